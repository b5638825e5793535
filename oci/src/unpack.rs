//! Layers applied to a directory tree, lowest first, as a container runtime would see the
//! image: regular files, directories, symlinks, hard links, device nodes and FIFOs with their
//! owners, modes, mtimes and xattrs (`SCHILY.xattr.*`); whiteouts and opaque directories
//! remove what lower layers put there (never what the same layer adds, wherever in the tar
//! the marker comes). gzip, zstd or plain tar, told by the stream's first bytes.
//!
//! Every file operation is relative to a directory fd opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)` and the last component is never followed: an entry whose parent
//! path leads out of the tree through a symlink (absolute, or `..` past the root) is refused
//! with its name, as are absolute paths and `..` ([`crate::entry`]). Needs root (owners,
//! device nodes), as `umoci unpack` does.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::Timespec;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;

use crate::entry::{self, Action};
use crate::error::{io, OciError};

/// A tree being built from layers.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    path: PathBuf,
    /// Directories' mtimes, set once every layer is in (adding entries changes them).
    dir_times: Vec<(Vec<u8>, Timespec)>,
}

/// What one layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries put in place.
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// The metadata of one entry.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn errno(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

impl Tree {
    /// Creates `path` (which must not exist) as the tree's root, mode 0755.
    pub fn create(path: &Path) -> Result<Tree, OciError> {
        std::fs::create_dir(path).map_err(io(path, "create the tree's root"))?;
        let root = rfs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| OciError::Io {
            path: path.to_path_buf(),
            op: "open the tree's root",
            source: errno(e),
        })?;
        Ok(Tree {
            root,
            path: path.to_path_buf(),
            dir_times: Vec::new(),
        })
    }

    /// The tree's root directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens directory `parts` below the root, never leaving it; with `create`, missing
    /// directories are made (0755, root's, their mtime the epoch).
    fn open_dir(&mut self, parts: &[Vec<u8>], create: bool) -> Result<OwnedFd, Errno> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let joined = if parts.is_empty() {
            b".".to_vec()
        } else {
            entry::join(parts)
        };
        match rfs::openat2(&self.root, &joined, flags, Mode::empty(), BENEATH) {
            Err(Errno::NOENT) if create => {}
            r => return r,
        }
        let mut fd = rfs::openat2(&self.root, ".", flags, Mode::empty(), BENEATH)?;
        for (i, p) in parts.iter().enumerate() {
            match rfs::mkdirat(&fd, p.as_slice(), Mode::from_raw_mode(0o755)) {
                Ok(()) => self.dir_times.push((
                    entry::join(&parts[..=i]),
                    Timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    },
                )),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
            fd = rfs::openat2(&fd, p.as_slice(), flags, Mode::empty(), BENEATH)?;
        }
        Ok(fd)
    }

    /// Applies one layer (`name` is its digest, for errors) from its blob's bytes.
    pub fn apply_layer<R: Read>(&mut self, name: &str, blob: R) -> Result<LayerStats, OciError> {
        let layer_err = |why: String| OciError::Layer {
            layer: name.to_string(),
            why,
        };
        let mut buf = BufReader::with_capacity(64 << 10, blob);
        let head = buf
            .fill_buf()
            .map_err(|e| layer_err(format!("reading: {e}")))?
            .to_vec();
        let stream: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::GzDecoder::new(buf))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                ruzstd::decoding::StreamingDecoder::new(buf)
                    .map_err(|e| layer_err(format!("zstd: {e}")))?,
            )
        } else {
            Box::new(buf)
        };
        let mut archive = tar::Archive::new(stream);
        let entries = archive
            .entries()
            .map_err(|e| layer_err(format!("not a tar stream: {e}")))?;
        let mut created: HashSet<Vec<u8>> = HashSet::new();
        let mut stats = LayerStats::default();
        for e in entries {
            let mut e = e.map_err(|e| layer_err(format!("truncated or corrupt: {e}")))?;
            let path = e.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&path).into_owned();
            let refuse = |why: String| OciError::Entry {
                layer: name.to_string(),
                entry: shown.clone(),
                why,
            };
            let kind = e.header().entry_type();
            if kind.is_pax_global_extensions() {
                continue;
            }
            let action = entry::classify(&path).map_err(|w| refuse(w.to_string()))?;
            match action {
                Action::Whiteout { parent, name: n } => {
                    let mut full = parent.clone();
                    full.push(n.clone());
                    if !created.contains(&entry::join(&full)) {
                        match self.open_dir(&parent, false) {
                            Ok(dir) => remove_tree(&dir, &n)
                                .map_err(|e| refuse(format!("whiteout: {e}")))?,
                            Err(Errno::NOENT) => {}
                            Err(e) => return Err(refuse(format!("its directory: {e}"))),
                        }
                    }
                    stats.whiteouts += 1;
                }
                Action::Opaque { dir } => {
                    match self.open_dir(&dir, false) {
                        Ok(fd) => {
                            let prefix = entry::join(&dir);
                            clear_dir(&fd, &prefix, &created)
                                .map_err(|e| refuse(format!("opaque: {e}")))?;
                        }
                        Err(Errno::NOENT) => {}
                        Err(e) => return Err(refuse(format!("its directory: {e}"))),
                    }
                    stats.whiteouts += 1;
                }
                Action::Root => {
                    let meta = meta_of(&mut e).map_err(refuse)?;
                    set_fd_meta(&self.root, &meta).map_err(|e| refuse(format!("metadata: {e}")))?;
                    self.dir_times.push((Vec::new(), meta.mtime));
                }
                Action::Put { parent, name: n } => {
                    let meta = meta_of(&mut e).map_err(refuse)?;
                    let dir = self.open_dir(&parent, true).map_err(|e| {
                        refuse(match e {
                            Errno::XDEV => {
                                "its directory is reached through a symlink that leaves the tree"
                                    .to_string()
                            }
                            Errno::NOTDIR => "its directory is not a directory".to_string(),
                            e => format!("its directory: {e}"),
                        })
                    })?;
                    let mut full = parent.clone();
                    full.push(n.clone());
                    let joined = entry::join(&full);
                    let wrote = self
                        .put(&dir, &n, &joined, &mut e, kind, &meta)
                        .map_err(refuse)?;
                    stats.bytes += wrote;
                    stats.entries += 1;
                    created.insert(joined);
                    for i in 1..=parent.len() {
                        created.insert(entry::join(&parent[..i]));
                    }
                }
            }
        }
        // Read past the end-of-archive blocks to the end of the stream: a truncated or
        // corrupt compressed stream shows here.
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
            .map_err(|e| layer_err(format!("after the last entry: {e}")))?;
        Ok(stats)
    }

    /// Puts one entry at `dir`/`name`; returns the bytes written.
    fn put<R: Read>(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        joined: &[u8],
        e: &mut tar::Entry<'_, R>,
        kind: tar::EntryType,
        meta: &Meta,
    ) -> Result<u64, String> {
        let existing = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok();
        let existing_dir = existing
            .as_ref()
            .is_some_and(|s| rfs::FileType::from_raw_mode(s.st_mode) == rfs::FileType::Directory);
        if existing.is_some() && !(kind.is_dir() && existing_dir) {
            remove_tree(dir, name).map_err(|e| format!("replacing what was there: {e}"))?;
        }
        let perm = Mode::from_raw_mode(meta.mode & 0o7777);
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous => {
                let fd = rfs::openat(
                    dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| format!("create: {e}"))?;
                let mut f = std::fs::File::from(fd);
                let n = std::io::copy(e, &mut f)
                    .map_err(|e| format!("contents: {e} (the layer is truncated or corrupt)"))?;
                set_fd_meta(&f, meta).map_err(|e| format!("metadata: {e}"))?;
                Ok(n)
            }
            T::Directory => {
                if !existing_dir {
                    rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| format!("mkdir: {e}"))?;
                }
                let fd = rfs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| format!("open: {e}"))?;
                set_fd_meta(&fd, meta).map_err(|e| format!("metadata: {e}"))?;
                self.dir_times.push((joined.to_vec(), meta.mtime));
                Ok(0)
            }
            T::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or("a symlink without a target")?
                    .into_owned();
                rfs::symlinkat(target.as_slice(), dir, name)
                    .map_err(|e| format!("symlink: {e}"))?;
                rfs::chownat(
                    dir,
                    name,
                    Some(uid(meta.uid)),
                    Some(gid(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| format!("chown: {e}"))?;
                rfs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| format!("mtime: {e}"))?;
                Ok(0)
            }
            T::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or("a hard link without a target")?
                    .into_owned();
                let mut t =
                    entry::components(&target).map_err(|w| format!("hard link target: {w}"))?;
                let tname = t.pop().ok_or("a hard link to the root")?;
                let tdir = self
                    .open_dir(&t, false)
                    .map_err(|e| format!("hard link target's directory: {e}"))?;
                rfs::linkat(&tdir, tname.as_slice(), dir, name, AtFlags::empty()).map_err(|e| {
                    format!("hard link to {:?}: {e}", String::from_utf8_lossy(&target))
                })?;
                Ok(0)
            }
            T::Char | T::Block | T::Fifo => {
                let ft = match kind {
                    T::Char => rfs::FileType::CharacterDevice,
                    T::Block => rfs::FileType::BlockDevice,
                    _ => rfs::FileType::Fifo,
                };
                let major = e.header().device_major().ok().flatten().unwrap_or(0);
                let minor = e.header().device_minor().ok().flatten().unwrap_or(0);
                rfs::mknodat(dir, name, ft, perm, rfs::makedev(major, minor))
                    .map_err(|e| format!("mknod: {e}"))?;
                rfs::chownat(
                    dir,
                    name,
                    Some(uid(meta.uid)),
                    Some(gid(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| format!("chown: {e}"))?;
                rfs::chmodat(dir, name, perm, AtFlags::empty())
                    .map_err(|e| format!("chmod: {e}"))?;
                rfs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| format!("mtime: {e}"))?;
                Ok(0)
            }
            other => Err(format!(
                "entry type {:?} is not supported",
                other.as_byte() as char
            )),
        }
    }

    /// The directory (made if missing) and name where an injected `dst` goes, whatever was
    /// there removed.
    fn injected_slot(&mut self, dst: &str) -> Result<(OwnedFd, Vec<u8>), OciError> {
        let bad = |why: String| injected_error(dst, why);
        let mut parts = entry::components(dst.trim_start_matches('/').as_bytes())
            .map_err(|w| bad(w.to_string()))?;
        let name = parts.pop().ok_or_else(|| bad("no file name".into()))?;
        let dir = self
            .open_dir(&parts, true)
            .map_err(|e| bad(format!("its directory: {e}")))?;
        remove_tree(&dir, &name).map_err(|e| bad(format!("replacing what was there: {e}")))?;
        Ok((dir, name))
    }

    /// Writes a regular file at `dst` (a path inside the tree, `/` or not at its start) from
    /// `src`, owned by root with `mode`, replacing what is there; missing directories are
    /// made. For what `keelctl build` injects (the agent, keys, the run config).
    pub fn write_file<R: Read>(
        &mut self,
        dst: &str,
        src: &mut R,
        mode: u32,
    ) -> Result<u64, OciError> {
        let bad = |why: String| injected_error(dst, why);
        let (dir, name) = self.injected_slot(dst)?;
        let fd = rfs::openat(
            &dir,
            name.as_slice(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| bad(format!("create: {e}")))?;
        let mut f = std::fs::File::from(fd);
        let n = std::io::copy(src, &mut f).map_err(|e| bad(format!("write: {e}")))?;
        let meta = Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            xattrs: Vec::new(),
        };
        set_fd_meta(&f, &meta).map_err(bad)?;
        Ok(n)
    }

    /// Makes `dst` a symlink to `target` (root's, mtime the epoch), replacing what is there.
    pub fn symlink(&mut self, dst: &str, target: &str) -> Result<(), OciError> {
        let bad = |why: String| injected_error(dst, why);
        let (dir, name) = self.injected_slot(dst)?;
        rfs::symlinkat(target, &dir, name.as_slice()).map_err(|e| bad(format!("symlink: {e}")))?;
        rfs::utimensat(
            &dir,
            name.as_slice(),
            &times(Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| bad(format!("mtime: {e}")))?;
        Ok(())
    }

    /// Whether `rel` exists in the tree (not following a last symlink).
    pub fn exists(&mut self, rel: &str) -> bool {
        let Ok(mut parts) = entry::components(rel.trim_start_matches('/').as_bytes()) else {
            return false;
        };
        let Some(name) = parts.pop() else { return true };
        self.open_dir(&parts, false)
            .is_ok_and(|d| rfs::statat(&d, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).is_ok())
    }

    /// Sets every directory's mtime as its last layer gave it (deepest first, so setting one
    /// does not disturb its parent's).
    pub fn finish(mut self) -> Result<PathBuf, OciError> {
        let mut last: std::collections::HashMap<Vec<u8>, Timespec> =
            std::collections::HashMap::new();
        for (p, t) in self.dir_times.drain(..) {
            last.insert(p, t);
        }
        let mut dirs: Vec<(Vec<u8>, Timespec)> = last.into_iter().collect();
        dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (p, t) in dirs {
            let parts = entry::components(&p).unwrap_or_default();
            if let Ok(fd) = self.open_dir(&parts, false) {
                rfs::futimens(&fd, &times(t)).map_err(|e| OciError::Io {
                    path: self.path.join(String::from_utf8_lossy(&p).as_ref()),
                    op: "set the directory's mtime",
                    source: errno(e),
                })?;
            }
        }
        Ok(self.path)
    }
}

fn uid(u: u32) -> rfs::Uid {
    rfs::Uid::from_raw(u)
}

fn gid(g: u32) -> rfs::Gid {
    rfs::Gid::from_raw(g)
}

fn times(t: Timespec) -> Timestamps {
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// The entry's owner, mode, mtime and xattrs, PAX records overriding the header.
fn meta_of<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let h = e.header();
    let mut m = Meta {
        mode: h.mode().map_err(|e| format!("mode: {e}"))?,
        uid: u32::try_from(h.uid().map_err(|e| format!("uid: {e}"))?)
            .map_err(|_| "uid out of range")?,
        gid: u32::try_from(h.gid().map_err(|e| format!("gid: {e}"))?)
            .map_err(|_| "gid out of range")?,
        mtime: Timespec {
            tv_sec: i64::try_from(h.mtime().map_err(|e| format!("mtime: {e}"))?).unwrap_or(0),
            tv_nsec: 0,
        },
        xattrs: Vec::new(),
    };
    if let Some(pax) = e.pax_extensions().map_err(|e| format!("PAX header: {e}"))? {
        for x in pax {
            let x = x.map_err(|e| format!("PAX record: {e}"))?;
            let Ok(key) = x.key() else { continue };
            let val = x.value_bytes();
            let num = || {
                std::str::from_utf8(val)
                    .ok()
                    .and_then(|v| v.trim().parse::<u32>().ok())
            };
            match key {
                "uid" => m.uid = num().ok_or("PAX uid is not a number")?,
                "gid" => m.gid = num().ok_or("PAX gid is not a number")?,
                "mtime" => {
                    let v = std::str::from_utf8(val).map_err(|_| "PAX mtime is not text")?;
                    let (s, frac) = v.trim().split_once('.').unwrap_or((v.trim(), ""));
                    m.mtime.tv_sec = s.parse().map_err(|_| "PAX mtime is not a number")?;
                    let digits: String = frac.chars().take(9).collect();
                    m.mtime.tv_nsec = if digits.is_empty() {
                        0
                    } else {
                        format!("{digits:0<9}")
                            .parse()
                            .map_err(|_| "PAX mtime fraction")?
                    };
                }
                k => {
                    if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                        m.xattrs.push((name.to_string(), val.to_vec()));
                    }
                }
            }
        }
    }
    Ok(m)
}

/// Owner, then mode (chown clears set-id bits), xattrs and mtime of an open file or dir.
fn set_fd_meta<F: AsFd>(fd: F, m: &Meta) -> Result<(), String> {
    rfs::fchown(&fd, Some(uid(m.uid)), Some(gid(m.gid))).map_err(|e| format!("chown: {e}"))?;
    rfs::fchmod(&fd, Mode::from_raw_mode(m.mode & 0o7777)).map_err(|e| format!("chmod: {e}"))?;
    for (k, v) in &m.xattrs {
        rfs::fsetxattr(&fd, k.as_str(), v, rfs::XattrFlags::empty())
            .map_err(|e| format!("xattr {k}: {e}"))?;
    }
    rfs::futimens(&fd, &times(m.mtime)).map_err(|e| format!("mtime: {e}"))?;
    Ok(())
}

/// Removes `dir`/`name`, a directory with everything in it; never follows a symlink.
fn remove_tree(dir: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::Directory {
        return rfs::unlinkat(dir, name, AtFlags::empty());
    }
    let fd = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for n in children(&fd)? {
        remove_tree(&fd, &n)?;
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// The names in a directory, `.` and `..` left out.
fn children(fd: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let mut out = Vec::new();
    for d in rfs::Dir::read_from(fd)? {
        let d = d?;
        let n = d.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

/// Removes what `dir` (at `prefix`) holds, but what this layer created.
fn clear_dir(fd: &OwnedFd, prefix: &[u8], created: &HashSet<Vec<u8>>) -> Result<(), Errno> {
    for n in children(fd)? {
        let p = if prefix.is_empty() {
            n.clone()
        } else {
            [prefix, b"/", &n].concat()
        };
        if !created.contains(&p) {
            remove_tree(fd, &n)?;
        }
    }
    Ok(())
}

/// An error about a file `keelctl build` injects.
fn injected_error(dst: &str, why: String) -> OciError {
    OciError::Entry {
        layer: "(injected)".into(),
        entry: dst.to_string(),
        why,
    }
}
