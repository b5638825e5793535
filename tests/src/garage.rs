//! Garage (crates.io's S3-compatible distributed object store, `make garage` installs it),
//! started by a test as a one-node cluster on 127.0.0.1: a private bucket, an access key
//! allowed to read and write it, and objects uploaded with `curl --aws-sigv4` (an S3 client
//! that is not keel's, so the agent's signatures are checked against a second
//! implementation's).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::nginx::Nginx;

/// The region the test cluster names in its signatures.
pub const REGION: &str = "garage";
/// The bucket the tests use.
pub const BUCKET: &str = "keel";

/// A running one-node Garage; killed on drop.
#[derive(Debug)]
pub struct Garage {
    child: Child,
    conf: PathBuf,
    bin: PathBuf,
    /// The S3 API's port on 127.0.0.1.
    pub port: u16,
    /// An access key allowed to read and write [`BUCKET`].
    pub key_id: String,
    /// Its secret.
    pub secret: String,
}

/// The `garage` binary: `$KEEL_GARAGE`, else on `PATH`; `None` (with a note) when missing,
/// a failure under CI (`KEEL_REQUIRE_ROOT`), which must run the S3 tests.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_GARAGE") {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("KEEL_REQUIRE_ROOT").is_none(),
            "garage is not installed: run `make garage`"
        );
        eprintln!("skipping: garage is not installed (`make garage`)");
    }
    found
}

fn run(bin: &Path, conf: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("garage")
}

fn ok(bin: &Path, conf: &Path, args: &[&str]) -> String {
    let out = run(bin, conf, args);
    assert!(out.status.success(), "garage {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Garage {
    /// Starts `bin` with its metadata, data and log in `dir`, lays out the one node, makes
    /// [`BUCKET`] and a key that may read and write it.
    pub fn start(bin: &Path, dir: &Path) -> Garage {
        fs::create_dir_all(dir).unwrap();
        let (rpc, port) = (Nginx::free_port(), Nginx::free_port());
        let d = dir.display();
        let conf = dir.join("garage.toml");
        fs::write(
            &conf,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{}\"\n[s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{port}\"\n",
                "5eed".repeat(16)
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("garage.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("garage server");
        let t0 = Instant::now();
        let id = loop {
            let out = run(bin, &conf, &["node", "id", "-q"]);
            if out.status.success() {
                let s = String::from_utf8_lossy(&out.stdout);
                break s.trim().split('@').next().unwrap_or("").to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "garage did not start: {}",
                fs::read_to_string(dir.join("garage.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        ok(
            bin,
            &conf,
            &["layout", "assign", "-z", "dc1", "-c", "1G", &id],
        );
        ok(bin, &conf, &["layout", "apply", "--version", "1"]);
        ok(bin, &conf, &["bucket", "create", BUCKET]);
        let key = ok(bin, &conf, &["key", "create", "device"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {key}"))
        };
        let (key_id, secret) = (field("Key ID:"), field("Secret key:"));
        ok(
            bin,
            &conf,
            &[
                "bucket", "allow", "--read", "--write", BUCKET, "--key", "device",
            ],
        );
        let g = Garage {
            child,
            conf,
            bin: bin.to_path_buf(),
            port,
            key_id,
            secret,
        };
        while std::net::TcpStream::connect(("127.0.0.1", g.port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "no S3 API");
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    /// The URL of `path` in the bucket (path-style).
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{BUCKET}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// Uploads `file` as `path` in the bucket with `curl --aws-sigv4`.
    pub fn put(&self, file: &Path, path: &str) {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--aws-sigv4"])
            .arg(format!("aws:amz:{REGION}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", self.key_id, self.secret))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T"])
            .arg(file)
            .arg(self.url(path))
            .output()
            .expect("curl");
        assert!(out.status.success(), "upload of {path}: {out:?}");
    }

    /// Uploads a channel folder written by `keelctl publish` under `prefix`: the images
    /// first, the manifest last (as an operator must).
    pub fn put_channel(&self, channel: &Path, prefix: &str) {
        for e in fs::read_dir(channel.join("images")).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            self.put(&e.path(), &format!("{prefix}/images/{name}"));
        }
        self.put(
            &channel.join("manifest.json"),
            &format!("{prefix}/manifest.json"),
        );
    }

    /// `garage` with this cluster's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(&self.bin, &self.conf, args)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
