//! A tiny `log` backend. Records go to `/dev/kmsg` with a `keel:` prefix once it is open, so
//! boot steps land in the kernel log with the kernel's timestamps (and on the console when the
//! kernel's loglevel shows them). Warnings and errors are also written to stderr (the
//! console) in any case; with `keel.debug` every record is, and debug records are kept too.
//! Writing each info line to a serial console twice (ours and the kernel's echo) cost boot
//! time under QEMU TCG.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    kmsg: Mutex<Option<File>>,
    verbose: AtomicBool,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= Level::Info || self.verbose.load(Ordering::Relaxed)
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
        let mut to_console = r.level() <= Level::Warn || self.verbose.load(Ordering::Relaxed);
        if let Ok(mut k) = self.kmsg.lock() {
            match k.as_mut() {
                None => to_console = true,
                Some(f) => {
                    // kmsg priority prefix: <3> error, <4> warning, <6> info.
                    let prio = match r.level() {
                        Level::Error => 3,
                        Level::Warn => 4,
                        Level::Info => 6,
                        _ => 7,
                    };
                    let _ = f.write_all(format!("<{prio}>{line}").as_bytes());
                }
            }
        }
        if to_console {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger {
    kmsg: Mutex::new(None),
    verbose: AtomicBool::new(false),
};

/// Installs the logger (stderr only until [`open_kmsg`]).
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

const DEVKMSG: &str = "/proc/sys/kernel/printk_devkmsg";

/// Lifts the kernel's rate limit on `/dev/kmsg` writers (10 lines per 5 s by default, which a
/// boot's step lines exceed) and returns the setting to restore before exec'ing the real
/// init. `None` when it cannot be changed (e.g. `printk.devkmsg=` on the command line).
pub fn unlimit() -> Option<String> {
    let old = std::fs::read_to_string(DEVKMSG).ok()?;
    let old = old.trim().to_string();
    if old == "on" {
        return None;
    }
    std::fs::write(DEVKMSG, "on\n").ok()?;
    Some(old)
}

/// Puts back what [`unlimit`] changed.
pub fn restore_limit(old: Option<String>) {
    if let Some(v) = old {
        let _ = std::fs::write(DEVKMSG, format!("{v}\n"));
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

/// `keel.debug`: every record on the console too, debug records included.
pub fn set_verbose(on: bool) {
    LOGGER.verbose.store(on, Ordering::Relaxed);
    log::set_max_level(if on {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    });
}

/// A duration shown as milliseconds with one decimal (`12.3`), in integer arithmetic:
/// initstage then links no float formatting (7.6 KB of its size budget).
#[derive(Debug, Clone, Copy)]
pub struct Ms(pub std::time::Duration);

impl std::fmt::Display for Ms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = self.0.as_micros();
        write!(f, "{}.{}", us / 1000, us % 1000 / 100)
    }
}

/// A duration shown as seconds with three decimals (`1.234`), in integer arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct Secs(pub std::time::Duration);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0.as_secs(), self.0.subsec_millis())
    }
}

/// Runs one boot step and logs its outcome with its duration: one line a step.
pub fn step<T, E: std::fmt::Display>(name: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let t = Instant::now();
    let r = f();
    let ms = Ms(t.elapsed());
    match &r {
        Ok(_) => log::info!("{name}: ok ({ms} ms)"),
        Err(e) => log::error!("{name}: {e} ({ms} ms)"),
    }
    r
}
