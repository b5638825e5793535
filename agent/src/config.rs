//! `/etc/keel/agent.toml`: every key optional, every default usable on a keel-booted system.
//!
//! ```toml
//! # Where to listen. The Unix socket is always on unless set to "".
//! unix = "/run/keel/agent.sock"
//! tcp = "0.0.0.0:7447"          # off by default; TLS 1.3 with the identity below
//! vsock_port = 7447             # off by default
//!
//! trusted_keys = "/etc/keel/trusted.pem"   # one or more PEM public keys
//! identity = "/var/lib/keel/identity.pem"  # the agent's own key for TLS, made on first
//!                                          # start (public half beside it as .pub); used
//!                                          # only with tcp. Keep it on storage that
//!                                          # survives a reboot, or clients see a new key.
//! run_dir = "/run/keel"                    # initstage's mounts and boot.json
//! # newimg_dir, img_dir, boot_report default to <run_dir>/newimg, <run_dir>/img,
//! # <run_dir>/boot.json.
//! # name = "appliance"          # product name; default: the booted image's name
//! # image = "root-squashfs.img" # image file name; default: from boot.json
//!
//! idle_timeout_secs = 30        # drop a peer silent this long
//! max_connections = 16          # per pool (local Unix socket; remote TCP + vsock): more are "busy"
//! max_connections_per_peer = 4  # remote connections from one IP address or vsock CID
//! max_session_secs = 300        # a remote connection is closed between requests after this
//! # announce = "vsock://2:7448" # say "ready" to the host once listening
//! # reboot_command = "systemctl reboot"  # default: `systemctl reboot` under systemd,
//!                                        # `reboot` under OpenRC, else sync + reboot(2)
//!
//! # Remote execution and remote control by key; off when the table is absent.
//! [exec]
//! enabled = true
//! authorized_keys = "/etc/keel/authorized.pem"  # PEM public keys that may exec and control
//! allowed_cids = [2]            # vsock peers that may exec (2 = the host)
//! trust_host_cid = false        # true: the host CID needs no key (as Kata's agent)
//! max_processes = 16            # processes running at once
//! max_file_bytes = 4294967296   # largest file keelctl cp moves
//! grace_secs = 60               # a process that lost its client waits this long for attach
//!
//! # Pulling signed updates from a channel (`keelctl publish`); off when absent.
//! [pull]
//! url = "https://updates.example/appliance" # the channel's base URL (http:// too)
//! # ca_file = "/etc/keel/pull-ca.pem"  # trusted for https besides the system's roots
//! # client_cert = "/etc/keel/device.pem" # shown to servers that check devices (mTLS),
//! # client_key = "/etc/keel/device.key" # with its key
//! interval_secs = 3600          # between polls
//! # jitter_secs = 360           # up to this much more at random (default: a tenth)
//! timeout_secs = 30             # per request, and per read of a body
//! reboot = "never"              # or "staged" (at once), "window 02:00-04:00" (UTC)
//! # [pull.s3]                   # a private S3 bucket: url = "https://HOST/BUCKET/PREFIX"
//! # access_key_id = "GK…"
//! # secret_access_key_file = "/etc/keel/s3.secret"
//! # region = "us-east-1"        # as the store names itself (Garage: "garage")
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;

/// The default config file.
pub const DEFAULT_CONFIG: &str = "/etc/keel/agent.toml";
/// The default Unix socket.
pub const DEFAULT_UNIX: &str = "/run/keel/agent.sock";
/// The default identity key.
pub const DEFAULT_IDENTITY: &str = "/var/lib/keel/identity.pem";
/// The default TCP/vsock port.
pub const DEFAULT_PORT: u16 = 7447;

/// The agent's settings after file and flags are merged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket path; empty disables it.
    pub unix: String,
    /// TCP address to listen on, `HOST:PORT`.
    pub tcp: Option<String>,
    /// vsock port to listen on (any CID).
    pub vsock_port: Option<u32>,
    /// PEM file of trusted public keys.
    pub trusted_keys: PathBuf,
    /// The agent's own private key, for TLS on TCP (made when missing).
    pub identity: PathBuf,
    /// initstage's run directory.
    pub run_dir: PathBuf,
    /// Where `newimg` is mounted.
    pub newimg_dir: Option<PathBuf>,
    /// Where `img` is mounted (the boot state lives there).
    pub img_dir: Option<PathBuf>,
    /// initstage's report.
    pub boot_report: Option<PathBuf>,
    /// Product name images must carry.
    pub name: Option<String>,
    /// Image file name.
    pub image: Option<String>,
    /// Seconds a peer may stay silent.
    pub idle_timeout_secs: u64,
    /// Concurrent connections served, per pool: the local Unix socket has its own, so remote
    /// peers can never starve local root's control requests.
    pub max_connections: usize,
    /// Concurrent remote connections from one IP address (TCP) or CID (vsock).
    pub max_connections_per_peer: usize,
    /// Seconds a remote connection may live: closed before its next request after this (a
    /// push in progress is not cut).
    pub max_session_secs: u64,
    /// Endpoint to announce readiness to (`vsock://CID:PORT` or `tcp://HOST:PORT`).
    pub announce: Option<String>,
    /// Run this (through `/bin/sh -c`) to reboot instead of sync + reboot(2).
    pub reboot_command: Option<String>,
    /// Remote execution and control by key (`[exec]`); absent: off.
    pub exec: Option<ExecConfig>,
    /// Pulling updates from a channel (`[pull]`); absent: off.
    pub pull: Option<PullConfig>,
    /// keel as PID 1 (`[init]`): what follows the image's program.
    pub init: crate::init::InitConfig,
}

/// The `[pull]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PullConfig {
    /// The channel's base URL (`http://HOST[:PORT]/PATH`), as `keelctl publish` wrote it.
    pub url: String,
    /// Seconds between polls.
    pub interval_secs: u64,
    /// Each wait is the interval plus up to this many seconds at random (default a tenth of
    /// the interval), so a fleet does not poll in lock-step.
    pub jitter_secs: Option<u64>,
    /// Seconds any one request may take, connect to last byte of the headers, and any read
    /// of the body may wait.
    pub timeout_secs: u64,
    /// PEM certificates trusted for `https://` besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain shown to servers that ask for one (mTLS); with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Credentials of a private S3 bucket (`[pull.s3]`): requests to the channel's own host
    /// are signed (SigV4).
    pub s3: Option<S3Config>,
    /// When a pulled image is booted ([`crate::reboot_policy::RebootPolicy::parse`]).
    pub reboot: String,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            url: String::new(),
            interval_secs: 3600,
            jitter_secs: None,
            timeout_secs: 30,
            ca_file: None,
            client_cert: None,
            client_key: None,
            s3: None,
            reboot: "never".into(),
        }
    }
}

/// The `[pull.s3]` table: a private bucket's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The access key id.
    pub access_key_id: String,
    /// A file holding the secret key (its first line), readable by the agent alone.
    pub secret_access_key_file: PathBuf,
    /// The region the store names in its signatures.
    #[serde(default = "default_region")]
    pub region: String,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// The `[exec]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Whether `exec` is served at all (the keys still authorize remote control when off).
    pub enabled: bool,
    /// PEM public keys that may exec and control.
    pub authorized_keys: PathBuf,
    /// vsock CIDs that may exec.
    pub allowed_cids: Vec<u32>,
    /// A vsock peer with the host's CID (2) is authorized without a key.
    pub trust_host_cid: bool,
    /// Processes running at once; more are `busy`.
    pub max_processes: usize,
    /// Largest file `cp` moves in either direction.
    pub max_file_bytes: u64,
    /// Seconds a process whose client was lost keeps running for a re-attach before it is
    /// killed with its group (detached processes are not).
    pub grace_secs: u64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            enabled: false,
            authorized_keys: "/etc/keel/authorized.pem".into(),
            allowed_cids: vec![2],
            trust_host_cid: false,
            max_processes: 16,
            max_file_bytes: 4 << 30,
            grace_secs: 60,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            unix: DEFAULT_UNIX.into(),
            tcp: None,
            vsock_port: None,
            trusted_keys: "/etc/keel/trusted.pem".into(),
            identity: DEFAULT_IDENTITY.into(),
            run_dir: "/run/keel".into(),
            newimg_dir: None,
            img_dir: None,
            boot_report: None,
            name: None,
            image: None,
            idle_timeout_secs: 30,
            max_connections: 16,
            max_connections_per_peer: 4,
            max_session_secs: 300,
            announce: None,
            reboot_command: None,
            exec: None,
            pull: None,
            init: Default::default(),
        }
    }
}

impl Config {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, Error> {
        let c: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: origin.to_path_buf(),
            detail: e.to_string().trim_end().to_string(),
        })?;
        c.check(origin)?;
        Ok(c)
    }

    /// Reads `path`; a missing file is the defaults only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<Config, Error> {
        match std::fs::read_to_string(path) {
            Ok(t) => Config::parse(&t, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::Io {
                op: "read config",
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }

    /// Rejects values that cannot work.
    pub fn check(&self, origin: &Path) -> Result<(), Error> {
        let bad = |detail: String| {
            Err(Error::Config {
                path: origin.to_path_buf(),
                detail,
            })
        };
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if self.max_connections_per_peer == 0 {
            return bad("max_connections_per_peer must be at least 1".into());
        }
        if self.max_session_secs == 0 {
            return bad("max_session_secs must be at least 1".into());
        }
        if self.idle_timeout_secs == 0 {
            return bad("idle_timeout_secs must be at least 1".into());
        }
        if let Some(i) = &self.image {
            if !keel_proto::layout::valid_image_name(i) {
                return bad(format!("image {i:?} is not a plain file name"));
            }
        }
        if let Some(a) = &self.announce {
            if !(a.starts_with("vsock://") || a.starts_with("tcp://")) {
                return bad(format!(
                    "announce {a:?} must be vsock://CID:PORT or tcp://HOST:PORT"
                ));
            }
        }
        if let Some(p) = &self.pull {
            if let Err(e) = crate::http::parse_url(&p.url) {
                return bad(format!("[pull] url: {e} (the channel's base URL)"));
            }
            if let Err(e) = crate::reboot_policy::RebootPolicy::parse(&p.reboot) {
                return bad(format!("[pull] {e}"));
            }
            if p.client_cert.is_some() != p.client_key.is_some() {
                return bad("[pull] client_cert and client_key go together".into());
            }
            if p.s3
                .as_ref()
                .is_some_and(|s| s.access_key_id.is_empty() || s.region.is_empty())
            {
                return bad("[pull.s3] access_key_id and region must not be empty".into());
            }
            if p.interval_secs == 0 || p.timeout_secs == 0 {
                return bad("[pull] interval_secs and timeout_secs must be at least 1".into());
            }
        }
        if self.exec.as_ref().is_some_and(|e| e.max_processes == 0) {
            return bad("[exec] max_processes must be at least 1".into());
        }
        if self.unix.is_empty() && self.tcp.is_none() && self.vsock_port.is_none() {
            return bad("no listener: set unix, tcp or vsock_port".into());
        }
        Ok(())
    }

    /// Where `newimg` is mounted.
    pub fn newimg_dir(&self) -> PathBuf {
        self.newimg_dir
            .clone()
            .unwrap_or_else(|| self.run_dir.join("newimg"))
    }

    /// Where `img` is mounted.
    pub fn img_dir(&self) -> PathBuf {
        self.img_dir
            .clone()
            .unwrap_or_else(|| self.run_dir.join("img"))
    }

    /// initstage's report.
    pub fn boot_report(&self) -> PathBuf {
        self.boot_report
            .clone()
            .unwrap_or_else(|| self.run_dir.join("boot.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: &str) -> Result<Config, Error> {
        Config::parse(t, Path::new("agent.toml"))
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = p("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.newimg_dir(), Path::new("/run/keel/newimg"));
        assert_eq!(c.boot_report(), Path::new("/run/keel/boot.json"));
    }

    #[test]
    fn every_key_parses() {
        let c = p(r#"
            unix = "/tmp/a.sock"
            tcp = "127.0.0.1:1"
            vsock_port = 9
            trusted_keys = "/k.pem"
            identity = "/i.pem"
            run_dir = "/r"
            newimg_dir = "/n"
            img_dir = "/i"
            boot_report = "/b.json"
            name = "appliance"
            image = "rootfs.erofs"
            idle_timeout_secs = 5
            max_connections = 2
            max_connections_per_peer = 1
            max_session_secs = 60
            announce = "tcp://127.0.0.1:2"
            reboot_command = "systemctl reboot"
            [exec]
            enabled = true
            authorized_keys = "/a.pem"
            allowed_cids = [2, 3]
            trust_host_cid = true
            max_processes = 4
        "#)
        .unwrap();
        let e = c.exec.clone().unwrap();
        assert!(e.enabled && e.trust_host_cid);
        assert_eq!((e.allowed_cids, e.max_processes), (vec![2, 3], 4));
        assert_eq!(c.vsock_port, Some(9));
        assert_eq!(c.newimg_dir(), Path::new("/n"));
        assert_eq!(c.img_dir(), Path::new("/i"));
    }

    #[test]
    fn mistakes_are_named() {
        let e = p("tpc = \"x\"").unwrap_err().to_string();
        assert!(e.contains("agent.toml") && e.contains("tpc"), "{e}");
        let e = p("max_connections = 0").unwrap_err().to_string();
        assert!(e.contains("max_connections"), "{e}");
        let e = p("image = \"../x\"").unwrap_err().to_string();
        assert!(e.contains("plain file name"), "{e}");
        let e = p("announce = \"udp://x\"").unwrap_err().to_string();
        assert!(e.contains("announce"), "{e}");
        let e = p("unix = \"\"").unwrap_err().to_string();
        assert!(e.contains("no listener"), "{e}");
        let e = p("[exec]\nmax_processes = 0").unwrap_err().to_string();
        assert!(e.contains("max_processes"), "{e}");
        let e = p("[exec]\nenable = true").unwrap_err().to_string();
        assert!(e.contains("enable"), "{e}");
        let e = p("idle_timeout_secs = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("idle_timeout_secs"), "{e}");
        let e = p("[pull]\nurl = \"ftp://h/c\"").unwrap_err().to_string();
        assert!(e.contains("http://"), "{e}");
        let e = p("[pull]\nurl = \"http://h/c\"\ninterval_secs = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("interval_secs"), "{e}");
        let c = p("[pull]\nurl = \"http://h/c\"").unwrap();
        let pull = c.pull.unwrap();
        assert_eq!(
            (pull.interval_secs, pull.jitter_secs, pull.timeout_secs),
            (3600, None, 30)
        );
        let e = p("[pull]\nurl = \"https://h/c\"\nclient_cert = \"/c.pem\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("go together"), "{e}");
        let e = p("[pull]\nurl = \"http://h/b/c\"\n[pull.s3]\naccess_key_id = \"GK1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret_access_key_file"), "{e}");
        let c = p("[pull]\nurl = \"http://h/b/c\"\n[pull.s3]\naccess_key_id = \"GK1\"\nsecret_access_key_file = \"/s\"")
            .unwrap();
        assert_eq!(c.pull.unwrap().s3.unwrap().region, "us-east-1");
    }
}
