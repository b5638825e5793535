//! dm-verity for the booted image: whether to use it ([`decide`], pure) and the device
//! (create, load, resume through [`keel_sys::dm`]; then the swap to `restart_on_corruption`
//! once the image has mounted and its init was found).
//!
//! The root hash comes from the image's signed manifest on `img` (`<image>.manifest`,
//! verified with the trusted keys when they are configured, and describing the very image
//! the boot state names as current), never from the image itself.

use std::path::{Path, PathBuf};

use keel_proto::bootstate::ImageRecord;
use keel_proto::manifest::{SignedManifest, VerifyingKey, VerityInfo};
use keel_sys::dm::{self, Control, Target};
use keel_sys::durable;

use crate::cmdline::VerityMode;
use crate::error::{Error, Result};
use crate::loopdev::LoopDevice;

/// The device-mapper name of the booted image.
pub const DM_NAME: &str = "keel-root";
const MAX_MANIFEST: u64 = 64 << 10;

/// What to do for this image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Mount through dm-verity with these parameters.
    Use(VerityInfo),
    /// Mount the loop device directly (why, for the log; `None` when verity is off).
    Plain(Option<String>),
    /// Do not mount this image (`keel.verity=required` and no usable tree).
    Refuse(String),
}

/// Decides from the mode, the current image's record and its manifest on `img` (`None`:
/// missing or unreadable), and whether the kernel has device-mapper.
pub fn decide(
    mode: VerityMode,
    current: Option<&ImageRecord>,
    manifest: std::result::Result<Option<SignedManifest>, String>,
    keys: &[VerifyingKey],
    kernel_has_dm: bool,
) -> Decision {
    if mode == VerityMode::Off {
        return Decision::Plain(None);
    }
    // An image signed without a tree is an ordinary plain image under `auto`: no warning,
    // and no signature check at boot (under `auto` nothing is refused; `required` checks).
    if mode == VerityMode::Auto && matches!(&manifest, Ok(Some(m)) if m.manifest.verity.is_none()) {
        return Decision::Plain(None);
    }
    let info = (|| -> std::result::Result<VerityInfo, String> {
        let m = manifest?.ok_or("the image has no manifest on img")?;
        if !keys.is_empty() {
            m.verify(keys).map_err(|e| format!("its manifest: {e}"))?;
        }
        let rec = current.ok_or("the boot state names no current image")?;
        if !m.manifest.sha256.eq_ignore_ascii_case(&rec.sha256) {
            return Err(format!(
                "its manifest describes version {} (sha256 {}), not the current image (sha256 {})",
                m.manifest.version, m.manifest.sha256, rec.sha256
            ));
        }
        m.manifest
            .verity
            .ok_or_else(|| format!("version {} carries no verity tree", m.manifest.version))
    })();
    match (info, mode) {
        (Ok(_), _) if !kernel_has_dm => {
            let why = "the kernel has no device-mapper (dm_mod, dm_verity)".to_string();
            if mode == VerityMode::Required {
                Decision::Refuse(format!("keel.verity=required: {why}"))
            } else {
                Decision::Plain(Some(format!(
                    "verity: not used: {why}; the image is mounted unchecked"
                )))
            }
        }
        (Ok(v), _) => Decision::Use(v),
        (Err(why), VerityMode::Required) => {
            Decision::Refuse(format!("keel.verity=required: {why}"))
        }
        (Err(why), _) => Decision::Plain(Some(format!("verity: not used: {why}"))),
    }
}

/// Reads `<image>.manifest` beside the image.
pub fn read_manifest(image: &Path) -> std::result::Result<Option<SignedManifest>, String> {
    let mut p = image.as_os_str().to_owned();
    p.push(".manifest");
    let p = PathBuf::from(p);
    match durable::read_regular(&p, MAX_MANIFEST) {
        Ok(Some(b)) => SignedManifest::from_json(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", p.display())),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// The CPU-accelerated SHA-256 drivers dm-verity picks when they are loaded (the kernel asks
/// for them through modprobe, which an initramfs does not have): SHA-NI/AVX2/SSSE3 on x86-64,
/// the ARMv8 crypto extensions on arm64; without them the kernel's generic C SHA-256 checks
/// every block. Each comes with the `/proc/cpuinfo` flags of which one must be present for
/// it to be tried (a module whose init fails with ENODEV still costs its load).
const SHA256_ACCEL: &[(&str, &[&str])] = if cfg!(target_arch = "x86_64") {
    &[("sha256_ssse3", &["sha_ni", "avx2", "avx", "ssse3"])]
} else if cfg!(target_arch = "aarch64") {
    &[("sha2_ce", &["sha2"])]
} else {
    &[]
};

/// Whether the CPU flags line of `cpuinfo` (`flags` on x86, `Features` on arm64) names any
/// of `wanted`.
fn cpu_has_any(cpuinfo: &str, wanted: &[&str]) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .and_then(|l| l.split_once(':'))
        .is_some_and(|(_, f)| f.split_ascii_whitespace().any(|f| wanted.contains(&f)))
}

/// Loads `dm_verity` (and through its dependencies `dm_mod`) when the control node is
/// missing and this is PID 1 (never into a host's kernel from `initstage prepare`), with
/// the accelerated SHA-256 driver when it is packed.
pub fn ensure_kernel_support(modules_dir: &Path) -> bool {
    if Control::available() {
        return true;
    }
    if std::process::id() == 1 {
        match crate::modules::load_all(modules_dir, &["dm_verity".to_string()]) {
            Ok(missing) if missing.is_empty() => {}
            Ok(_) => log::warn!("module dm_verity not found in {}", modules_dir.display()),
            Err(e) => log::warn!("loading dm_verity: {e}"),
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        for (m, flags) in SHA256_ACCEL {
            if !cpu_has_any(&cpuinfo, flags) {
                log::debug!("verity: the CPU has none of {flags:?}: generic SHA-256");
                continue;
            }
            // Optional: not packed, or refused by the kernel.
            match crate::modules::load_all(modules_dir, &[m.to_string()]) {
                Ok(missing) if missing.is_empty() => log::debug!("verity: {m} loaded"),
                Ok(_) => log::debug!("verity: {m} not packed: generic SHA-256"),
                Err(e) => log::debug!("verity: {m}: {e}: generic SHA-256"),
            }
        }
    }
    Control::available()
}

fn dm_err(e: dm::DmError) -> Error {
    Error::Dm(e.to_string())
}

/// `major:minor` of a block device node.
fn dev_of(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md =
        std::fs::metadata(path).map_err(|e| Error::Dm(format!("stat {}: {e}", path.display())))?;
    let rdev = md.rdev();
    Ok(format!(
        "{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    ))
}

/// The verity device over `loopdev`, live and in EIO mode (a corrupt block fails its read,
/// so a failed mount can fall back to `-old`); its node.
pub fn setup(loopdev: &LoopDevice, v: &VerityInfo) -> Result<PathBuf> {
    let ctl = Control::open().map_err(dm_err)?;
    // A device left by a failed attempt this boot.
    let _ = ctl.remove(DM_NAME);
    let dev = ctl.create(DM_NAME).map_err(dm_err)?;
    let r = (|| {
        ctl.load(DM_NAME, &[target(&dev_of(&loopdev.path)?, v, false)])
            .map_err(dm_err)?;
        ctl.resume(DM_NAME).map_err(dm_err)?;
        dm::make_node(DM_NAME, dev)
            .map_err(|e| Error::Dm(format!("mknod /dev/mapper/{DM_NAME}: {e}")))
    })();
    if r.is_err() {
        let _ = ctl.remove(DM_NAME);
    }
    r
}

/// Removes the device (after a failed mount; it must be unmounted).
pub fn teardown() {
    if let Ok(ctl) = Control::open() {
        let _ = ctl.remove(DM_NAME);
    }
}

/// Whether the device found a corrupt block (its status is `C`).
pub fn corrupt() -> bool {
    Control::open()
        .and_then(|c| c.table(DM_NAME, false))
        .is_ok_and(|t| t.first().is_some_and(|t| t.params.trim() == "C"))
}

/// `e`, named for what it was when the device met a corrupt block: the mount, or the look
/// for init, failed because a block does not match the signed root hash.
pub fn explain(e: Error, image: &Path, v: &VerityInfo) -> Error {
    if matches!(e, Error::Verity { .. }) || !corrupt() {
        return e;
    }
    Error::Verity {
        path: image.to_path_buf(),
        detail: format!(
            "corrupt: a block fails dm-verity against root hash {} (the image changed on disk \
             after it was checked): {e}",
            v.root_hash
        ),
    }
}

/// Whether the last boot through verity of the image with `sha256` was never confirmed
/// (the marker on `img` names it).
pub fn unconfirmed(img: &Path, sha256: &str) -> bool {
    let p = img.join(keel_proto::layout::VERITY_UNCONFIRMED_FILE);
    matches!(durable::read_regular(&p, 128), Ok(Some(b)) if b.trim_ascii().eq_ignore_ascii_case(sha256.as_bytes()))
}

/// Writes the marker for the image with `sha256` (unless it is there already).
pub fn mark_unconfirmed(img: &Path, sha256: &str) -> Result<()> {
    if unconfirmed(img, sha256) {
        return Ok(());
    }
    durable::write_atomic(
        img,
        keel_proto::layout::VERITY_UNCONFIRMED_TMP,
        keel_proto::layout::VERITY_UNCONFIRMED_FILE,
        format!("{}\n", sha256.to_ascii_lowercase()).as_bytes(),
        |_| {},
    )
    .map_err(|e| Error::Dm(format!("mark the boot unconfirmed: {e}")))
}

/// Reads every block of the (EIO-mode) verity device at `node`: `Ok(bytes)` when all verify,
/// else the first failing offset. Constant memory (one 1 MiB buffer).
pub fn check_all(node: &Path, image: &Path, v: &VerityInfo) -> Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(node)
        .map_err(|e| Error::Dm(format!("open {}: {e}", node.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => at += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Verity {
                    path: image.to_path_buf(),
                    detail: format!(
                        "corrupt: the block at byte {at} (or within the next MiB) fails dm-verity \
                         against root hash {} ({e}); the image changed on disk after it was checked",
                        v.root_hash
                    ),
                })
            }
        }
    }
    if at != v.data_size {
        return Err(Error::Dm(format!(
            "{} gave {at} bytes, the manifest says {}",
            node.display(),
            v.data_size
        )));
    }
    Ok(at)
}

/// Swaps the live table for one with `restart_on_corruption`: from now on a corrupt block
/// restarts the machine (and counts against a trial) instead of failing a read.
pub fn arm_restart(v: &VerityInfo) -> Result<String> {
    let ctl = Control::open().map_err(dm_err)?;
    let live = ctl.table(DM_NAME, true).map_err(dm_err)?;
    let device = live
        .first()
        .and_then(|t| t.params.split(' ').nth(1))
        .ok_or_else(|| Error::Dm(format!("{DM_NAME} has no verity table")))?
        .to_string();
    ctl.load(DM_NAME, &[target(&device, v, true)])
        .map_err(dm_err)?;
    ctl.resume(DM_NAME).map_err(dm_err)?;
    Ok("restart_on_corruption".into())
}

fn target(device: &str, v: &VerityInfo, restart: bool) -> Target {
    let (length, params) = keel_verity::table(
        device,
        v.data_size,
        v.hash_offset,
        &v.root_hash,
        &v.salt,
        restart,
    );
    Target {
        start: 0,
        length,
        kind: "verity".into(),
        params,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::manifest::{Manifest, SigningKey, MANIFEST_FORMAT, MANIFEST_FORMAT_VERITY};

    fn signed(verity: bool) -> (SignedManifest, ImageRecord) {
        let info = VerityInfo {
            data_size: 300 * 4096,
            hash_offset: 300 * 4096,
            salt: "11".repeat(32),
            root_hash: "cd".repeat(32),
        };
        let m = Manifest {
            format: if verity {
                MANIFEST_FORMAT_VERITY
            } else {
                MANIFEST_FORMAT
            },
            name: "demo".into(),
            version: 2,
            size: if verity { 305 * 4096 } else { 4096 },
            sha256: "ab".repeat(32),
            created: 0,
            min_version: None,
            verity: verity.then_some(info),
        };
        let rec = ImageRecord::from_manifest(&m);
        (m.sign(&SigningKey::from_bytes(&[1; 32])), rec)
    }

    fn key() -> Vec<VerifyingKey> {
        vec![SigningKey::from_bytes(&[1; 32]).verifying_key()]
    }

    #[test]
    fn auto_uses_a_signed_tree_and_says_why_it_does_not() {
        let (m, rec) = signed(true);
        let d = decide(
            VerityMode::Auto,
            Some(&rec),
            Ok(Some(m.clone())),
            &key(),
            true,
        );
        assert!(matches!(d, Decision::Use(ref v) if v.root_hash == "cd".repeat(32)));
        assert_eq!(
            decide(
                VerityMode::Off,
                Some(&rec),
                Ok(Some(m.clone())),
                &key(),
                true
            ),
            Decision::Plain(None)
        );
        let (plain, prec) = signed(false);
        let d = decide(
            VerityMode::Auto,
            Some(&prec),
            Ok(Some(plain.clone())),
            &key(),
            true,
        );
        assert_eq!(
            d,
            Decision::Plain(None),
            "a plain image is no cause for a warning"
        );
        let d = decide(VerityMode::Auto, Some(&rec), Ok(Some(m)), &key(), false);
        assert!(
            matches!(d, Decision::Plain(Some(ref w)) if w.contains("no device-mapper")),
            "{d:?}"
        );
        // Required: each of those refuses the image.
        let d = decide(
            VerityMode::Required,
            Some(&prec),
            Ok(Some(plain)),
            &key(),
            true,
        );
        assert!(
            matches!(d, Decision::Refuse(ref w) if w.contains("no verity tree")),
            "{d:?}"
        );
        let d = decide(VerityMode::Required, Some(&prec), Ok(None), &key(), true);
        assert!(
            matches!(d, Decision::Refuse(ref w) if w.contains("no manifest")),
            "{d:?}"
        );
    }

    #[test]
    fn a_manifest_that_is_not_the_current_images_or_not_signed_is_not_trusted() {
        let (m, mut rec) = signed(true);
        rec.sha256 = "00".repeat(32);
        let d = decide(
            VerityMode::Required,
            Some(&rec),
            Ok(Some(m.clone())),
            &key(),
            true,
        );
        assert!(
            matches!(d, Decision::Refuse(ref w) if w.contains("not the current image")),
            "{d:?}"
        );
        let (_, rec) = signed(true);
        let other = vec![SigningKey::from_bytes(&[2; 32]).verifying_key()];
        let d = decide(VerityMode::Required, Some(&rec), Ok(Some(m)), &other, true);
        assert!(
            matches!(d, Decision::Refuse(ref w) if w.contains("signature")),
            "{d:?}"
        );
    }

    #[test]
    fn the_unconfirmed_marker_names_one_image() {
        let dir = std::env::temp_dir().join(format!("keel-verity-mark-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = "AB".repeat(32);
        assert!(!unconfirmed(&dir, &a));
        mark_unconfirmed(&dir, &a).unwrap();
        assert!(unconfirmed(&dir, &a.to_ascii_lowercase()));
        assert!(!unconfirmed(&dir, &"cd".repeat(32)));
        // Not a regular file: not trusted, never followed.
        let p = dir.join(keel_proto::layout::VERITY_UNCONFIRMED_FILE);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(dir.join("elsewhere"), format!("{a}\n")).unwrap();
        std::os::unix::fs::symlink("elsewhere", &p).unwrap();
        assert!(!unconfirmed(&dir, &a));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpu_flags_are_read_from_the_first_flags_line() {
        let x86 = "processor\t: 0\nflags\t\t: fpu sse2 ssse3 avx\nbugs\t: x\n";
        assert!(cpu_has_any(x86, &["sha_ni", "ssse3"]));
        assert!(!cpu_has_any(x86, &["sha_ni", "avx2"]));
        assert!(cpu_has_any("Features\t: fp asimd sha1 sha2\n", &["sha2"]));
        assert!(!cpu_has_any("flags: sse3\n", &["sse"]));
        assert!(!cpu_has_any("", &["ssse3"]));
    }
}
