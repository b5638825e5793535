//! `keelctl status [--json]`: what the device runs, holds and did.

use anyhow::bail;
use keel_proto::message::{Request, Response, StatusReport};
use keelctl::client::Client;

use super::out;

/// Asks for the status and prints it (as JSON with `json`).
pub fn run(mut c: Client, json: bool) -> anyhow::Result<()> {
    match c.expect(&Request::Status)? {
        Response::Status(s) => {
            if json {
                out!("{}", serde_json::to_string_pretty(&s)?);
                Ok(())
            } else {
                print(&s)
            }
        }
        other => bail!("unexpected reply {other:?}"),
    }
}

fn print(s: &StatusReport) -> anyhow::Result<()> {
    let rec = |r: &keel_proto::bootstate::ImageRecord| {
        format!(
            "{} version {} ({} bytes, sha256 {})",
            r.name,
            r.version,
            r.size,
            r.sha256.get(..12).unwrap_or("?")
        )
    };
    out!("agent        {}", s.agent_version);
    if let Some(id) = &s.identity {
        out!("agent key    {id}");
    }
    out!("image file   {}", s.image_file);
    out!(
        "booted       {}",
        s.booted
            .as_ref()
            .map(rec)
            .unwrap_or_else(|| "unknown (no boot report)".into())
    );
    match (&s.trial, s.tries_left) {
        (Some(t), left) => out!(
            "trial        on trial: boot {} of {}{}",
            t.used,
            t.tries,
            left.map(|l| format!(", {l} left")).unwrap_or_default()
        ),
        (None, _) => out!("trial        not on trial"),
    }
    out!(
        "staged       {}",
        s.staged.as_ref().map(rec).unwrap_or_else(|| "none".into())
    );
    if let Some(p) = &s.partial {
        out!(
            "partial      version {}: {} of {} bytes (push again to resume)",
            p.version,
            p.received,
            p.size
        );
    }
    out!(
        "old          {}",
        s.old.as_ref().map(rec).unwrap_or_else(|| "none".into())
    );
    if let Some(f) = s.newimg_free {
        out!("newimg free  {:.1} MiB", f as f64 / (1 << 20) as f64);
    }
    if s.push_in_progress {
        out!("push         in progress");
    }
    if let Some(t) = &s.last_transfer {
        out!(
            "last staged  version {} by {}{}: {} bytes received, {} reused{}",
            t.version,
            t.how,
            if t.delta { " (delta)" } else { "" },
            t.received,
            t.reused,
            if t.index > 0 {
                format!(", {}-byte chunk index", t.index)
            } else {
                String::new()
            }
        );
    }
    if let Some(p) = &s.pull {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ago = |t: u64| format!("{} s ago", now.saturating_sub(t));
        let within = |t: u64| format!("in {} s", t.saturating_sub(now));
        out!("pull         {}", p.url);
        out!(
            "last poll    {}: {}",
            p.last_poll.map(ago).unwrap_or_else(|| "none yet".into()),
            p.last_result.as_deref().unwrap_or("-")
        );
        if let Some(e) = &p.last_error {
            out!("pull error   {e} ({} failed in a row)", p.failures);
        }
        if let Some(t) = p.next_poll {
            out!("next poll    {} (keelctl pull-now: at once)", within(t));
        }
    }
    if let Some(v) = &s.verity {
        out!(
            "verity       root {} on {} ({}), kernel: {}",
            v.setup.root_hash,
            v.setup.device,
            v.setup.on_corruption,
            match (&v.kernel_status, &v.error) {
                (Some(st), _) if st == "V" => "verified so far".to_string(),
                (Some(st), _) if st == "C" => "CORRUPTION SEEN".to_string(),
                (Some(st), _) => st.clone(),
                (None, Some(e)) => e.clone(),
                (None, None) => "-".into(),
            }
        );
    }
    for a in &s.boot_actions {
        out!("this boot    {a}");
    }
    if let Some(e) = &s.state_error {
        out!("boot state   {e}");
    }
    if let Some(e) = s.events.last() {
        out!("last event   boot {}: {:?}: {}", e.boot, e.kind, e.detail);
    }
    Ok(())
}
