//! The protocol in memory: `session::serve` driven over `tokio::io::duplex` with temporary
//! `newimg` and `img` directories. No root, no loop device, no agent process: every refusal
//! that does not need a real block device, in milliseconds. (`tests/tests/agent.rs` runs the
//! same refusals against a real agent on ext4 over TCP and the Unix socket.)

mod common;

use common::*;

async fn push_all(c: &mut Client, b: &[u8], m: &SignedManifest) -> Response {
    match c.offer(m, false).await {
        Response::Send { offset: 0 } => {}
        other => return other,
    }
    c.data(b).await;
    c.end().await;
    c.recv().await
}

#[tokio::test]
async fn a_good_push_is_staged_and_reported() {
    let d = Dev::new("good", 1, 30);
    let mut c = d.client(tcp()).await;
    let img = data(3, 1);
    let m = signed(&img, 2);
    match push_all(&mut c, &img, &m).await {
        Response::Staged {
            image, received, ..
        } => {
            assert_eq!(image.version, 2);
            assert_eq!(received, img.len() as u64);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.slot().0.unwrap(), img);
    c.send(&Request::Status).await;
    let Response::Status(s) = c.recv().await else {
        panic!("status")
    };
    assert_eq!(s.staged.unwrap().version, 2);
    assert_eq!(s.booted.unwrap().version, 1);
    assert!(s.state_error.is_none());
    // The same offer again is a no-op.
    assert!(matches!(
        c.offer(&m, false).await,
        Response::UpToDate { .. }
    ));
}

#[tokio::test]
async fn offers_are_refused_before_a_byte_and_the_staged_image_is_untouched() {
    let d = Dev::new("offers", 5, 30);
    let mut c = d.client(tcp()).await;
    let v7 = data(1, 7);
    assert!(matches!(
        push_all(&mut c, &v7, &signed(&v7, 7)).await,
        Response::Staged { .. }
    ));
    let before = d.slot();
    let other_key = SigningKey::from_bytes(&[8; 32]);
    let img = data(1, 8);
    let mut min = manifest(&img, 9, "demo");
    min.min_version = Some(6);
    let mut bad_sig = signed(&img, 9);
    bad_sig.manifest.version = 10;
    let cases: Vec<(SignedManifest, ErrorCode)> = vec![
        (
            manifest(&img, 9, "demo").sign(&other_key),
            ErrorCode::BadSignature,
        ),
        (bad_sig, ErrorCode::BadSignature),
        (
            manifest(&img, 9, "other").sign(&key()),
            ErrorCode::WrongName,
        ),
        (signed(&img, 4), ErrorCode::Downgrade),
        (signed(&img, 6), ErrorCode::Downgrade), // below the staged 7
        (min.sign(&key()), ErrorCode::MinVersion),
        (signed(&data(1, 99), 9), ErrorCode::Rejected),
    ];
    for (i, (m, want)) in cases.into_iter().enumerate() {
        let (got, msg) = code(c.offer(&m, false).await);
        assert_eq!(got, want, "case {i}: {msg}");
        assert_eq!(d.slot(), before, "case {i} touched the staged slot");
        assert!(!d.partial_exists(), "case {i} left a partial file");
    }
    // A manifest that does not validate.
    let mut zero = manifest(&img, 9, "demo");
    zero.sha256 = "xyz".into();
    let (got, msg) = code(c.offer(&zero.sign(&key()), false).await);
    assert_eq!(got, ErrorCode::BadManifest, "{msg}");
    // Bigger than newimg can hold.
    let mut huge = manifest(&img, 9, "demo");
    huge.size = 1 << 60;
    let (got, msg) = code(c.offer(&huge.sign(&key()), false).await);
    assert_eq!(got, ErrorCode::NoSpace, "{msg}");
    assert_eq!(d.slot(), before);
}

#[tokio::test]
async fn bad_streams_are_refused_and_leave_nothing() {
    let d = Dev::new("streams", 1, 30);
    let img = data(2, 3);
    // Wrong bytes: hash mismatch.
    let mut c = d.client(tcp()).await;
    let m = signed(&img, 2);
    assert!(matches!(
        c.offer(&m, false).await,
        Response::Send { offset: 0 }
    ));
    c.data(&data(2, 4)).await;
    c.end().await;
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::HashMismatch, "{msg}");
    assert_eq!(d.slot(), (None, None));
    assert!(!d.partial_exists());
    // Too short: the end frame comes early.
    let mut c = d.client(tcp()).await;
    assert!(matches!(c.offer(&m, false).await, Response::Send { .. }));
    c.data(&img[..1000]).await;
    c.end().await;
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::SizeMismatch, "{msg}");
    assert!(!d.partial_exists());
    // Too long.
    let mut c = d.client(tcp()).await;
    assert!(matches!(c.offer(&m, false).await, Response::Send { .. }));
    c.data(&img).await;
    c.data(b"x").await;
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::SizeMismatch, "{msg}");
    assert!(c.closed().await);
    assert!(!d.partial_exists());
    // A message where image data belongs.
    let mut c = d.client(tcp()).await;
    assert!(matches!(c.offer(&m, false).await, Response::Send { .. }));
    c.send(&Request::Status).await;
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("expected image data"), "{msg}");
}

#[tokio::test]
async fn protocol_violations_are_named() {
    let d = Dev::new("protocol", 1, 30);
    // A request before the hello.
    let mut c = d.raw(tcp());
    c.send(&Request::Status).await;
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("expected hello first"), "{msg}");
    // Another protocol version.
    let mut c = d.raw(tcp());
    c.send(&Request::Hello {
        protocol: 99,
        client: "t".into(),
    })
    .await;
    assert_eq!(code(c.recv().await).0, ErrorCode::UnsupportedProtocol);
    // An oversized frame header, refused before its body.
    let mut c = d.client(tcp()).await;
    c.s.write_all(&u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes())
        .await
        .unwrap();
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::FrameTooLarge, "{msg}");
    assert!(c.closed().await);
    // An empty frame, garbage JSON, an unknown op, image data where a request belongs.
    for bytes in [
        vec![0, 0, 0, 0],
        vec![0, 0, 0, 2, 1, b'{'],
        [&[0, 0, 0, 20, 1][..], br#"{"op":"format-disk"}"#].concat()[..24].to_vec(),
        vec![0, 0, 0, 2, 2, 0],
    ] {
        let mut c = d.client(tcp()).await;
        c.s.write_all(&bytes).await.unwrap();
        let (got, msg) = code(c.recv().await);
        assert_eq!(got, ErrorCode::BadRequest, "{bytes:?}: {msg}");
    }
    // A second hello.
    let mut c = d.client(tcp()).await;
    c.send(&Request::Hello {
        protocol: PROTOCOL_VERSION,
        client: "t".into(),
    })
    .await;
    assert_eq!(code(c.recv().await).0, ErrorCode::BadRequest);
}

#[tokio::test]
async fn control_is_for_local_root_or_an_authorized_key() {
    let d = Dev::new("control", 1, 30);
    for peer in [
        tcp(),
        Peer::Vsock { cid: 2, port: 5 },
        Peer::Unix {
            uid: Some(1000),
            pid: None,
        },
    ] {
        let mut c = d.client(peer).await;
        for req in [Request::MarkGood, Request::Reboot] {
            c.send(&req).await;
            let (got, msg) = code(c.recv().await);
            assert_eq!(got, ErrorCode::NotAuthorized, "{msg}");
        }
    }
    let state = || keel_sys::state::load(&d.root.join("img")).unwrap().unwrap();
    assert!(state().trial.is_some());
    // A boot through dm-verity that initstage marked unconfirmed: mark-good confirms it.
    let marker = d
        .root
        .join("img")
        .join(keel_proto::layout::VERITY_UNCONFIRMED_FILE);
    fs::write(&marker, b"ab\n").unwrap();
    let mut c = d.client(local_root()).await;
    c.send(&Request::MarkGood).await;
    let Response::Done { message } = c.recv().await else {
        panic!("mark-good")
    };
    assert!(message.contains("dm-verity is confirmed"), "{message}");
    assert!(state().trial.is_none());
    assert!(!marker.exists());
    // Marked good again: nothing to confirm.
    c.send(&Request::MarkGood).await;
    let Response::Done { message } = c.recv().await else {
        panic!("mark-good")
    };
    assert!(
        message.contains("not on trial") && !message.contains("verity"),
        "{message}"
    );
    // A corrupt state file: status says so, mark-good refuses, nothing is rewritten.
    let p = keel_sys::state::path(&d.root.join("img"));
    fs::write(&p, b"{garbage").unwrap();
    c.send(&Request::MarkGood).await;
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::InvalidState, "{msg}");
    assert!(msg.contains("corrupt"), "{msg}");
    c.send(&Request::Status).await;
    let Response::Status(s) = c.recv().await else {
        panic!("status")
    };
    assert!(s.state_error.unwrap().contains("corrupt"));
    assert_eq!(fs::read(&p).unwrap(), b"{garbage");
}

#[tokio::test]
async fn one_push_at_a_time_and_a_missing_newimg() {
    let d = Dev::new("busy", 1, 30);
    let img = data(1, 5);
    let guard = d.sh.push.lock().await;
    let mut c = d.client(tcp()).await;
    let (got, msg) = code(c.offer(&signed(&img, 2), false).await);
    assert_eq!(got, ErrorCode::Busy, "{msg}");
    drop(guard);
    fs::remove_dir_all(d.newimg()).unwrap();
    let (got, msg) = code(c.offer(&signed(&img, 2), false).await);
    assert_eq!(got, ErrorCode::Unavailable, "{msg}");
}

#[tokio::test]
async fn a_silent_peer_is_dropped_and_a_cut_upload_resumes() {
    let d = Dev::new("resume", 1, 1);
    let img = data(4, 6);
    let m = signed(&img, 3);
    let mut c = d.client(tcp()).await;
    assert!(matches!(
        c.offer(&m, false).await,
        Response::Send { offset: 0 }
    ));
    let half = img.len() / 2;
    c.data(&img[..half]).await;
    // Silent for the idle timeout: the agent says why and keeps the bytes.
    let (got, msg) = code(c.recv().await);
    assert_eq!(got, ErrorCode::Timeout, "{msg}");
    assert!(c.closed().await);
    assert!(d.partial_exists());
    let mut c = d.client(tcp()).await;
    match c.offer(&m, true).await {
        Response::Send { offset } => assert_eq!(offset, half as u64),
        other => panic!("{other:?}"),
    }
    c.data(&img[half..]).await;
    c.end().await;
    match c.recv().await {
        Response::Staged { resumed_from, .. } => assert_eq!(resumed_from, half as u64),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.slot().0.unwrap(), img);
    // Idle between requests: a timeout error, then the connection closes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(code(c.recv().await).0, ErrorCode::Timeout);
}

#[tokio::test]
async fn planted_fifos_and_symlinks_on_newimg_neither_hang_nor_redirect_writes() {
    use std::os::unix::fs::symlink;
    let d = Dev::new("planted", 1, 30);
    let n = d.newimg();
    let victim = d.root.join("victim");
    fs::write(&victim, b"precious").unwrap();
    // A FIFO where the commit marker goes: reading it would block forever.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        n.join(format!("{IMAGE}.manifest")),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // Symlinks where the temporary manifests go: writing them would write the victim.
    for tmp in ["partial.manifest.tmp", "manifest.tmp"] {
        symlink(&victim, n.join(format!("{IMAGE}.{tmp}"))).unwrap();
    }
    // A symlink to /dev/zero as the partial upload: reading it would never end.
    symlink("/dev/zero", n.join(format!("{IMAGE}.partial.manifest"))).unwrap();
    let mut c = d.client(tcp()).await;
    c.send(&Request::Status).await;
    let Response::Status(s) = c.recv().await else {
        panic!("status")
    };
    assert!(s.staged.is_none() && s.partial.is_none());
    let img = data(1, 2);
    assert!(matches!(
        push_all(&mut c, &img, &signed(&img, 2)).await,
        Response::Staged { .. }
    ));
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(d.slot().0.unwrap(), img);
    let m = n.join(format!("{IMAGE}.manifest"));
    assert!(fs::symlink_metadata(&m).unwrap().file_type().is_file());
    // A symlink to /dev/zero as the commit marker: treated as nothing staged.
    fs::remove_file(&m).unwrap();
    symlink("/dev/zero", &m).unwrap();
    c.send(&Request::Status).await;
    let Response::Status(s) = c.recv().await else {
        panic!("status")
    };
    assert!(s.staged.is_none());
}

#[tokio::test]
async fn a_remote_connection_lives_at_most_max_session_secs_a_local_one_longer() {
    let d = Dev::configured("lifetime", 1, |c| {
        c.idle_timeout_secs = 2;
        c.max_session_secs = 2;
    });
    let mut remote = d.client(tcp()).await;
    let mut local = d.client(local_root()).await;
    // Busy enough never to be idle, yet closed once the session is 2 s old.
    let t0 = std::time::Instant::now();
    let closed_after = loop {
        // The agent may have closed already: its answer is still there to read.
        let _ = remote
            .s
            .write_all(&message_frame(&Request::Status).unwrap())
            .await;
        match remote.recv().await {
            Response::Status(_) => {}
            Response::Error { code, message } => {
                assert_eq!(code, ErrorCode::Timeout, "{message}");
                assert!(message.contains("max_session_secs"), "{message}");
                break t0.elapsed();
            }
            other => panic!("{other:?}"),
        }
        local.send(&Request::Status).await;
        assert!(matches!(local.recv().await, Response::Status(_)));
        assert!(t0.elapsed() < Duration::from_secs(8), "never closed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        closed_after >= Duration::from_millis(1500),
        "{closed_after:?}"
    );
    assert!(remote.closed().await);
    // The local one is still served.
    local.send(&Request::Status).await;
    assert!(matches!(local.recv().await, Response::Status(_)));
}
