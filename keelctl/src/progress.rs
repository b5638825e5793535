//! Transfer progress (push, cp): a bar with rate and ETA on a terminal, a line per 10 %
//! otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The state of one push's display.
pub struct Progress {
    tty: bool,
    start: Instant,
    first: Option<u64>,
    last_draw: Option<Instant>,
    last_decile: u64,
    label: String,
    verb: &'static str,
    drew: bool,
}

impl Progress {
    /// A progress display for pushing `version`.
    pub fn new(version: u64) -> Progress {
        Progress::labelled(format!("v{version}"), "pushed")
    }

    /// A progress display for `label`; the lines off a terminal say `verb` (`copied`).
    pub fn labelled(label: String, verb: &'static str) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            first: None,
            last_draw: None,
            last_decile: 0,
            label,
            verb,
            drew: false,
        }
    }

    /// `done` of `total` bytes are out.
    pub fn update(&mut self, done: u64, total: u64) {
        let first = *self.first.get_or_insert(done);
        if done < first {
            self.first = Some(done);
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = (done.saturating_sub(self.first.unwrap_or(0))) as f64 / secs;
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mib = |b: f64| b / (1 << 20) as f64;
        if self.tty {
            let now = Instant::now();
            if done < total
                && self
                    .last_draw
                    .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
            {
                return;
            }
            self.last_draw = Some(now);
            let eta = if rate > 0.0 {
                format!("{:.0}s", (total - done) as f64 / rate)
            } else {
                "?".into()
            };
            let filled = (pct / 4) as usize;
            eprint!(
                "\r{} [{}{}] {:3}% {:7.1} MiB/s ETA {:>5}",
                self.label,
                "#".repeat(filled),
                "-".repeat(25 - filled.min(25)),
                pct,
                mib(rate),
                eta
            );
            self.drew = true;
        } else {
            let decile = pct / 10;
            if decile > self.last_decile || done == total && !self.drew {
                self.last_decile = decile;
                self.drew = true;
                eprintln!(
                    "{} {pct}% ({done} of {total} bytes, {:.1} MiB/s)",
                    self.verb,
                    mib(rate)
                );
            }
        }
    }

    /// Ends the bar's line.
    pub fn end(&self) {
        if self.tty && self.drew {
            eprintln!();
        }
    }
}
