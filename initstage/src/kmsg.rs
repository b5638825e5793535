//! A tiny `log` backend: every record goes to stderr (the console) and, when it can be
//! opened, to `/dev/kmsg` with a `keel:` prefix, so boot steps land in the kernel log.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    kmsg: Mutex<Option<File>>,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= Level::Info
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            _ => "",
        };
        let line = format!("keel: {level}{}\n", r.args());
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Ok(mut k) = self.kmsg.lock() {
            if let Some(f) = k.as_mut() {
                // kmsg priority prefix: <3> error, <4> warning, <6> info.
                let prio = match r.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    _ => 6,
                };
                let _ = f.write_all(format!("<{prio}>{line}").as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger {
    kmsg: Mutex::new(None),
};

/// Installs the logger (stderr only until [`open_kmsg`]).
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

/// Starts copying log lines to `/dev/kmsg` (PID 1 mode, once devtmpfs is mounted).
pub fn open_kmsg() {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        if let Ok(mut k) = LOGGER.kmsg.lock() {
            *k = Some(f);
        }
    }
}

/// Runs one boot step and logs its outcome with its duration: one line a step.
pub fn step<T, E: std::fmt::Display>(name: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let t = Instant::now();
    let r = f();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match &r {
        Ok(_) => log::info!("{name}: ok ({ms:.1} ms)"),
        Err(e) => log::error!("{name}: {e} ({ms:.1} ms)"),
    }
    r
}
