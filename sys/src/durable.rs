//! Crash-safe writes and careful reads: the one implementation initstage and the agent use.
//!
//! A write of `dir/name` goes: remove a stale `dir/tmp` (left by a power cut), create `dir/tmp`
//! exclusively without following symlinks (`O_EXCL|O_NOFOLLOW`, relative to the directory's
//! fd), write, fsync, rename over `name`, fsync the directory. A symlink planted at the temp
//! name is removed, never written through; a power cut at any point leaves the old `name` or
//! the new one, never a mix.
//!
//! Reads of files that came from disk (manifests, the state) open with
//! `O_NOFOLLOW|O_NONBLOCK`, require a regular file and cap the size: a FIFO cannot block the
//! reader, a symlink to `/dev/zero` cannot fill memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};

/// Called after each write step with its name ("write temp", "fsync temp", "rename",
/// "fsync dir", "unlink"): initstage's failpoints.
pub type Hook = fn(&'static str);

/// The hook for callers without failpoints.
pub fn no_hook(_: &'static str) {}

/// A file-system step that failed: which step, on which path, why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct IoError {
    /// The step ("create", "fsync", "rename", ...).
    pub op: &'static str,
    /// The path it was applied to.
    pub path: PathBuf,
    /// The system's reason.
    #[source]
    pub source: io::Error,
}

impl IoError {
    /// Wraps `source` with its step and path.
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        IoError {
            op,
            path: path.into(),
            source: source.into(),
        }
    }

    /// Whether the file system is full.
    pub fn is_no_space(&self) -> bool {
        self.source.raw_os_error() == Some(libc::ENOSPC)
    }
}

/// Shorthand.
pub type Result<T, E = IoError> = std::result::Result<T, E>;

fn open_dir(dir: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| IoError::new("open directory", dir, e))
}

fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// fsyncs a directory so the renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path, hook: Hook) -> Result<()> {
    let fd = open_dir(dir)?;
    rustix::fs::fsync(&fd).map_err(|e| IoError::new("fsync directory", dir, e))?;
    hook("fsync dir");
    Ok(())
}

/// Removes `path` (a symlink itself, never its target); `Ok(false)` when it was not there.
pub fn remove(path: &Path, hook: Hook) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            hook("unlink");
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(IoError::new("remove", path, e)),
    }
}

/// Creates `dir/name` for writing: any file or symlink already there is removed first, then
/// the name is created with `O_EXCL|O_NOFOLLOW` relative to the directory, so nothing outside
/// `dir` can be written through it.
pub fn create_new(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    if !plain_name(name) {
        return Err(IoError::new(
            "create",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a plain file name"),
        ));
    }
    let d = open_dir(dir)?;
    create_in(&d, dir, name)
}

fn create_in(d: &OwnedFd, dir: &Path, name: &str) -> Result<File> {
    create_in_mode(d, dir, name, 0o644)
}

fn create_in_mode(d: &OwnedFd, dir: &Path, name: &str, mode: u32) -> Result<File> {
    let path = dir.join(name);
    match rustix::fs::unlinkat(d, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(IoError::new("remove stale", &path, e)),
    }
    let fd = rustix::fs::openat(
        d,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| IoError::new("create", &path, e))?;
    Ok(File::from(fd))
}

/// Replaces `dir/name` with `bytes` crash-safely through `dir/tmp`: exclusive create, write,
/// fsync, rename, fsync the directory. `hook` runs after each of the four steps.
pub fn write_atomic(dir: &Path, tmp: &str, name: &str, bytes: &[u8], hook: Hook) -> Result<()> {
    write_atomic_mode(dir, tmp, name, bytes, 0o644, hook)
}

/// [`write_atomic`] creating the file with `mode` (0600 for a private key: it is never
/// readable by others, not even between create and rename).
pub fn write_atomic_mode(
    dir: &Path,
    tmp: &str,
    name: &str,
    bytes: &[u8],
    mode: u32,
    hook: Hook,
) -> Result<()> {
    let dst = dir.join(name);
    if !plain_name(tmp) || !plain_name(name) {
        return Err(IoError::new(
            "write",
            dst,
            io::Error::new(io::ErrorKind::InvalidInput, "not a plain file name"),
        ));
    }
    let d = open_dir(dir)?;
    let tmp_path = dir.join(tmp);
    {
        let mut f = create_in_mode(&d, dir, tmp, mode)?;
        f.write_all(bytes)
            .map_err(|e| IoError::new("write", &tmp_path, e))?;
        hook("write temp");
        f.sync_all()
            .map_err(|e| IoError::new("fsync", &tmp_path, e))?;
        hook("fsync temp");
    }
    rustix::fs::renameat(&d, tmp, &d, name).map_err(|e| IoError::new("rename", &dst, e))?;
    hook("rename");
    rustix::fs::fsync(&d).map_err(|e| IoError::new("fsync directory", dir, e))?;
    hook("fsync dir");
    Ok(())
}

/// Opens `path` for reading only if it is a regular file, without following a symlink and
/// without blocking on a FIFO. `Ok(None)` when it does not exist.
pub fn open_regular(path: &Path) -> Result<Option<(File, u64)>> {
    let fd = match rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::LOOP) => {
            return Err(IoError::new(
                "open",
                path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "is a symlink: refusing to follow it",
                ),
            ))
        }
        Err(e) => return Err(IoError::new("open", path, e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| IoError::new("stat", path, e))?;
    let ty = FileType::from_raw_mode(st.st_mode);
    if ty != FileType::RegularFile {
        return Err(IoError::new(
            "open",
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("is a {} (a regular file is required)", type_name(ty)),
            ),
        ));
    }
    // Reads of a regular file do not block anyway; clear O_NONBLOCK for plain semantics.
    let _ = rustix::fs::fcntl_setfl(fd.as_fd(), OFlags::empty());
    Ok(Some((
        File::from(fd),
        u64::try_from(st.st_size).unwrap_or(0),
    )))
}

fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::Fifo => "FIFO",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Directory => "directory",
        FileType::Socket => "socket",
        FileType::Symlink => "symlink",
        _ => "special file",
    }
}

/// Reads the regular file `path` whole if it is at most `max` bytes (see [`open_regular`]).
/// `Ok(None)` when it does not exist.
pub fn read_regular(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    let Some((f, len)) = open_regular(path)? else {
        return Ok(None);
    };
    let too_big = |n: u64| {
        IoError::new(
            "read",
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("is {n} bytes, over the {max}-byte limit for this file"),
            ),
        )
    };
    if len > max {
        return Err(too_big(len));
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // One byte past the limit tells a file that grew since the stat.
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| IoError::new("read", path, e))?;
    if buf.len() as u64 > max {
        return Err(too_big(buf.len() as u64));
    }
    Ok(Some(buf))
}

/// Whether `path` exists as anything (a dangling symlink counts), without following it.
pub fn exists_nofollow(path: &Path) -> bool {
    rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keel-durable-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_replaces_and_hooks_every_step() {
        use std::sync::Mutex;
        static STEPS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
        fn record(s: &'static str) {
            STEPS.lock().unwrap().push(s);
        }
        let d = tmpdir("write");
        write_atomic(&d, "f.tmp", "f", b"one", record).unwrap();
        write_atomic(&d, "f.tmp", "f", b"two", record).unwrap();
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"two");
        assert!(!d.join("f.tmp").exists());
        assert_eq!(
            STEPS.lock().unwrap()[..4],
            ["write temp", "fsync temp", "rename", "fsync dir"]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_planted_symlink_at_the_temp_name_is_not_written_through() {
        let d = tmpdir("symlink");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("f.tmp")).unwrap();
        write_atomic(&d, "f.tmp", "f", b"new", no_hook).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"new");
        assert!(write_atomic(&d, "../x", "f", b"", no_hook).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reads_refuse_fifos_symlinks_and_oversized_files() {
        let d = tmpdir("read");
        assert!(read_regular(&d.join("missing"), 10).unwrap().is_none());
        std::fs::write(d.join("small"), b"12345").unwrap();
        assert_eq!(
            read_regular(&d.join("small"), 5).unwrap().unwrap(),
            b"12345"
        );
        let e = read_regular(&d.join("small"), 4).unwrap_err();
        assert!(e.to_string().contains("over the 4-byte limit"), "{e}");
        std::os::unix::fs::symlink("/dev/zero", d.join("zero")).unwrap();
        let e = read_regular(&d.join("zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        let fifo = d.join("fifo");
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let e = read_regular(&fifo, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(exists_nofollow(&d.join("zero")));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
