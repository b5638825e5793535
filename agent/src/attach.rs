//! A client watching a process (after `exec`, or by `attach ID`): the process's buffered and
//! new output to the client as stream frames, the client's stdin, close-stdin, signals and
//! resizes to the process's pump, and `exited` once the process has ended and every byte of
//! its output went out.
//!
//! One client at a time. A client that leaves (or stops reading for the idle timeout) leaves
//! the process running: its output is kept in the ring (the oldest dropped beyond the bound)
//! for the next `attach`, which is told how much it missed; the pump kills the process after
//! the grace period unless it was started detached. A client that breaks the protocol
//! takes the process with it.

use std::sync::Arc;
use std::time::Instant;

use keel_proto::exec::KIND_STDIN;
use keel_proto::message::{parse_request, split_body, Body, ErrorCode, Request, Response};
use keel_proto::wire::Decoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::conn::{write_frame_parts, Conn};
use crate::exec::{kill_group, OUT_CHUNK};
use crate::procs::{Input, Proc};
use crate::session::Outcome;
use crate::shared::Shared;
use crate::verify::Refusal;

/// Largest output frame: small writes of a process go out merged up to this.
pub const FRAME_OUT: usize = 256 << 10;

/// Claims `proc` for this client: refused if another one is attached.
pub fn claim(proc: &Proc) -> Result<(), Refusal> {
    let mut st = proc.lock();
    if st.attached {
        return Err(Refusal::new(
            ErrorCode::Busy,
            format!("process {} is attached to another client", proc.id),
        ));
    }
    st.attached = true;
    st.lost_at = None;
    drop(st);
    proc.room.notify_waiters();
    proc.attachment.notify_waiters();
    Ok(())
}

fn lost(proc: &Proc) {
    let mut st = proc.lock();
    st.attached = false;
    st.lost_at = Some(Instant::now());
    drop(st);
    proc.room.notify_waiters();
    proc.attachment.notify_waiters();
}

/// Streams `proc` to the client until it has ended (`exited`), the client leaves, or breaks
/// the protocol. The process must be claimed for this client already.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    sh: &Arc<Shared>,
    proc: Arc<Proc>,
) -> Outcome {
    let gone = |why: &str| Outcome {
        close: true,
        ..Outcome::reply(Response::error(ErrorCode::Io, why.to_string()))
    };
    let mut changed = proc.changed.subscribe();
    if io
        .send(&Response::Started {
            pid: proc.pid,
            id: proc.id,
        })
        .await
        .is_err()
    {
        lost(&proc);
        return gone("the client left");
    }
    let dropped = proc.lock().ring.take_dropped();
    if dropped > 0
        && io
            .send(&Response::Dropped { bytes: dropped })
            .await
            .is_err()
    {
        lost(&proc);
        return gone("the client left");
    }
    let idle = io.idle;
    let (mut rd, mut wr) = tokio::io::split(&mut io.s);
    let mut cbuf = vec![0u8; 64 << 10];
    let mut decoder = Decoder::default();
    let mut closed = false;
    let mut bytes = 0u64;
    loop {
        // Everything buffered goes out first; then, if the process has ended, its end.
        let (chunk, exit) = {
            let mut st = proc.lock();
            (st.ring.pop_batch(FRAME_OUT), st.exit)
        };
        if let Some(batch) = chunk {
            bytes += batch.len() as u64;
            if write_frame_parts(&mut wr, batch.kind, &batch.chunks, idle)
                .await
                .is_err()
            {
                // Not delivered: kept for the next client.
                proc.lock().ring.unpop(batch);
                lost(&proc);
                return gone("the client stopped reading");
            }
            proc.lock().ring.sent(batch, OUT_CHUNK);
            proc.room.notify_waiters();
            continue;
        }
        if let Some(st) = exit {
            sh.procs.remove(proc.id);
            return Outcome {
                response: Response::Exited(st),
                bytes,
                close: false,
                reboot: false,
            };
        }
        tokio::select! {
            _ = changed.changed() => {},
            r = rd.read(&mut cbuf) => {
                let n = match r {
                    Ok(0) | Err(_) => {
                        lost(&proc);
                        return gone("the client left");
                    }
                    Ok(n) => n,
                };
                decoder.push(&cbuf[..n]);
                match take_frames(&mut decoder, &mut closed, proc.tty) {
                    Ok(inputs) => {
                        for i in inputs {
                            // The pump is gone once the process ended: nothing to send to.
                            let _ = proc.input.send(i).await;
                        }
                    }
                    Err(r) => {
                        kill_group(proc.pid, libc::SIGKILL);
                        proc.lock().attached = false;
                        return Outcome {
                            close: true,
                            ..Outcome::reply(Response::from(r))
                        };
                    }
                }
            },
        }
    }
}

/// Every whole frame the client sent, as inputs for the pump. Anything but stdin data,
/// close-stdin, signal and resize is a protocol error.
fn take_frames(d: &mut Decoder, closed: &mut bool, tty: bool) -> Result<Vec<Input>, Refusal> {
    let bad = |m: String| Refusal::new(ErrorCode::BadRequest, format!("during an exec: {m}"));
    let mut v = Vec::new();
    while let Some(body) = d.next_frame().map_err(|e| bad(e.to_string()))? {
        match split_body(&body).map_err(|e| bad(e.to_string()))? {
            Body::Stream(KIND_STDIN, data) => {
                if *closed {
                    return Err(bad("stdin data after close-stdin".into()));
                }
                v.push(Input::Stdin(data.to_vec()));
            }
            Body::Message(_) => match parse_request(&body).map_err(|e| bad(e.to_string()))? {
                Request::CloseStdin => {
                    *closed = true;
                    v.push(Input::Close);
                }
                Request::Signal { signal } if (1..=64).contains(&signal) => {
                    v.push(Input::Signal(signal))
                }
                Request::Signal { signal } => {
                    return Err(bad(format!(
                        "signal {signal} is not a signal number (1-64)"
                    )))
                }
                Request::Resize(ws) if tty => v.push(Input::Resize(ws)),
                Request::Resize(_) => return Err(bad("resize without a tty".into())),
                other => {
                    return Err(bad(format!(
                    "{} (only stdin data, close-stdin, signal and resize until the process exits)",
                    other.op()
                )))
                }
            },
            Body::Stream(..) | Body::Data(_) => {
                return Err(bad("a frame kind the client does not send".into()))
            }
        }
    }
    Ok(v)
}
