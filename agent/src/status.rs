//! What the agent knows about the device: the boot report, the boot state, the staging slot.
//! Read fresh for every request (small files), so the agent never serves stale facts.

use keel_proto::bootstate::{BootState, ImageRecord};
use keel_proto::layout::DEFAULT_IMAGE;
use keel_proto::message::{PartialUpload, StatusReport, VerityStatus};
use keel_proto::report::BootReport;

use keel_sys::{durable, state};

use crate::config::Config;
use crate::stage::Slot;

/// The facts read from disk.
#[derive(Debug, Default)]
pub struct Facts {
    /// initstage's report of this boot.
    pub report: Option<BootReport>,
    /// The boot state on `img`.
    pub state: Option<BootState>,
    /// Why the boot state could not be read.
    pub state_error: Option<String>,
}

impl Facts {
    /// Reads the report and the state named by `config`.
    pub fn read(config: &Config) -> Facts {
        let (state, state_error) = match state::load(&config.img_dir()) {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e.to_string())),
        };
        Facts {
            report: durable::read_regular(&config.boot_report(), MAX_REPORT)
                .ok()
                .flatten()
                .and_then(|b| BootReport::from_json(&b).ok()),
            state,
            state_error,
        }
    }

    /// The image file name: config, else the report, else the default.
    pub fn image_name(&self, config: &Config) -> String {
        config
            .image
            .clone()
            .or_else(|| self.report.as_ref().map(|r| r.image_file.clone()))
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string())
    }

    /// The booted image, when initstage reported one with a known manifest.
    pub fn booted(&self) -> Option<&ImageRecord> {
        self.report.as_ref().map(|r| &r.booted)
    }

    /// The product name pushes must carry.
    pub fn product_name<'a>(&'a self, config: &'a Config) -> Option<&'a str> {
        config.name.as_deref().or_else(|| {
            self.booted()
                .filter(|b| !b.sha256.is_empty())
                .map(|b| b.name.as_str())
        })
    }

    /// Digests rolled back on this device.
    pub fn rejected(&self) -> &[String] {
        self.state.as_ref().map(|s| &s.rejected[..]).unwrap_or(&[])
    }
}

/// The largest boot report read (a real one is a few KiB).
pub const MAX_REPORT: u64 = 1 << 20;

/// Assembles the status report.
pub fn report(config: &Config, push_in_progress: bool) -> StatusReport {
    let facts = Facts::read(config);
    let slot = Slot::new(config.newimg_dir(), &facts.image_name(config));
    let r = facts.report.as_ref();
    let trial = match &facts.state {
        Some(s) => s.trial,
        None => r.and_then(|r| r.trial),
    };
    StatusReport {
        pull: None,
        last_transfer: None,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        booted: facts.booted().cloned(),
        image_file: facts.image_name(config),
        staged: slot
            .staged()
            .map(|m| ImageRecord::from_manifest(&m.manifest)),
        partial: slot.partial().map(|(m, received)| PartialUpload {
            version: m.manifest.version,
            received,
            size: m.manifest.size,
        }),
        // The state is newer than the report once mark-good has run.
        trial,
        tries_left: trial.and(r.and_then(|r| r.tries_left)),
        old: facts.state.as_ref().and_then(|s| s.old.clone()),
        newimg_free: if slot.available() {
            slot.free_bytes().ok()
        } else {
            None
        },
        push_in_progress,
        boot_actions: r.map(|r| r.actions.clone()).unwrap_or_default(),
        events: facts
            .state
            .as_ref()
            .map(|s| s.events.clone())
            .unwrap_or_default(),
        state_error: facts.state_error.clone(),
        identity: None,
        verity: r.and_then(|r| r.verity.as_ref()).map(verity_status),
    }
}

/// What initstage set up, and the kernel's live view of the device: its table (with the
/// root hash it checks against) and its status (`V`, or `C` once a corrupt block was read).
fn verity_status(v: &keel_proto::report::BootVerity) -> VerityStatus {
    let mut st = VerityStatus {
        setup: v.clone(),
        ..Default::default()
    };
    let name = v.device.rsplit('/').next().unwrap_or_default();
    let live = || -> Result<(String, String), String> {
        let ctl = keel_sys::dm::Control::open().map_err(|e| e.to_string())?;
        let one = |table: bool| -> Result<String, String> {
            let t = ctl.table(name, table).map_err(|e| e.to_string())?;
            t.first()
                .map(|t| format!("{} {}", t.kind, t.params))
                .ok_or_else(|| format!("{name} has no table"))
        };
        Ok((one(true)?, one(false)?))
    };
    match live() {
        Ok((t, s)) => {
            st.kernel_table = Some(t);
            st.kernel_status = s.split(' ').nth(1).map(str::to_string);
        }
        Err(e) => st.error = Some(e),
    }
    st
}
