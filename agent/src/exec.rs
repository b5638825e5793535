//! One exec: [`prepare`] turns the request into what to start (pure: argv, environment,
//! directory, user), [`run`] starts it in its own process group and carries its streams until
//! it ends.
//!
//! The loop never buffers more than a frame of output per stream and [`STDIN_PENDING`] of
//! input: a client that does not read stops the process's writes (its pipe fills), a process
//! that does not read its stdin stops the client's. Every branch of the loop is cancel-safe
//! (plain `read`/`write` calls, whole frames decoded from a buffer).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::exec::{ExecSpec, ExitStatus, KIND_STDERR, KIND_STDIN, KIND_STDOUT};
use keel_proto::message::{parse_request, split_body, Body, ErrorCode, Request, Response};
use keel_proto::wire::{encode_header, Decoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::conn::Conn;
use crate::pty;
use crate::session::Outcome;
use crate::shared::Shared;
use crate::users::{lookup, User};
use crate::verify::Refusal;

/// Bytes of output per frame.
pub const OUT_CHUNK: usize = 32 << 10;
/// Bytes of stdin held for a process that is not reading it; the client is not read beyond.
pub const STDIN_PENDING: usize = 256 << 10;
/// How long output is still read after the process exits (a background child may hold the
/// pipes open; its output after this is not waited for).
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// `PATH` of every process.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Switch to this user (uid, gid); `None`: the agent's own.
    pub ids: Option<(u32, u32)>,
}

/// Checks `spec` and decides what to start, for an agent running as `agent_uid` with
/// `/etc/passwd` reading `passwd`.
pub fn prepare(spec: &ExecSpec, agent_uid: u32, passwd: &str) -> Result<Prepared, Refusal> {
    let bad = |m: String| Refusal::new(ErrorCode::BadRequest, format!("exec: {m}"));
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return Err(bad("no program given (argv is empty)".into()));
    }
    let nul = |s: &str| s.contains('\0');
    if spec.argv.iter().any(|a| nul(a)) {
        return Err(bad("an argument contains a NUL byte".into()));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || nul(k) || nul(v) {
            return Err(bad(format!(
                "environment variable name {k:?} is not valid (empty, '=' or NUL)"
            )));
        }
    }
    let user: Option<User> = match &spec.user {
        None => None,
        Some(u) => Some(
            lookup(passwd, u).ok_or_else(|| bad(format!("no user named {u:?} in /etc/passwd")))?,
        ),
    };
    if let Some(u) = &user {
        if agent_uid != 0 && u.uid != agent_uid {
            return Err(Refusal::new(
                ErrorCode::NotPermitted,
                format!(
                    "exec: the agent runs as uid {agent_uid} and cannot run a process as {} \
                     (uid {})",
                    u.name, u.uid
                ),
            ));
        }
    }
    let cwd = match &spec.cwd {
        Some(c) if !c.starts_with('/') || nul(c) => {
            return Err(bad(format!("cwd {c:?} is not an absolute path")));
        }
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(user.as_ref().map_or("/", |u| u.home.as_str())),
    };
    let mut env = vec![("PATH".to_string(), PATH.to_string())];
    if let Some(u) = &user {
        env.push(("HOME".into(), u.home.clone()));
        env.push(("USER".into(), u.name.clone()));
        env.push(("LOGNAME".into(), u.name.clone()));
    } else {
        env.push(("HOME".into(), cwd.display().to_string()));
    }
    for (k, v) in &spec.env {
        env.retain(|(e, _)| e != k);
        env.push((k.clone(), v.clone()));
    }
    Ok(Prepared {
        argv: spec.argv.clone(),
        env,
        cwd,
        ids: user.map(|u| (u.uid, u.gid)),
    })
}

/// A process's output, or its stdin: pipes, or the pty master.
type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// See [`Reader`].
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Sends `sig` to process group `pgid`.
fn kill_group(pgid: u32, sig: i32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: killpg takes two integers and touches no memory of ours.
    unsafe { libc::killpg(pgid, sig) };
}

fn status_of(st: std::process::ExitStatus, timed_out: bool) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus {
        code: st.code(),
        signal: st.signal(),
        timed_out,
    }
}

/// Writes one stream frame.
async fn send_stream<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    data: &[u8],
    idle: Duration,
) -> std::io::Result<()> {
    let h = encode_header(kind, data.len()).map_err(std::io::Error::other)?;
    let mut f = Vec::with_capacity(h.len() + data.len());
    f.extend_from_slice(&h);
    f.extend_from_slice(data);
    match tokio::time::timeout(idle, w.write_all(&f)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client does not read the output",
        )),
    }
}

/// Runs `spec` with the connection's streams until the process ends; the outcome's reply is
/// `exited` (or the error that stopped it before it started).
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    sh: &Arc<Shared>,
    spec: ExecSpec,
) -> Outcome {
    let Ok(_slot) = sh.exec_slots.clone().try_acquire_owned() else {
        return Outcome::reply(Response::error(
            ErrorCode::Busy,
            format!(
                "{} processes are running (max_processes): try again when one ends",
                sh.exec_slots_max
            ),
        ));
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let p = match prepare(&spec, rustix::process::getuid().as_raw(), &passwd) {
        Ok(p) => p,
        Err(r) => return Outcome::reply(Response::from(r)),
    };
    if !p.cwd.is_dir() {
        return Outcome::reply(Response::error(
            ErrorCode::ExecFailed,
            format!("exec: no such directory: {}", p.cwd.display()),
        ));
    }
    let mut cmd = tokio::process::Command::new(&p.argv[0]);
    cmd.args(&p.argv[1..])
        .env_clear()
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&p.cwd)
        .kill_on_drop(true);
    let pty = match spec.tty {
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            None
        }
        Some(ws) => match pty::open(ws) {
            Ok((master, slave)) => {
                let dup = |f: &OwnedFd| f.try_clone().map(Stdio::from);
                match (dup(&slave), dup(&slave)) {
                    (Ok(a), Ok(b)) => {
                        cmd.stdin(Stdio::from(slave)).stdout(a).stderr(b);
                    }
                    _ => {
                        return Outcome::reply(Response::error(
                            ErrorCode::Io,
                            "exec: dup of the pty",
                        ))
                    }
                }
                // SAFETY: between fork and exec: setsid and ioctl are async-signal-safe and
                // touch only the child's own descriptors.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                Some(master)
            }
            Err(e) => {
                return Outcome::reply(Response::error(
                    ErrorCode::Io,
                    format!("exec: openpty: {e}"),
                ))
            }
        },
    };
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (signal, sigemptyset, sigprocmask) on its own stack data.
    unsafe {
        cmd.pre_exec(|| {
            // Ignored signals survive exec: an agent started with SIGINT ignored (a
            // background job of a non-interactive shell) would hand that on, and Ctrl-C
            // forwarded by keelctl would do nothing. Every process starts with the defaults.
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut());
            Ok(())
        });
    }
    if let Some((uid, gid)) = p.ids {
        // std drops the supplementary groups when root switches uid.
        cmd.uid(uid).gid(gid);
    }
    let spawned = cmd.spawn();
    // The parent's copies of the pty slave go now: the master reads EOF (EIO) once the
    // process and its children have closed theirs.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                format!("no such program: {} (PATH={PATH})", p.argv[0])
            } else {
                format!("{}: {e}", p.argv[0])
            };
            return Outcome::reply(Response::error(
                ErrorCode::ExecFailed,
                format!("exec: {what}"),
            ));
        }
    };
    let pid = child.id().unwrap_or(0);
    if io.send(&Response::Started { pid }).await.is_err() {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
        return Outcome {
            close: true,
            ..Outcome::reply(Response::error(ErrorCode::Io, "the client left"))
        };
    }
    let idle = io.idle;
    let (mut rd, mut wr) = tokio::io::split(&mut io.s);
    let (mut out, mut err, mut stdin): (Option<Reader>, Option<Reader>, Option<Writer>) = match &pty
    {
        None => (
            child.stdout.take().map(|o| Box::new(o) as Reader),
            child.stderr.take().map(|e| Box::new(e) as Reader),
            child.stdin.take().map(|i| Box::new(i) as Writer),
        ),
        Some(m) => match (m.try_clone(), m.try_clone()) {
            (Ok(r), Ok(w)) => (
                Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(r))) as Reader),
                None,
                Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(w))) as Writer),
            ),
            _ => {
                kill_group(pid, libc::SIGKILL);
                let _ = child.wait().await;
                return Outcome::reply(Response::error(
                    ErrorCode::Io,
                    "exec: dup of the pty master",
                ));
            }
        },
    };
    let tty = pty.as_ref().map(|m| m.as_raw_fd());
    let (mut obuf, mut ebuf, mut cbuf) = (
        vec![0u8; OUT_CHUNK],
        vec![0u8; OUT_CHUNK],
        vec![0u8; 64 << 10],
    );
    let mut pending: Vec<u8> = Vec::new();
    let mut closing = false;
    let mut decoder = Decoder::default();
    let mut exited: Option<std::process::ExitStatus> = None;
    let mut timed_out = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let timeout_at = spec.timeout_secs.map_or(far, |s| {
        tokio::time::Instant::now() + Duration::from_secs(s)
    });
    let mut drain_until = far;
    let mut bytes = 0u64;
    // Why the loop stopped early: the client left or broke the protocol.
    let mut abort: Option<Response> = None;
    loop {
        if closing && pending.is_empty() {
            stdin = None;
        }
        if exited.is_some() && out.is_none() && err.is_none() {
            break;
        }
        tokio::select! {
            r = async { out.as_mut().expect("guarded").read(&mut obuf).await }, if out.is_some() => match r {
                Ok(0) | Err(_) => out = None,
                Ok(n) => {
                    bytes += n as u64;
                    if send_stream(&mut wr, KIND_STDOUT, &obuf[..n], idle).await.is_err() {
                        abort = Some(Response::error(ErrorCode::Io, "the client stopped reading"));
                        break;
                    }
                }
            },
            r = async { err.as_mut().expect("guarded").read(&mut ebuf).await }, if err.is_some() => match r {
                Ok(0) | Err(_) => err = None,
                Ok(n) => {
                    bytes += n as u64;
                    if send_stream(&mut wr, KIND_STDERR, &ebuf[..n], idle).await.is_err() {
                        abort = Some(Response::error(ErrorCode::Io, "the client stopped reading"));
                        break;
                    }
                }
            },
            r = rd.read(&mut cbuf), if abort.is_none() && pending.len() < STDIN_PENDING => {
                let n = match r {
                    Ok(0) | Err(_) => {
                        abort = Some(Response::error(ErrorCode::Io, "the client left"));
                        break;
                    }
                    Ok(n) => n,
                };
                decoder.push(&cbuf[..n]);
                if let Err(r) = take_frames(&mut decoder, &mut pending, &mut closing, stdin.is_some(), pid, tty) {
                    abort = Some(Response::from(r));
                    break;
                }
            },
            r = async { stdin.as_mut().expect("guarded").write(&pending).await }, if stdin.is_some() && !pending.is_empty() => match r {
                Ok(n) => { pending.drain(..n); }
                // The process closed its stdin: what is left has no reader.
                Err(_) => { stdin = None; pending.clear(); }
            },
            st = child.wait(), if exited.is_none() => {
                exited = Some(st.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(255 << 8)));
                drain_until = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
                // Nobody reads the stdin of a process that ended.
                stdin = None;
                pending.clear();
            },
            _ = tokio::time::sleep_until(timeout_at), if exited.is_none() && !timed_out => {
                kill_group(pid, libc::SIGKILL);
                timed_out = true;
            },
            _ = tokio::time::sleep_until(drain_until), if exited.is_some() => break,
        }
    }
    drop(stdin);
    if let Some(r) = abort {
        // No client to report to: the process group goes (re-attach is not built yet).
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
        return Outcome {
            response: r,
            bytes,
            close: true,
            reboot: false,
        };
    }
    let st = match exited {
        Some(st) => st,
        None => child
            .wait()
            .await
            .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(255 << 8)),
    };
    Outcome {
        response: Response::Exited(status_of(st, timed_out)),
        bytes,
        close: false,
        reboot: false,
    }
}

/// Takes every whole frame the client sent: stdin bytes into `pending`, `close-stdin`, and
/// signals (sent to the process group at once). Anything else is a protocol error.
fn take_frames(
    d: &mut Decoder,
    pending: &mut Vec<u8>,
    closing: &mut bool,
    stdin_open: bool,
    pgid: u32,
    tty: Option<std::os::fd::RawFd>,
) -> Result<(), Refusal> {
    let bad = |m: String| Refusal::new(ErrorCode::BadRequest, format!("during an exec: {m}"));
    while let Some(body) = d.next_frame().map_err(|e| bad(e.to_string()))? {
        match split_body(&body).map_err(|e| bad(e.to_string()))? {
            Body::Stream(KIND_STDIN, data) => {
                if *closing {
                    return Err(bad("stdin data after close-stdin".into()));
                }
                if stdin_open {
                    pending.extend_from_slice(data);
                }
            }
            Body::Message(_) => match parse_request(&body).map_err(|e| bad(e.to_string()))? {
                // A terminal has no end of its own: its EOF character ends a read.
                Request::CloseStdin if tty.is_some() => pending.push(0x04),
                Request::CloseStdin => *closing = true,
                Request::Resize(ws) => match tty {
                    Some(fd) => pty::resize(fd, ws),
                    None => return Err(bad("resize without a tty".into())),
                },
                Request::Signal { signal } if (1..=64).contains(&signal) => {
                    kill_group(pgid, signal);
                }
                Request::Signal { signal } => {
                    return Err(bad(format!(
                        "signal {signal} is not a signal number (1-64)"
                    )))
                }
                other => {
                    return Err(bad(format!(
                        "{} (only stdin data, close-stdin and signal until the process exits)",
                        other.op()
                    )))
                }
            },
            _ => return Err(bad("a frame kind the client does not send".into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:100::/home/app:/bin/sh\n";

    fn spec(argv: &[&str]) -> ExecSpec {
        ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..ExecSpec::default()
        }
    }

    #[test]
    fn the_environment_is_a_base_plus_what_was_asked() {
        let mut s = spec(&["env"]);
        s.env = vec![("PATH".into(), "/opt".into()), ("A".into(), "1".into())];
        s.user = Some("app".into());
        let p = prepare(&s, 0, PASSWD).unwrap();
        assert_eq!(p.ids, Some((1000, 100)));
        assert_eq!(p.cwd, PathBuf::from("/home/app"));
        assert!(p.env.contains(&("PATH".into(), "/opt".into())));
        assert!(p.env.contains(&("USER".into(), "app".into())));
        assert_eq!(p.env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        let p = prepare(&spec(&["true"]), 1000, PASSWD).unwrap();
        assert_eq!((p.ids, p.cwd), (None, PathBuf::from("/")));
    }

    #[test]
    fn bad_requests_are_named() {
        let msg = |s: &ExecSpec, uid| prepare(s, uid, PASSWD).unwrap_err().message;
        assert!(msg(&spec(&[]), 0).contains("argv is empty"));
        assert!(msg(&spec(&["a\0b"]), 0).contains("NUL"));
        let mut s = spec(&["true"]);
        s.env = vec![("A=B".into(), "x".into())];
        assert!(msg(&s, 0).contains("\"A=B\""));
        let mut s = spec(&["true"]);
        s.cwd = Some("tmp".into());
        assert!(msg(&s, 0).contains("absolute"));
        let mut s = spec(&["true"]);
        s.user = Some("nobody".into());
        assert!(msg(&s, 0).contains("no user named \"nobody\""));
        s.user = Some("root".into());
        let e = prepare(&s, 1000, PASSWD).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotPermitted);
    }
}
