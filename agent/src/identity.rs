//! The agent's own ed25519 key (agent.toml `identity`): what it proves itself with to a TLS
//! client on TCP, so that a client pinning it (or remembering it on first use) knows it talks
//! to this device and no other. Made on first start, kept across restarts.
//!
//! The private key is PKCS#8 PEM, mode 0600, written crash-safely (temp, fsync, rename); its
//! public half sits beside it as `PATH.pub` (SPKI PEM, what `keelctl --agent-key` takes). A
//! key file readable by group or others is refused, as ssh refuses one.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use keel_proto::exec::fingerprint;
use keel_proto::manifest::{public_key_to_pem, signing_key_from_pem, signing_key_to_pem};
use keel_proto::manifest::{SigningKey, VerifyingKey};
use keel_sys::durable;

use crate::error::Error;

/// The agent's key pair.
pub struct Identity {
    /// Where the private key lives.
    pub path: PathBuf,
    /// The private key, PKCS#8 PEM.
    pub pem: String,
    /// The public half.
    pub public: VerifyingKey,
    /// Whether this start made it.
    pub created: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("path", &self.path)
            .field("public", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// `SHA256:…` of the public key, as `keelctl` and ssh print it.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.public.as_bytes())
    }

    /// Loads the key at `path`, or makes one there if none exists; (re)writes `PATH.pub`
    /// when it is missing or does not match.
    pub fn load_or_create(path: &Path) -> Result<Identity, Error> {
        let bad = |detail: String| Error::Identity {
            path: path.to_path_buf(),
            detail,
        };
        let (dir, name) = split(path).ok_or_else(|| bad("not a file path".into()))?;
        std::fs::create_dir_all(dir).map_err(|e| bad(format!("create {}: {e}", dir.display())))?;
        let (key, created) = match durable::open_regular(path).map_err(|e| bad(e.to_string()))? {
            Some((f, _)) => {
                let mode = f
                    .metadata()
                    .map_err(|e| bad(e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(bad(format!(
                        "mode {:o} lets others read the private key: chmod 600 it",
                        mode & 0o777
                    )));
                }
                let pem = durable::read_regular(path, 64 << 10)
                    .map_err(|e| bad(e.to_string()))?
                    .ok_or_else(|| bad("vanished while read".into()))?;
                let pem = String::from_utf8(pem).map_err(|_| bad("not PEM text".into()))?;
                (
                    signing_key_from_pem(&pem).map_err(|e| bad(e.to_string()))?,
                    false,
                )
            }
            None => {
                let mut seed = [0u8; 32];
                keel_sys::random::fill(&mut seed)
                    .map_err(|e| bad(format!("no random bytes for a new key: {e}")))?;
                let key = SigningKey::from_bytes(&seed);
                durable::write_atomic_mode(
                    dir,
                    &format!(".{name}.tmp"),
                    name,
                    signing_key_to_pem(&key).as_bytes(),
                    0o600,
                    durable::no_hook,
                )
                .map_err(|e| bad(e.to_string()))?;
                (key, true)
            }
        };
        let public = key.verifying_key();
        let pub_name = format!("{name}.pub");
        let pub_pem = public_key_to_pem(&public);
        let on_disk = durable::read_regular(&dir.join(&pub_name), 64 << 10)
            .ok()
            .flatten();
        if on_disk.as_deref() != Some(pub_pem.as_bytes()) {
            durable::write_atomic(
                dir,
                &format!(".{pub_name}.tmp"),
                &pub_name,
                pub_pem.as_bytes(),
                durable::no_hook,
            )
            .map_err(|e| bad(e.to_string()))?;
        }
        Ok(Identity {
            path: path.to_path_buf(),
            pem: signing_key_to_pem(&key),
            public,
            created,
        })
    }
}

/// The filesystem `path`'s directory is on, when it is one whose files may not survive a
/// reboot: tmpfs or ramfs, or an overlay (keel's own root overlay clears its upper layer at
/// each boot). A key there is a new key after the reboot, which every client that remembered
/// the old one refuses.
pub fn volatile(path: &Path) -> Option<&'static str> {
    const TMPFS: u64 = 0x0102_1994;
    const RAMFS: u64 = 0x8584_58f6;
    const OVERLAYFS: u64 = 0x794c_7630;
    let dir = path.parent()?;
    let st = rustix::fs::statfs(dir).ok()?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    match st.f_type as u64 {
        TMPFS => Some("tmpfs"),
        RAMFS => Some("ramfs"),
        OVERLAYFS => Some("an overlay"),
        _ => None,
    }
}

fn split(path: &Path) -> Option<(&Path, &str)> {
    let name = path.file_name()?.to_str()?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    Some((dir, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keel-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn made_once_then_kept_with_its_public_half() {
        let d = tmp("kept");
        let p = d.join("sub/identity.pem");
        let a = Identity::load_or_create(&p).unwrap();
        assert!(a.created);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Identity::load_or_create(&p).unwrap();
        assert!(!b.created);
        assert_eq!(a.public, b.public);
        let pub_pem = std::fs::read_to_string(d.join("sub/identity.pem.pub")).unwrap();
        assert_eq!(pub_pem, public_key_to_pem(&a.public));
        // A lost .pub is written again; a wrong one is replaced.
        std::fs::write(d.join("sub/identity.pem.pub"), "junk").unwrap();
        Identity::load_or_create(&p).unwrap();
        let again = std::fs::read_to_string(d.join("sub/identity.pem.pub")).unwrap();
        assert_eq!(again, pub_pem);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_key_on_tmpfs_is_called_volatile() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let shm_is_tmpfs = mounts
            .lines()
            .any(|l| l.starts_with("tmpfs /dev/shm tmpfs "));
        if shm_is_tmpfs {
            assert_eq!(volatile(Path::new("/dev/shm/identity.pem")), Some("tmpfs"));
        }
        let proc_fs = volatile(Path::new("/proc/identity.pem"));
        assert_eq!(proc_fs, None, "procfs is none of tmpfs, ramfs, overlay");
    }

    #[test]
    fn a_readable_or_corrupt_key_is_refused_by_name() {
        let d = tmp("bad");
        let p = d.join("identity.pem");
        Identity::load_or_create(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identity::load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("identity.pem") && e.contains("chmod 600"), "{e}");
        std::fs::write(&p, "not a key").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Identity::load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("identity.pem") && e.contains("private"), "{e}");
        // A symlink is not followed.
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        let e = Identity::load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("identity.pem"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
