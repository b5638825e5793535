//! keel-agent end to end: a real agent process staging into a real ext4 `newimg` on a loop
//! device, in a private mount namespace per test, over TCP on 127.0.0.1 and the Unix socket.
//! Never vsock: that is tested inside QEMU guests only.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_proto::manifest::{SignedManifest, SigningKey};
use keel_proto::message::{data_header, message_frame, ErrorCode, Request, Response};
use keel_proto::wire::MAX_FRAME;
use keel_tests::agent::*;
use keel_tests::*;
use keelctl::client::{self, Client, Pushed};
use keelctl::error::Error as ClientError;
use keelctl::stream::Stream;
use keelctl::tls::TlsStream;
use keelctl::Endpoint;

#[test]
fn good_push_over_tcp_then_unix_socket() {
    if !privileged() {
        return;
    }
    with_newimg("agent-good", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let a = start(&w, "");
        let v2 = image(sb, 5, 2);
        let k = sb.fresh("signing.pem");
        fs::write(&k, keel_proto::manifest::signing_key_to_pem(&test_key())).unwrap();
        let out = keelctl(&[
            "sign",
            v2.to_str().unwrap(),
            "--key",
            k.to_str().unwrap(),
            "--name",
            "demo",
            "--version",
            "2",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // keelctl push over TCP.
        let ep = a.tcp.to_string();
        let out = keelctl(&["-e", &ep, "push", v2.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("staged version 2"), "{stdout}");
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v2));
        let m2 = SignedManifest::from_json(
            &fs::read(newimg.join("root-squashfs.img.manifest")).unwrap(),
        )
        .unwrap();
        assert_eq!(m2.manifest.version, 2);
        assert!(!newimg.join("root-squashfs.img.partial").exists());
        assert!(!newimg.join("root-squashfs.img.partial.manifest").exists());
        // The same again is a no-op with exit 0.
        let out = keelctl(&["-e", &ep, "push", v2.to_str().unwrap()]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("already staged"));

        // v3 over the Unix socket replaces it.
        let v3 = image(sb, 3, 3);
        let m3 = manifest_for(&v3, "demo", 3);
        let r = a.push(&a.unix, &v3, &m3).unwrap();
        assert!(
            matches!(
                r,
                Pushed::Staged {
                    version: 3,
                    attempts: 1,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v3));

        // Status, human and JSON.
        let ue = a.unix.to_string();
        let out = keelctl(&["-e", &ue, "status", "--json"]);
        assert!(out.status.success());
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["staged"]["version"], 3);
        assert_eq!(s["booted"]["version"], 1);
        assert_eq!(s["trial"]["tries"], 3);
        assert!(s["newimg_free"].as_u64().unwrap() > 0);
        let out = keelctl(&["-e", &ue, "status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("staged       demo version 3"), "{text}");
        // A reader that is gone (`| head -1` once it has its line) is no error and no panic.
        let piped = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; {} -e {ue} status --json | {{ exec 0<&-; sleep 1; }}",
                bin("keelctl").display()
            ))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&piped.stderr);
        assert!(
            piped.status.success() && err.is_empty(),
            "{:?} {err}",
            piped.status
        );
        // --wait bounds how long a push keeps retrying the connection.
        let t0 = Instant::now();
        let out = keelctl(&[
            "-e",
            "unix:///nonexistent/agent.sock",
            "--wait",
            "1",
            "push",
            v3.to_str().unwrap(),
            "--manifest",
            newimg.join("root-squashfs.img.manifest").to_str().unwrap(),
            "--retries",
            "0",
        ]);
        assert!(!out.status.success());
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "--wait 1 took {:?}",
            t0.elapsed()
        );
        // One log line per request, with peer, op, outcome and bytes.
        let log = a.log();
        assert!(
            log.lines().any(|l| l.contains("op=\"push\"")
                && l.contains("staged version 3")
                && l.contains("bytes=3145728")),
            "{log}"
        );
    });
}

#[test]
fn bad_input_is_refused_and_the_staged_image_is_untouched() {
    if !privileged() {
        return;
    }
    with_newimg("agent-bad", 16, |sb, newimg| {
        let w = world(sb, newimg, 5);
        let a = start(&w, "");
        let v6 = image(sb, 4, 6);
        let m6 = manifest_for(&v6, "demo", 6);
        a.push(&a.tcp, &v6, &m6).unwrap();
        let before = slot(&w);
        let check = |what: &str| {
            assert_eq!(slot(&w), before, "staged slot changed after: {what}");
            assert!(
                !newimg.join("root-squashfs.img.partial").exists(),
                "partial left after {what}"
            );
        };
        let v7 = image(sb, 2, 7);
        let m7 = manifest_for(&v7, "demo", 7);

        // Unknown key.
        let other = SigningKey::from_bytes(&[9; 32]);
        let (c, msg) = refused(a.push(&a.tcp, &v7, &m7.manifest.clone().sign(&other)));
        assert_eq!(c, ErrorCode::BadSignature, "{msg}");
        assert!(msg.contains("does not verify"), "{msg}");
        check("unknown key");

        // A flipped byte in the signature.
        let mut bad = m7.clone();
        let flip = if bad.signature.starts_with('0') {
            "1"
        } else {
            "0"
        };
        bad.signature.replace_range(0..1, flip);
        assert_eq!(
            refused(a.push(&a.tcp, &v7, &bad)).0,
            ErrorCode::BadSignature
        );
        check("flipped signature");

        // A changed manifest field (the signature no longer covers it).
        let mut bad = m7.clone();
        bad.manifest.size += 1;
        assert_eq!(
            refused(a.push(&a.tcp, &v7, &bad)).0,
            ErrorCode::BadSignature
        );
        check("flipped manifest");

        // A flipped byte in the payload: every byte arrives, the digest does not match.
        let mut bytes = fs::read(&v7).unwrap();
        bytes[1_000_000] ^= 0x40;
        let flipped = sb.fresh("flipped");
        fs::write(&flipped, &bytes).unwrap();
        let (c, msg) = refused(a.push(&a.tcp, &flipped, &m7));
        assert_eq!(c, ErrorCode::HashMismatch, "{msg}");
        assert!(msg.contains(&m7.manifest.sha256), "{msg}");
        check("flipped payload");

        // Downgrade, and the running version again.
        let (c, msg) = refused(a.push(&a.tcp, &v7, &manifest_for(&v7, "demo", 4)));
        assert_eq!(c, ErrorCode::Downgrade, "{msg}");
        assert!(msg.contains("older than the running version 5"), "{msg}");
        let m5 = manifest_for(&v7, "demo", 5);
        assert_eq!(refused(a.push(&a.tcp, &v7, &m5)).0, ErrorCode::Downgrade);
        check("downgrade");
        // Equal to the staged one: a no-op.
        let r = a.push(&a.tcp, &v6, &m6).unwrap();
        assert!(
            matches!(&r, Pushed::UpToDate(m) if m.contains("already staged")),
            "{r:?}"
        );
        check("equal version");

        // Another product.
        let (c, msg) = refused(a.push(&a.tcp, &v7, &manifest_for(&v7, "other", 7)));
        assert_eq!(c, ErrorCode::WrongName, "{msg}");
        check("wrong name");

        // Too large for the partition: refused before a single byte is sent.
        let big = image(sb, 20, 8);
        let (c, msg) = refused(a.push(&a.tcp, &big, &manifest_for(&big, "demo", 8)));
        assert_eq!(c, ErrorCode::NoSpace, "{msg}");
        assert!(msg.contains("bytes free"), "{msg}");
        check("disk full");

        // Truncated: the end-of-image frame arrives early.
        let (mut cl, r) = a.begin_push(&m7, false);
        assert_eq!(r, Response::Send { offset: 0 });
        let data = fs::read(&v7).unwrap();
        send_data(&mut cl, &data[..500_000]);
        cl.stream().write_all(&data_header(0).unwrap()).unwrap();
        let (c, msg) = error_of(cl.response().unwrap());
        assert_eq!(c, ErrorCode::SizeMismatch, "{msg}");
        assert!(msg.contains("ended after 500000 of"), "{msg}");
        check("truncated stream");

        // More bytes than declared.
        let (mut cl, _) = a.begin_push(&m7, false);
        send_data(&mut cl, &data);
        send_data(&mut cl, b"extra");
        let (c, msg) = error_of(cl.response().unwrap());
        assert_eq!(c, ErrorCode::SizeMismatch, "{msg}");
        assert!(msg.contains("more bytes than"), "{msg}");
        check("extra bytes");

        // Garbage instead of a frame: the length is absurd, refused from the header.
        let mut s = std::os::unix::net::UnixStream::connect(w.etc.join("agent.sock")).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let (c, msg) = error_of(read_response(&mut s));
        assert_eq!(c, ErrorCode::FrameTooLarge, "{msg}");
        // On TCP the same garbage is not TLS: no byte of the protocol is answered, the
        // connection is closed and the log says why.
        let mut s = TcpStream::connect(a.tcp.to_string().trim_start_matches("tcp://")).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            !answer.windows(5).any(|w| w == b"error"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        wait_for(|| a.log().contains("refused: TLS handshake"));
        // An oversized frame after the hello.
        let mut cl = a.client(&a.unix);
        cl.stream()
            .write_all(&(u32::try_from(MAX_FRAME).unwrap() + 1).to_be_bytes())
            .unwrap();
        let (c, msg) = error_of(cl.response().unwrap());
        assert_eq!(c, ErrorCode::FrameTooLarge, "{msg}");
        assert!(msg.contains(&format!("{}", MAX_FRAME + 1)), "{msg}");
        // Malformed JSON and an unknown operation.
        let mut cl = a.client(&a.unix);
        let mut f = vec![0, 0, 0, 3, 1, b'{', b'x'];
        f[3] = 3;
        cl.stream().write_all(&f).unwrap();
        let (c, msg) = error_of(cl.response().unwrap());
        assert_eq!(c, ErrorCode::BadRequest, "{msg}");
        // The wrong protocol version.
        let mut s = std::os::unix::net::UnixStream::connect(w.etc.join("agent.sock")).unwrap();
        s.write_all(
            &message_frame(&Request::Hello {
                protocol: 99,
                client: "t".into(),
            })
            .unwrap(),
        )
        .unwrap();
        let (c, msg) = error_of(read_response(&mut s));
        assert_eq!(c, ErrorCode::UnsupportedProtocol, "{msg}");
        check("garbage");

        // The agent survived all of it and still stages a good image.
        a.push(&a.unix, &v7, &m7).unwrap();
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v7));
    });
}

fn send_data(cl: &mut Client, data: &[u8]) {
    for c in data.chunks(200_000) {
        cl.stream()
            .write_all(&data_header(c.len()).unwrap())
            .unwrap();
        cl.stream().write_all(c).unwrap();
    }
}

fn error_of(r: Response) -> (ErrorCode, String) {
    match r {
        Response::Error { code, message } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn read_response(s: &mut impl Read) -> Response {
    let body = client::read_frame(s, "test").unwrap();
    keel_proto::message::parse_response(&body).unwrap()
}

#[test]
fn one_push_at_a_time_stalls_dropped_cut_uploads_resume() {
    if !privileged() {
        return;
    }
    with_newimg("agent-busy", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let a = start(&w, "idle_timeout_secs = 2");
        let v2 = image(sb, 6, 2);
        let m2 = manifest_for(&v2, "demo", 2);
        let data = fs::read(&v2).unwrap();

        // A first push sends 2 MiB and pauses; a second push is told "busy".
        let (mut first, r) = a.begin_push(&m2, false);
        assert_eq!(r, Response::Send { offset: 0 });
        send_data(&mut first, &data[..2 << 20]);
        let (c, msg) = refused(a.push(&a.unix, &v2, &m2));
        assert_eq!(c, ErrorCode::Busy, "{msg}");
        // Then the first one stalls past the idle timeout: dropped, with a reason.
        std::thread::sleep(Duration::from_secs(3));
        let (c, msg) = error_of(first.response().unwrap());
        assert_eq!(c, ErrorCode::Timeout, "{msg}");
        assert!(msg.contains("push again to resume"), "{msg}");
        // What arrived is kept for a resume; nothing is staged.
        assert_eq!(slot(&w), (None, None));
        let st = status(&a);
        assert_eq!(st.partial.as_ref().map(|p| p.received), Some(2 << 20));

        // A cut connection (the client vanishes mid-stream), then a resume.
        let (mut cl, r) = a.begin_push(&m2, true);
        assert_eq!(r, Response::Send { offset: 2 << 20 });
        send_data(&mut cl, &data[2 << 20..3 << 20]);
        drop(cl);
        wait_for(|| status(&a).partial.map(|p| p.received) == Some(3 << 20));
        // The bytes are on disk; the cut session may still be closing (then: busy, and a
        // client tries again, as keelctl does).
        let t = std::time::Instant::now();
        let mut cl = loop {
            let (cl, r) = a.begin_push(&m2, true);
            match r {
                Response::Error {
                    code: ErrorCode::Busy,
                    ..
                } if t.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                r => {
                    assert_eq!(r, Response::Send { offset: 3 << 20 });
                    break cl;
                }
            }
        };
        send_data(&mut cl, &data[3 << 20..]);
        cl.stream().write_all(&data_header(0).unwrap()).unwrap();
        match cl.response().unwrap() {
            Response::Staged {
                received,
                resumed_from,
                image,
                ..
            } => {
                assert_eq!(resumed_from, 3 << 20);
                assert_eq!(received, 3 << 20);
                assert_eq!(image.version, 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v2));
        assert!(status(&a).partial.is_none());
    });
}

/// keelctl resumes by itself when the connection drops: a proxy cuts the first connection
/// after 3 MiB.
#[test]
fn keelctl_push_resumes_after_a_dropped_connection() {
    if !privileged() {
        return;
    }
    with_newimg("agent-resume", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let a = start(&w, "");
        let v2 = image(sb, 8, 2);
        fs::write(
            sb.dir.join("v2.manifest"),
            manifest_for(&v2, "demo", 2).to_json(),
        )
        .unwrap();
        let upstream = a.tcp.to_string().trim_start_matches("tcp://").to_string();
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = proxy.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            for (i, conn) in proxy.incoming().take(2).enumerate() {
                let down = conn.unwrap();
                let up = TcpStream::connect(&upstream).unwrap();
                let limit = if i == 0 { Some(3u64 << 20) } else { None };
                relay(down, up, limit);
            }
        });
        let out = keelctl(&[
            "-e",
            &format!("tcp://127.0.0.1:{port}"),
            "push",
            v2.to_str().unwrap(),
            "--manifest",
            sb.dir.join("v2.manifest").to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains("2 connections"), "{stdout}{stderr}");
        // Not a terminal: plain progress lines.
        assert!(stderr.contains("pushed 100%"), "{stderr}");
        t.join().unwrap();
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v2));
        assert!(
            a.log().contains("resumed") || a.log().contains("upload cut"),
            "{}",
            a.log()
        );
    });
}

/// Forwards both ways; with `limit`, cuts both sockets after that many client bytes.
fn relay(down: TcpStream, up: TcpStream, limit: Option<u64>) {
    let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut u2, &mut d2);
        let _ = d2.shutdown(std::net::Shutdown::Both);
    });
    let (mut d, mut u) = (down, up);
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = match d.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        if u.write_all(&buf[..k]).is_err() {
            break;
        }
        n += k as u64;
        if limit.is_some_and(|l| n >= l) {
            break;
        }
    }
    let _ = u.shutdown(std::net::Shutdown::Both);
    let _ = d.shutdown(std::net::Shutdown::Both);
    let _ = back.join();
}

#[test]
fn control_is_for_local_root_or_a_key() {
    if !privileged() {
        return;
    }
    with_newimg("agent-control", 16, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let flag = sb.fresh("rebooted");
        let a = start(
            &w,
            &format!("reboot_command = \"touch {}\"", flag.display()),
        );
        for req in [Request::MarkGood, Request::Reboot] {
            let (c, msg) = error_of(a.client(&a.tcp).call(&req).unwrap());
            assert_eq!(c, ErrorCode::NotAuthorized, "{msg}");
            assert!(msg.contains("root on the local Unix socket"), "{msg}");
        }
        assert!(read_state(&w.img).trial.is_some());
        assert!(!flag.exists());
        // keelctl over the Unix socket as root, as keel-mark-good.service runs it: no $HOME,
        // no known-agents file (only TLS needs one).
        let ue = a.unix.to_string();
        let out = Command::new(bin("keelctl"))
            .args(["-e", &ue, "mark-good"])
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("version 1 marked good"));
        // Over TLS the same environment has nowhere to remember the agent's key: it says so.
        let out = Command::new(bin("keelctl"))
            .args(["-e", &a.tcp.to_string(), "status"])
            .env_clear()
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--known-agents FILE"),
            "{err}"
        );
        let st = read_state(&w.img);
        assert!(st.trial.is_none());
        assert_eq!(
            st.events.last().unwrap().kind,
            keel_proto::bootstate::EventKind::MarkedGood
        );
        let out = keelctl(&["-e", &ue, "mark-good"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("not on trial"));
        assert!(status(&a).trial.is_none());
        // keelctl refuses with the agent's reason and a non-zero exit over TCP.
        let te = a.tcp.to_string();
        let out = keelctl(&["-e", &te, "reboot"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not-authorized"));
        let out = keelctl(&["-e", &ue, "reboot"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for(|| flag.exists());
    });
}

#[test]
fn connection_limit_and_sigterm() {
    if !privileged() {
        return;
    }
    with_newimg("agent-limit", 16, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let mut a = start(&w, "max_connections = 3\nmax_connections_per_peer = 2");
        let busy = |s: &mut Stream| {
            let (c, msg) = error_of(read_response(s));
            assert_eq!(c, ErrorCode::Busy, "{msg}");
            msg
        };
        // Two from 127.0.0.1 hold that address's share.
        let r1 = a.client(&a.tcp);
        let r2 = a.client(&a.tcp);
        let mut s = tls_from("127.0.0.1", &a);
        assert!(busy(&mut s).contains("this address"));
        // One from 127.0.0.2 fills the remote pool; 127.0.0.3 is then refused too.
        let r3 = Client::over(tls_from("127.0.0.2", &a), "127.0.0.2".into(), T).unwrap();
        let mut s = tls_from("127.0.0.3", &a);
        assert!(busy(&mut s).contains("3 connections"));
        // Remote peers holding every remote slot do not keep local root out.
        let out = keelctl(&["-e", &a.unix.to_string(), "mark-good"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(read_state(&w.img).trial.is_none());
        // The local pool full: keelctl says busy (not "broken pipe").
        let l: Vec<Client> = (0..3).map(|_| a.client(&a.unix)).collect();
        let out = keelctl(&["-e", &a.unix.to_string(), "--wait", "0", "status"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("busy"), "{err}");
        assert!(!err.to_lowercase().contains("broken pipe"), "{err}");
        drop((r1, r2, r3, l));
        wait_for(|| Client::connect(&a.tcp, &a.dial()).is_ok());
        // SIGTERM: a clean exit that removes the socket.
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(a.child.id().cast_signed()).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let st = a.child.wait().unwrap();
        assert!(st.success(), "{st}");
        assert!(!w.etc.join("agent.sock").exists());
        assert!(a.log().contains("SIGTERM"));
    });
}

/// A TLS session with `a` on TCP from the local address `src` (any of 127.0.0.0/8).
fn tls_from(src: &str, a: &Agent) -> Stream {
    let tcp = tcp_from(src, &a.tcp);
    let trust = a.dial().trust;
    Stream::Tls(TlsStream::connect(tcp, &a.tcp.to_string(), &trust).unwrap())
}

/// A TCP connection to `ep` from the local address `src` (any of 127.0.0.0/8).
fn tcp_from(src: &str, ep: &Endpoint) -> TcpStream {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketAddrV4, SocketType};
    let Endpoint::Tcp(addr) = ep else {
        panic!("{ep} is not TCP")
    };
    let to: std::net::SocketAddrV4 = addr.parse().unwrap();
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&fd, &SocketAddrV4::new(src.parse().unwrap(), 0)).unwrap();
    connect(&fd, &to).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// kill -9 of the agent mid-stream, then a restart: nothing half-staged that initstage would
/// promote (initstage itself is run on the disk), and the upload resumes to completion.
#[test]
fn agent_killed_mid_stream_leaves_nothing_initstage_promotes() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("agent-kill9");
    let img = sb.img_with_v1(24);
    let disk = sb.disk(&[img, Part::new("overlay", 16), Part::new("newimg", 48)]);
    let r = sb.prepare(&disk, "keel.tries=3");
    assert_eq!(r.booted.version, 1);
    sb.teardown();
    // A v2 big enough to be caught mid-stream: a squashfs of incompressible bytes.
    let root = sb.rootfs(2);
    let noise = image(&mut sb, 12, 5);
    fs::rename(&noise, root.join("noise")).unwrap();
    let v2 = sb.fresh("v2.squashfs");
    run(Command::new("mksquashfs")
        .arg(&root)
        .arg(&v2)
        .args(["-noappend", "-quiet", "-all-root"]));
    let m2 = manifest_for(&v2, "demo", 2);
    let mut sb2 = sb.files();
    sb.with_partition(&disk, 3, |newimg| {
        let w = world(&mut sb2, newimg, 1);
        let mut a = start(&w, "");
        let (mut cl, _) = a.begin_push(&m2, false);
        let data = fs::read(&v2).unwrap();
        send_data(&mut cl, &data[..5 << 20]);
        wait_for(|| {
            fs::metadata(newimg.join("root-squashfs.img.partial"))
                .map(|m| m.len())
                .unwrap_or(0)
                >= 4 << 20
        });
        a.kill9();
        drop(cl);
        assert!(!newimg.join("root-squashfs.img.manifest").exists());
    });
    // initstage boots v1 again and promotes nothing.
    let r = sb.prepare(&disk, "keel.tries=3");
    assert_eq!(r.booted.version, 1, "{:?}", r.actions);
    sb.teardown();
    // A restarted agent resumes the upload; the next boot promotes v2.
    sb.with_partition(&disk, 3, |newimg| {
        let w = world(&mut sb2, newimg, 1);
        let a = start(&w, "");
        let before = status(&a).partial.unwrap().received;
        assert!(before >= 4 << 20, "{before}");
        let r = a.push(&a.tcp, &v2, &m2).unwrap();
        assert!(matches!(r, Pushed::Staged { version: 2, .. }), "{r:?}");
    });
    let r = sb.prepare(&disk, "keel.tries=3");
    assert_eq!(r.booted.version, 2, "{:?}", r.actions);
    sb.finish();
}

/// The ready announce reaches a host listening on TCP (`keelctl wait-ready`), and systemd's
/// notify socket gets READY=1 once the agent listens.
#[test]
fn ready_announce_and_sd_notify() {
    if !privileged() {
        return;
    }
    with_newimg("agent-ready", 16, |sb, newimg| {
        let w = world(sb, newimg, 4);
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let waiter = Command::new(bin("keelctl"))
            .args([
                "wait-ready",
                &format!("tcp://127.0.0.1:{port}"),
                "--within",
                "20",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let notify = sb.fresh("notify.sock");
        let ns = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
        ns.set_read_timeout(Some(T)).unwrap();
        let a = start_env(
            &w,
            &format!("announce = \"tcp://127.0.0.1:{port}\""),
            &[
                ("NOTIFY_SOCKET", &notify),
                ("WATCHDOG_USEC", Path::new("200000")),
            ],
        );
        let mut buf = [0u8; 512];
        let n = ns.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            msg.starts_with("READY=1\nSTATUS=listening on unix://"),
            "{msg}"
        );
        // WatchdogSec=: WATCHDOG=1 every half of WATCHDOG_USEC (100 ms here); each read is
        // bounded by the socket's timeout.
        let mut pings = 0;
        while pings < 3 {
            let n = ns.recv(&mut buf).unwrap();
            if &buf[..n] == b"WATCHDOG=1" {
                pings += 1;
            }
        }
        let out = waiter.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ann: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ann["op"], "ready");
        assert_eq!(ann["booted"]["version"], 4);
        assert_eq!(ann["boot_count"], 7);
        assert!(
            ann["listening"].to_string().contains("tcp://127.0.0.1:"),
            "{ann}"
        );
        drop(a);
    });
}

/// Hybrid vsock as Firecracker and Cloud Hypervisor offer it: a Unix socket on the host,
/// `CONNECT <port>\n` → `OK <n>\n`. A fake VMM closes the first attempt without OK (the guest
/// does not listen yet), then accepts and relays to the agent's Unix socket; keelctl retries
/// and pushes through it. (No AF_VSOCK socket is opened.)
#[test]
fn hybrid_vsock_endpoint_retries_until_the_guest_listens() {
    if !privileged() {
        return;
    }
    with_newimg("agent-hvsock", 32, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let a = start(&w, "");
        let vmm = sb.fresh("vm.vsock");
        let listener = std::os::unix::net::UnixListener::bind(&vmm).unwrap();
        let agent_sock = w.etc.join("agent.sock");
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (i, conn) in listener.incoming().enumerate() {
                let mut c = conn.unwrap();
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                seen.push(String::from_utf8(line).unwrap());
                if i == 0 {
                    continue; // dropped: nothing listens in the guest yet
                }
                c.write_all(b"OK 1073741824\n").unwrap();
                let up = std::os::unix::net::UnixStream::connect(&agent_sock).unwrap();
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                let back = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up2, &mut c2);
                });
                let (mut c, mut up) = (c, up);
                let _ = std::io::copy(&mut c, &mut up);
                let _ = up.shutdown(std::net::Shutdown::Write);
                let _ = back.join();
                break;
            }
            seen
        });
        let v2 = image(sb, 3, 2);
        fs::write(
            sb.dir.join("v2.manifest"),
            manifest_for(&v2, "demo", 2).to_json(),
        )
        .unwrap();
        let out = keelctl(&[
            "-e",
            &format!("hvsock://{}:7447", vmm.display()),
            "push",
            v2.to_str().unwrap(),
            "--manifest",
            sb.dir.join("v2.manifest").to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(t.join().unwrap(), vec!["CONNECT 7447", "CONNECT 7447"]);
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v2));
        drop(a);
    });
}

/// Pushes with the busy retry keelctl does (a cut session may still be closing).
fn push_retrying(
    a: &Agent,
    ep: &Endpoint,
    img: &Path,
    m: &SignedManifest,
) -> Result<Pushed, ClientError> {
    let t = Instant::now();
    loop {
        match a.push(ep, img, m) {
            Err(ClientError::Refused {
                code: ErrorCode::Busy,
                ..
            }) if t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            r => return r,
        }
    }
}

#[test]
fn large_images_resume_replace_the_staged_one_and_unstage() {
    if !privileged() {
        return;
    }
    with_newimg("agent-space", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let a = start(&w, "");
        let free = status(&a).newimg_free.unwrap();
        // Over half of newimg's free space, cut after 8 MiB.
        let v2 = image(sb, 30, 4);
        let m2 = manifest_for(&v2, "demo", 2);
        let data = fs::read(&v2).unwrap();
        assert!(
            data.len() as u64 * 2 > free,
            "image {} vs free {free}",
            data.len()
        );
        let (mut cl, r) = a.begin_push(&m2, true);
        assert_eq!(r, Response::Send { offset: 0 });
        send_data(&mut cl, &data[..8 << 20]);
        drop(cl);
        wait_for(|| status(&a).partial.map(|p| p.received) == Some(8 << 20));
        // The resume counts the partial file's reserved blocks as its own.
        let r = push_retrying(&a, &a.tcp, &v2, &m2).unwrap();
        assert!(matches!(r, Pushed::Staged { version: 2, .. }), "{r:?}");
        // A newer image that does not fit beside the staged one replaces it.
        let v3 = image(sb, 30, 5);
        let m3 = manifest_for(&v3, "demo", 3);
        let r = a.push(&a.tcp, &v3, &m3).unwrap();
        assert!(matches!(r, Pushed::Staged { version: 3, .. }), "{r:?}");
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v3));
        // One that fits nowhere is refused and leaves no partial file.
        let huge = image(sb, 60, 6);
        let (c, msg) = refused(a.push(&a.tcp, &huge, &manifest_for(&huge, "demo", 4)));
        assert_eq!(c, ErrorCode::NoSpace, "{msg}");
        assert!(!newimg.join("root-squashfs.img.partial").exists());
        assert!(!newimg.join("root-squashfs.img.partial.manifest").exists());
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v3));
        // unstage: refused over TCP, done for root on the Unix socket.
        let out = keelctl(&["-e", &a.tcp.to_string(), "unstage"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not-authorized"));
        let out = keelctl(&["-e", &a.unix.to_string(), "unstage"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("removed staged version 3"), "{text}");
        assert_eq!(slot(&w), (None, None));
    });
}

/// A push the next boot could not promote (`img` too small) is refused before a byte.
#[test]
fn a_push_img_cannot_take_is_refused() {
    if !privileged() {
        return;
    }
    with_newimg("agent-imgfull", 16, |sb, small_img| {
        let newimg = sb.fresh("newimg");
        fs::create_dir_all(&newimg).unwrap();
        let mut w = world(sb, &newimg, 1);
        fs::copy(
            w.img.join("keel-state.json"),
            small_img.join("keel-state.json"),
        )
        .unwrap();
        w.img = small_img.to_path_buf();
        let a = start(&w, "");
        let big = image(sb, 20, 7);
        let (c, msg) = refused(a.push(&a.tcp, &big, &manifest_for(&big, "demo", 2)));
        assert_eq!(c, ErrorCode::NoSpace, "{msg}");
        assert!(msg.contains("could not promote"), "{msg}");
        assert_eq!(slot(&w), (None, None));
        assert!(!newimg.join("root-squashfs.img.partial").exists());
        let ok = image(sb, 2, 8);
        let r = a.push(&a.tcp, &ok, &manifest_for(&ok, "demo", 2)).unwrap();
        assert!(matches!(r, Pushed::Staged { version: 2, .. }), "{r:?}");
    });
}
