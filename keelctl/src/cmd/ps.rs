//! `keelctl ps` and `keelctl kill`: the processes exec started, and signals to them.

use anyhow::{bail, Context as _};
use keel_proto::message::{Request, Response};
use keelctl::client::Client;

use super::out;

/// Signal names keelctl knows (with or without `SIG`), and their numbers on Linux.
const SIGNALS: [(&str, i32); 14] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("WINCH", 28),
];

/// A signal by name or number.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("signal {n} is not a signal number (1-64)");
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .with_context(|| format!("unknown signal {s:?} (a number, or one of HUP INT QUIT KILL USR1 USR2 PIPE ALRM TERM CHLD CONT STOP TSTP WINCH)"))
}

/// Lists the processes.
pub fn run(mut c: Client, json: bool) -> anyhow::Result<()> {
    let Response::Processes { processes } = c.expect(&Request::Ps)? else {
        bail!("unexpected reply to ps");
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&processes)?);
        return Ok(());
    }
    out!(
        "{:>4} {:>7} {:<14} {:<9} COMMAND",
        "ID",
        "PID",
        "STATE",
        "CLIENT"
    );
    for p in processes {
        let state = match p.exit {
            None => "running".to_string(),
            Some(e) => match (e.code, e.signal) {
                (Some(c), _) => format!("exited {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "ended".into(),
            },
        };
        let client = if p.attached {
            "attached"
        } else if p.detached {
            "detached"
        } else {
            "lost"
        };
        out!(
            "{:>4} {:>7} {:<14} {:<9} {}",
            p.id,
            p.pid,
            state,
            client,
            p.argv.join(" ")
        );
    }
    Ok(())
}

/// Sends `signal` to process `id`.
pub fn kill(mut c: Client, id: u64, signal: &str) -> anyhow::Result<()> {
    let signal = parse_signal(signal)?;
    match c.expect(&Request::Kill { id, signal })? {
        Response::Done { message } => out!("{message}"),
        other => bail!("unexpected reply {other:?}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("sigkill").unwrap(), 9);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("BOGUS")
            .unwrap_err()
            .to_string()
            .contains("unknown signal"));
    }
}
