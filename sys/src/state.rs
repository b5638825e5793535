//! `keel-state.json` on the `img` partition: the one loader and the one writer.
//!
//! The rule for every reader: a missing file is `Ok(None)` (a fresh device); a file that is
//! not a regular file, is over [`MAX_STATE`] bytes or does not parse is
//! [`StateError::Corrupt`], naming the file and what is wrong. initstage then starts from a
//! fresh state and records why; the agent reports the error in `status` and refuses
//! `mark-good`.

use std::path::{Path, PathBuf};

use keel_proto::bootstate::BootState;
use keel_proto::layout::{STATE_FILE, STATE_TMP};

use crate::durable::{self, Hook, IoError};

/// The largest state file read (a real one is a few KiB: events are capped).
pub const MAX_STATE: u64 = 1 << 20;

/// Why the state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading failed (I/O error, special file, oversized).
    #[error("boot state unreadable: {0}")]
    Unreadable(#[source] IoError),
    /// The bytes are not a boot state.
    #[error("boot state {path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
}

/// The state file's path under the mounted `img` directory.
pub fn path(img: &Path) -> PathBuf {
    img.join(STATE_FILE)
}

/// Reads the state from `img`; see the module doc for the rule.
pub fn load(img: &Path) -> Result<Option<BootState>, StateError> {
    let p = path(img);
    let Some(bytes) = durable::read_regular(&p, MAX_STATE).map_err(StateError::Unreadable)? else {
        return Ok(None);
    };
    BootState::from_json(&bytes)
        .map(Some)
        .map_err(|e| StateError::Corrupt {
            path: p,
            detail: e.to_string(),
        })
}

/// Writes the state to `img` crash-safely ([`durable::write_atomic`]).
pub fn save(img: &Path, state: &BootState, hook: Hook) -> Result<(), IoError> {
    durable::write_atomic(img, STATE_TMP, STATE_FILE, &state.to_json(), hook)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::no_hook;

    #[test]
    fn missing_is_fresh_corrupt_is_named() {
        let d = std::env::temp_dir().join(format!("keel-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert!(load(&d).unwrap().is_none());
        let s = BootState::default();
        save(&d, &s, no_hook).unwrap();
        assert_eq!(load(&d).unwrap().unwrap(), s);
        std::fs::write(path(&d), b"{not json").unwrap();
        let e = load(&d).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("keel-state.json"), "{e}");
        std::fs::write(path(&d), b"").unwrap();
        assert!(matches!(load(&d), Err(StateError::Corrupt { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
