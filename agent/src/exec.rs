//! One exec: [`prepare`] turns the request into what to start (pure: argv, environment,
//! directory, user), [`start`] spawns it in its own process group (a session, with a tty),
//! registers it in [`crate::procs`] and runs its pump: a task of its own that carries output
//! into the process's ring and input from whichever client is attached
//! ([`crate::attach`]), until the process ends.
//!
//! The pump holds at most the ring's bound of output and [`STDIN_PENDING`] of input: with a
//! client attached a full ring stops the process's writes (its pipe fills); a process that
//! does not read its stdin stops the client's. A process whose client is lost is killed
//! with its group after `[exec] grace_secs` unless it was started detached. Every branch of
//! the pump is cancel-safe (plain `read`/`write` calls, channel receives).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::exec::{ExecSpec, ExitStatus, KIND_STDERR, KIND_STDOUT};
use keel_proto::message::ErrorCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::procs::{Input, Proc, Ring, State, ATTACHED_BYTES, RING_BYTES};
use crate::pty;
use crate::shared::Shared;
use crate::users::{lookup, User};
use crate::verify::Refusal;

/// Bytes of output read at once: a pipe's default capacity. (Larger pipes and reads were
/// measured slower in the QEMU guest of `make bench`, and cost more memory per process.)
pub const OUT_CHUNK: usize = 64 << 10;
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

/// Sends `sig` to process group `pgid` (a process's pid: each runs in a group of its own).
pub fn kill_group(pgid: u32, sig: i32) {
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

/// What the pump reads and writes: the pipes, or the pty master.
struct Streams {
    out: Option<Reader>,
    err: Option<Reader>,
    stdin: Option<Writer>,
    /// The pty master, for resizes.
    tty: Option<OwnedFd>,
}

/// Starts `spec` for `owner` (a principal's name): checks it, spawns the process in its own
/// group (or session, with a tty), registers it and starts its pump. The caller attaches to
/// the returned process, or (detached) just reports it.
pub async fn start(sh: &Arc<Shared>, spec: ExecSpec, owner: String) -> Result<Arc<Proc>, Refusal> {
    let Ok(slot) = sh.exec_slots.clone().try_acquire_owned() else {
        return Err(Refusal::new(
            ErrorCode::Busy,
            format!(
                "{} processes are running (max_processes): try again when one ends",
                sh.exec_slots_max
            ),
        ));
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let p = prepare(&spec, rustix::process::getuid().as_raw(), &passwd)?;
    if !p.cwd.is_dir() {
        return Err(Refusal::new(
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
                    _ => return Err(Refusal::new(ErrorCode::Io, "exec: dup of the pty")),
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
                let hint = if std::path::Path::new("/dev/pts/ptmx").exists() {
                    ""
                } else {
                    " (no devpts on /dev/pts: the guest's init must mount it, \
                     `mount -t devpts devpts /dev/pts`)"
                };
                return Err(Refusal::new(
                    ErrorCode::Io,
                    format!("exec -t: openpty: {e}{hint}"),
                ));
            }
        },
    };
    crate::child::default_signals(cmd.as_std_mut());
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
            return Err(Refusal::new(ErrorCode::ExecFailed, format!("exec: {what}")));
        }
    };
    let pid = child.id().unwrap_or(0);
    let streams = match pty {
        None => Streams {
            out: child.stdout.take().map(|o| Box::new(o) as Reader),
            err: child.stderr.take().map(|e| Box::new(e) as Reader),
            stdin: child.stdin.take().map(|i| Box::new(i) as Writer),
            tty: None,
        },
        Some(m) => match (m.try_clone(), m.try_clone()) {
            (Ok(r), Ok(w)) => Streams {
                out: Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(r))) as Reader),
                err: None,
                stdin: Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(w))) as Writer),
                tty: Some(m),
            },
            _ => {
                kill_group(pid, libc::SIGKILL);
                let _ = child.wait().await;
                return Err(Refusal::new(ErrorCode::Io, "exec: dup of the pty master"));
            }
        },
    };
    let (input, input_rx) = tokio::sync::mpsc::channel(16);
    let proc = Arc::new(Proc {
        id: sh.procs.next_id(),
        pid,
        argv: p.argv.clone(),
        started: std::time::SystemTime::now(),
        detached: spec.detach,
        owner,
        tty: spec.tty.is_some(),
        input,
        state: std::sync::Mutex::new(State {
            ring: Ring::new(RING_BYTES),
            exit: None,
            attached: !spec.detach,
            lost_at: None,
        }),
        changed: tokio::sync::watch::channel(0).0,
        room: tokio::sync::Notify::new(),
        attachment: tokio::sync::Notify::new(),
    });
    sh.procs.insert(proc.clone());
    let grace = Duration::from_secs(sh.config.exec.as_ref().map_or(60, |e| e.grace_secs));
    let pumped = proc.clone();
    tokio::spawn(async move {
        let st = pump(&pumped, child, streams, input_rx, spec.timeout_secs, grace).await;
        pumped.lock().exit = Some(st);
        pumped.bump();
        drop(slot);
    });
    Ok(proc)
}

/// Puts a chunk of output in the process's ring, waiting for room while a client is attached
/// (that client's pace is the process's).
async fn deliver(proc: &Proc, kind: u8, data: Vec<u8>) {
    loop {
        let room = proc.room.notified();
        {
            let mut st = proc.lock();
            if !st.attached || st.ring.has_room(data.len(), ATTACHED_BYTES) {
                st.ring.push(kind, data);
                drop(st);
                proc.bump();
                return;
            }
        }
        room.await;
    }
}

/// A read of at least this much means the process is streaming, not talking.
const STREAMING: usize = 4096;

/// Carries one output stream into the ring until it ends: the hot path of an exec, a task of
/// its own so that a chunk costs one read and one ring push, not a turn of [`pump`]'s loop.
///
/// After a streaming read the thread yields its CPU once before reading again: the writer
/// then fills the pipe meanwhile and the next read takes all of it, where otherwise (one
/// vCPU, a microVM's usual size) every 4 KiB write wakes the agent for a read, a ring push and
/// a frame of its own. Output that comes in small pieces (a shell, a log line) is read as soon
/// as it comes.
///
/// A read that filled at least half the buffer goes to the ring as it is (a spare buffer of
/// the ring's, or a new one, takes its place); a smaller one is copied out to its size, so a ring of small chunks does not
/// hold a buffer's worth of memory for each.
async fn carry(proc: Arc<Proc>, mut r: Reader, kind: u8) {
    let mut buf = proc.lock().ring.buffer(OUT_CHUNK);
    loop {
        buf.clear();
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let chunk = if n >= OUT_CHUNK / 2 {
                    let next = proc.lock().ring.buffer(OUT_CHUNK);
                    std::mem::replace(&mut buf, next)
                } else {
                    buf.clone()
                };
                deliver(&proc, kind, chunk).await;
                if n >= STREAMING {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// Carries the process's streams until it ends: output into its ring (by [`carry`] tasks),
/// input from its clients, the timeout, and the grace period once its client is lost
/// (unless detached).
async fn pump(
    proc: &Arc<Proc>,
    mut child: tokio::process::Child,
    s: Streams,
    mut input: tokio::sync::mpsc::Receiver<Input>,
    timeout_secs: Option<u64>,
    grace: Duration,
) -> ExitStatus {
    let pid = proc.pid;
    let Streams {
        out,
        err,
        mut stdin,
        tty,
    } = s;
    let mut carriers = tokio::task::JoinSet::new();
    for (r, kind) in [(out, KIND_STDOUT), (err, KIND_STDERR)] {
        if let Some(r) = r {
            carriers.spawn(carry(proc.clone(), r, kind));
        }
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut closing = false;
    let mut exited: Option<std::process::ExitStatus> = None;
    let mut timed_out = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let timeout_at = timeout_secs.map_or(far, |s| {
        tokio::time::Instant::now() + Duration::from_secs(s)
    });
    let mut drain_until = far;
    loop {
        if closing && pending.is_empty() {
            stdin = None;
        }
        if exited.is_some() && carriers.is_empty() {
            break;
        }
        // Made before the state is read: a client that leaves or returns after this wakes it.
        let woken = proc.attachment.notified();
        tokio::pin!(woken);
        // A lost client: the process is killed once the grace period has passed.
        let lost_deadline = match proc.lock().lost_at {
            Some(t) if !proc.detached && exited.is_none() => {
                tokio::time::Instant::from_std(t + grace)
            }
            _ => far,
        };
        tokio::select! {
            _ = carriers.join_next(), if !carriers.is_empty() => {},
            i = input.recv(), if pending.len() < STDIN_PENDING => match i {
                Some(Input::Stdin(b)) => if stdin.is_some() && !closing { pending.extend_from_slice(&b) },
                // A terminal has no end of its own: its EOF character ends a read.
                Some(Input::Close) if tty.is_some() => pending.push(0x04),
                Some(Input::Close) => closing = true,
                Some(Input::Signal(sig)) => kill_group(pid, sig),
                Some(Input::Resize(ws)) => if let Some(m) = &tty { pty::resize(m.as_raw_fd(), ws) },
                // Every sender is gone: nothing more will come.
                None => closing = true,
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
            _ = tokio::time::sleep_until(lost_deadline), if lost_deadline != far => {
                tracing::info!(id = proc.id, pid, "no client re-attached within the grace period: killing its process group");
                kill_group(pid, libc::SIGKILL);
                proc.lock().lost_at = None;
            },
            // A client left or came back: look at the grace deadline again.
            _ = &mut woken => {},
            _ = tokio::time::sleep_until(drain_until), if exited.is_some() => break,
        }
    }
    drop(stdin);
    // Output still open after the drain time (a child of the process holds the pipe) is cut.
    carriers.abort_all();
    let st = match exited {
        Some(st) => st,
        None => child
            .wait()
            .await
            .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(255 << 8)),
    };
    status_of(st, timed_out)
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
