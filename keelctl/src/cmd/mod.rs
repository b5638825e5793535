//! One file per `keelctl` command; what they share lives here.

pub mod build;
pub mod control;
pub mod cp;
pub mod disk;
pub mod exec;
pub mod initramfs;
pub mod keygen;
pub mod persist;
pub mod ps;
pub mod publish;
pub mod push;
pub mod sign;
pub mod status;
pub mod verify;
pub mod wait_ready;

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use keel_proto::hex;
use keel_proto::manifest::SignedManifest;
use sha2::{Digest, Sha256};

/// stdout was closed by its reader (`keelctl status --json | head -1`): not an error.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
pub struct StdoutClosed;

/// Writes one line to stdout; a closed pipe becomes [`StdoutClosed`] instead of a panic.
pub fn emit(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    match writeln!(o, "{args}").and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => r.context("write to stdout"),
    }
}

/// `println!` that survives a closed stdout.
macro_rules! out {
    ($($t:tt)*) => { $crate::cmd::emit(format_args!($($t)*))? };
}
pub(crate) use out;

/// IMAGE.manifest unless given.
pub fn manifest_path(image: &Path, m: &Option<PathBuf>) -> PathBuf {
    m.clone().unwrap_or_else(|| {
        let mut s = image.as_os_str().to_owned();
        s.push(".manifest");
        s.into()
    })
}

/// Reads and parses a signed manifest.
pub fn read_manifest(p: &Path) -> anyhow::Result<SignedManifest> {
    let b = fs::read(p).with_context(|| format!("read manifest {}", p.display()))?;
    SignedManifest::from_json(&b).with_context(|| format!("manifest {}", p.display()))
}

/// Size and SHA-256 of a file.
pub fn hash_file(p: &Path) -> anyhow::Result<(u64, String)> {
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
