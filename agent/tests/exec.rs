//! Exec and key authentication in memory: `session::serve` over `tokio::io::duplex`, real
//! processes (`sh`, `cat`, `sleep`), no root needed beyond what the host user has.

mod common;

use std::time::Instant;

use common::*;
use keel_agent::config::ExecConfig;
use keel_proto::exec::{ExecSpec, ExitStatus, WinSize, KIND_STDERR, KIND_STDOUT};
use keel_proto::message::{split_body, Body};

fn exec_dev(tag: &str, f: impl FnOnce(&mut ExecConfig)) -> Dev {
    Dev::configured(tag, 1, |c| {
        let mut e = ExecConfig {
            enabled: true,
            authorized_keys: "/etc/keel/authorized.pem".into(),
            ..ExecConfig::default()
        };
        f(&mut e);
        c.exec = Some(e);
    })
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecSpec::default()
    }
}

fn argv(a: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: a.iter().map(|s| s.to_string()).collect(),
        ..ExecSpec::default()
    }
}

/// What an exec produced.
#[derive(Debug, Default)]
struct Ran {
    out: Vec<u8>,
    err: Vec<u8>,
    status: Option<ExitStatus>,
    error: Option<(ErrorCode, String)>,
}

/// Starts `spec`; returns the pid, or the error instead of `started`.
async fn start(c: &mut Client, spec: ExecSpec) -> Result<u32, (ErrorCode, String)> {
    c.send(&Request::Exec(spec)).await;
    match c.recv().await {
        Response::Started { pid, .. } => Ok(pid),
        Response::Error { code, message } => Err((code, message)),
        other => panic!("started expected, got {other:?}"),
    }
}

/// Reads streams until `exited`.
async fn collect(c: &mut Client) -> Ran {
    let mut r = Ran::default();
    loop {
        let body = c.frame().await;
        match split_body(&body).unwrap() {
            Body::Stream(KIND_STDOUT, d) => r.out.extend_from_slice(d),
            Body::Stream(KIND_STDERR, d) => r.err.extend_from_slice(d),
            Body::Message(_) => {
                match keel_proto::message::parse_response(&body).unwrap() {
                    Response::Exited(st) => r.status = Some(st),
                    Response::Error { code, message } => r.error = Some((code, message)),
                    other => panic!("unexpected {other:?}"),
                }
                return r;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn run(c: &mut Client, spec: ExecSpec) -> Ran {
    match start(c, spec).await {
        Ok(_) => collect(c).await,
        Err(e) => Ran {
            error: Some(e),
            ..Ran::default()
        },
    }
}

#[tokio::test]
async fn stdout_and_stderr_arrive_apart_in_order_with_the_exit_code() {
    let d = exec_dev("streams", |_| {});
    let mut c = d.client(local_root()).await;
    let r = run(
        &mut c,
        sh("echo o1; echo e1 >&2; echo o2; seq 1 20000; echo e2 >&2; exit 3"),
    )
    .await;
    let mut want = b"o1\no2\n".to_vec();
    for i in 1..=20000 {
        want.extend_from_slice(format!("{i}\n").as_bytes());
    }
    assert!(r.out == want, "stdout differs ({} bytes)", r.out.len());
    assert_eq!(r.err, b"e1\ne2\n");
    assert_eq!(r.status.unwrap().code, Some(3));
    // The session goes on: another request on the same connection.
    let r = run(&mut c, sh("pwd; echo $HOME; echo $PATH")).await;
    let out = String::from_utf8(r.out).unwrap();
    assert!(out.starts_with("/\n/\n/usr/local/sbin:"), "{out}");
    assert_eq!(r.status.unwrap().shell_code(), 0);
}

#[tokio::test]
async fn stdin_reaches_the_process_and_its_eof_too() {
    let d = exec_dev("stdin", |_| {});
    let mut c = d.client(local_root()).await;
    start(
        &mut c,
        ExecSpec {
            argv: vec!["wc".into(), "-c".into()],
            ..ExecSpec::default()
        },
    )
    .await
    .unwrap();
    let data = vec![b'x'; 3 << 20];
    c.stdin(&data).await;
    c.send(&Request::CloseStdin).await;
    let r = collect(&mut c).await;
    assert_eq!(
        String::from_utf8(r.out).unwrap().trim(),
        (3 << 20).to_string()
    );
    assert_eq!(r.status.unwrap().code, Some(0));
    // cat echoes what it is given, while it is given it.
    start(
        &mut c,
        ExecSpec {
            argv: vec!["cat".into()],
            ..ExecSpec::default()
        },
    )
    .await
    .unwrap();
    c.stdin(b"hello\n").await;
    let body = c.frame().await;
    assert_eq!(
        split_body(&body).unwrap(),
        Body::Stream(KIND_STDOUT, b"hello\n")
    );
    c.send(&Request::CloseStdin).await;
    assert_eq!(collect(&mut c).await.status.unwrap().code, Some(0));
}

#[tokio::test]
async fn signals_timeouts_and_deaths_by_signal() {
    let d = exec_dev("signals", |_| {});
    let mut c = d.client(local_root()).await;
    // sleep itself, not under a shell: a shell that gets SIGINT while it forks waits for
    // its child (POSIX's wait-and-cooperative-exit), and the test would wait 30 s.
    start(&mut c, argv(&["sleep", "30"])).await.unwrap();
    c.send(&Request::Signal { signal: 2 }).await;
    let st = collect(&mut c).await.status.unwrap();
    assert_eq!(
        (st.signal, st.shell_code(), st.timed_out),
        (Some(2), 130, false)
    );
    let st = run(&mut c, sh("kill -9 $$")).await.status.unwrap();
    assert_eq!(st.shell_code(), 137);
    let t = Instant::now();
    let mut spec = sh("sleep 30");
    spec.timeout_secs = Some(1);
    let st = run(&mut c, spec).await.status.unwrap();
    assert!(st.timed_out && st.signal == Some(9), "{st:?}");
    assert!(t.elapsed().as_secs() < 10);
    // A signal number that is none is a protocol error; the process is killed.
    start(&mut c, argv(&["sleep", "30"])).await.unwrap();
    c.send(&Request::Signal { signal: 99 }).await;
    let (code, msg) = collect(&mut c).await.error.unwrap();
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("signal 99"), "{msg}");
}

/// An agent that was started with SIGINT ignored (a background job of a script) does not
/// hand that on: every process starts with default dispositions and nothing blocked.
#[tokio::test]
async fn processes_start_with_default_signal_dispositions() {
    // SAFETY: sets one disposition of this test process; nothing here handles SIGINT.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let d = exec_dev("sigdfl", |_| {});
    let mut c = d.client(local_root()).await;
    let r = run(&mut c, argv(&["cat", "/proc/self/status"])).await;
    let status = String::from_utf8(r.out).unwrap();
    // The standard signals, 1-31 (glibc keeps 32 and 33 for itself and refuses to touch
    // them).
    for field in ["SigIgn:", "SigBlk:"] {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let mask = u64::from_str_radix(line[field.len()..].trim(), 16).unwrap();
        assert_eq!(mask & 0x7fff_ffff, 0, "{line}");
    }
}

/// With a tty the process runs on a pseudo-terminal of the size asked: `tty` names it, `stty`
/// reads the size, a resize reaches it, input is a terminal's (echoed, line by line), and
/// close-stdin is the EOF character.
#[tokio::test]
async fn a_tty_is_a_terminal_of_the_size_asked_and_resized() {
    let d = exec_dev("tty", |_| {});
    let mut c = d.client(local_root()).await;
    let mut spec = sh("tty; stty size; read line; stty size; echo got:$line; cat; exit 4");
    spec.tty = Some(WinSize {
        rows: 33,
        cols: 101,
    });
    start(&mut c, spec).await.unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("33 101") {
        let body = c.frame().await;
        match split_body(&body).unwrap() {
            Body::Stream(KIND_STDOUT, b) => out.extend_from_slice(b),
            other => panic!("{other:?} after {:?}", String::from_utf8_lossy(&out)),
        }
    }
    c.send(&Request::Resize(WinSize {
        rows: 40,
        cols: 120,
    }))
    .await;
    c.stdin(b"hello\n").await;
    c.send(&Request::CloseStdin).await;
    let r = collect(&mut c).await;
    out.extend_from_slice(&r.out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("/dev/pts/"), "{text}");
    assert!(text.contains("40 120"), "{text}");
    assert!(text.contains("got:hello"), "{text}");
    assert!(r.err.is_empty(), "a tty has one stream");
    assert_eq!(r.status.unwrap().code, Some(4), "{text}");
    // A resize without a tty is a protocol error.
    start(&mut c, argv(&["sleep", "5"])).await.unwrap();
    c.send(&Request::Resize(WinSize { rows: 1, cols: 1 })).await;
    let (code, msg) = collect(&mut c).await.error.unwrap();
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("without a tty"), "{msg}");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// A lost client leaves its process running for the grace period (here 1 s), then the
/// process group is killed.
#[tokio::test]
async fn a_process_whose_client_is_lost_dies_after_the_grace_period() {
    let d = exec_dev("leave", |e| e.grace_secs = 1);
    let mut c = d.client(local_root()).await;
    start(&mut c, sh("sleep 60 & echo $!; wait")).await.unwrap();
    let body = c.frame().await;
    let Ok(Body::Stream(KIND_STDOUT, pid)) = split_body(&body) else {
        panic!("pid line")
    };
    let pid: u32 = String::from_utf8_lossy(pid).trim().parse().unwrap();
    assert!(alive(pid));
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid), "killed before the grace period ended");
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed().as_secs() < 10,
            "the background sleep {pid} survived its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that comes back gets what the process wrote meanwhile, then the rest and the
/// exit; a detached process runs without any client, shows in ps, takes kill; one client
/// at a time; an unknown id is named.
#[tokio::test]
async fn attach_replays_detach_runs_on_ps_lists_kill_signals() {
    let d = exec_dev("attach", |_| {});
    let mut c = d.client(local_root()).await;
    c.send(&Request::Exec(sh(
        "echo one; sleep 1; echo two; read x; echo got:$x; exit 6",
    )))
    .await;
    let Response::Started { id, .. } = c.recv().await else {
        panic!("started")
    };
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut c = d.client(local_root()).await;
    c.send(&Request::Attach { id }).await;
    assert!(matches!(c.recv().await, Response::Started { id: i, .. } if i == id));
    // A second client cannot take it.
    let mut other = d.client(local_root()).await;
    other.send(&Request::Attach { id }).await;
    let Response::Error { code, .. } = other.recv().await else {
        panic!("busy")
    };
    assert_eq!(code, ErrorCode::Busy);
    c.stdin(b"back\n").await;
    let r = collect(&mut c).await;
    assert_eq!(String::from_utf8_lossy(&r.out), "one\ntwo\ngot:back\n");
    assert_eq!(r.status.unwrap().code, Some(6));
    // Delivered: forgotten.
    c.send(&Request::Attach { id }).await;
    let Response::Error { code, message } = c.recv().await else {
        panic!("not found")
    };
    assert_eq!(code, ErrorCode::NotFound, "{message}");
    // Detached: more output than the ring holds while nobody watches.
    let mut spec = sh("head -c 3000000 /dev/zero; echo done; sleep 30");
    spec.detach = true;
    c.send(&Request::Exec(spec)).await;
    let Response::Started { id, pid } = c.recv().await else {
        panic!("started")
    };
    c.send(&Request::Ps).await;
    let Response::Processes { processes } = c.recv().await else {
        panic!("processes")
    };
    let p = processes.iter().find(|p| p.id == id).expect("in ps");
    assert!(
        p.detached && !p.attached && p.exit.is_none() && p.pid == pid,
        "{p:?}"
    );
    assert_eq!(p.argv[0], "sh");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.send(&Request::Attach { id }).await;
    assert!(matches!(c.recv().await, Response::Started { .. }));
    let Response::Dropped { bytes } = c.recv().await else {
        panic!("dropped notice")
    };
    assert!(bytes > 1_000_000, "{bytes}");
    // What is left ends with "done"; kill from another connection ends it.
    let mut k = d.client(local_root()).await;
    k.send(&Request::Kill { id, signal: 15 }).await;
    assert!(matches!(k.recv().await, Response::Done { .. }));
    let r = collect(&mut c).await;
    assert!(r.out.ends_with(b"done\n"));
    assert!(
        r.out.len() as u64 + bytes == 3_000_005,
        "{} + {bytes}",
        r.out.len()
    );
    assert_eq!(r.status.unwrap().signal, Some(15));
    k.send(&Request::Kill { id: 999, signal: 9 }).await;
    assert!(matches!(
        k.recv().await,
        Response::Error {
            code: ErrorCode::NotFound,
            ..
        }
    ));
}

#[tokio::test]
async fn what_cannot_start_is_answered_at_once() {
    let d = exec_dev("nostart", |_| {});
    let mut c = d.client(local_root()).await;
    let spec = ExecSpec {
        argv: vec!["no-such-program-keel".into()],
        ..ExecSpec::default()
    };
    let (code, msg) = run(&mut c, spec).await.error.unwrap();
    assert_eq!(code, ErrorCode::ExecFailed);
    assert!(
        msg.contains("no such program: no-such-program-keel"),
        "{msg}"
    );
    let mut spec = sh("true");
    spec.cwd = Some("/no/such/dir".into());
    let (code, msg) = run(&mut c, spec).await.error.unwrap();
    assert_eq!(code, ErrorCode::ExecFailed);
    assert!(msg.contains("/no/such/dir"), "{msg}");
    let (code, _) = run(&mut c, ExecSpec::default()).await.error.unwrap();
    assert_eq!(code, ErrorCode::BadRequest);
}

#[tokio::test]
async fn max_processes_bounds_what_runs_at_once() {
    let d = exec_dev("busy", |e| e.max_processes = 1);
    let mut a = d.client(local_root()).await;
    start(&mut a, argv(&["sleep", "30"])).await.unwrap();
    let mut b = d.client(local_root()).await;
    let (code, msg) = run(&mut b, sh("true")).await.error.unwrap();
    assert_eq!(code, ErrorCode::Busy, "{msg}");
    a.send(&Request::Signal { signal: 15 }).await;
    assert_eq!(collect(&mut a).await.status.unwrap().signal, Some(15));
    assert_eq!(run(&mut b, sh("true")).await.status.unwrap().code, Some(0));
}

#[tokio::test]
async fn every_refusal_names_its_reason() {
    let host = Peer::Vsock { cid: 2, port: 1000 };
    let d = exec_dev("refusals", |_| {});
    // No key: not authorized, on vsock and TCP alike.
    for p in [host.clone(), tcp()] {
        let mut c = d.client(p).await;
        let (code, msg) = run(&mut c, sh("true")).await.error.unwrap();
        assert_eq!(code, ErrorCode::NotAuthorized, "{msg}");
        assert!(msg.contains("--key"), "{msg}");
    }
    // On TCP (TLS) the signature covers the session's channel binding: one made without it,
    // or for another TLS session, does not verify; one over this session's does.
    let (mut c, ch) = d.greeted_bound(tcp(), vec![5; 32]).await;
    let (code, msg) = code_of(c.auth(&host_key(), &ch).await);
    assert_eq!(code, ErrorCode::NotAuthorized);
    assert!(msg.contains("does not verify"), "{msg}");
    let (mut c, ch) = d.greeted_bound(tcp(), vec![5; 32]).await;
    let (code, msg) = code_of(c.auth_bound(&host_key(), &ch, &[6; 32]).await);
    assert_eq!(code, ErrorCode::NotAuthorized);
    assert!(msg.contains("does not verify"), "{msg}");
    let (mut c, ch) = d.greeted_bound(tcp(), vec![5; 32]).await;
    assert!(matches!(
        c.auth_bound(&host_key(), &ch, &[5; 32]).await,
        Response::Authenticated { .. }
    ));
    // An unknown key, and a signature over another session's challenge.
    let (mut c, ch) = d.greeted(host.clone()).await;
    let (code, msg) = code_of(c.auth(&key(), &ch).await);
    assert_eq!(code, ErrorCode::NotAuthorized);
    assert!(msg.contains("is not in /etc/keel/authorized.pem"), "{msg}");
    let (_, other) = d.greeted(host.clone()).await;
    let (_, msg) = code_of(c.auth(&host_key(), &other).await);
    assert!(msg.contains("does not verify"), "{msg}");
    let (code, _) = run(&mut c, sh("true")).await.error.unwrap();
    assert_eq!(code, ErrorCode::NotAuthorized);
    // The authorized key: exec runs.
    assert!(matches!(
        c.auth(&host_key(), &ch).await,
        Response::Authenticated { .. }
    ));
    let r = run(&mut c, sh("echo hi")).await;
    assert_eq!(r.out, b"hi\n");
    // Another guest's CID may not exec, key or not.
    let (mut c, ch) = d.greeted(Peer::Vsock { cid: 7, port: 1 }).await;
    assert!(matches!(
        c.auth(&host_key(), &ch).await,
        Response::Authenticated { .. }
    ));
    let (_, msg) = run(&mut c, sh("true")).await.error.unwrap();
    assert!(msg.contains("CID 7"), "{msg}");
    // Exec off: local root is told how to turn it on.
    let off = Dev::new("exec-off", 1, 30);
    let mut c = off.client(local_root()).await;
    let (code, msg) = run(&mut c, sh("true")).await.error.unwrap();
    assert_eq!(code, ErrorCode::Unavailable);
    assert!(msg.contains("enabled = true"), "{msg}");
    // trust_host_cid: the host needs no key.
    let trusting = exec_dev("trusting", |e| e.trust_host_cid = true);
    let mut c = trusting.client(host).await;
    assert_eq!(run(&mut c, sh("true")).await.status.unwrap().code, Some(0));
}

#[tokio::test]
async fn an_authorized_key_ends_a_trial_remotely() {
    let d = exec_dev("remote-mark-good", |_| {});
    let state = || keel_sys::state::load(&d.root.join("img")).unwrap().unwrap();
    assert!(state().trial.is_some());
    let (mut c, ch) = d.greeted(Peer::Vsock { cid: 2, port: 1 }).await;
    c.send(&Request::MarkGood).await;
    assert_eq!(code_of(c.recv().await).0, ErrorCode::NotAuthorized);
    assert!(state().trial.is_some());
    assert!(matches!(
        c.auth(&host_key(), &ch).await,
        Response::Authenticated { .. }
    ));
    c.send(&Request::MarkGood).await;
    assert!(matches!(c.recv().await, Response::Done { .. }));
    assert!(state().trial.is_none());
}

fn code_of(r: Response) -> (ErrorCode, String) {
    match r {
        Response::Error { code, message } => (code, message),
        other => panic!("an error expected, got {other:?}"),
    }
}
