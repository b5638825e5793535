//! TCP is TLS 1.3: the real keel-agent and keelctl on loopback. The agent's identity is made
//! on first start and kept; keelctl trusts it on first use and remembers it, refuses a
//! changed one loudly, or takes only a pinned one; key authentication works inside the
//! session (and only there: its signature is bound to the TLS session); and what crosses
//! the wire is not readable, checked by a relay that records every byte.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use keel_proto::manifest::{public_key_to_pem, signing_key_to_pem};
use keel_tests::agent::*;
use keel_tests::*;
use sha2::Digest;

fn world_with_exec(sb: &mut Sandbox) -> (World, String, std::path::PathBuf) {
    let (w, host) = exec_world(sb, "newimg");
    let key = w.etc.join("host.pem");
    fs::write(&key, signing_key_to_pem(&host)).unwrap();
    let cfg = exec_config(&w);
    (w, cfg, key)
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_key_is_remembered_on_first_use_pinned_or_refused_when_changed() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("tls-trust");
    let (w, cfg, key) = world_with_exec(&mut sb);
    let mut a = start(&w, &cfg);
    let te = a.tcp.to_string();
    let known = w.etc.join("known_agents");
    let kn = known.to_str().unwrap();
    let fp = status(&a).identity.expect("the agent names its identity");
    assert!(fp.starts_with("SHA256:"), "{fp}");
    let mode = fs::metadata(&a.identity).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // First contact: trusted, remembered, said.
    let out = keelctl(&["-e", &te, "--known-agents", kn, "status"]);
    let stdout = ok(&out);
    assert!(stdout.contains(&fp), "{stdout}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("first contact") && err.contains(&fp), "{err}");
    let lines = fs::read_to_string(&known).unwrap();
    assert_eq!(lines.lines().count(), 1);
    assert!(lines.starts_with(&format!("{te} ed25519 ")), "{lines}");
    // Second contact: the same key, nothing said, nothing added.
    let out = keelctl(&["-e", &te, "--known-agents", kn, "status"]);
    ok(&out);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_to_string(&known).unwrap(), lines);

    // Key authentication inside the TLS session: exec and a remote mark-good.
    let k = key.to_str().unwrap();
    let out = keelctl(&[
        "-e",
        &te,
        "--known-agents",
        kn,
        "--key",
        k,
        "exec",
        "--",
        "sh",
        "-c",
        "echo $((6*7))",
    ]);
    assert_eq!(ok(&out), "42\n");
    assert!(read_state(&w.img).trial.is_some());
    ok(&keelctl(&[
        "-e",
        &te,
        "--known-agents",
        kn,
        "--key",
        k,
        "mark-good",
    ]));
    assert!(read_state(&w.img).trial.is_none());

    // Pinned: the agent's own .pub is accepted, another key refused before any request.
    let pubf = a.identity_pub();
    ok(&keelctl(&[
        "-e",
        &te,
        "--agent-key",
        pubf.to_str().unwrap(),
        "status",
    ]));
    let wrong = w.etc.join("wrong.pub");
    fs::write(&wrong, public_key_to_pem(&test_key().verifying_key())).unwrap();
    let out = keelctl(&["-e", &te, "--agent-key", wrong.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the pinned") && err.contains(&fp), "{err}");

    // A remembered key that differs: refused loudly, with the line to delete; nothing
    // is run and the file is left as it was.
    let forged = format!(
        "# an older agent on this port\n{te} ed25519 {}\n",
        keel_proto::exec::b64(test_key().verifying_key().as_bytes())
    );
    fs::write(&known, &forged).unwrap();
    let out = keelctl(&[
        "-e",
        &te,
        "--known-agents",
        kn,
        "--key",
        k,
        "exec",
        "--",
        "touch",
        w.etc.join("ran").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AGENT KEY CHANGED") && err.contains("delete line 2") && err.contains(&fp),
        "{err}"
    );
    assert!(!w.etc.join("ran").exists());
    assert_eq!(fs::read_to_string(&known).unwrap(), forged);
    // A known-agents file with a broken line is an error naming it, not "trust all".
    fs::write(&known, "tcp://x:1 ed25519\n").unwrap();
    let out = keelctl(&["-e", &te, "--known-agents", kn, "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 1"), "{err}");

    // The identity survives a restart: same key, same .pub.
    let pub_before = fs::read(&pubf).unwrap();
    a.kill9();
    let a = start(&w, &cfg);
    assert_eq!(status(&a).identity.as_deref(), Some(fp.as_str()));
    assert_eq!(fs::read(a.identity_pub()).unwrap(), pub_before);
    assert!(a.log().contains("loaded agent identity"), "{}", a.log());
}

/// Relays `listener`'s first connection to `to`, appending every byte to `seen`.
fn recording_relay(
    listener: TcpListener,
    to: String,
    seen: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (down, _) = listener.accept().unwrap();
        let up = TcpStream::connect(&to).unwrap();
        let pump = |mut from: TcpStream, mut to: TcpStream, seen: Arc<Mutex<Vec<u8>>>| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            })
        };
        let a = pump(
            down.try_clone().unwrap(),
            up.try_clone().unwrap(),
            seen.clone(),
        );
        let b = pump(up, down, seen);
        a.join().unwrap();
        b.join().unwrap();
    })
}

#[test]
fn nothing_readable_crosses_the_wire() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("tls-wire");
    let (w, cfg, key) = world_with_exec(&mut sb);
    let a = start(&w, &cfg);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_ep = format!("tcp://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let t = recording_relay(
        l,
        a.tcp.to_string().trim_start_matches("tcp://").to_string(),
        seen.clone(),
    );
    // 4 MiB of a marker through stdin to sha256sum, and a marker on stdout: both directions
    // at once through one session (keelctl's writer thread beside its reader).
    let marker = b"keel-plaintext-marker-0123456789";
    let data: Vec<u8> = marker.iter().copied().cycle().take(4 << 20).collect();
    let mut child = std::process::Command::new(bin("keelctl"))
        .args([
            "-e",
            &relay_ep,
            "--agent-key",
            a.identity_pub().to_str().unwrap(),
        ])
        .args(["--key", key.to_str().unwrap(), "exec", "--", "sh", "-c"])
        .arg("sha256sum; echo keel-output-marker-9876543210")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feed.join().unwrap();
    let stdout = ok(&out);
    let want = hex(&sha2::Sha256::digest(
        marker
            .iter()
            .copied()
            .cycle()
            .take(4 << 20)
            .collect::<Vec<u8>>(),
    ));
    assert!(stdout.starts_with(&want), "{stdout}");
    assert!(stdout.contains("keel-output-marker-9876543210"), "{stdout}");
    t.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 4 << 20, "the relay saw {} bytes", seen.len());
    for needle in [
        &marker[..],
        b"keel-output-marker",
        b"sha256sum",
        b"\"exec\"",
    ] {
        assert!(
            !seen.windows(needle.len()).any(|w| w == needle),
            "{:?} crossed the wire in the clear",
            String::from_utf8_lossy(needle)
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
