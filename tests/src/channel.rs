//! Pull channels for the tests: images signed and published with the real `keelctl`, the
//! agent's `[pull]` table, and what nginx was asked.

use std::fs;
use std::path::Path;

use crate::agent::keelctl;
use crate::nginx::Nginx;
use crate::{test_key, Sandbox};

/// Signs `image` as `demo` `version` with the test key (`keelctl sign`).
pub fn sign(sb: &mut Sandbox, image: &Path, version: &str) {
    let k = sb.fresh("signing.pem");
    fs::write(&k, keel_proto::manifest::signing_key_to_pem(&test_key())).unwrap();
    let out = keelctl(&[
        "sign",
        image.to_str().unwrap(),
        "--key",
        k.to_str().unwrap(),
        "--name",
        "demo",
        "--version",
        version,
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// `keelctl publish IMAGE --channel DIR`; its stdout.
pub fn publish(image: &Path, channel: &Path) -> String {
    let out = keelctl(&[
        "publish",
        image.to_str().unwrap(),
        "--channel",
        channel.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Requests for `path` so far, and their statuses.
pub fn asked(n: &Nginx, path: &str) -> Vec<u16> {
    n.requests()
        .into_iter()
        .filter(|(p, _, _)| p == path)
        .map(|(_, s, _)| s)
        .collect()
}

/// A `[pull]` table polling `url` every second (no jitter, 5 s timeout), trusting `ca`.
pub fn pull_config(url: &str, ca: Option<&Path>) -> String {
    format!(
        "[pull]\nurl = {url:?}\ninterval_secs = 1\njitter_secs = 0\ntimeout_secs = 5\n{}",
        ca.map(|c| format!("ca_file = {c:?}\n")).unwrap_or_default()
    )
}

/// Forwards connections on 127.0.0.1 to `to`; the first request for an image gets only
/// `cut` bytes of its response, then both sides are closed.
pub fn cutting_relay(to: u16, cut: usize) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cut_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    std::thread::spawn(move || {
        for down in l.incoming().flatten() {
            let cut_once = cut_once.clone();
            std::thread::spawn(move || {
                let up = std::net::TcpStream::connect(("127.0.0.1", to)).unwrap();
                let (mut d_rd, mut u_wr) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match d_rd.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                u_wr.write_all(&head).unwrap();
                let image = String::from_utf8_lossy(&head).contains("/images/");
                let limit = if image && cut_once.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    cut
                } else {
                    usize::MAX
                };
                let (mut u_rd, mut d_wr) = (up, down);
                let mut sent = 0usize;
                let mut buf = vec![0u8; 64 << 10];
                while sent < limit {
                    let n = match u_rd.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(limit - sent),
                    };
                    if d_wr.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = d_wr.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}
