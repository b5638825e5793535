//! File transfer for `keelctl cp`: into the guest crash-safely (an exclusive temporary file
//! beside the target, fsync, mode, rename, fsync of the directory: a reader sees the old file
//! or the whole new one, never a part), out of it from regular files only. Paths are checked
//! by [`target`] (pure) before any I/O; the final component is never followed if it is a
//! symlink. Memory is constant: a channel of four chunks to a writer (or from a reader)
//! thread, so the runtime thread never blocks on the disk, and the chunks' buffers return
//! for reuse.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_proto::message::{data_header, ErrorCode, Response};
use keel_proto::wire::KIND_DATA;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::conn::{write_frame, Conn};
use crate::session::Outcome;
use crate::shared::Shared;
use crate::verify::Refusal;

/// Bytes per data frame going out.
pub const OUT_CHUNK: usize = 256 << 10;

/// Where a file goes: its directory and its plain name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The directory (must exist).
    pub dir: PathBuf,
    /// The file name in it.
    pub name: String,
}

/// Checks a guest path from the wire: absolute, no NUL, a plain last component.
pub fn target(path: &str) -> Result<Target, Refusal> {
    let bad = |m: &str| Refusal::new(ErrorCode::BadRequest, format!("cp: {path:?}: {m}"));
    if !path.starts_with('/') {
        return Err(bad("not an absolute path"));
    }
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("does not end in a file name"));
    }
    Ok(Target {
        dir: PathBuf::from(if dir.is_empty() { "/" } else { dir }),
        name: name.to_string(),
    })
}

/// The temporary name a file is received under, beside the target.
pub fn temp_name(name: &str) -> String {
    format!(".{name}.keel-tmp")
}

fn io_err(op: &str, path: &Path, e: &std::io::Error) -> Refusal {
    crate::stage::io_refusal(&format!("cp: {op}"), path, e)
}

/// Checks the target before a byte: its directory exists, it is not a directory, a symlink
/// or a special file, and the file system has room for `size` bytes.
fn check_in(t: &Target, size: u64, max: u64) -> Result<(), Refusal> {
    let path = t.dir.join(&t.name);
    if size > max {
        return Err(Refusal::new(
            ErrorCode::NoSpace,
            format!("cp: {size} bytes is over the agent's limit of {max} ([exec] max_file_bytes)"),
        ));
    }
    match std::fs::symlink_metadata(&t.dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("cp: {} is not a directory", t.dir.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                format!("cp: no such directory: {}", t.dir.display()),
            ))
        }
        Err(e) => return Err(io_err("directory", &t.dir, &e)),
    }
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) => {
            let what = if m.is_dir() {
                "a directory: name the file (a trailing / appends the source's name)"
            } else if m.file_type().is_symlink() {
                "a symlink: it is not followed"
            } else {
                "not a regular file"
            };
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("cp: {} is {what}", path.display()),
            ));
        }
        Err(e) => return Err(io_err("stat", &path, &e)),
    }
    let st = rustix::fs::statvfs(&t.dir)
        .map_err(|e| io_err("statvfs", &t.dir, &std::io::Error::from(e)))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if size > free {
        return Err(Refusal::new(
            ErrorCode::NoSpace,
            format!(
                "cp: {} needs {size} bytes, {} has {free} free",
                path.display(),
                t.dir.display()
            ),
        ));
    }
    Ok(())
}

/// The writer thread: creates the temporary file, writes what arrives, then on `None` (the
/// whole file arrived) fsyncs, sets the mode, renames and fsyncs the directory. Any failure
/// removes the temporary file.
fn write_file(
    t: Target,
    mode: u32,
    mut rx: mpsc::Receiver<Option<Vec<u8>>>,
    back: std::sync::mpsc::Sender<Vec<u8>>,
) -> Result<(), Refusal> {
    let tmp = temp_name(&t.name);
    let tmp_path = t.dir.join(&tmp);
    let mut f = keel_sys::durable::create_new(&t.dir, &tmp)
        .map_err(|e| Refusal::new(ErrorCode::Io, format!("cp: {e}")))?;
    let r = (|| {
        loop {
            match rx.blocking_recv() {
                Some(Some(chunk)) => {
                    f.write_all(&chunk)
                        .map_err(|e| io_err("write", &tmp_path, &e))?;
                    let _ = back.send(chunk);
                }
                Some(None) => break,
                None => {
                    return Err(Refusal::new(
                        ErrorCode::Io,
                        "cp: the transfer stopped before its end",
                    ))
                }
            }
        }
        f.sync_all().map_err(|e| io_err("fsync", &tmp_path, &e))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| io_err("chmod", &tmp_path, &e))?;
        let path = t.dir.join(&t.name);
        std::fs::rename(&tmp_path, &path).map_err(|e| io_err("rename", &path, &e))?;
        keel_sys::durable::fsync_dir(&t.dir, keel_sys::durable::no_hook)
            .map_err(|e| Refusal::new(ErrorCode::Io, format!("cp: {e}")))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    r
}

/// Receives `size` bytes for the guest file `path` (mode `mode`): `send`, data frames, an
/// empty data frame, then `done` once the file is in place.
pub async fn copy_in<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    sh: &Arc<Shared>,
    path: &str,
    mode: u32,
    size: u64,
) -> Outcome {
    let t = match target(path) {
        Ok(t) => t,
        Err(r) => return Outcome::reply(r.into()),
    };
    let max = sh.config.exec.as_ref().map_or(0, |e| e.max_file_bytes);
    let t2 = t.clone();
    match tokio::task::spawn_blocking(move || check_in(&t2, size, max)).await {
        Ok(Ok(())) => {}
        Ok(Err(r)) => return Outcome::reply(r.into()),
        Err(_) => return Outcome::reply(Response::error(ErrorCode::Io, "cp: check failed")),
    }
    if io.send(&Response::Send { offset: 0 }).await.is_err() {
        return Outcome {
            close: true,
            ..Outcome::reply(Response::error(ErrorCode::Io, "the client left"))
        };
    }
    let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>(4);
    // Written buffers come back for the next frames: no allocation per frame.
    let (back, returned) = std::sync::mpsc::channel::<Vec<u8>>();
    let (done_tx, done_rx) = oneshot::channel();
    let t2 = t.clone();
    std::thread::spawn(move || {
        let _ = done_tx.send(write_file(t2, mode, rx, back));
    });
    let mut got = 0u64;
    let stopped: Option<Response> = loop {
        let (len, kind) = match io.header().await {
            Ok(h) => h,
            Err(e) => break Some(Response::error(ErrorCode::Io, e.describe(io.idle))),
        };
        if kind != KIND_DATA {
            break Some(Response::error(
                ErrorCode::BadRequest,
                "cp: a message arrived where file data belongs",
            ));
        }
        if len == 0 {
            if got != size {
                break Some(Response::error(
                    ErrorCode::SizeMismatch,
                    format!("cp: {got} bytes arrived, {size} were announced"),
                ));
            }
            let _ = tx.send(None).await;
            break None;
        }
        let mut buf = returned.try_recv().unwrap_or_default();
        // Zeroed only where it grows; every byte is then read over.
        buf.resize(len, 0);
        if let Err(e) = io.read_exact(&mut buf).await {
            break Some(Response::error(ErrorCode::Io, e.describe(io.idle)));
        }
        got += len as u64;
        if got > size {
            break Some(Response::error(
                ErrorCode::SizeMismatch,
                format!("cp: more than the {size} bytes announced arrived"),
            ));
        }
        if tx.send(Some(buf)).await.is_err() {
            // The writer stopped: its own error says why.
            break None;
        }
    };
    drop(tx);
    let written = done_rx
        .await
        .unwrap_or_else(|_| Err(Refusal::new(ErrorCode::Io, "cp: the writer thread stopped")));
    let response = match (stopped, written) {
        (Some(r), _) => r,
        (None, Err(r)) => r.into(),
        (None, Ok(())) => Response::Done {
            message: format!("wrote {size} bytes to {}", t.dir.join(&t.name).display()),
        },
    };
    // A transfer cut short leaves the stream mid-frame: end the session after the reply.
    let close = !matches!(response, Response::Done { .. });
    Outcome {
        response,
        bytes: got,
        close,
        reboot: false,
    }
}

/// Sends the guest file `path`: `sending` with its size and mode, data frames, an empty data
/// frame. Regular files only, not followed if a symlink, at most `[exec] max_file_bytes`.
pub async fn copy_out<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    sh: &Arc<Shared>,
    path: &str,
) -> Outcome {
    if let Err(r) = target(path) {
        return Outcome::reply(r.into());
    }
    let max = sh.config.exec.as_ref().map_or(0, |e| e.max_file_bytes);
    let p = PathBuf::from(path);
    let opened = tokio::task::spawn_blocking(move || keel_sys::durable::open_regular(&p)).await;
    let (mut f, size) = match opened {
        Ok(Ok(Some(fs))) => fs,
        Ok(Ok(None)) => {
            return Outcome::reply(Response::error(
                ErrorCode::NotFound,
                format!("cp: {path}: no such file"),
            ))
        }
        Ok(Err(e)) => {
            return Outcome::reply(Response::error(ErrorCode::BadRequest, format!("cp: {e}")))
        }
        Err(_) => return Outcome::reply(Response::error(ErrorCode::Io, "cp: open failed")),
    };
    if size > max {
        return Outcome::reply(Response::error(
            ErrorCode::NoSpace,
            format!("cp: {path} is {size} bytes, over the agent's limit of {max} ([exec] max_file_bytes)"),
        ));
    }
    let mode = f
        .metadata()
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    if io.send(&Response::Sending { size, mode }).await.is_err() {
        return Outcome {
            close: true,
            ..Outcome::reply(Response::error(ErrorCode::Io, "the client left"))
        };
    }
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let (back, returned) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut left = size;
        while left > 0 {
            let want = OUT_CHUNK.min(usize::try_from(left).unwrap_or(OUT_CHUNK));
            let mut buf = returned.try_recv().unwrap_or_default();
            // A returned buffer is zeroed only where it grows.
            buf.resize(want, 0);
            let r = f.read(&mut buf).and_then(|n| {
                if n == 0 {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was sent",
                    ))
                } else {
                    buf.truncate(n);
                    Ok(buf)
                }
            });
            let stop = r.is_err();
            if let Ok(b) = &r {
                left -= b.len() as u64;
            }
            if tx.blocking_send(r).is_err() || stop {
                return;
            }
        }
    });
    let mut sent = 0u64;
    while sent < size {
        let chunk = match rx.recv().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                // Mid-stream: the client learns from the message in place of data.
                return Outcome {
                    close: true,
                    ..Outcome::reply(Response::error(
                        ErrorCode::Io,
                        format!("cp: read {path}: {e}"),
                    ))
                };
            }
            None => break,
        };
        if write_frame(&mut io.s, KIND_DATA, &chunk, io.idle)
            .await
            .is_err()
        {
            return Outcome {
                close: true,
                bytes: sent,
                ..Outcome::reply(Response::error(ErrorCode::Io, "the client stopped reading"))
            };
        }
        sent += chunk.len() as u64;
        // Back to the reader for its next chunk (it may have finished: then it is freed).
        let _ = back.send(chunk);
    }
    let end = data_header(0).expect("an empty frame fits");
    let _ = tokio::time::timeout(io.idle, io.s.write_all(&end)).await;
    Outcome {
        response: Response::Done {
            message: format!("sent {sent} bytes of {path}"),
        },
        bytes: sent,
        close: false,
        reboot: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            target("/srv/app.tar").unwrap(),
            Target {
                dir: "/srv".into(),
                name: "app.tar".into()
            }
        );
        assert_eq!(target("/x").unwrap().dir, PathBuf::from("/"));
        for bad in ["srv/a", "/srv/", "/srv/..", "/a\0b", "/"] {
            assert!(target(bad).is_err(), "{bad:?}");
        }
        assert_eq!(temp_name("a"), ".a.keel-tmp");
    }
}
