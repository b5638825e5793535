//! `keelctl mark-good`, `keelctl reboot`, `keelctl unstage`: control requests.

use anyhow::bail;
use keel_proto::message::{Request, Response};
use keelctl::client::Client;

use super::out;

/// Sends `req` (mark-good, reboot or unstage) and prints the agent's answer.
pub fn run(mut c: Client, req: &Request) -> anyhow::Result<()> {
    match c.expect(req)? {
        Response::Done { message } => {
            out!("{message}");
            Ok(())
        }
        other => bail!("unexpected reply {other:?}"),
    }
}
