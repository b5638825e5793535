//! The boot state kept on the `img` partition (`keel-state.json`).
//!
//! It is the single source of truth for which image is current, which is the previous one,
//! whether the current one is on trial, and what happened lately. Methods here change it in
//! memory only; callers persist it with one atomic write (temp file, fsync, rename, fsync dir).

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// The state format this code writes.
pub const STATE_FORMAT: u32 = 1;
/// How many events the state keeps.
pub const MAX_EVENTS: usize = 16;
/// How many rejected digests the state keeps.
pub const MAX_REJECTED: usize = 8;

/// Why the state could not be read or changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The bytes are not a valid state.
    #[error("boot state is not valid JSON: {0}")]
    Json(String),
    /// The format is newer than this build.
    #[error("boot state format {0} is not supported (this build reads format {STATE_FORMAT})")]
    Format(u32),
    /// mark-good while a promotion or rollback is half done.
    #[error("a {0} is in progress; boot once more before marking good")]
    Busy(&'static str),
}

/// One image known to the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Product name from the manifest (`unknown` for a factory image without one).
    pub name: String,
    /// Version from the manifest (0 when unknown).
    pub version: u64,
    /// SHA-256, hex (empty when unknown).
    pub sha256: String,
    /// Size in bytes (0 when unknown).
    pub size: u64,
}

impl ImageRecord {
    /// The record of an image described by `m`.
    pub fn from_manifest(m: &Manifest) -> Self {
        ImageRecord {
            name: m.name.clone(),
            version: m.version,
            sha256: m.sha256.to_ascii_lowercase(),
            size: m.size,
        }
    }

    /// The record of an image nothing is known about.
    pub fn unknown() -> Self {
        ImageRecord {
            name: "unknown".into(),
            version: 0,
            sha256: String::new(),
            size: 0,
        }
    }
}

/// A trial: the current image must be marked good within `tries` boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// Boots the image gets.
    pub tries: u32,
    /// Boots it has used, this one included.
    pub used: u32,
}

impl Trial {
    /// Boots left after this one.
    pub fn left(&self) -> u32 {
        self.tries.saturating_sub(self.used)
    }
}

/// A transition that was started and must be finished by the next boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pending {
    /// `new` is fully copied and verified as `<image>.new`; the renames may be half done.
    Promote {
        /// The image being promoted.
        new: ImageRecord,
    },
    /// The current image is being replaced by `-old`.
    Rollback {
        /// Why.
        reason: String,
    },
}

/// What happened, for status and for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// First boot with no state: the current image was adopted.
    Adopted,
    /// A staged image became current (on trial).
    Promoted,
    /// A staged image was refused (hash mismatch, bad manifest, known bad).
    StagedRejected,
    /// The previous image was restored.
    RolledBack,
    /// The trial ended well.
    MarkedGood,
    /// A trial ran out but there was no previous image to go back to.
    TrialExpiredNoFallback,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The boot counter when it happened.
    pub boot: u64,
    /// What happened.
    pub kind: EventKind,
    /// Details for people: versions, reasons.
    pub detail: String,
}

/// The persistent boot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// Boots counted by initstage: those that changed the state (the first boot,
    /// promotions, trial boots, rollbacks, refusals). A boot that changes nothing does not
    /// write the state, so it is not counted.
    pub boot_count: u64,
    /// The image in `<image>`.
    pub current: Option<ImageRecord>,
    /// The image in `<image-old>`.
    pub old: Option<ImageRecord>,
    /// Set while the current image is on trial.
    pub trial: Option<Trial>,
    /// A transition in progress.
    pub pending: Option<Pending>,
    /// Digests of images that failed; never promoted again.
    pub rejected: Vec<String>,
    /// The latest events, oldest first.
    pub events: Vec<Event>,
}

impl Default for BootState {
    fn default() -> Self {
        BootState {
            format: STATE_FORMAT,
            boot_count: 0,
            current: None,
            old: None,
            trial: None,
            pending: None,
            rejected: Vec::new(),
            events: Vec::new(),
        }
    }
}

/// What [`BootState::mark_good`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkGood {
    /// A trial ended.
    Ended,
    /// There was no trial: nothing changed.
    NotOnTrial,
}

impl BootState {
    /// Parses the state file.
    pub fn from_json(bytes: &[u8]) -> Result<Self, StateError> {
        let s: BootState =
            serde_json::from_slice(bytes).map_err(|e| StateError::Json(e.to_string()))?;
        if s.format > STATE_FORMAT {
            return Err(StateError::Format(s.format));
        }
        Ok(s)
    }

    /// The state file's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("state serializes");
        v.push(b'\n');
        v
    }

    /// Appends an event, keeping the last [`MAX_EVENTS`].
    pub fn push_event(&mut self, kind: EventKind, detail: impl Into<String>) {
        self.events.push(Event {
            boot: self.boot_count,
            kind,
            detail: detail.into(),
        });
        let extra = self.events.len().saturating_sub(MAX_EVENTS);
        self.events.drain(..extra);
    }

    /// Remembers a digest that must never be promoted again.
    pub fn reject(&mut self, sha256: &str) {
        if sha256.is_empty() || self.is_rejected(sha256) {
            return;
        }
        self.rejected.push(sha256.to_ascii_lowercase());
        let extra = self.rejected.len().saturating_sub(MAX_REJECTED);
        self.rejected.drain(..extra);
    }

    /// Whether `sha256` failed before.
    pub fn is_rejected(&self, sha256: &str) -> bool {
        self.rejected.iter().any(|r| r.eq_ignore_ascii_case(sha256))
    }

    /// Ends the current trial: the image is good. In memory only; persist afterwards.
    pub fn mark_good(&mut self) -> Result<MarkGood, StateError> {
        match &self.pending {
            Some(Pending::Promote { .. }) => return Err(StateError::Busy("promotion")),
            Some(Pending::Rollback { .. }) => return Err(StateError::Busy("rollback")),
            None => {}
        }
        match self.trial.take() {
            Some(t) => {
                let v = self.current.as_ref().map(|c| c.version).unwrap_or(0);
                self.push_event(
                    EventKind::MarkedGood,
                    format!(
                        "version {v} marked good after {} of {} boots",
                        t.used, t.tries
                    ),
                );
                Ok(MarkGood::Ended)
            }
            None => Ok(MarkGood::NotOnTrial),
        }
    }

    /// The last event, if any.
    pub fn last_event(&self) -> Option<&Event> {
        self.events.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: u64) -> ImageRecord {
        ImageRecord {
            name: "demo".into(),
            version: v,
            sha256: format!("{v:064x}"),
            size: 10,
        }
    }

    #[test]
    fn mark_good_ends_trial_once() {
        let mut s = BootState {
            current: Some(rec(2)),
            trial: Some(Trial { tries: 3, used: 1 }),
            ..Default::default()
        };
        assert_eq!(s.mark_good(), Ok(MarkGood::Ended));
        assert_eq!(s.trial, None);
        assert_eq!(s.last_event().unwrap().kind, EventKind::MarkedGood);
        assert_eq!(s.mark_good(), Ok(MarkGood::NotOnTrial));
        assert_eq!(s.events.len(), 1);
    }

    #[test]
    fn mark_good_refused_mid_transition() {
        let mut s = BootState {
            trial: Some(Trial { tries: 3, used: 1 }),
            pending: Some(Pending::Rollback { reason: "x".into() }),
            ..Default::default()
        };
        assert_eq!(s.mark_good(), Err(StateError::Busy("rollback")));
        assert!(s.trial.is_some());
    }

    #[test]
    fn events_and_rejections_are_bounded() {
        let mut s = BootState::default();
        for i in 0..40 {
            s.push_event(EventKind::Promoted, format!("{i}"));
            s.reject(&format!("{i:064x}"));
        }
        assert_eq!(s.events.len(), MAX_EVENTS);
        assert_eq!(s.events.last().unwrap().detail, "39");
        assert_eq!(s.rejected.len(), MAX_REJECTED);
        assert!(s.is_rejected(&format!("{:064X}", 39)));
        assert!(!s.is_rejected(&format!("{:064x}", 0)));
    }

    #[test]
    fn json_round_trip() {
        let s = BootState {
            current: Some(rec(1)),
            pending: Some(Pending::Promote { new: rec(2) }),
            ..Default::default()
        };
        assert_eq!(BootState::from_json(&s.to_json()).unwrap(), s);
        assert!(matches!(
            BootState::from_json(b"[]"),
            Err(StateError::Json(_))
        ));
        let future = BootState {
            format: 99,
            ..Default::default()
        };
        assert_eq!(
            BootState::from_json(&future.to_json()),
            Err(StateError::Format(99))
        );
    }

    #[test]
    fn trial_left() {
        assert_eq!(Trial { tries: 3, used: 1 }.left(), 2);
        assert_eq!(Trial { tries: 3, used: 5 }.left(), 0);
    }
}
