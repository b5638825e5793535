//! `cp` in memory: files into and out of the "guest" (temporary directories) through
//! `session::serve`, with every refusal and a cut transfer leaving nothing half-written.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use keel_agent::config::ExecConfig;
use keel_proto::message::{split_body, Body};

fn files_dev(tag: &str, max: u64) -> Dev {
    Dev::configured(tag, 1, |c| {
        c.exec = Some(ExecConfig {
            enabled: true,
            max_file_bytes: max,
            ..ExecConfig::default()
        })
    })
}

fn bytes(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 7 + i / 4093) & 0xff).to_le_bytes()[0])
        .collect()
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("keel-tmp"))
        .collect()
}

async fn copy_in(c: &mut Client, path: &str, mode: u32, data: &[u8]) -> Response {
    c.send(&Request::CopyIn {
        path: path.into(),
        mode,
        size: data.len() as u64,
    })
    .await;
    match c.recv().await {
        Response::Send { offset: 0 } => {}
        other => return other,
    }
    c.data(data).await;
    c.end().await;
    c.recv().await
}

/// Reads a copy out to its end: the bytes, or the refusal.
async fn copy_out(c: &mut Client, path: &str) -> Result<(Vec<u8>, u32), (ErrorCode, String)> {
    c.send(&Request::CopyOut { path: path.into() }).await;
    let mode = match c.recv().await {
        Response::Sending { mode, .. } => mode,
        Response::Error { code, message } => return Err((code, message)),
        other => panic!("{other:?}"),
    };
    let mut out = Vec::new();
    loop {
        let body = c.frame().await;
        match split_body(&body).unwrap() {
            Body::Data([]) => break,
            Body::Data(d) => out.extend_from_slice(d),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(c.recv().await, Response::Done { .. }));
    Ok((out, mode))
}

fn err(r: Response) -> (ErrorCode, String) {
    match r {
        Response::Error { code, message } => (code, message),
        other => panic!("an error expected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_file_goes_in_and_out_whole_with_its_mode() {
    let d = files_dev("cp-round", 64 << 20);
    let dir = d.root.join("srv");
    std::fs::create_dir_all(&dir).unwrap();
    let data = bytes(3 << 20);
    let mut c = d.client(local_root()).await;
    let p = format!("{}/app.bin", dir.display());
    let r = copy_in(&mut c, &p, 0o751, &data).await;
    assert!(matches!(r, Response::Done { .. }), "{r:?}");
    assert!(std::fs::read(&p).unwrap() == data);
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o751);
    assert!(leftovers(&dir).is_empty());
    let (back, m) = copy_out(&mut c, &p).await.unwrap();
    assert!(back == data);
    assert_eq!(m, 0o751);
    // An existing file is replaced whole; an empty file is a file.
    assert!(matches!(
        copy_in(&mut c, &p, 0o600, b"").await,
        Response::Done { .. }
    ));
    assert_eq!(std::fs::read(&p).unwrap(), b"");
}

#[tokio::test]
async fn bad_targets_are_refused_before_a_byte() {
    let d = files_dev("cp-refusals", 1 << 20);
    let dir = d.root.join("srv");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();
    let mut c = d.client(local_root()).await;
    let at = |n: &str| format!("{}/{n}", dir.display());
    let cases: Vec<(String, usize, ErrorCode, &str)> = vec![
        (at("nodir/x"), 1, ErrorCode::NotFound, "no such directory"),
        (at("sub"), 1, ErrorCode::BadRequest, "a directory"),
        (at("link"), 1, ErrorCode::BadRequest, "a symlink"),
        (at("big"), 2 << 20, ErrorCode::NoSpace, "max_file_bytes"),
        ("relative/x".into(), 1, ErrorCode::BadRequest, "absolute"),
    ];
    for (path, size, code, what) in cases {
        let (got, msg) = err(copy_in(&mut c, &path, 0o644, &vec![0u8; size]).await);
        assert_eq!(got, code, "{path}: {msg}");
        assert!(msg.contains(what), "{path}: {msg}");
    }
    assert_eq!(
        std::fs::read_link(dir.join("link")).unwrap().to_str(),
        Some("/etc/passwd")
    );
    assert!(!dir.join("big").exists() && leftovers(&dir).is_empty());
    // Out: missing, a symlink, a FIFO (no hang), over the limit.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    std::fs::write(dir.join("large"), vec![0u8; 2 << 20]).unwrap();
    for (n, code) in [
        ("missing", ErrorCode::NotFound),
        ("link", ErrorCode::BadRequest),
        ("fifo", ErrorCode::BadRequest),
        ("large", ErrorCode::NoSpace),
    ] {
        let (got, msg) = copy_out(&mut c, &at(n)).await.unwrap_err();
        assert_eq!(got, code, "{n}: {msg}");
    }
}

#[tokio::test]
async fn a_cut_or_short_transfer_leaves_the_old_file_and_no_temp() {
    let d = files_dev("cp-cut", 64 << 20);
    let dir = d.root.join("srv");
    std::fs::create_dir_all(&dir).unwrap();
    let p = format!("{}/conf", dir.display());
    std::fs::write(&p, b"old contents").unwrap();
    // Fewer bytes than announced, then the end frame.
    let mut c = d.client(local_root()).await;
    c.send(&Request::CopyIn {
        path: p.clone(),
        mode: 0o644,
        size: 1000,
    })
    .await;
    assert!(matches!(c.recv().await, Response::Send { .. }));
    c.data(&[1u8; 10]).await;
    c.end().await;
    let (code, _) = err(c.recv().await);
    assert_eq!(code, ErrorCode::SizeMismatch);
    // The client vanishes halfway.
    let mut c = d.client(local_root()).await;
    c.send(&Request::CopyIn {
        path: p.clone(),
        mode: 0o644,
        size: 4 << 20,
    })
    .await;
    assert!(matches!(c.recv().await, Response::Send { .. }));
    c.data(&bytes(1 << 20)).await;
    drop(c);
    let t = std::time::Instant::now();
    while !leftovers(&dir).is_empty() {
        assert!(
            t.elapsed().as_secs() < 10,
            "temp file left: {:?}",
            leftovers(&dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(&p).unwrap(), b"old contents");
}

#[tokio::test]
async fn cp_needs_a_principal() {
    let d = files_dev("cp-authz", 1 << 20);
    let mut c = d.client(Peer::Vsock { cid: 2, port: 5 }).await;
    let (code, msg) = err(copy_in(&mut c, "/tmp/x", 0o644, b"x").await);
    assert_eq!(code, ErrorCode::NotAuthorized, "{msg}");
    c.send(&Request::CopyOut {
        path: "/etc/passwd".into(),
    })
    .await;
    assert_eq!(err(c.recv().await).0, ErrorCode::NotAuthorized);
}
