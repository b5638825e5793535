//! The staging slot on `newimg`: receiving an image crash-safely with constant memory.
//!
//! Files (for image `root-squashfs.img`):
//!
//! | file | meaning |
//! |---|---|
//! | `root-squashfs.img.partial.manifest` | signed manifest of the upload in progress (written first) |
//! | `root-squashfs.img.partial` | the bytes received so far |
//! | `root-squashfs.img` | the staged image |
//! | `root-squashfs.img.manifest` | its signed manifest: the commit marker initstage looks for |
//!
//! Receiving runs as a three-stage pipeline over [`NBUF`] buffers of [`CHUNK`] bytes: the
//! connection fills a buffer, a hasher thread hashes it, a writer thread writes it at its
//! offset and starts its writeback at once (`sync_file_range`), then waits for the window
//! before it and drops it from the page cache. Hashing overlaps writing; memory is `NBUF ×
//! CHUNK` whatever the image size; the final `fsync` has little left to do.
//!
//! Commit: fsync the partial file, compare its digest, remove the old commit marker (fsync
//! the directory), rename the partial file over the staged image, write the manifest to a
//! temporary file, fsync, rename, fsync the directory. A power cut anywhere leaves either the
//! previous staged image with its manifest, or no manifest at all — never a manifest next to
//! bytes it does not describe being promoted (initstage re-hashes while copying anyway).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use keel_proto::bootstate::ImageRecord;
use keel_proto::imagecheck::ImageCheck;
use keel_proto::layout::Names;
use keel_proto::manifest::SignedManifest;
use keel_proto::message::ErrorCode;
use keel_sys::durable::{self, no_hook, IoError};

use crate::verify::Refusal;

/// Bytes per pipeline buffer.
pub const CHUNK: usize = 512 << 10;
/// Buffers in flight.
pub const NBUF: usize = 4;
/// Writeback window: started as soon as written, waited for one window later.
const WINDOW: u64 = 16 << 20;

/// The staging slot: the `newimg` directory and the file names for one image.
#[derive(Debug, Clone)]
pub struct Slot {
    dir: PathBuf,
    names: Names,
}

/// A failed file operation as a refusal: `no-space` for ENOSPC, `io` otherwise.
pub fn io_refusal(op: &str, path: &Path, e: &std::io::Error) -> Refusal {
    let code = if e.raw_os_error() == Some(libc::ENOSPC) {
        ErrorCode::NoSpace
    } else {
        ErrorCode::Io
    };
    Refusal::new(code, format!("{op} {}: {e}", path.display()))
}

/// Bytes of disk a regular file holds (its blocks, not its length); 0 for anything else.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => m.blocks().saturating_mul(512),
        _ => 0,
    }
}

fn sys_refusal(e: IoError) -> Refusal {
    let code = if e.is_no_space() {
        ErrorCode::NoSpace
    } else {
        ErrorCode::Io
    };
    Refusal::new(code, e.to_string())
}

fn fsync_dir(dir: &Path) -> Result<(), Refusal> {
    durable::fsync_dir(dir, no_hook).map_err(sys_refusal)
}

fn remove(path: &Path) -> Result<bool, Refusal> {
    durable::remove(path, no_hook).map_err(sys_refusal)
}

/// The largest manifest file read from `newimg` (a real one is under 1 KiB).
pub const MAX_MANIFEST: u64 = 64 << 10;

impl Slot {
    /// The slot for image file `image` in `dir`.
    pub fn new(dir: impl Into<PathBuf>, image: &str) -> Slot {
        Slot {
            dir: dir.into(),
            names: Names::for_image(image),
        }
    }

    /// The `newimg` directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Path of the staged image.
    pub fn staged_path(&self) -> PathBuf {
        self.path(&self.names.staged)
    }

    /// Path of the partial upload.
    pub fn partial_path(&self) -> PathBuf {
        self.path(&self.names.staged_partial)
    }

    /// Whether `newimg` is there (a directory we can look into).
    pub fn available(&self) -> bool {
        self.dir.is_dir()
    }

    fn read_manifest(&self, name: &str) -> Option<SignedManifest> {
        let p = self.path(name);
        match durable::read_regular(&p, MAX_MANIFEST) {
            Ok(Some(b)) => SignedManifest::from_json(&b).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("{e}: treated as absent");
                None
            }
        }
    }

    /// The complete staged image's manifest (the commit marker), if any.
    pub fn staged(&self) -> Option<SignedManifest> {
        self.read_manifest(&self.names.staged_manifest)
    }

    /// The upload in progress: its manifest and the bytes on disk.
    pub fn partial(&self) -> Option<(SignedManifest, u64)> {
        let m = self.read_manifest(&self.names.partial_manifest)?;
        let md = fs::symlink_metadata(self.partial_path()).ok()?;
        if !md.file_type().is_file() {
            return None;
        }
        let len = md.len();
        Some((m, len))
    }

    /// Free bytes on `newimg` (`f_bavail`: the blocks ext4 reserves for root are not counted,
    /// so a push never eats into them).
    pub fn free_bytes(&self) -> Result<u64, Refusal> {
        let s = rustix::fs::statvfs(&self.dir)
            .map_err(|e| io_refusal("statvfs", &self.dir, &std::io::Error::from(e)))?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Removes the staged image: its manifest (the commit marker) first, then the bytes.
    /// Returns the version removed, if one was staged.
    pub fn unstage(&self) -> Result<Option<u64>, Refusal> {
        let version = self.staged().map(|m| m.manifest.version);
        if remove(&self.path(&self.names.staged_manifest))? {
            fsync_dir(&self.dir)?;
        }
        if remove(&self.staged_path())? {
            fsync_dir(&self.dir)?;
        }
        Ok(version)
    }

    /// Removes a partial upload and its manifest.
    pub fn discard_partial(&self) -> Result<(), Refusal> {
        let a = remove(&self.partial_path())?;
        let b = remove(&self.path(&self.names.partial_manifest))?;
        if a || b {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Prepares to receive `signed`: resumes the partial upload of the same manifest when
    /// `resume` is set (re-hashing the bytes on disk), otherwise starts afresh. Checks space.
    /// `align` moves a resume point back to where the sender can restart (a chunk boundary
    /// for a delta; the identity for a full push): the bytes after it are dropped.
    pub fn begin(
        &self,
        signed: &SignedManifest,
        resume: bool,
        align: &dyn Fn(u64) -> u64,
    ) -> Result<Upload, Refusal> {
        let size = signed.manifest.size;
        let same = matches!(self.partial(), Some((m, len)) if m == *signed && len <= size);
        if !(resume && same) {
            self.discard_partial()?;
        }
        let on_disk = if resume && same {
            fs::symlink_metadata(self.partial_path())
                .map(|m| m.len())
                .unwrap_or(0)
        } else {
            0
        };
        let have = align(on_disk).min(on_disk);
        // Blocks the partial upload already holds (fallocated up front) are ours to reuse;
        // blocks of a staged image this one replaces are freed if nothing else fits.
        let held = if resume && same {
            allocated(&self.partial_path())
        } else {
            0
        };
        let free = self.free_bytes()?;
        let need = size.saturating_sub(held.max(have));
        if need > free {
            let staged = allocated(&self.staged_path());
            if self.staged().is_some() && need <= free.saturating_add(staged) {
                // Admission already checked this image is newer than the staged one: the
                // staged one is superseded, and both do not fit.
                tracing::info!(
                    "dropping the staged image to make room: {need} bytes needed, {free} free"
                );
                self.unstage()?;
            } else {
                // A refusal leaves no partial file behind.
                self.discard_partial()?;
                return Err(Refusal::new(
                    ErrorCode::NoSpace,
                    format!(
                        "image is {size} bytes, {need} more do not fit: {} has {free} bytes free{}",
                        self.dir.display(),
                        if staged > 0 {
                            format!(" ({staged} more if the staged image went)")
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }
        if have == 0 {
            let tmp = format!("{}.tmp", self.names.partial_manifest);
            durable::write_atomic(
                &self.dir,
                &tmp,
                &self.names.partial_manifest,
                &signed.to_json(),
                no_hook,
            )
            .map_err(sys_refusal)?;
        }
        let path = self.partial_path();
        // Never through a symlink planted at the partial name (a fresh start removed
        // whatever was there; a resume checked it is a regular file).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io_refusal("open", &path, &e))?;
        if have == 0 {
            fsync_dir(&self.dir)?;
        }
        if on_disk > have {
            file.set_len(have)
                .map_err(|e| io_refusal("truncate", &path, &e))?;
        }
        // Reserve the blocks now: a full disk is found before the bytes arrive, and the
        // file is laid out in one piece. KEEP_SIZE: the length still counts received bytes.
        if need > 0 {
            if let Err(e) =
                rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, have, need)
            {
                let e = std::io::Error::from(e);
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    let r = io_refusal("reserve space for", &path, &e);
                    drop(file);
                    self.discard_partial()?;
                    return Err(r);
                }
            }
        }
        let mut hasher = ImageCheck::new(&signed.manifest).map_err(|e| {
            Refusal::new(
                ErrorCode::HashMismatch,
                format!("cannot check this image: {e}"),
            )
        })?;
        if have > 0 {
            let mut f = &file;
            let mut buf = vec![0u8; CHUNK];
            let mut left = have;
            while left > 0 {
                let n = f
                    .read(&mut buf[..usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK))])
                    .map_err(|e| io_refusal("re-read", &path, &e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        Ok(Upload {
            slot: self.clone(),
            signed: signed.clone(),
            file,
            offset: have,
            hasher,
        })
    }
}

/// An upload ready to receive bytes from `offset`.
#[derive(Debug)]
pub struct Upload {
    slot: Slot,
    signed: SignedManifest,
    file: File,
    offset: u64,
    hasher: ImageCheck,
}

/// One buffer moving through the pipeline.
#[derive(Debug)]
pub struct Chunk {
    /// The buffer, [`CHUNK`] bytes long.
    pub buf: Vec<u8>,
    /// How many of its bytes are data.
    pub len: usize,
}

/// The running pipeline: take empty buffers with [`Pipeline::take`], hand full ones to
/// [`Pipeline::put`], then [`Pipeline::finish`].
#[derive(Debug)]
pub struct Pipeline {
    free: tokio::sync::mpsc::UnboundedReceiver<Chunk>,
    full: Option<mpsc::SyncSender<Chunk>>,
    hasher: Option<thread::JoinHandle<ImageCheck>>,
    writer: Option<thread::JoinHandle<Result<(File, u64), Refusal>>>,
    upload: UploadMeta,
}

#[derive(Debug)]
struct UploadMeta {
    slot: Slot,
    signed: SignedManifest,
    offset: u64,
}

impl Upload {
    /// The first byte still needed.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Starts the hasher and writer threads.
    pub fn start(self) -> Pipeline {
        let (free_tx, free_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..NBUF {
            let _ = free_tx.send(Chunk {
                buf: vec![0u8; CHUNK],
                len: 0,
            });
        }
        let (full_tx, full_rx) = mpsc::sync_channel::<Chunk>(NBUF);
        let (hashed_tx, hashed_rx) = mpsc::sync_channel::<Chunk>(NBUF);
        let mut hasher = self.hasher;
        let hasher = thread::Builder::new()
            .name("keel-hash".into())
            .spawn(move || {
                for c in full_rx {
                    hasher.update(&c.buf[..c.len]);
                    if hashed_tx.send(c).is_err() {
                        break;
                    }
                }
                hasher
            })
            .expect("spawn hasher thread");
        let file = self.file;
        let path = self.slot.partial_path();
        let start = self.offset;
        let writer = thread::Builder::new()
            .name("keel-write".into())
            .spawn(move || write_loop(file, &path, start, hashed_rx, free_tx))
            .expect("spawn writer thread");
        Pipeline {
            free: free_rx,
            full: Some(full_tx),
            hasher: Some(hasher),
            writer: Some(writer),
            upload: UploadMeta {
                slot: self.slot,
                signed: self.signed,
                offset: self.offset,
            },
        }
    }
}

fn write_loop(
    file: File,
    path: &Path,
    start: u64,
    rx: mpsc::Receiver<Chunk>,
    free: tokio::sync::mpsc::UnboundedSender<Chunk>,
) -> Result<(File, u64), Refusal> {
    let fd = file.as_raw_fd();
    let mut pos = start;
    let mut window_start = start;
    let mut prev_window: Option<(u64, u64)> = None;
    for mut c in rx {
        file.write_all_at(&c.buf[..c.len], pos)
            .map_err(|e| io_refusal("write", path, &e))?;
        pos += c.len as u64;
        c.len = 0;
        let _ = free.send(c);
        if pos - window_start >= WINDOW {
            // SAFETY: plain syscall on a file descriptor we own for the call's duration.
            unsafe {
                libc::sync_file_range(
                    fd,
                    window_start.cast_signed(),
                    (pos - window_start).cast_signed(),
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if let Some((s, l)) = prev_window {
                // SAFETY: as above.
                let r = unsafe {
                    libc::sync_file_range(
                        fd,
                        s.cast_signed(),
                        l.cast_signed(),
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    )
                };
                if r != 0 {
                    return Err(io_refusal(
                        "write back",
                        path,
                        &std::io::Error::last_os_error(),
                    ));
                }
                let _ = rustix::fs::fadvise(
                    &file,
                    s,
                    std::num::NonZeroU64::new(l),
                    rustix::fs::Advice::DontNeed,
                );
            }
            prev_window = Some((window_start, pos - window_start));
            window_start = pos;
        }
    }
    Ok((file, pos))
}

impl Pipeline {
    /// An empty buffer; `None` when the writer stopped (its error comes from `finish`).
    pub async fn take(&mut self) -> Option<Chunk> {
        self.free.recv().await
    }

    /// Hands a filled buffer on. Never blocks: only [`NBUF`] buffers exist.
    pub fn put(&mut self, c: Chunk) -> bool {
        match &self.full {
            Some(tx) => tx.send(c).is_ok(),
            None => false,
        }
    }

    /// Waits for the threads (blocking: call from a blocking context) and commits when the
    /// stream was complete and its digest matches; on any failure the partial upload is
    /// removed unless `keep_partial` says a resume may continue it.
    pub fn finish(mut self, complete: bool, keep_partial: bool) -> Result<ImageRecord, Refusal> {
        self.full = None;
        let hasher = self.hasher.take().expect("hasher").join();
        let written = self.writer.take().expect("writer").join();
        let u = &self.upload;
        let fail = |r: Refusal, keep: bool| {
            if !keep {
                u.slot.discard_partial()?;
            }
            Err(r)
        };
        let (file, end) = match written {
            Ok(Ok(x)) => x,
            Ok(Err(r)) => return fail(r, false),
            Err(_) => return fail(Refusal::new(ErrorCode::Io, "writer thread panicked"), false),
        };
        let hasher = match hasher {
            Ok(h) => h,
            Err(_) => return fail(Refusal::new(ErrorCode::Io, "hasher thread panicked"), false),
        };
        let path = u.slot.partial_path();
        if let Err(e) = file.sync_all() {
            return fail(io_refusal("fsync", &path, &e), false);
        }
        let m = &u.signed.manifest;
        if !complete {
            return fail(
                Refusal::new(
                    ErrorCode::SizeMismatch,
                    format!("stream ended after {end} of {} bytes", m.size),
                ),
                keep_partial,
            );
        }
        if let Err(e) = hasher.finish() {
            return fail(
                Refusal::new(
                    ErrorCode::HashMismatch,
                    format!("received {end} bytes: {e}"),
                ),
                false,
            );
        }
        drop(file);
        self.commit()
    }

    fn commit(&self) -> Result<ImageRecord, Refusal> {
        let u = &self.upload;
        let s = &u.slot;
        let n = &s.names;
        // 1. The old commit marker goes first: from here on nothing is staged.
        if remove(&s.path(&n.staged_manifest))? {
            fsync_dir(&s.dir)?;
        }
        // 2. The bytes take the staged name.
        let staged = s.staged_path();
        fs::rename(s.partial_path(), &staged).map_err(|e| io_refusal("rename", &staged, &e))?;
        // 3. The manifest, written last, commits.
        durable::write_atomic(
            &s.dir,
            &n.staged_manifest_tmp,
            &n.staged_manifest,
            &u.signed.to_json(),
            no_hook,
        )
        .map_err(sys_refusal)?;
        remove(&s.path(&n.partial_manifest))?;
        fsync_dir(&s.dir)?;
        Ok(ImageRecord::from_manifest(&u.signed.manifest))
    }

    /// Offset the upload started from.
    pub fn resumed_from(&self) -> u64 {
        self.upload.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::hex;
    use keel_proto::manifest::{Manifest, SigningKey, MANIFEST_FORMAT};
    use sha2::{Digest, Sha256};

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keel-stage-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn manifest(data: &[u8], version: u64) -> SignedManifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "app".into(),
            version,
            size: data.len() as u64,
            sha256: hex::encode(&Sha256::digest(data)),
            created: 0,
            min_version: None,
            verity: None,
        }
        .sign(&SigningKey::from_bytes(&[3; 32]))
    }

    fn feed(p: &mut Pipeline, data: &[u8]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for piece in data.chunks(CHUNK) {
            let mut c = rt.block_on(p.take()).unwrap();
            c.buf[..piece.len()].copy_from_slice(piece);
            c.len = piece.len();
            assert!(p.put(c));
        }
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i: usize| i.to_le_bytes()[0])
            .map(|b| b.wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn receive_commit_and_replace() {
        let d = tmpdir("commit");
        let slot = Slot::new(&d, "root.img");
        let a = data(3 * CHUNK + 17, 1);
        let ma = manifest(&a, 2);
        let mut p = slot.begin(&ma, false, &|n| n).unwrap().start();
        feed(&mut p, &a);
        let rec = p.finish(true, false).unwrap();
        assert_eq!(rec.version, 2);
        assert_eq!(fs::read(d.join("root.img")).unwrap(), a);
        assert_eq!(slot.staged().unwrap(), ma);
        assert!(slot.partial().is_none());

        // A corrupt replacement leaves the staged image as it was.
        let b = data(CHUNK, 2);
        let mut mb = manifest(&b, 3);
        mb.manifest.sha256 = "00".repeat(32);
        let mut p = slot.begin(&mb, false, &|n| n).unwrap().start();
        feed(&mut p, &b);
        let e = p.finish(true, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::HashMismatch);
        assert_eq!(fs::read(d.join("root.img")).unwrap(), a);
        assert_eq!(slot.staged().unwrap(), ma);
        assert!(!slot.partial_path().exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn cut_upload_resumes_from_disk() {
        let d = tmpdir("resume");
        let slot = Slot::new(&d, "root.img");
        let a = data(2 * CHUNK + 5, 9);
        let m = manifest(&a, 4);
        let mut p = slot.begin(&m, false, &|n| n).unwrap().start();
        feed(&mut p, &a[..CHUNK + 3]);
        let e = p.finish(false, true).unwrap_err();
        assert_eq!(e.code, ErrorCode::SizeMismatch);
        assert_eq!(slot.partial().unwrap().1, (CHUNK + 3) as u64);
        assert!(slot.staged().is_none());

        let u = slot.begin(&m, true, &|n| n).unwrap();
        assert_eq!(u.offset(), (CHUNK + 3) as u64);
        let mut p = u.start();
        feed(&mut p, &a[CHUNK + 3..]);
        p.finish(true, false).unwrap();
        assert_eq!(fs::read(d.join("root.img")).unwrap(), a);

        // Without resume, or with another manifest, a partial upload starts over.
        let mut p = slot.begin(&manifest(&a, 5), false, &|n| n).unwrap().start();
        feed(&mut p, &a[..10]);
        let _ = p.finish(false, true);
        assert_eq!(
            slot.begin(&manifest(&a, 6), true, &|n| n).unwrap().offset(),
            0
        );
        fs::remove_dir_all(&d).unwrap();
    }

    /// A verity image and its manifest (format 2), with the root hash `root` signed.
    fn verity_image(blocks: usize, root: Option<&str>) -> (Vec<u8>, SignedManifest) {
        let mut img = data(blocks * 4096, 5);
        let r = keel_verity::check::append_tree(&mut img, &[8; 32], [0; 16]).unwrap();
        let mut m = manifest(&img, 7);
        m.manifest.format = keel_proto::manifest::MANIFEST_FORMAT_VERITY;
        m.manifest.verity = Some(keel_proto::manifest::VerityInfo {
            data_size: (blocks * 4096) as u64,
            hash_offset: (blocks * 4096) as u64,
            salt: "08".repeat(32),
            root_hash: root.map_or_else(|| hex::encode(&r), str::to_string),
        });
        m.manifest.validate().unwrap();
        (img, m)
    }

    #[test]
    fn a_verity_tree_is_checked_while_it_arrives_and_across_a_resume() {
        let d = tmpdir("verity");
        let slot = Slot::new(&d, "root.img");
        let (img, m) = verity_image(700, None);
        let mut p = slot.begin(&m, false, &|n| n).unwrap().start();
        feed(&mut p, &img[..CHUNK + 100]);
        let _ = p.finish(false, true);
        let mut p = slot.begin(&m, true, &|n| n).unwrap().start();
        feed(&mut p, &img[CHUNK + 100..]);
        p.finish(true, false).unwrap();
        assert_eq!(slot.staged().unwrap(), m);

        // Signed over the right bytes, but a root the tree does not give: never staged.
        let (img, bad) = verity_image(700, Some(&"ab".repeat(32)));
        let mut bad = bad;
        bad.manifest.version = 8;
        let mut p = slot.begin(&bad, false, &|n| n).unwrap().start();
        feed(&mut p, &img);
        let e = p.finish(true, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::HashMismatch);
        assert!(e.message.contains("verity root hash"), "{}", e.message);
        assert_eq!(slot.staged().unwrap(), m);
        assert!(!slot.partial_path().exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
