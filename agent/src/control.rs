//! Control requests: end the booted image's trial (mark-good) and reboot.

use std::path::Path;

use keel_proto::bootstate::MarkGood;
use keel_proto::message::ErrorCode;
use keel_sys::durable::{self, no_hook};
use keel_sys::state;

use crate::verify::Refusal;

/// Ends the trial recorded in `<img>/keel-state.json`, confirms a boot through dm-verity
/// (removes initstage's marker, so the next boot does not check every block), and stops the
/// watchdog initstage armed for the trial (`watchdog`: its device); returns what happened.
pub fn mark_good(img: &Path, watchdog: Option<&Path>) -> Result<String, Refusal> {
    let mut state = match state::load(img) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(Refusal::new(
                ErrorCode::InvalidState,
                format!(
                    "no boot state at {}: was this system booted by initstage?",
                    state::path(img).display()
                ),
            ))
        }
        Err(e) => return Err(Refusal::new(ErrorCode::InvalidState, e.to_string())),
    };
    let version = state.current.as_ref().map(|c| c.version).unwrap_or(0);
    let said = match state.mark_good() {
        Ok(MarkGood::Ended) => {
            state::save(img, &state, no_hook)
                .map_err(|e| Refusal::new(ErrorCode::Io, e.to_string()))?;
            format!("version {version} marked good: its trial is over")
        }
        Ok(MarkGood::NotOnTrial) => format!("version {version} is not on trial: nothing to do"),
        Err(e) => return Err(Refusal::new(ErrorCode::InvalidState, e.to_string())),
    };
    let said = match watchdog {
        None => said,
        Some(dev) => match keel_sys::watchdog::disarm(dev) {
            Ok(()) => format!("{said}; {} disarmed", dev.display()),
            Err(e) => {
                tracing::error!("disarm {}: {e}: it will reset the machine", dev.display());
                format!(
                    "{said}; {} could not be disarmed ({e}): it will reset the machine",
                    dev.display()
                )
            }
        },
    };
    let io = |e: durable::IoError| Refusal::new(ErrorCode::Io, e.to_string());
    let marker = img.join(keel_proto::layout::VERITY_UNCONFIRMED_FILE);
    if durable::remove(&marker, no_hook).map_err(io)? {
        durable::fsync_dir(img, no_hook).map_err(io)?;
        return Ok(format!("{said}; its boot through dm-verity is confirmed"));
    }
    Ok(said)
}

/// The init system the agent runs under, as far as its reboot is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitSystem {
    /// systemd started the agent (`$INVOCATION_ID` set).
    Systemd,
    /// OpenRC is running (`/run/openrc` exists): Alpine's or Debian's.
    OpenRc,
    /// Anything else (a script as `/sbin/init`, the agent as PID 1's child).
    Other,
}

impl InitSystem {
    /// Looks at this process's environment and `/run`.
    pub fn detect() -> InitSystem {
        if std::env::var_os("INVOCATION_ID").is_some() {
            InitSystem::Systemd
        } else if std::path::Path::new("/run/openrc").is_dir() {
            InitSystem::OpenRc
        } else {
            InitSystem::Other
        }
    }
}

/// The command a reboot runs: the configured one; else the init system's own, for an
/// orderly shutdown (`systemctl reboot`; `reboot`, which OpenRC's init — sysvinit, busybox
/// or openrc-init — turns into its shutdown runlevel); `None`: sync(2) + reboot(2).
pub fn reboot_command(configured: Option<&str>, init: InitSystem) -> Option<&str> {
    configured.or(match init {
        InitSystem::Systemd => Some("systemctl reboot"),
        InitSystem::OpenRc => Some("reboot"),
        InitSystem::Other => None,
    })
}

/// Flushes filesystems and reboots by [`reboot_command`].
pub fn reboot(command: Option<&str>) -> Result<(), Refusal> {
    rustix::fs::sync();
    match reboot_command(command, InitSystem::detect()) {
        Some(cmd) => {
            let st = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .map_err(|e| Refusal::new(ErrorCode::Io, format!("run {cmd:?}: {e}")))?;
            if st.success() {
                Ok(())
            } else {
                Err(Refusal::new(ErrorCode::Io, format!("{cmd:?} failed: {st}")))
            }
        }
        None => rustix::system::reboot(rustix::system::RebootCommand::Restart)
            .map_err(|e| Refusal::new(ErrorCode::Io, format!("reboot(2): {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reboot_goes_through_the_init_system_unless_configured() {
        use InitSystem::*;
        assert_eq!(reboot_command(None, Systemd), Some("systemctl reboot"));
        assert_eq!(reboot_command(None, OpenRc), Some("reboot"));
        assert_eq!(reboot_command(None, Other), None);
        for init in [Systemd, OpenRc, Other] {
            assert_eq!(reboot_command(Some("true"), init), Some("true"));
        }
    }
}
