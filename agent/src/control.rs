//! Control requests: end the booted image's trial (mark-good) and reboot.

use std::fs;
use std::path::Path;

use keel_proto::bootstate::{BootState, MarkGood};
use keel_proto::layout::{STATE_FILE, STATE_TMP};
use keel_proto::message::ErrorCode;

use crate::verify::Refusal;

fn io(op: &str, p: &Path, e: std::io::Error) -> Refusal {
    Refusal::new(ErrorCode::Io, format!("{op} {}: {e}", p.display()))
}

/// Writes the state crash-safely: temporary file, fsync, rename, fsync the directory.
pub fn save_state(img: &Path, state: &BootState) -> Result<(), Refusal> {
    crate::stage::atomic_write(img, STATE_TMP, STATE_FILE, &state.to_json())
}

/// Ends the trial recorded in `<img>/keel-state.json`; returns what happened.
pub fn mark_good(img: &Path) -> Result<String, Refusal> {
    let path = img.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::new(
                ErrorCode::InvalidState,
                format!(
                    "no boot state at {}: was this system booted by initstage?",
                    path.display()
                ),
            ))
        }
        Err(e) => return Err(io("read", &path, e)),
    };
    let mut state = BootState::from_json(&bytes)
        .map_err(|e| Refusal::new(ErrorCode::InvalidState, format!("{}: {e}", path.display())))?;
    let version = state.current.as_ref().map(|c| c.version).unwrap_or(0);
    match state.mark_good() {
        Ok(MarkGood::Ended) => {
            save_state(img, &state)?;
            Ok(format!("version {version} marked good: its trial is over"))
        }
        Ok(MarkGood::NotOnTrial) => Ok(format!("version {version} is not on trial: nothing to do")),
        Err(e) => Err(Refusal::new(ErrorCode::InvalidState, e.to_string())),
    }
}

/// Flushes filesystems and reboots: `command` through `/bin/sh -c` when configured; under
/// systemd (`$INVOCATION_ID` set) `systemctl reboot` for an orderly shutdown; else
/// sync(2) + reboot(2).
pub fn reboot(command: Option<&str>) -> Result<(), Refusal> {
    rustix::fs::sync();
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
    let command = command.or(under_systemd.then_some("systemctl reboot"));
    match command {
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
