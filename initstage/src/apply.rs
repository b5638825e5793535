//! Runs a [`Plan`]: the thin layer of file-system calls behind the pure state machine.
//!
//! Every write, rename and fsync is followed by a [`failpoint::hit`], so tests can stop the
//! process after each one and check that the next boot still starts an intact image.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use keel_proto::bootstate::BootState;
use keel_proto::imagecheck::{CheckError, ImageCheck};
use keel_proto::layout::Names;
use keel_proto::manifest::{Manifest, SignedManifest, VerifyingKey, VerityInfo};
use keel_proto::{bootstate::ImageRecord, hex};
use keel_sys::durable;
use keel_sys::state::{self, StateError};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::failpoint;
use crate::promote::{Facts, Plan, Staged, Step};

/// The largest manifest file read (a real one is under 1 KiB).
const MAX_MANIFEST: u64 = 64 << 10;

/// Copy buffer size: large and aligned for the page cache.
const CHUNK: usize = 1 << 20;

/// Where the plan's files live.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Mounted img partition.
    pub img: PathBuf,
    /// Mounted newimg partition, if any.
    pub newimg: Option<PathBuf>,
    /// File names.
    pub names: Names,
}

impl Dirs {
    fn img(&self, name: &str) -> PathBuf {
        self.img.join(name)
    }

    fn newimg(&self, name: &str) -> Option<PathBuf> {
        self.newimg.as_ref().map(|d| d.join(name))
    }
}

fn hook(step: &'static str) {
    failpoint::hit(step)
}

fn sys(e: durable::IoError) -> Error {
    Error::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    }
}

/// fsyncs a directory so renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    durable::fsync_dir(dir, hook).map_err(sys)
}

/// Reads the boot state ([`keel_sys::state::load`]: missing is fresh, unreadable is an error).
pub fn load_state(img: &Path) -> Result<Option<BootState>> {
    state::load(img).map_err(|e| match e {
        StateError::Unreadable(e) => sys(e),
        StateError::Corrupt { path, detail } => Error::Invalid { path, detail },
    })
}

/// Persists the boot state atomically.
pub fn save_state(img: &Path, s: &BootState) -> Result<()> {
    state::save(img, s, hook).map_err(sys)
}

fn remove_if_exists(p: &Path) -> Result<bool> {
    durable::remove(p, hook).map_err(sys)
}

/// Reads and checks the staged slot on newimg. `keys`: verify the signature too.
pub fn read_staged(dirs: &Dirs, keys: &[VerifyingKey]) -> Staged {
    let Some(mpath) = dirs.newimg(&dirs.names.staged_manifest) else {
        return Staged::None;
    };
    // A FIFO or a symlink to /dev/zero here must not hang or exhaust PID 1.
    let bytes = match durable::read_regular(&mpath, MAX_MANIFEST) {
        Ok(Some(b)) => b,
        Ok(None) => return Staged::None,
        Err(e) => return Staged::Invalid(format!("cannot read staged manifest: {e}")),
    };
    let signed = match SignedManifest::from_json(&bytes) {
        Ok(m) => m,
        Err(e) => return Staged::Invalid(format!("{}: {e}", mpath.display())),
    };
    if !keys.is_empty() {
        if let Err(e) = signed.verify(keys) {
            return Staged::Invalid(format!("{}: {e}", mpath.display()));
        }
    }
    let ipath = dirs.newimg(&dirs.names.staged).expect("newimg is mounted");
    match fs::symlink_metadata(&ipath) {
        Ok(md) if !md.file_type().is_file() => {
            Staged::Invalid(format!("{} is not a regular file", ipath.display()))
        }
        Ok(md) if md.len() == signed.manifest.size => Staged::Ready(signed.manifest),
        Ok(md) => Staged::Invalid(format!(
            "{} is {} bytes, its manifest says {}",
            ipath.display(),
            md.len(),
            signed.manifest.size
        )),
        Err(e) => Staged::Invalid(format!("{}: {e}", ipath.display())),
    }
}

/// Looks at the img partition (and the staged slot) for the planner.
pub fn gather_facts(dirs: &Dirs, keys: &[VerifyingKey]) -> Facts {
    let n = &dirs.names;
    let adopt = durable::read_regular(&dirs.img(&format!("{}.manifest", n.current)), MAX_MANIFEST)
        .ok()
        .flatten()
        .and_then(|b| SignedManifest::from_json(&b).ok())
        .map(|m| ImageRecord::from_manifest(&m.manifest));
    Facts {
        current_exists: dirs.img(&n.current).exists(),
        old_exists: dirs.img(&n.old).exists(),
        new_tmp_exists: dirs.img(&n.new_tmp).exists(),
        old_tmp_exists: dirs.img(&n.old_tmp).exists(),
        staged: read_staged(dirs, keys),
        adopt,
        adopt_old: None,
    }
}

/// Checks the manifest found beside the current image against the image itself (size, then
/// sha256): a lost state must not make a factory manifest describe a promoted image. Returns
/// the record to adopt and, on a mismatch, why it is recorded as unknown.
pub fn check_adopt(dirs: &Dirs, rec: &ImageRecord) -> (ImageRecord, Option<String>) {
    check_record(&dirs.img(&dirs.names.current), rec)
}

/// The `-old` image's record, from `<old>.manifest` when it describes the bytes, else unknown
/// with the real digest.
pub fn adopt_old(dirs: &Dirs) -> ImageRecord {
    let n = &dirs.names;
    let path = dirs.img(&n.old);
    let rec = durable::read_regular(&dirs.img(&format!("{}.manifest", n.old)), MAX_MANIFEST)
        .ok()
        .flatten()
        .and_then(|b| SignedManifest::from_json(&b).ok())
        .map(|m| ImageRecord::from_manifest(&m.manifest))
        .unwrap_or_else(ImageRecord::unknown);
    check_record(&path, &rec).0
}

fn check_record(path: &Path, rec: &ImageRecord) -> (ImageRecord, Option<String>) {
    let (size, sha256) = match hash_file(path) {
        Ok(x) => x,
        Err(e) => return (ImageRecord::unknown(), Some(e.to_string())),
    };
    if size == rec.size && sha256.eq_ignore_ascii_case(&rec.sha256) {
        return (rec.clone(), None);
    }
    let why = format!(
        "the manifest beside {} describes {} version {} ({} bytes, sha256 {}), but the image is {size} bytes with sha256 {sha256}: recorded as unknown",
        path.display(),
        rec.name,
        rec.version,
        rec.size,
        rec.sha256
    );
    let unknown = ImageRecord {
        sha256,
        size,
        ..ImageRecord::unknown()
    };
    (unknown, Some(why))
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let f = File::open(path).ctx("open", path)?;
    let mut hasher = Sha256::new();
    let total = read_through(f, path, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    Ok((total, hex::encode(&hasher.finalize())))
}

/// Reads `f` (opened from `path`) to its end, handing each chunk to `sink`; the bytes read.
/// The one read loop of the adoption check and the promotion copy.
fn read_through(
    mut f: File,
    path: &Path,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            break;
        }
        sink(&buf[..n])?;
        total += n as u64;
    }
    Ok(total)
}

/// Copies `src` to `dst` checking as it goes (the digest, and the verity tree when the
/// manifest has one), fsyncs, and refuses a copy that is not the manifest's image.
pub fn copy_verify(
    src: &Path,
    dst: &Path,
    size: u64,
    sha256: &str,
    verity: Option<&VerityInfo>,
) -> Result<()> {
    let mut check = ImageCheck::of(size, sha256, verity).map_err(|e| Error::Verity {
        path: src.to_path_buf(),
        detail: e.to_string(),
    })?;
    let input = File::open(src).ctx("open", src)?;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .ctx("create", dst)?;
    let total = read_through(input, src, |chunk| {
        check.update(chunk);
        out.write_all(chunk).ctx("write", dst)
    })?;
    failpoint::hit("copy image");
    out.sync_all().ctx("fsync", dst)?;
    failpoint::hit("fsync image");
    if total != size {
        return Err(Error::SizeMismatch {
            path: src.to_path_buf(),
            expected: size,
            found: total,
        });
    }
    match check.finish() {
        Ok(_) => Ok(()),
        Err(CheckError::Digest { found, expected }) => Err(Error::HashMismatch {
            path: src.to_path_buf(),
            expected,
            found,
        }),
        Err(e @ CheckError::Verity(_)) => Err(Error::Verity {
            path: src.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Keeps the installed image's signed manifest beside it on `img` (from the staged slot,
/// still there until the plan's last step), so that a lost state file is recovered from the
/// image's own manifest, not the factory one. Best effort: a missing or unreadable staged
/// manifest leaves the old one, which [`check_adopt`] then finds not to match.
fn record_manifest(dirs: &Dirs) -> Result<()> {
    match dirs.newimg(&dirs.names.staged_manifest) {
        Some(src) => copy_manifest(&src, dirs, &dirs.names.current),
        None => Ok(()),
    }
}

/// Writes the manifest at `src` (if readable) crash-safely as `<image>.manifest` on `img`.
fn copy_manifest(src: &Path, dirs: &Dirs, image: &str) -> Result<()> {
    let Ok(Some(bytes)) = durable::read_regular(src, MAX_MANIFEST) else {
        return Ok(());
    };
    let name = format!("{image}.manifest");
    durable::write_atomic(&dirs.img, &format!("{name}.tmp"), &name, &bytes, hook).map_err(sys)
}

/// Whether two paths name the same file (device and inode), without following symlinks.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Runs one step.
pub fn run_step(step: &Step, dirs: &Dirs) -> Result<()> {
    let n = &dirs.names;
    match step {
        Step::RemoveNewTmp => {
            if remove_if_exists(&dirs.img(&n.new_tmp))? {
                fsync_dir(&dirs.img)?;
            }
        }
        Step::RemoveOldTmp => {
            if remove_if_exists(&dirs.img(&n.old_tmp))? {
                fsync_dir(&dirs.img)?;
            }
        }
        Step::CopyStaged {
            size,
            sha256,
            verity,
        } => {
            let src = dirs
                .newimg(&n.staged)
                .ok_or_else(|| Error::Usage("no newimg partition to copy from".into()))?;
            let dst = dirs.img(&n.new_tmp);
            copy_verify(&src, &dst, *size, sha256, verity.as_ref())?;
            fsync_dir(&dirs.img)?;
        }
        Step::WriteState(s) => save_state(&dirs.img, s)?,
        Step::KeepCurrentAsOld => {
            // Best effort, like record_manifest: the old image's manifest goes with it.
            copy_manifest(&dirs.img(&format!("{}.manifest", n.current)), dirs, &n.old)?;
            let tmp = dirs.img(&n.old_tmp);
            remove_if_exists(&tmp)?;
            fs::hard_link(dirs.img(&n.current), &tmp).ctx("link", &tmp)?;
            failpoint::hit("link old");
            fs::rename(&tmp, dirs.img(&n.old)).ctx("rename", dirs.img(&n.old))?;
            failpoint::hit("rename old");
            fsync_dir(&dirs.img)?;
        }
        Step::InstallNew => {
            fs::rename(dirs.img(&n.new_tmp), dirs.img(&n.current))
                .ctx("rename", dirs.img(&n.current))?;
            failpoint::hit("rename new");
            fsync_dir(&dirs.img)?;
            record_manifest(dirs)?;
        }
        Step::RestoreOld => {
            // Best effort, like KeepCurrentAsOld: the manifest comes back with its image
            // (the verity root of the image now current is read from it).
            copy_manifest(&dirs.img(&format!("{}.manifest", n.old)), dirs, &n.current)?;
            fs::rename(dirs.img(&n.old), dirs.img(&n.current))
                .ctx("rename", dirs.img(&n.current))?;
            failpoint::hit("rename old to current");
            fsync_dir(&dirs.img)?;
        }
        Step::RemoveStaged => {
            if let Some(dir) = &dirs.newimg {
                let staged = dir.join(&n.staged);
                // Never the current or old image, whatever the mounts made of the names.
                for keep in [dirs.img(&n.current), dirs.img(&n.old)] {
                    if same_file(&staged, &keep) {
                        log::error!(
                            "refusing to remove {}: it is {} (two roles on one filesystem?); left in place",
                            staged.display(),
                            keep.display()
                        );
                        return Ok(());
                    }
                }
                // The manifest is the commit marker: it goes first.
                let a = remove_if_exists(&dir.join(&n.staged_manifest))?;
                let b = remove_if_exists(&staged)?;
                if a || b {
                    fsync_dir(dir)?;
                }
            }
        }
    }
    Ok(())
}

/// Runs every step of `plan` in order, stopping at the first error.
pub fn execute(plan: &Plan, dirs: &Dirs) -> Result<()> {
    for step in &plan.steps {
        run_step(step, dirs)?;
    }
    Ok(())
}

/// The manifest of a staged image, for [`crate::promote::plan_reject_staged`].
pub fn staged_manifest(facts: &Facts) -> Option<&Manifest> {
    match &facts.staged {
        Staged::Ready(m) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promote::Staged;

    #[test]
    fn a_fifo_or_dev_zero_as_the_staged_manifest_is_invalid_not_a_hang() {
        let root = std::env::temp_dir().join(format!("keel-apply-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let newimg = root.join("newimg");
        fs::create_dir_all(&newimg).unwrap();
        let dirs = Dirs {
            img: root.join("img"),
            newimg: Some(newimg.clone()),
            names: Names::for_image("root.img"),
        };
        let m = newimg.join("root.img.manifest");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &m,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        match read_staged(&dirs, &[]) {
            Staged::Invalid(why) => assert!(why.contains("FIFO"), "{why}"),
            other => panic!("{other:?}"),
        }
        fs::remove_file(&m).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &m).unwrap();
        match read_staged(&dirs, &[]) {
            Staged::Invalid(why) => assert!(why.contains("symlink"), "{why}"),
            other => panic!("{other:?}"),
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn removing_the_staged_image_never_removes_the_current_one() {
        let root = std::env::temp_dir().join(format!("keel-apply-same-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("root.img"), b"current").unwrap();
        fs::write(root.join("root.img.manifest"), b"{}").unwrap();
        // newimg and img are the same directory, as two roles on one filesystem make them.
        let dirs = Dirs {
            img: root.clone(),
            newimg: Some(root.clone()),
            names: Names::for_image("root.img"),
        };
        run_step(&Step::RemoveStaged, &dirs).unwrap();
        assert_eq!(fs::read(root.join("root.img")).unwrap(), b"current");
        assert!(root.join("root.img.manifest").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
