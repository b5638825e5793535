//! `keelctl persist PATH…` (on the device, as root): records files, directories and symlinks
//! of the running system — or, with `--remove`, their removal — as one batch on the overlay
//! partition, which initstage applies to `persistent/` at the next boot (the format and its
//! guarantees: [`keel_proto::persist`]). Nothing is written into the mounted lower layer.
//!
//! Each path's parents are recorded too (their modes and owners win in the merged root, so
//! they are the live ones); no symlink is followed on the way to a path; only the root file
//! system's files are taken (a directory's walk stays on it, as `find -xdev`).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use keel_proto::persist::{self, Meta, Op, Plan, PLAN_FORMAT};
use keel_proto::report::BootReport;
use sha2::{Digest, Sha256};

use super::emit;

/// What the command was asked.
#[derive(Debug)]
pub struct Persist<'a> {
    /// Paths as the running system sees them.
    pub paths: &'a [String],
    /// Record their removal instead.
    pub remove: bool,
    /// initstage's run directory (boot.json, the overlay partition's mount).
    pub run_dir: &'a Path,
    /// The tree the paths are read from (`/`).
    pub root: &'a Path,
    /// Print the outcome as JSON.
    pub json: bool,
}

/// Files to copy into the batch: (blob number, source).
type Blobs = Vec<(u32, PathBuf)>;

fn meta_of(m: &fs::Metadata) -> Meta {
    Meta {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
    }
}

/// The entries for `paths` read from `root` (dev: the root file system's device).
fn collect(root: &Path, paths: &[String], remove: bool) -> anyhow::Result<(Vec<Op>, Blobs)> {
    let root_dev = fs::metadata(root)
        .with_context(|| format!("stat {}", root.display()))?
        .dev();
    let mut ops = Vec::new();
    let mut blobs = Vec::new();
    let mut parents = BTreeSet::new();
    for raw in paths {
        let path = persist::normalize(raw);
        if !raw.starts_with('/') || raw.split('/').any(|c| c == "..") {
            bail!("{raw:?}: give an absolute path without \"..\" (as the running system sees it)");
        }
        let parts = persist::components(&path).map_err(anyhow::Error::msg)?;
        if remove {
            ops.push(Op::Remove { path });
            continue;
        }
        // Parents: directories on the root file system, never a symlink.
        let mut at = String::new();
        for c in &parts[..parts.len() - 1] {
            at.push('/');
            at.push_str(c);
            let m = fs::symlink_metadata(root.join(&at[1..]))
                .with_context(|| format!("{path}: stat {at}"))?;
            if m.file_type().is_symlink() {
                bail!("{path} goes through the symlink {at}: name the path it points to");
            }
            if !m.is_dir() {
                bail!("{path}: {at} is not a directory");
            }
            if m.dev() != root_dev {
                bail!("{path} is not on the root file system ({at} is another mount): only the root's files persist");
            }
            if parents.insert(at.clone()) {
                ops.push(Op::Dir {
                    path: at.clone(),
                    meta: meta_of(&m),
                });
            }
        }
        walk(root, &path, root_dev, &mut ops, &mut blobs, &mut parents)?;
    }
    if ops.len() > persist::MAX_OPS {
        bail!(
            "{} entries: a batch holds at most {}; persist fewer paths at a time",
            ops.len(),
            persist::MAX_OPS
        );
    }
    Ok((ops, blobs))
}

fn walk(
    root: &Path,
    path: &str,
    root_dev: u64,
    ops: &mut Vec<Op>,
    blobs: &mut Blobs,
    dirs: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    let live = root.join(&path[1..]);
    let m = fs::symlink_metadata(&live)
        .with_context(|| format!("{path}: not in the running system"))?;
    let meta = meta_of(&m);
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(&live).with_context(|| format!("readlink {path}"))?;
        ops.push(Op::Symlink {
            path: path.into(),
            target: target.to_string_lossy().into_owned(),
            meta,
        });
    } else if ft.is_file() {
        if m.len() > persist::MAX_FILE_BYTES {
            bail!(
                "{path} is {} bytes: persist takes files up to {} bytes",
                m.len(),
                persist::MAX_FILE_BYTES
            );
        }
        let blob = u32::try_from(blobs.len()).context("too many files")?;
        blobs.push((blob, live));
        ops.push(Op::File {
            path: path.into(),
            meta,
            blob,
            size: m.len(),
            sha256: String::new(),
        });
    } else if ft.is_dir() {
        if m.dev() != root_dev {
            // Another mount inside the tree (a tmpfs, /proc): not the root's.
            return Ok(());
        }
        if dirs.insert(path.into()) {
            ops.push(Op::Dir {
                path: path.into(),
                meta,
            });
        }
        let mut names: Vec<String> = fs::read_dir(&live)
            .with_context(|| format!("list {path}"))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()
            .with_context(|| format!("list {path}"))?;
        names.sort();
        for n in names {
            walk(root, &format!("{path}/{n}"), root_dev, ops, blobs, dirs)?;
            if ops.len() > persist::MAX_OPS {
                bail!(
                    "{path}: more than {} entries in one batch",
                    persist::MAX_OPS
                );
            }
        }
    } else {
        bail!("{path} is not a regular file, directory or symlink: it cannot persist");
    }
    Ok(())
}

/// The overlay partition's mount, checked against boot.json.
fn overlay_dir(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let rp = run_dir.join("boot.json");
    let bytes = keel_sys::durable::read_regular(&rp, 1 << 20)?.with_context(|| {
        format!(
            "{} is missing: this system was not booted by initstage",
            rp.display()
        )
    })?;
    let r = BootReport::from_json(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", rp.display()))?;
    let Some(p) = r.partitions.iter().find(|p| p.role == "overlay") else {
        bail!("this system has no overlay partition (boot.json lists none): persistent/ lives there, so nothing can persist");
    };
    Ok(PathBuf::from(&p.mountpoint))
}

/// Copies `src` (a regular file, not followed if a symlink) to `dst`; its size and SHA-256.
fn copy_blob(src: &Path, dst: &Path) -> anyhow::Result<(u64, String)> {
    let (mut f, _) = keel_sys::durable::open_regular(src)?
        .with_context(|| format!("{} vanished", src.display()))?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .with_context(|| format!("create {}", dst.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let k =
            io::Read::read(&mut f, &mut buf).with_context(|| format!("read {}", src.display()))?;
        if k == 0 {
            break;
        }
        n += k as u64;
        if n > persist::MAX_FILE_BYTES {
            bail!(
                "{} grew past {} bytes while being read",
                src.display(),
                persist::MAX_FILE_BYTES
            );
        }
        h.update(&buf[..k]);
        out.write_all(&buf[..k])
            .with_context(|| format!("write {}", dst.display()))?;
    }
    out.sync_all()
        .with_context(|| format!("fsync {}", dst.display()))?;
    Ok((n, keel_proto::hex::encode(&h.finalize())))
}

/// The next batch number: one past every batch, rejected or finished, on the partition.
fn next_seq(dir: &Path) -> anyhow::Result<u64> {
    let mut max = 0;
    for e in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let n = name
            .strip_prefix(persist::REJECTED_PREFIX)
            .or_else(|| name.strip_prefix("done-"))
            .unwrap_or(&name);
        if let Some(s) = persist::batch_seq(n) {
            max = max.max(s);
        }
    }
    Ok(max + 1)
}

/// Runs `keelctl persist`.
pub fn run(p: &Persist<'_>) -> anyhow::Result<()> {
    if p.paths.is_empty() {
        bail!("name at least one path to persist (or to --remove)");
    }
    let overlay = overlay_dir(p.run_dir)?;
    let (mut ops, blobs) = collect(p.root, p.paths, p.remove)?;
    let need: u64 = ops
        .iter()
        .map(|o| match o {
            Op::File { size, .. } => *size,
            _ => 0,
        })
        .sum();
    let st =
        rustix::fs::statvfs(&overlay).with_context(|| format!("statvfs {}", overlay.display()))?;
    let free = st.f_bavail * st.f_frsize;
    // The batch and its applied copy are both on the partition until the next boot ends.
    if need.saturating_mul(2) > free {
        bail!(
            "{need} bytes to persist need {} free on the overlay partition ({} is free; the \
             batch and persistent/ both hold them until the next boot): persist less, or free \
             room in persistent/ with --remove",
            need * 2,
            free
        );
    }
    let dir = overlay.join(persist::PERSIST_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let seq = next_seq(&dir)?;
    let b = dir.join(seq.to_string());
    fs::create_dir(&b).with_context(|| format!("create {}", b.display()))?;
    let bd = b.join(persist::BLOBS_DIR);
    fs::create_dir(&bd).with_context(|| format!("create {}", bd.display()))?;
    for (blob, src) in &blobs {
        let (size, sha) = copy_blob(src, &bd.join(blob.to_string()))?;
        for op in ops.iter_mut() {
            if let Op::File {
                blob: b2,
                size: s,
                sha256,
                ..
            } = op
            {
                if b2 == blob {
                    *s = size;
                    *sha256 = sha.clone();
                }
            }
        }
    }
    let plan = Plan {
        format: PLAN_FORMAT,
        ops,
    };
    plan.check().map_err(anyhow::Error::msg)?;
    keel_sys::durable::fsync_dir(&bd, keel_sys::durable::no_hook)?;
    // The commit: the plan by rename, then the directories that hold it.
    keel_sys::durable::write_atomic(
        &b,
        persist::PLAN_TMP,
        persist::PLAN_FILE,
        &plan.to_text(),
        keel_sys::durable::no_hook,
    )?;
    keel_sys::durable::fsync_dir(&dir, keel_sys::durable::no_hook)?;
    let files = plan
        .ops
        .iter()
        .filter(|o| matches!(o, Op::File { .. }))
        .count();
    if p.json {
        emit(format_args!(
            "{}",
            serde_json::json!({
                "batch": seq,
                "entries": plan.ops.len(),
                "files": files,
                "bytes": need,
                "remove": p.remove,
                "dir": b.display().to_string(),
            })
        ))
    } else {
        emit(format_args!(
            "staged persist batch {seq}: {} {} ({need} bytes in {files} file{}); initstage \
             applies it to persistent/ at the next boot (boot.json \"persisted\" says how it \
             went)",
            plan.ops.len(),
            if p.remove { "removals" } else { "entries" },
            if files == 1 { "" } else { "s" }
        ))
    }
}
