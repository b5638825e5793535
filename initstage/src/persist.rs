//! Applies the `keelctl persist` batches staged on the overlay partition to `persistent/`,
//! before it is mounted as a lower layer (the format: [`keel_proto::persist`]).
//!
//! Per batch: read and check its plan, check every blob's size and SHA-256 and every path's
//! parents in `persistent/` (directories, never symlinks) — a batch that fails any check is
//! renamed `rejected-<seq>`, applied in nothing and kept for the user. Then each entry goes in
//! crash-safely (a file through a temp name, fsync, rename, fsync of the directory); the
//! batch is renamed `done-<seq>` (the one step that ends it) and removed. A power cut before
//! that rename replays the whole batch at the next boot, which gives the same result.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use keel_proto::persist::{self, Meta, Op, Plan};
use keel_proto::report::PersistedBatch;
use sha2::{Digest, Sha256};

use crate::apply::fsync_dir;
use crate::error::{IoContext, Result};
use crate::failpoint;

/// Prefix of a batch being removed after it was applied.
const DONE_PREFIX: &str = "done-";
/// Temp name prefix of an entry going in.
const TMP_PREFIX: &str = ".keel-persist-";

/// Applies every complete batch under `<overlay>/persist` to `persistent`, in order; one
/// outcome per batch (nothing when there is no persist directory).
pub fn apply_all(overlay: &Path, persistent: &Path) -> Vec<PersistedBatch> {
    let dir = overlay.join(persist::PERSIST_DIR);
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return out;
    };
    let mut batches = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if name.starts_with(DONE_PREFIX) && is_dir {
            // A batch applied last boot whose removal a power cut stopped.
            let _ = fs::remove_dir_all(e.path());
        } else if let (Some(seq), true) = (persist::batch_seq(&name), is_dir) {
            batches.push(seq);
        }
    }
    batches.sort_unstable();
    if let Err(e) = fs::create_dir_all(persistent) {
        log::error!("create {}: {e}", persistent.display());
        return out;
    }
    for seq in batches {
        let b = dir.join(seq.to_string());
        if !b.join(persist::PLAN_FILE).exists() {
            // `keelctl persist` was cut before its commit: never a change anyone confirmed.
            let _ = fs::remove_dir_all(&b);
            out.push(PersistedBatch {
                batch: seq,
                applied: 0,
                error: Some("incomplete (no plan): dropped".into()),
            });
            continue;
        }
        out.push(apply_batch(&dir, seq, persistent));
    }
    for r in &out {
        match &r.error {
            None => log::info!("persist batch {}: {} entries applied", r.batch, r.applied),
            Some(e) => log::error!("persist batch {}: {e}", r.batch),
        }
    }
    out
}

fn apply_batch(dir: &Path, seq: u64, persistent: &Path) -> PersistedBatch {
    let b = dir.join(seq.to_string());
    let plan = match check_batch(&b, persistent) {
        Ok(p) => p,
        Err(why) => {
            let to = dir.join(format!("{}{seq}", persist::REJECTED_PREFIX));
            let kept = match fs::rename(&b, &to) {
                Ok(()) => format!("kept as {}", to.display()),
                Err(e) => format!("left in place (rename: {e})"),
            };
            let _ = fsync_dir(dir);
            return PersistedBatch {
                batch: seq,
                applied: 0,
                error: Some(format!("refused: {why}; nothing applied, {kept}")),
            };
        }
    };
    let mut applied = 0;
    for op in &plan.ops {
        if let Err(e) = apply_op(op, &b, persistent) {
            // An I/O error (a full partition, say): the batch stays for the next boot.
            return PersistedBatch {
                batch: seq,
                applied,
                error: Some(format!(
                    "{}: {e}; the batch is retried next boot",
                    op.path()
                )),
            };
        }
        applied += 1;
    }
    let done = dir.join(format!("{DONE_PREFIX}{seq}"));
    let end = fs::rename(&b, &done).ctx("rename", &b).and_then(|()| {
        failpoint::hit("persist: batch done");
        fsync_dir(dir)
    });
    let _ = fs::remove_dir_all(&done);
    PersistedBatch {
        batch: seq,
        applied,
        // Applied, but not ended: the next boot applies it again, to the same result.
        error: end
            .err()
            .map(|e| format!("{e}; the batch is applied again next boot")),
    }
}

/// The plan of batch `b`, once everything it needs checks out; the reason otherwise.
fn check_batch(b: &Path, persistent: &Path) -> std::result::Result<Plan, String> {
    let pf = b.join(persist::PLAN_FILE);
    let bytes = keel_sys::durable::read_regular(&pf, persist::MAX_PLAN_BYTES)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{}: not there", pf.display()))?;
    let plan = Plan::parse(&bytes)?;
    for op in &plan.ops {
        let path = op.path();
        parent_of(persistent, path, false).map_err(|e| format!("{path}: {e}"))?;
        if let Op::File {
            blob, size, sha256, ..
        } = op
        {
            let bp = blob_path(b, *blob);
            let (mut f, len) = keel_sys::durable::open_regular(&bp)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{path}: its blob {} is missing", bp.display()))?;
            if len != *size {
                return Err(format!(
                    "{path}: blob {blob} is {len} bytes, the plan says {size}"
                ));
            }
            let digest =
                copy_hashing(&mut f, None).map_err(|e| format!("read {}: {e}", bp.display()))?;
            if keel_proto::hex::encode(&digest) != sha256.to_ascii_lowercase() {
                return Err(format!("{path}: blob {blob} does not match its SHA-256"));
            }
        }
    }
    Ok(plan)
}

/// Reads `src` to its end (into `dst` too, when given); the SHA-256 of what it read. One
/// plain loop: no `io::copy` and its kernel-copy machinery in the initramfs binary.
fn copy_hashing(src: &mut File, mut dst: Option<&mut File>) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
        if let Some(d) = dst.as_mut() {
            d.write_all(&buf[..n])?;
        }
    }
}

fn blob_path(b: &Path, blob: u32) -> PathBuf {
    b.join(persist::BLOBS_DIR).join(blob.to_string())
}

/// The parent directory of `path` under `persistent` and the entry's name; every existing
/// parent must be a directory, never a symlink. With `make`, missing ones are made (0755
/// root); without, the walk stops at the first missing one.
fn parent_of(persistent: &Path, path: &str, make: bool) -> Result<(PathBuf, String)> {
    let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let parts = persist::components(path).map_err(bad).ctx("check", path)?;
    let mut at = persistent.to_path_buf();
    for c in &parts[..parts.len() - 1] {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(bad("not a directory (or a symlink) in persistent/".into()))
                    .ctx("walk", &at)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !make => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).ctx("create", &at)?;
                failpoint::hit("persist: mkdir parent");
            }
            Err(e) => return Err(e).ctx("stat", &at),
        }
    }
    Ok((at, parts[parts.len() - 1].to_string()))
}

/// Removes whatever is at `p` (a directory with its contents; a symlink itself).
fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(p).ctx("remove", p),
        Ok(_) => fs::remove_file(p).ctx("remove", p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx("stat", p),
    }
}

fn own(p: &Path, meta: &Meta) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(meta.uid), Some(meta.gid)).ctx("chown", p)
}

fn apply_op(op: &Op, batch: &Path, persistent: &Path) -> Result<()> {
    let (parent, name) = parent_of(persistent, op.path(), true)?;
    let target = parent.join(&name);
    let tmp = parent.join(format!("{TMP_PREFIX}{name}"));
    match op {
        Op::Remove { .. } => {
            remove_any(&target)?;
            failpoint::hit("persist: remove");
        }
        Op::Dir { meta, .. } => {
            match fs::symlink_metadata(&target) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    remove_any(&target)?;
                    fs::create_dir(&target).ctx("create", &target)?;
                }
                Err(_) => fs::create_dir(&target).ctx("create", &target)?,
            }
            own(&target, meta)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode))
                .ctx("chmod", &target)?;
            failpoint::hit("persist: dir");
        }
        Op::File { meta, blob, .. } => {
            remove_any(&tmp)?;
            let mut src = File::open(blob_path(batch, *blob)).ctx("open", batch)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .ctx("create", &tmp)?;
            copy_hashing(&mut src, Some(&mut f)).ctx("write", &tmp)?;
            failpoint::hit("persist: write temp");
            own(&tmp, meta)?;
            f.set_permissions(fs::Permissions::from_mode(meta.mode))
                .ctx("chmod", &tmp)?;
            f.sync_all().ctx("fsync", &tmp)?;
            failpoint::hit("persist: fsync temp");
            if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                remove_any(&target)?;
            }
            fs::rename(&tmp, &target).ctx("rename", &tmp)?;
            failpoint::hit("persist: rename");
        }
        Op::Symlink {
            target: to, meta, ..
        } => {
            remove_any(&tmp)?;
            std::os::unix::fs::symlink(to, &tmp).ctx("symlink", &tmp)?;
            own(&tmp, meta)?;
            if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                remove_any(&target)?;
            }
            fs::rename(&tmp, &target).ctx("rename", &tmp)?;
            failpoint::hit("persist: symlink");
        }
    }
    fsync_dir(&parent)?;
    Ok(())
}
