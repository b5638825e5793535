//! `keelctl`: keys, signing, and talking to keel-agent over TCP, Unix sockets, vsock and
//! hybrid vsock.

use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use keel_agent::client::{self, Client, Endpoint, Pushed};
use keel_proto::hex;
use keel_proto::manifest::{
    public_key_to_pem, public_keys_from_pem, signing_key_from_pem, signing_key_to_pem, Manifest,
    SignedManifest, SigningKey, MANIFEST_FORMAT,
};
use keel_proto::message::{parse_response, Announce, Request, Response, StatusReport};
use sha2::{Digest, Sha256};

/// keel's host-side tool.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Agent endpoint: tcp://HOST:PORT, unix:///PATH, vsock://CID:PORT, hvsock:///PATH:PORT.
    #[arg(
        long,
        short = 'e',
        env = "KEEL_ENDPOINT",
        default_value = "unix:///run/keel/agent.sock",
        global = true
    )]
    endpoint: String,
    /// Seconds any single read or write may take.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    /// Seconds to keep retrying the connection (the agent or guest may not listen yet).
    #[arg(long, default_value_t = 10, global = true)]
    wait: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Makes an ed25519 key pair: KEY (PKCS#8 PEM, mode 0600) and KEY.pub (SPKI PEM).
    Keygen {
        /// Private key file to write.
        key: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Writes the signed manifest of IMAGE (default: IMAGE.manifest).
    Sign {
        /// The image file.
        image: PathBuf,
        /// Private key (PEM, as `openssl genpkey -algorithm ed25519` writes).
        #[arg(long)]
        key: PathBuf,
        /// Product name.
        #[arg(long)]
        name: String,
        /// Image version (a positive integer, higher is newer).
        #[arg(long)]
        version: u64,
        /// Devices must run at least this version to install it.
        #[arg(long)]
        min_version: Option<u64>,
        /// Creation time (Unix seconds; default now).
        #[arg(long)]
        created: Option<u64>,
        /// Output file.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Checks a manifest's signature and, with the image, its size and digest.
    Verify {
        /// The image file (its manifest defaults to IMAGE.manifest).
        image: PathBuf,
        /// Trusted public keys (PEM; several blocks allowed).
        #[arg(long)]
        keys: PathBuf,
        /// The manifest file.
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Sends IMAGE to the agent, which verifies and stages it; resumes after a cut.
    Push {
        /// The image file (its manifest defaults to IMAGE.manifest).
        image: PathBuf,
        /// The manifest file.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Reconnect and resume this many times after a lost connection.
        #[arg(long, default_value_t = 5)]
        retries: u32,
    },
    /// Shows what the device runs, holds and did.
    Status {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ends the booted image's trial (root on the device's Unix socket).
    MarkGood,
    /// Reboots the device (root on the device's Unix socket).
    Reboot,
    /// Builds an initramfs: initstage as /init, kernel modules with their dependencies, keys.
    Initramfs {
        /// The static initstage binary.
        #[arg(long)]
        init: PathBuf,
        /// A kernel's lib/modules/<version> directory (with modules.dep).
        #[arg(long)]
        kernel_modules: Option<PathBuf>,
        /// Modules to include (comma-separated; dependencies are added).
        #[arg(long, value_delimiter = ',')]
        modules: Vec<String>,
        /// Trusted public keys (PEM) for /etc/keel/trusted.pem.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Extra file, SRC:PATH-IN-INITRAMFS (repeatable).
        #[arg(long = "file")]
        files: Vec<String>,
        /// Output (gzip-compressed cpio newc).
        #[arg(long, short = 'o')]
        out: PathBuf,
    },
    /// Listens on tcp://HOST:PORT or unix:///PATH for an agent's ready announce and prints it.
    WaitReady {
        /// Where to listen.
        listen: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        within: u64,
    },
}

fn main() {
    let args = Args::parse();
    if std::env::var_os("KEEL_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_target(false)
            .init();
    }
    if let Err(e) = run(args) {
        eprintln!("keelctl: {e:#}");
        std::process::exit(1);
    }
}

fn endpoint(a: &Args) -> anyhow::Result<Endpoint> {
    Ok(a.endpoint.parse::<Endpoint>()?)
}

fn connect(a: &Args) -> anyhow::Result<Client> {
    let ep = endpoint(a)?;
    Ok(Client::connect(
        &ep,
        Duration::from_secs(a.wait),
        Duration::from_secs(a.timeout),
    )?)
}

fn manifest_path(image: &Path, m: &Option<PathBuf>) -> PathBuf {
    m.clone().unwrap_or_else(|| {
        let mut s = image.as_os_str().to_owned();
        s.push(".manifest");
        s.into()
    })
}

fn read_manifest(p: &Path) -> anyhow::Result<SignedManifest> {
    let b = fs::read(p).with_context(|| format!("read manifest {}", p.display()))?;
    SignedManifest::from_json(&b).with_context(|| format!("manifest {}", p.display()))
}

fn hash_file(p: &Path) -> anyhow::Result<(u64, String)> {
    let mut f = fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("read {}", p.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(&h.finalize())))
}

fn run(a: Args) -> anyhow::Result<()> {
    match &a.cmd {
        Cmd::Keygen { key, force } => keygen(key, *force),
        Cmd::Sign {
            image,
            key,
            name,
            version,
            min_version,
            created,
            out,
        } => {
            let pem =
                fs::read_to_string(key).with_context(|| format!("read key {}", key.display()))?;
            let sk =
                signing_key_from_pem(&pem).with_context(|| format!("key {}", key.display()))?;
            let (size, sha256) = hash_file(image)?;
            let created = created.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            });
            let m = Manifest {
                format: MANIFEST_FORMAT,
                name: name.clone(),
                version: *version,
                size,
                sha256,
                created,
                min_version: *min_version,
            };
            m.validate()?;
            let signed = m.sign(&sk);
            let out = manifest_path(image, out);
            fs::write(&out, signed.to_json())
                .with_context(|| format!("write {}", out.display()))?;
            println!(
                "signed {} version {} ({} bytes) -> {}",
                signed.manifest.name,
                signed.manifest.version,
                signed.manifest.size,
                out.display()
            );
            Ok(())
        }
        Cmd::Verify {
            image,
            keys,
            manifest,
        } => {
            let pem = fs::read_to_string(keys)
                .with_context(|| format!("read keys {}", keys.display()))?;
            let keys = public_keys_from_pem(&pem)?;
            let mp = manifest_path(image, manifest);
            let signed = read_manifest(&mp)?;
            signed
                .verify(&keys)
                .with_context(|| format!("manifest {}", mp.display()))?;
            let (size, sha) = hash_file(image)?;
            if size != signed.manifest.size {
                bail!(
                    "{} is {size} bytes, its manifest says {}",
                    image.display(),
                    signed.manifest.size
                );
            }
            if !sha.eq_ignore_ascii_case(&signed.manifest.sha256) {
                bail!(
                    "{} hashes to {sha}, its manifest says {}",
                    image.display(),
                    signed.manifest.sha256
                );
            }
            println!(
                "ok: {} version {} signed by a trusted key, {} bytes, sha256 {}",
                signed.manifest.name, signed.manifest.version, size, sha
            );
            Ok(())
        }
        Cmd::Push {
            image,
            manifest,
            retries,
        } => {
            let ep = endpoint(&a)?;
            let signed = read_manifest(&manifest_path(image, manifest))?;
            let mut bar = Progress::new(signed.manifest.version);
            let r = client::push(
                &ep,
                &signed,
                image,
                *retries,
                Duration::from_secs(a.timeout),
                &mut |d, t| bar.update(d, t),
            );
            bar.end();
            match r? {
                Pushed::Staged {
                    version,
                    sent,
                    attempts,
                } => {
                    println!(
                        "staged version {version} on {ep} ({sent} bytes sent{}); it is installed at the next boot",
                        if attempts > 1 {
                            format!(", {attempts} connections")
                        } else {
                            String::new()
                        }
                    );
                }
                Pushed::UpToDate(m) => println!("nothing to do: {m}"),
            }
            Ok(())
        }
        Cmd::Status { json } => {
            let mut c = connect(&a)?;
            match c.expect(&Request::Status)? {
                Response::Status(s) => {
                    if *json {
                        println!("{}", serde_json::to_string_pretty(&s)?);
                    } else {
                        print_status(&s);
                    }
                    Ok(())
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Cmd::MarkGood | Cmd::Reboot => {
            let req = if matches!(a.cmd, Cmd::MarkGood) {
                Request::MarkGood
            } else {
                Request::Reboot
            };
            let mut c = connect(&a)?;
            match c.expect(&req)? {
                Response::Done { message } => {
                    println!("{message}");
                    Ok(())
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Cmd::Initramfs {
            init,
            kernel_modules,
            modules,
            keys,
            files,
            out,
        } => {
            let mut extra = Vec::new();
            for f in files {
                let (src, dst) = f
                    .split_once(':')
                    .with_context(|| format!("--file {f:?}: expected SRC:PATH"))?;
                extra.push((PathBuf::from(src), dst.to_string()));
            }
            let spec = keel_agent::initramfs::Spec {
                init: init.clone(),
                kernel_modules: kernel_modules.clone(),
                modules: modules.clone(),
                keys: keys.clone(),
                files: extra,
            };
            let packed = keel_agent::initramfs::build(&spec, out)?;
            let size = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
            println!(
                "wrote {} ({size} bytes): {} module file(s){}{}",
                out.display(),
                packed.modules.len(),
                if packed.modules.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", packed.modules.join(" "))
                },
                if packed.builtin.is_empty() {
                    String::new()
                } else {
                    format!("; built in: {}", packed.builtin.join(" "))
                }
            );
            Ok(())
        }
        Cmd::WaitReady { listen, within } => wait_ready(listen, Duration::from_secs(*within)),
    }
}

fn keygen(key: &Path, force: bool) -> anyhow::Result<()> {
    let mut pubp = key.as_os_str().to_owned();
    pubp.push(".pub");
    let pubp = PathBuf::from(pubp);
    for p in [key, &pubp] {
        if p.exists() && !force {
            bail!(
                "{} exists: refusing to overwrite a key (use --force)",
                p.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("read /dev/urandom")?;
    let sk = SigningKey::from_bytes(&seed);
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key)
        .with_context(|| format!("create {}", key.display()))?;
    f.write_all(signing_key_to_pem(&sk).as_bytes())
        .with_context(|| format!("write {}", key.display()))?;
    fs::write(&pubp, public_key_to_pem(&sk.verifying_key()))
        .with_context(|| format!("write {}", pubp.display()))?;
    println!(
        "wrote {} (private, 0600) and {} (public)",
        key.display(),
        pubp.display()
    );
    Ok(())
}

fn print_status(s: &StatusReport) {
    let rec = |r: &keel_proto::bootstate::ImageRecord| {
        format!(
            "{} version {} ({} bytes, sha256 {})",
            r.name,
            r.version,
            r.size,
            r.sha256.get(..12).unwrap_or("?")
        )
    };
    println!("agent        {}", s.agent_version);
    println!("image file   {}", s.image_file);
    println!(
        "booted       {}",
        s.booted
            .as_ref()
            .map(rec)
            .unwrap_or_else(|| "unknown (no boot report)".into())
    );
    match (&s.trial, s.tries_left) {
        (Some(t), left) => println!(
            "trial        on trial: boot {} of {}{}",
            t.used,
            t.tries,
            left.map(|l| format!(", {l} left")).unwrap_or_default()
        ),
        (None, _) => println!("trial        not on trial"),
    }
    println!(
        "staged       {}",
        s.staged.as_ref().map(rec).unwrap_or_else(|| "none".into())
    );
    if let Some(p) = &s.partial {
        println!(
            "partial      version {}: {} of {} bytes (push again to resume)",
            p.version, p.received, p.size
        );
    }
    println!(
        "old          {}",
        s.old.as_ref().map(rec).unwrap_or_else(|| "none".into())
    );
    if let Some(f) = s.newimg_free {
        println!("newimg free  {:.1} MiB", f as f64 / (1 << 20) as f64);
    }
    if s.push_in_progress {
        println!("push         in progress");
    }
    for a in &s.boot_actions {
        println!("this boot    {a}");
    }
    if let Some(e) = s.events.last() {
        println!("last event   boot {}: {:?}: {}", e.boot, e.kind, e.detail);
    }
}

/// Polls a non-blocking `accept` until a peer comes or `within` passes.
fn accept_within<S>(
    listen: &str,
    within: Duration,
    mut accept: impl FnMut() -> std::io::Result<S>,
) -> anyhow::Result<S> {
    let deadline = Instant::now() + within;
    loop {
        match accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).with_context(|| format!("accept on {listen}")),
        }
        if Instant::now() > deadline {
            bail!(
                "no ready announce on {listen} within {} s",
                within.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_ready(listen: &str, within: Duration) -> anyhow::Result<()> {
    let read_timeout = Some(Duration::from_secs(10));
    let mut stream: Box<dyn Read> = if let Some(a) = listen.strip_prefix("tcp://") {
        let l = std::net::TcpListener::bind(a).with_context(|| format!("listen on {listen}"))?;
        l.set_nonblocking(true)?;
        let s = accept_within(listen, within, || l.accept().map(|(s, _)| s))?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(read_timeout)?;
        Box::new(s)
    } else if let Some(p) = listen.strip_prefix("unix://") {
        let _ = fs::remove_file(p);
        let l = std::os::unix::net::UnixListener::bind(p)
            .with_context(|| format!("listen on {listen}"))?;
        l.set_nonblocking(true)?;
        let s = accept_within(listen, within, || l.accept().map(|(s, _)| s))?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(read_timeout)?;
        Box::new(s)
    } else {
        bail!("wait-ready listens on tcp://HOST:PORT or unix:///PATH, not {listen:?}");
    };
    let body = client::read_frame(&mut stream, listen)?;
    // The announce is a message frame like a response.
    let json = body.get(1..).unwrap_or_default();
    let ann: Announce = serde_json::from_slice(json).with_context(|| {
        format!(
            "announce is not a ready message: {:?}",
            parse_response(&body).err()
        )
    })?;
    println!("{}", serde_json::to_string(&ann)?);
    Ok(())
}

/// Push progress: a bar with rate and ETA on a terminal, a line per 10 % otherwise.
struct Progress {
    tty: bool,
    start: Instant,
    first: Option<u64>,
    last_draw: Option<Instant>,
    last_decile: u64,
    version: u64,
    drew: bool,
}

impl Progress {
    fn new(version: u64) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            first: None,
            last_draw: None,
            last_decile: 0,
            version,
            drew: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        let first = *self.first.get_or_insert(done);
        if done < first {
            self.first = Some(done);
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = (done.saturating_sub(self.first.unwrap_or(0))) as f64 / secs;
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mib = |b: f64| b / (1 << 20) as f64;
        if self.tty {
            let now = Instant::now();
            if done < total
                && self
                    .last_draw
                    .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
            {
                return;
            }
            self.last_draw = Some(now);
            let eta = if rate > 0.0 {
                format!("{:.0}s", (total - done) as f64 / rate)
            } else {
                "?".into()
            };
            let filled = (pct / 4) as usize;
            eprint!(
                "\rv{} [{}{}] {:3}% {:7.1} MiB/s ETA {:>5}",
                self.version,
                "#".repeat(filled),
                "-".repeat(25 - filled.min(25)),
                pct,
                mib(rate),
                eta
            );
            self.drew = true;
        } else {
            let decile = pct / 10;
            if decile > self.last_decile || done == total && !self.drew {
                self.last_decile = decile;
                self.drew = true;
                eprintln!(
                    "pushed {pct}% ({done} of {total} bytes, {:.1} MiB/s)",
                    mib(rate)
                );
            }
        }
    }

    fn end(&self) {
        if self.tty && self.drew {
            eprintln!();
        }
    }
}
