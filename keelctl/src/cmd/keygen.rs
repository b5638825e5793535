//! `keelctl keygen KEY`: an ed25519 key pair.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use keel_proto::manifest::{public_key_to_pem, signing_key_to_pem, SigningKey};

use super::out;

/// Writes KEY (PKCS#8 PEM, 0600) and KEY.pub (SPKI PEM); refuses to overwrite unless `force`.
pub fn run(key: &Path, force: bool) -> anyhow::Result<()> {
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
    out!(
        "wrote {} (private, 0600) and {} (public)",
        key.display(),
        pubp.display()
    );
    Ok(())
}
