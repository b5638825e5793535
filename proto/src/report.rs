//! `/run/keel/boot.json`: what initstage found and did this boot, read by the agent.

use serde::{Deserialize, Serialize};

use crate::bootstate::{ImageRecord, Trial};

/// A partition initstage found by its label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundPartition {
    /// Role: `img`, `overlay`, `newimg` or `boot`.
    pub role: String,
    /// The label searched for.
    pub label: String,
    /// The block device, e.g. `/dev/vda2`.
    pub device: String,
    /// Filesystem type libblkid reported.
    pub fstype: String,
    /// Where it is mounted (under the run directory).
    pub mountpoint: String,
}

/// The boot report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// initstage's version.
    pub initstage_version: String,
    /// Image file name on `img`.
    pub image_file: String,
    /// The booted image.
    pub booted: ImageRecord,
    /// Filesystem of the image (squashfs, erofs).
    pub image_fstype: String,
    /// Set when the booted image is on trial.
    pub trial: Option<Trial>,
    /// Boots left for the trial after this one.
    pub tries_left: Option<u32>,
    /// Boot counter.
    pub boot_count: u64,
    /// Partitions found.
    pub partitions: Vec<FoundPartition>,
    /// Where the overlay's upper layer lives: `partition` or `tmpfs`.
    pub upper: String,
    /// What happened this boot, in order (promoted, rolled back and why, ...).
    pub actions: Vec<String>,
    /// The run directory holding the partitions' mounts.
    pub run_dir: String,
    /// The dm-verity device the image is read through, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<BootVerity>,
    /// The watchdog initstage armed for this trial boot (`keel.watchdog=`): its timeout in
    /// seconds; `mark-good` disarms it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<u32>,
    /// The `keelctl persist` batches dealt with this boot, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persisted: Vec<PersistedBatch>,
}

/// One `keelctl persist` batch initstage dealt with ([`crate::persist`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedBatch {
    /// Its sequence number.
    pub batch: u64,
    /// Entries applied to `persistent/`.
    pub applied: usize,
    /// `None`: every entry applied and the batch removed. Else why not: refused (kept as
    /// `rejected-<seq>`, nothing applied), dropped (incomplete), or stopped by an I/O error
    /// (kept, retried next boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How the booted image is protected by dm-verity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootVerity {
    /// The root hash the kernel checks every block against (from the signed manifest).
    pub root_hash: String,
    /// The device-mapper device (`/dev/mapper/<name>`).
    pub device: String,
    /// What a corrupt block does at run time (`restart_on_corruption`).
    pub on_corruption: String,
}

impl BootReport {
    /// The report's JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("report serializes");
        v.push(b'\n');
        v
    }

    /// Parses a report.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
