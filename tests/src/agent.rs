//! A real keel-agent process for the integration tests: its world (newimg, img, boot report,
//! trusted keys in temporary directories), its start with a generated agent.toml, clients.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_proto::bootstate::{BootState, ImageRecord, Trial};
use keel_proto::manifest::{public_key_to_pem, SignedManifest};
use keel_proto::message::{ErrorCode, Request, Response};
use keel_proto::report::BootReport;
use keelctl::client::{self, Client, Dial, Pushed};
use keelctl::error::Error as ClientError;
use keelctl::known::Trust;
use keelctl::Endpoint;

use crate::*;

pub const T: Duration = Duration::from_secs(20);

/// A running agent and where it listens.
#[derive(Debug)]
pub struct Agent {
    pub child: Child,
    pub tcp: Endpoint,
    pub unix: Endpoint,
    pub log: PathBuf,
    /// The agent's TLS identity (its private key; `.pub` beside it).
    pub identity: PathBuf,
}

impl Agent {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How the tests reach this agent: its TLS key pinned.
    pub fn dial(&self) -> Dial {
        Dial {
            wait: Duration::from_secs(5),
            timeout: T,
            trust: Trust::pinned_from_file(&self.identity_pub()).unwrap(),
        }
    }

    /// The public half of the agent's identity, as `--agent-key` takes it.
    pub fn identity_pub(&self) -> PathBuf {
        let mut p = self.identity.clone().into_os_string();
        p.push(".pub");
        p.into()
    }

    pub fn client(&self, ep: &Endpoint) -> Client {
        Client::connect(ep, &self.dial()).unwrap()
    }

    /// Pushes `img` with `m` to `ep` (one of this agent's endpoints, or a relay to one).
    pub fn push(
        &self,
        ep: &Endpoint,
        img: &Path,
        m: &SignedManifest,
    ) -> Result<Pushed, ClientError> {
        client::push(
            ep,
            &self.dial(),
            m,
            img,
            client::Offer::FULL,
            0,
            &mut |_, _| {},
        )
    }

    /// Opens a TCP connection and asks to push `m`: the connection and the agent's answer.
    pub fn begin_push(&self, m: &SignedManifest, resume: bool) -> (Client, Response) {
        let mut cl = self.client(&self.tcp);
        let r = cl
            .call(&Request::Push {
                manifest: m.clone(),
                resume,
                delta: false,
            })
            .unwrap();
        (cl, r)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The world an agent sees: newimg mounted, img and the boot report in plain directories.
#[derive(Debug)]
pub struct World {
    pub newimg: PathBuf,
    pub img: PathBuf,
    pub etc: PathBuf,
}

pub fn record(name: &str, version: u64, sha: &str, size: u64) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        version,
        sha256: sha.into(),
        size,
    }
}

pub fn world(sb: &mut Sandbox, newimg: &Path, booted: u64) -> World {
    let img = sb.fresh("img");
    let etc = sb.fresh("etc");
    fs::create_dir_all(&img).unwrap();
    fs::create_dir_all(&etc).unwrap();
    let rec = record("demo", booted, &"11".repeat(32), 4096);
    let report = BootReport {
        initstage_version: "test".into(),
        image_file: "root-squashfs.img".into(),
        booted: rec.clone(),
        image_fstype: "squashfs".into(),
        trial: Some(Trial { tries: 3, used: 1 }),
        tries_left: Some(2),
        boot_count: 7,
        partitions: vec![],
        upper: "partition".into(),
        actions: vec!["promoted".into()],
        run_dir: "/run/keel".into(),
        verity: None,
        watchdog: None,
        persisted: Vec::new(),
    };
    fs::write(etc.join("boot.json"), report.to_json()).unwrap();
    let mut st = BootState {
        current: Some(rec),
        trial: Some(Trial { tries: 3, used: 1 }),
        ..BootState::default()
    };
    st.boot_count = 7;
    write_state(&img, &st);
    fs::write(
        etc.join("trusted.pem"),
        public_key_to_pem(&test_key().verifying_key()),
    )
    .unwrap();
    World {
        newimg: newimg.to_path_buf(),
        img,
        etc,
    }
}

pub fn start(w: &World, extra: &str) -> Agent {
    start_env(w, extra, &[])
}

pub fn start_env(w: &World, extra: &str, env: &[(&str, &Path)]) -> Agent {
    let sock = w.etc.join("agent.sock");
    let cfg = w.etc.join("agent.toml");
    fs::write(
        &cfg,
        format!(
            "unix = {:?}\ntcp = \"127.0.0.1:0\"\nidentity = {:?}\ntrusted_keys = {:?}\nnewimg_dir = {:?}\nimg_dir = {:?}\nboot_report = {:?}\n{extra}\n",
            sock,
            w.etc.join("identity.pem"),
            w.etc.join("trusted.pem"),
            w.newimg,
            w.img,
            w.etc.join("boot.json"),
        ),
    )
    .unwrap();
    let log = w.etc.join(format!(
        "agent-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let child = Command::new(bin("keel-agent"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The ready line names the TCP port the kernel picked.
    let t0 = Instant::now();
    let tcp = loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if let Some(i) = text.find("tcp://127.0.0.1:") {
            let rest = &text[i + 6..];
            let end = rest.find([' ', '\n', '"']).unwrap_or(rest.len());
            break rest[..end].to_string();
        }
        assert!(t0.elapsed() < T, "agent did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    Agent {
        child,
        tcp: Endpoint::Tcp(tcp),
        unix: Endpoint::Unix(sock),
        log,
        identity: w.etc.join("identity.pem"),
    }
}

/// A file of `mib` MiB of pseudo-random bytes.
pub fn image(sb: &mut Sandbox, mib: usize, seed: u64) -> PathBuf {
    let p = sb.fresh("image");
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(mib << 20);
    while v.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    fs::write(&p, v).unwrap();
    p
}

/// Staged image bytes and manifest, for byte-identity checks.
pub fn slot(w: &World) -> (Option<String>, Option<Vec<u8>>) {
    let img = w.newimg.join("root-squashfs.img");
    let m = fs::read(w.newimg.join("root-squashfs.img.manifest")).ok();
    (img.exists().then(|| sha256_file(&img)), m)
}

pub fn refused(r: Result<Pushed, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Runs keelctl. Each run gets a known-agents file of its own, so an agent key is trusted on
/// first use (agents of earlier tests may have had the same port with another key); the
/// tests of pinning and of remembered keys pass `--agent-key` or `--known-agents` themselves.
pub fn keelctl(args: &[&str]) -> std::process::Output {
    keelctl_with(&bin("keelctl"), &std::env::temp_dir(), args)
}

/// [`keelctl()`] with the binary `keelctl` and the per-run known-agents file under `dir`.
pub fn keelctl_with(keelctl: &Path, dir: &Path, args: &[&str]) -> std::process::Output {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let known = dir.join(format!("keel-known-agents-{}-{n}", std::process::id()));
    let out = Command::new(keelctl)
        .args(args)
        .env("KEEL_KNOWN_AGENTS", &known)
        .env_remove("KEEL_AGENT_KEY")
        .output()
        .unwrap();
    let _ = fs::remove_file(&known);
    out
}

pub fn with_newimg<T>(name: &str, size_mb: u64, f: impl FnOnce(&mut Sandbox, &Path) -> T) -> T {
    let mut sb = Sandbox::new(name);
    let disk = sb.disk(&[Part::new("newimg", size_mb)]);
    let mut sb2 = sb.files();
    let r = sb.with_partition(&disk, 1, |d| f(&mut sb2, d));
    sb.finish();
    r
}

pub fn status(a: &Agent) -> keel_proto::message::StatusReport {
    match a.client(&a.unix).expect(&Request::Status).unwrap() {
        Response::Status(s) => *s,
        other => panic!("{other:?}"),
    }
}

pub fn wait_for(mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < T, "condition not met in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A world for exec: newimg a plain directory, the host key `[43; 32]` authorized.
pub fn exec_world(sb: &mut Sandbox, name: &str) -> (World, keel_proto::manifest::SigningKey) {
    let newimg = sb.fresh(name);
    fs::create_dir_all(&newimg).unwrap();
    let w = world(sb, &newimg, 1);
    let host = keel_proto::manifest::SigningKey::from_bytes(&[43; 32]);
    fs::write(
        w.etc.join("authorized.pem"),
        public_key_to_pem(&host.verifying_key()),
    )
    .unwrap();
    (w, host)
}

/// The `[exec]` table that authorizes [`exec_world`]'s host key.
pub fn exec_config(w: &World) -> String {
    format!(
        "[exec]\nenabled = true\nauthorized_keys = {:?}\n",
        w.etc.join("authorized.pem")
    )
}
