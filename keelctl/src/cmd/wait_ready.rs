//! `keelctl wait-ready LISTEN`: wait for an agent's ready announce and print it.

use std::fs;
use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use keel_proto::message::{parse_response, Announce};
use keelctl::client;

use super::out;

/// Polls a non-blocking `accept` until a peer comes or `within` passes.
fn accept_within<S>(
    listen: &str,
    within: Duration,
    mut accept: impl FnMut() -> std::io::Result<S>,
) -> anyhow::Result<S> {
    let deadline = Instant::now() + within;
    loop {
        match accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).with_context(|| format!("accept on {listen}")),
        }
        if Instant::now() > deadline {
            bail!(
                "no ready announce on {listen} within {} s",
                within.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Listens on `listen` (tcp:// or unix://) for one announce, for at most `within`.
pub fn run(listen: &str, within: Duration) -> anyhow::Result<()> {
    let read_timeout = Some(Duration::from_secs(10));
    let mut stream: Box<dyn Read> = if let Some(a) = listen.strip_prefix("tcp://") {
        let l = std::net::TcpListener::bind(a).with_context(|| format!("listen on {listen}"))?;
        l.set_nonblocking(true)?;
        let s = accept_within(listen, within, || l.accept().map(|(s, _)| s))?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(read_timeout)?;
        Box::new(s)
    } else if let Some(p) = listen.strip_prefix("unix://") {
        let _ = fs::remove_file(p);
        let l = std::os::unix::net::UnixListener::bind(p)
            .with_context(|| format!("listen on {listen}"))?;
        l.set_nonblocking(true)?;
        let s = accept_within(listen, within, || l.accept().map(|(s, _)| s))?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(read_timeout)?;
        Box::new(s)
    } else {
        bail!("wait-ready listens on tcp://HOST:PORT or unix:///PATH, not {listen:?}");
    };
    let body = client::read_frame(&mut stream, listen)?;
    // The announce is a message frame like a response.
    let json = body.get(1..).unwrap_or_default();
    let ann: Announce = serde_json::from_slice(json).with_context(|| {
        format!(
            "announce is not a ready message: {:?}",
            parse_response(&body).err()
        )
    })?;
    out!("{}", serde_json::to_string(&ann)?);
    Ok(())
}
