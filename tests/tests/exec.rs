//! `keelctl exec` against a real keel-agent over its Unix socket: the real binaries, real
//! processes, stdin from a pipe, a signal to keelctl forwarded, exit codes through. (The
//! streams in detail, and every refusal, are `agent/tests/exec.rs`, in memory; vsock is
//! QEMU's.)

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_tests::agent::*;
use keel_tests::*;
use sha2::Digest;

#[test]
fn keelctl_exec_through_the_real_binaries() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("exec-real");
    let (w, host) = exec_world(&mut sb, "newimg");
    let a = start(&w, &exec_config(&w));
    let ue = a.unix.to_string();
    // stdout and stderr apart, the exit code through.
    let out = keelctl(&[
        "-e",
        &ue,
        "exec",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    // stdin from a pipe, 8 MiB, through sha256sum.
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut c = Command::new(bin("keelctl"))
        .args([
            "-e",
            &ue,
            "exec",
            "--env",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING; sha256sum",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let feed = std::thread::spawn(move || stdin.write_all(&data).map(|()| data));
    let out = c.wait_with_output().unwrap();
    let data = feed.join().unwrap().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text,
        format!(
            "hi\n{}  -\n",
            keel_proto::hex::encode(&sha2::Sha256::digest(&data))
        )
    );
    // SIGINT to keelctl reaches the remote process: it dies of it and keelctl says 130.
    let mut c = follow(
        &ue,
        &["exec", "--", "sh", "-c", "echo started; exec sleep 30"],
    );
    assert_eq!(first_bytes(&mut c, 8), b"started\n");
    let t = Instant::now();
    let pid = rustix::process::Pid::from_raw(i32::try_from(c.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let st = c.wait().unwrap();
    assert_eq!(st.code(), Some(130));
    assert!(t.elapsed() < Duration::from_secs(10));
    // -t: a pty in the guest (24x80 when keelctl's own output is not a terminal).
    let out = keelctl(&[
        "-e",
        &ue,
        "exec",
        "-t",
        "--",
        "sh",
        "-c",
        "tty; stty size; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("/dev/pts/") && text.contains("24 80\r\n"),
        "{text:?}"
    );
    // --timeout kills it and says so; a missing program is 127.
    let out = keelctl(&["-e", &ue, "exec", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ran out of its --timeout (1 s)"));
    let out = keelctl(&["-e", &ue, "exec", "--", "no-such-program-keel"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such program"));
    // A key: accepted on the Unix socket; an unknown one refused with its fingerprint and
    // exit 255.
    let keyfile = w.etc.join("host.pem");
    fs::write(&keyfile, keel_proto::manifest::signing_key_to_pem(&host)).unwrap();
    let other = w.etc.join("other.pem");
    fs::write(
        &other,
        keel_proto::manifest::signing_key_to_pem(&test_key()),
    )
    .unwrap();
    let k = keyfile.to_str().unwrap();
    let out = keelctl(&["-e", &ue, "--key", k, "exec", "--", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = keelctl(&[
        "-e",
        &ue,
        "--key",
        other.to_str().unwrap(),
        "exec",
        "--",
        "true",
    ]);
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SHA256:") && err.contains("authorized.pem"),
        "{err}"
    );
    // cp both ways, 16 MiB, hashes and mode kept.
    let src = w.etc.join("blob.bin");
    let blob: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 24) as u8)
        .collect();
    fs::write(&src, &blob).unwrap();
    fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let guest_dir = w.etc.join("guest");
    fs::create_dir_all(&guest_dir).unwrap();
    let gd = format!(":{}/", guest_dir.display());
    let out = keelctl(&["-e", &ue, "cp", src.to_str().unwrap(), &gd]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&guest_dir.join("blob.bin")), sha256_file(&src));
    let back = w.etc.join("back");
    fs::create_dir_all(&back).unwrap();
    let gs = format!(":{}/blob.bin", guest_dir.display());
    let out = keelctl(&["-e", &ue, "cp", &gs, back.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&back.join("blob.bin")), sha256_file(&src));
    let mode = fs::metadata(back.join("blob.bin")).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o640
    );
    // A full disk: a 4 MiB tmpfs in this test's mount namespace. Refused before a byte, with
    // the numbers; nothing left behind. A missing guest file is named.
    let small = w.etc.join("small");
    fs::create_dir_all(&small).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &small,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"size=4m",
    )
    .unwrap();
    let out = keelctl(&[
        "-e",
        &ue,
        "cp",
        src.to_str().unwrap(),
        &format!(":{}/", small.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-space") && err.contains("needs 16777216 bytes"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&small).unwrap().count(), 0);
    let out = keelctl(&[
        "-e",
        &ue,
        "cp",
        &format!(":{}/nope", guest_dir.display()),
        back.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
    assert_eq!(fs::read_dir(&back).unwrap().count(), 1);
    // --detach prints an id; ps lists it; attach replays what it wrote; kill ends it.
    let out = keelctl(&[
        "-e",
        &ue,
        "exec",
        "--detach",
        "--",
        "sh",
        "-c",
        "echo hello; echo world; exec sleep 30",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ps = keelctl(&["-e", &ue, "ps", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"].as_u64().map(|v| v.to_string()).as_deref() == Some(id.as_str()))
        .unwrap()
        .clone();
    assert_eq!(entry["detached"], true);
    std::thread::sleep(Duration::from_millis(500));
    let mut watcher = follow(&ue, &["attach", &id]);
    assert_eq!(first_bytes(&mut watcher, 12), b"hello\nworld\n");
    let out = keelctl(&["-e", &ue, "kill", &id, "--signal", "KILL"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(watcher.wait().unwrap().code(), Some(137));
    // A keelctl killed mid-exec: the process goes on; attach gets the rest and its code.
    let mut first_client = follow(
        &ue,
        &["exec", "--", "sh", "-c", "echo a; sleep 2; echo b; exit 9"],
    );
    assert_eq!(first_bytes(&mut first_client, 2), b"a\n");
    first_client.kill().unwrap();
    first_client.wait().unwrap();
    let ps = keelctl(&["-e", &ue, "ps", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let lost = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["argv"][2].as_str() == Some("echo a; sleep 2; echo b; exit 9"))
        .unwrap()["id"]
        .to_string();
    let out = keelctl(&["-e", &ue, "attach", &lost]);
    assert_eq!(out.status.code(), Some(9));
    assert_eq!(out.stdout, b"b\n");
    // Each exec is one log line naming the peer and the outcome.
    let log = a.log();
    assert!(
        log.contains("op=\"exec\"") || log.contains("op=exec"),
        "{log}"
    );
    assert!(log.contains("exited 7"), "{log}");
    drop(a);
    sb.finish();
}

/// keelctl against `ep` with `args`, stdin empty, stdout to read.
fn follow(ep: &str, args: &[&str]) -> std::process::Child {
    Command::new(bin("keelctl"))
        .args(["-e", ep])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The first `n` bytes a child writes to stdout.
fn first_bytes(c: &mut std::process::Child, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(c.stdout.as_mut().unwrap(), &mut b).unwrap();
    b
}
