//! `cp` from the host: a local file into the guest ([`copy_in`]) and a guest file out
//! ([`copy_out`]), streamed with constant memory. A file copied out is written locally the way
//! the agent writes one in: an exclusive temporary file beside the target, fsync, mode, rename
//! — nothing half-written is left behind on any error.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use keel_proto::message::{data_header, parse_response, split_body, Body, Request, Response};

use crate::client::{read_frame, Client, DATA_FRAME};
use crate::error::{Error, Result};

fn local<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Copies the local regular file `src` to the guest path `dst`; `progress(done, total)`.
/// Returns the agent's confirmation.
pub fn copy_in(
    c: &mut Client,
    src: &Path,
    dst: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String> {
    let f = File::open(src).map_err(local("open", src))?;
    let meta = f.metadata().map_err(local("stat", src))?;
    if !meta.is_file() {
        return Err(local("read", src)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let size = meta.len();
    match c.expect(&Request::CopyIn {
        path: dst.to_string(),
        mode: meta.permissions().mode() & 0o7777,
        size,
    })? {
        Response::Send { .. } => {}
        other => return Err(c.unexpected_reply(&other)),
    }
    let mut r = BufReader::with_capacity(DATA_FRAME, f);
    let mut done = 0u64;
    progress(0, size);
    while done < size {
        let buf = r.fill_buf().map_err(local("read", src))?;
        if buf.is_empty() {
            return Err(local("read", src)(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file shrank to {done} bytes while it was sent"),
            )));
        }
        let n = usize::try_from(size - done).map_or(buf.len(), |l| buf.len().min(l));
        let h = data_header(n).expect("DATA_FRAME is under the frame limit");
        c.send_raw(&h).and_then(|()| c.send_raw(&buf[..n]))?;
        r.consume(n);
        done += n as u64;
        progress(done, size);
    }
    c.send_raw(&data_header(0).expect("an empty frame fits"))?;
    match c.response()? {
        Response::Done { message } => Ok(message),
        other => Err(c.unexpected_reply(&other)),
    }
}

/// The temporary file a copy out is received into, beside `dst`.
pub fn temp_beside(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    dst.with_file_name(format!(".{name}.keel-tmp-{}", std::process::id()))
}

/// Copies the guest file `src` to the local path `dst` (mode kept); `progress(done, total)`.
/// Returns the bytes written.
pub fn copy_out(
    c: &mut Client,
    src: &str,
    dst: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let (size, mode) = match c.expect(&Request::CopyOut {
        path: src.to_string(),
    })? {
        Response::Sending { size, mode } => (size, mode),
        other => return Err(c.unexpected_reply(&other)),
    };
    let tmp = temp_beside(dst);
    let r = receive(c, &tmp, size, progress).and_then(|()| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(local("chmod", &tmp))?;
        std::fs::rename(&tmp, dst).map_err(local("rename", dst))
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    // The agent's closing `done`.
    let _ = c.response();
    Ok(size)
}

fn receive(
    c: &mut Client,
    tmp: &Path,
    size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(local("create", tmp))?;
    let mut got = 0u64;
    let peer = c.peer().to_string();
    progress(0, size);
    loop {
        let body = read_frame(c.stream(), &peer)?;
        match split_body(&body) {
            Ok(Body::Data([])) => break,
            Ok(Body::Data(d)) => {
                got += d.len() as u64;
                if got > size {
                    return Err(c.protocol("more bytes than announced arrived"));
                }
                f.write_all(d).map_err(local("write", tmp))?;
                progress(got, size);
            }
            Ok(Body::Message(_)) => {
                return Err(match parse_response(&body) {
                    Ok(Response::Error { code, message }) => Error::Refused { code, message },
                    other => c.protocol(&format!("unexpected {other:?} in a copy")),
                })
            }
            _ => return Err(c.protocol("unexpected frame in a copy")),
        }
    }
    if got != size {
        return Err(c.protocol(&format!("{got} bytes arrived, {size} were announced")));
    }
    f.sync_all().map_err(local("fsync", tmp))
}
