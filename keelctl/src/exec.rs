//! An exec from the host: the request, then the process's streams both ways until it ends.
//!
//! [`start`] sends the exec and waits for `started`; [`Running::feed_stdin`] forwards a reader
//! on a thread of its own (its end becomes `close-stdin`); a [`Signaller`] sends signals from
//! anywhere (keelctl's signal thread); [`Running::wait`] writes stdout and stderr as their
//! frames arrive and returns the exit status.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use keel_proto::exec::{ExecSpec, ExitStatus, WinSize, KIND_STDERR, KIND_STDIN, KIND_STDOUT};
use keel_proto::message::{message_frame, parse_response, split_body, Body, Request, Response};
use keel_proto::wire::encode_header;

use crate::client::{read_frame, Client};
use crate::error::{Error, Result};
use crate::stream::Stream;

/// A started process.
#[derive(Debug)]
pub struct Running {
    reader: Stream,
    writer: Arc<Mutex<Stream>>,
    peer: String,
    /// Its pid in the guest.
    pub pid: u32,
    /// Its id for `attach` and `kill`.
    pub id: u64,
}

/// Sends signals and stdin frames to a running process; cheap to clone.
#[derive(Debug, Clone)]
pub struct Signaller {
    writer: Arc<Mutex<Stream>>,
}

impl Signaller {
    fn frame(&self, f: &[u8]) -> std::io::Result<()> {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(f)
    }

    /// Sends `signal` to the process's group.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        self.frame(&message_frame(&Request::Signal { signal }).map_err(std::io::Error::other)?)
    }

    /// Tells the process its terminal has a new size.
    pub fn resize(&self, ws: WinSize) -> std::io::Result<()> {
        self.frame(&message_frame(&Request::Resize(ws)).map_err(std::io::Error::other)?)
    }

    /// Tells the process its stdin has ended.
    pub fn close_stdin(&self) -> std::io::Result<()> {
        self.frame(&message_frame(&Request::CloseStdin).map_err(std::io::Error::other)?)
    }

    /// Sends bytes for its stdin.
    pub fn stdin(&self, data: &[u8]) -> std::io::Result<()> {
        let h = encode_header(KIND_STDIN, data.len()).map_err(std::io::Error::other)?;
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&h)?;
        w.write_all(data)
    }
}

/// Sends the exec of `spec` over `client`'s session and waits for `started`.
pub fn start(client: Client, spec: ExecSpec) -> Result<Running> {
    begin(client, &Request::Exec(spec))
}

/// Attaches to the process `id` (started earlier, detached or with its client lost).
pub fn attach(client: Client, id: u64) -> Result<Running> {
    begin(client, &Request::Attach { id })
}

/// Starts a detached process: its id and pid.
pub fn start_detached(mut client: Client, mut spec: ExecSpec) -> Result<(u64, u32)> {
    spec.detach = true;
    match client.expect(&Request::Exec(spec))? {
        Response::Started { pid, id } => Ok((id, pid)),
        other => Err(client.unexpected_reply(&other)),
    }
}

fn begin(mut client: Client, req: &Request) -> Result<Running> {
    let (pid, id) = match client.expect(req)? {
        Response::Started { pid, id } => (pid, id),
        other => {
            return Err(Error::Protocol {
                peer: client.peer().to_string(),
                detail: format!("expected started, got {other:?}"),
            })
        }
    };
    let (reader, peer) = client.into_stream();
    let net = |source| Error::Net {
        op: "exec",
        peer: peer.clone(),
        source,
    };
    // The output may pause as long as the process likes; writes keep their timeout.
    reader.set_read_timeout(None).map_err(net)?;
    let writer = reader.try_clone().map_err(net)?;
    Ok(Running {
        reader,
        writer: Arc::new(Mutex::new(writer)),
        peer,
        pid,
        id,
    })
}

impl Running {
    /// A handle that sends signals and stdin.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            writer: self.writer.clone(),
        }
    }

    /// Forwards `input` to the process's stdin on a thread; its end is `close-stdin`.
    pub fn feed_stdin(&self, mut input: Box<dyn Read + Send>) {
        let s = self.signaller();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if s.stdin(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = s.close_stdin();
        });
    }

    /// Writes the process's output to `stdout` and `stderr` as it arrives; returns how it
    /// ended. `dropped(n)` is told when `n` bytes of output were lost while no client was
    /// attached.
    pub fn wait(
        mut self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
        dropped: &mut dyn FnMut(u64),
    ) -> Result<ExitStatus> {
        loop {
            let body = read_frame(&mut self.reader, &self.peer)?;
            let local = |source| Error::Io {
                op: "write output",
                path: "-".into(),
                source,
            };
            match split_body(&body) {
                Ok(Body::Stream(KIND_STDOUT, d)) => stdout
                    .write_all(d)
                    .and_then(|()| stdout.flush())
                    .map_err(local)?,
                Ok(Body::Stream(KIND_STDERR, d)) => stderr
                    .write_all(d)
                    .and_then(|()| stderr.flush())
                    .map_err(local)?,
                Ok(Body::Message(_)) => match parse_response(&body) {
                    Ok(Response::Exited(st)) => return Ok(st),
                    Ok(Response::Dropped { bytes }) => dropped(bytes),
                    Ok(Response::Error { code, message }) => {
                        return Err(Error::Refused { code, message })
                    }
                    other => {
                        return Err(Error::Protocol {
                            peer: self.peer,
                            detail: format!("during an exec: unexpected {other:?}"),
                        })
                    }
                },
                other => {
                    return Err(Error::Protocol {
                        peer: self.peer,
                        detail: format!("during an exec: unexpected frame {other:?}"),
                    })
                }
            }
        }
    }
}
