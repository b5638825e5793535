//! The in-memory harness the protocol tests share: a device in temporary directories, a
//! client over `tokio::io::duplex`, images and manifests.
#![allow(dead_code)]

pub use std::fs;
pub use std::path::PathBuf;
pub use std::sync::Arc;
pub use std::time::Duration;

pub use keel_agent::config::Config;
pub use keel_agent::session;
pub use keel_agent::shared::Shared;
pub use keel_agent::transport::Peer;
pub use keel_proto::bootstate::{BootState, ImageRecord, Trial};
pub use keel_proto::hex;
pub use keel_proto::manifest::{Manifest, SignedManifest, SigningKey, MANIFEST_FORMAT};
pub use keel_proto::message::{
    data_header, message_frame, parse_response, ErrorCode, Request, Response,
};
pub use keel_proto::report::BootReport;
#[allow(unused_imports)]
pub use keel_proto::wire::{frame_len, MAX_FRAME, PROTOCOL_VERSION};
pub use keel_sys::durable::no_hook;
pub use sha2::{Digest, Sha256};
pub use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

pub const IMAGE: &str = "root-squashfs.img";

pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// The host's key, listed in the device's authorized keys.
pub fn host_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

pub fn record(version: u64) -> ImageRecord {
    ImageRecord {
        name: "demo".into(),
        version,
        sha256: "11".repeat(32),
        size: 4096,
    }
}

/// A device: newimg, img with a boot state, a boot report, booted at `booted`.
pub struct Dev {
    pub root: PathBuf,
    pub sh: Arc<Shared>,
}

impl Dev {
    pub fn new(tag: &str, booted: u64, idle_secs: u64) -> Dev {
        Dev::configured(tag, booted, |c| c.idle_timeout_secs = idle_secs)
    }

    pub fn configured(tag: &str, booted: u64, f: impl FnOnce(&mut Config)) -> Dev {
        let root = std::env::temp_dir().join(format!("keel-session-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["newimg", "img"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let report = BootReport {
            initstage_version: "test".into(),
            image_file: IMAGE.into(),
            booted: record(booted),
            image_fstype: "squashfs".into(),
            trial: Some(Trial { tries: 3, used: 1 }),
            tries_left: Some(2),
            boot_count: 7,
            partitions: vec![],
            upper: "partition".into(),
            actions: vec![],
            run_dir: "/run/keel".into(),
            verity: None,
            watchdog: None,
            persisted: Vec::new(),
        };
        fs::write(root.join("boot.json"), report.to_json()).unwrap();
        let st = BootState {
            current: Some(record(booted)),
            trial: Some(Trial { tries: 3, used: 1 }),
            rejected: vec![digest(&data(1, 99))],
            ..BootState::default()
        };
        keel_sys::state::save(&root.join("img"), &st, no_hook).unwrap();
        let mut config = Config {
            unix: String::new(),
            newimg_dir: Some(root.join("newimg")),
            img_dir: Some(root.join("img")),
            boot_report: Some(root.join("boot.json")),
            ..Config::default()
        };
        f(&mut config);
        let authorized = vec![host_key().verifying_key()];
        let sh = Arc::new(Shared::new(config, vec![key().verifying_key()], authorized));
        Dev { root, sh }
    }

    pub fn newimg(&self) -> PathBuf {
        self.root.join("newimg")
    }

    /// The staged slot's bytes and manifest, for byte-identity checks.
    pub fn slot(&self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let n = self.newimg();
        (
            fs::read(n.join(IMAGE)).ok(),
            fs::read(n.join(format!("{IMAGE}.manifest"))).ok(),
        )
    }

    pub fn partial_exists(&self) -> bool {
        self.newimg().join(format!("{IMAGE}.partial")).exists()
    }

    /// A connected, greeted client, served as `peer`.
    pub async fn client(&self, peer: Peer) -> Client {
        let mut c = self.raw(peer);
        c.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: "test".into(),
        })
        .await;
        assert!(matches!(c.recv().await, Response::Hello { .. }));
        c
    }

    /// A connected, greeted client and the hello's challenge.
    pub async fn greeted(&self, peer: Peer) -> (Client, Vec<u8>) {
        self.greeted_bound(peer, Vec::new()).await
    }

    /// [`Dev::greeted`] over a transport with the channel binding `binding` (as TLS has).
    pub async fn greeted_bound(&self, peer: Peer, binding: Vec<u8>) -> (Client, Vec<u8>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(session::serve(b, peer, self.sh.clone(), binding));
        let mut c = Client { s: a };
        c.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: "test".into(),
        })
        .await;
        match c.recv().await {
            Response::Hello {
                challenge: Some(ch),
                ..
            } => (
                c,
                keel_proto::hex::decode::<32>(&ch)
                    .expect("hex challenge")
                    .to_vec(),
            ),
            other => panic!("hello with a challenge expected, got {other:?}"),
        }
    }

    /// A connection without the hello.
    pub fn raw(&self, peer: Peer) -> Client {
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(session::serve(b, peer, self.sh.clone(), Vec::new()));
        Client { s: a }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

pub fn tcp() -> Peer {
    Peer::Tcp("127.0.0.1:40000".parse().unwrap())
}

pub fn local_root() -> Peer {
    Peer::Unix {
        uid: Some(0),
        pid: Some(1),
    }
}

pub struct Client {
    pub s: DuplexStream,
}

impl Client {
    pub async fn send(&mut self, r: &Request) {
        self.s.write_all(&message_frame(r).unwrap()).await.unwrap();
    }

    pub async fn data(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(64 << 10) {
            self.s
                .write_all(&data_header(c.len()).unwrap())
                .await
                .unwrap();
            self.s.write_all(c).await.unwrap();
        }
    }

    pub async fn end(&mut self) {
        self.s.write_all(&data_header(0).unwrap()).await.unwrap();
    }

    pub async fn recv(&mut self) -> Response {
        let read = async {
            let mut h = [0u8; 4];
            self.s.read_exact(&mut h).await.unwrap();
            let mut body = vec![0u8; frame_len(h).unwrap()];
            self.s.read_exact(&mut body).await.unwrap();
            parse_response(&body).unwrap()
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("a response within 10 s")
    }

    /// One raw frame body.
    pub async fn frame(&mut self) -> Vec<u8> {
        let read = async {
            let mut h = [0u8; 4];
            self.s.read_exact(&mut h).await.unwrap();
            let mut body = vec![0u8; frame_len(h).unwrap()];
            self.s.read_exact(&mut body).await.unwrap();
            body
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("a frame within 20 s")
    }

    /// Authenticates with `k` over `challenge`.
    pub async fn auth(&mut self, k: &SigningKey, challenge: &[u8]) -> Response {
        self.auth_bound(k, challenge, b"").await
    }

    /// Authenticates with `k`, signing `challenge` and the channel `binding`.
    pub async fn auth_bound(
        &mut self,
        k: &SigningKey,
        challenge: &[u8],
        binding: &[u8],
    ) -> Response {
        use keel_proto::exec::{b64, sign_auth};
        self.send(&Request::Auth {
            public_key: b64(k.verifying_key().as_bytes()),
            signature: b64(&sign_auth(k, challenge, binding)),
        })
        .await;
        self.recv().await
    }

    /// Sends stdin bytes.
    pub async fn stdin(&mut self, data: &[u8]) {
        for c in data.chunks(64 << 10) {
            let h = keel_proto::wire::encode_header(keel_proto::exec::KIND_STDIN, c.len()).unwrap();
            self.s.write_all(&h).await.unwrap();
            self.s.write_all(c).await.unwrap();
        }
    }

    /// Whether the agent closed the connection.
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// Offers `m`; expects `Send` and returns its offset.
    pub async fn offer(&mut self, m: &SignedManifest, resume: bool) -> Response {
        self.send(&Request::Push {
            manifest: m.clone(),
            resume,
            delta: false,
        })
        .await;
        self.recv().await
    }
}

pub fn data(mib_quarter: usize, seed: u8) -> Vec<u8> {
    (0..mib_quarter * (256 << 10))
        .map(|i: usize| {
            i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed) ^ (i >> 12).to_le_bytes()[0]
        })
        .collect()
}

pub fn digest(b: &[u8]) -> String {
    hex::encode(&Sha256::digest(b))
}

pub fn manifest(b: &[u8], version: u64, name: &str) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: name.into(),
        version,
        size: b.len() as u64,
        sha256: digest(b),
        created: 0,
        min_version: None,
        verity: None,
    }
}

pub fn signed(b: &[u8], version: u64) -> SignedManifest {
    manifest(b, version, "demo").sign(&key())
}

pub fn code(r: Response) -> (ErrorCode, String) {
    match r {
        Response::Error { code, message } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    }
}
