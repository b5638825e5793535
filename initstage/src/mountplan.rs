//! What to mount where (pure): partitions under the run directory, the image, the upper
//! layer, the overlay on the new root and the Alpine-style views of its layers.
//!
//! Layout (run directory `/run/keel` in PID 1 mode):
//!
//! | path | what |
//! |---|---|
//! | `<run>/img`, `<run>/overlay`, `<run>/newimg` | the partitions, read-write |
//! | `<run>/boot` | the boot partition, read-only |
//! | `<run>/ro` | the image, read-only through a loop device |
//! | `<run>/rw` | the tmpfs upper layer (`overlaytmpfs=yes`, or no overlay partition) |
//! | `<sysroot>` | overlay: `lowerdir=<overlay>/persistent:<run>/ro` |
//! | `<sysroot>/media/root-ro`, `<sysroot>/media/root-rw` | binds of the image and the upper's filesystem |

use std::path::{Path, PathBuf};

use crate::cmdline::Config;
use crate::probe::Partitions;

/// Mount flags initstage uses, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-write, nosuid, nodev.
    ReadWrite,
    /// Read-only, nosuid, nodev.
    ReadOnly,
    /// A recursive bind.
    Bind,
}

/// One mount, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOp {
    /// Device, image loop device or pseudo-source.
    pub source: String,
    /// Mount point (created if missing).
    pub target: PathBuf,
    /// Filesystem type (empty for binds).
    pub fstype: String,
    /// Flags.
    pub access: Access,
    /// Filesystem options.
    pub data: String,
}

/// Paths for one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Where partitions and the image are mounted.
    pub run: PathBuf,
    /// Where the new root is assembled.
    pub sysroot: PathBuf,
}

impl Layout {
    /// Mount point of a partition role.
    pub fn part(&self, role: &str) -> PathBuf {
        self.run.join(role)
    }
    /// Mount point of the image.
    pub fn ro(&self) -> PathBuf {
        self.run.join("ro")
    }
    /// Mount point of the tmpfs upper layer.
    pub fn rw(&self) -> PathBuf {
        self.run.join("rw")
    }
    /// `boot.json`.
    pub fn report(&self) -> PathBuf {
        self.run.join("boot.json")
    }
}

/// The partitions' mounts, `img` first.
pub fn partition_mounts(parts: &Partitions, layout: &Layout) -> Vec<MountOp> {
    parts
        .all()
        .map(|f| MountOp {
            source: f.device.display().to_string(),
            target: layout.part(f.role),
            fstype: f.fstype.clone(),
            access: if f.role == "boot" {
                Access::ReadOnly
            } else {
                Access::ReadWrite
            },
            data: String::new(),
        })
        .collect()
}

/// Where the overlay's writable layer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpperPlan {
    /// A tmpfs to mount first, if the upper lives on tmpfs.
    pub tmpfs: Option<MountOp>,
    /// The filesystem root that holds upper and work (shown at /media/root-rw).
    pub base: PathBuf,
    /// upperdir.
    pub upper: PathBuf,
    /// workdir.
    pub work: PathBuf,
    /// `<overlay>/persistent`, when the overlay partition is there.
    pub persistent: Option<PathBuf>,
    /// Move the old upper/work aside first (partition-backed upper).
    pub rotate: bool,
    /// Set when falling back to tmpfs because there is no overlay partition.
    pub warning: Option<String>,
    /// `partition` or `tmpfs`.
    pub kind: &'static str,
}

/// Decides where the upper layer goes.
pub fn upper_plan(cfg: &Config, has_overlay: bool, layout: &Layout) -> UpperPlan {
    let persistent = has_overlay.then(|| layout.part("overlay").join("persistent"));
    if cfg.overlay_tmpfs || !has_overlay {
        let mut data = "mode=0755".to_string();
        if let Some(f) = &cfg.overlay_tmpfs_flags {
            data.push(',');
            data.push_str(f);
        }
        let base = layout.rw();
        UpperPlan {
            tmpfs: Some(MountOp {
                source: "tmpfs".into(),
                target: base.clone(),
                fstype: "tmpfs".into(),
                access: Access::ReadWrite,
                data,
            }),
            upper: base.join("upper"),
            work: base.join("work"),
            base,
            persistent,
            rotate: false,
            warning: (!has_overlay && !cfg.overlay_tmpfs).then(|| {
                format!(
                    "no partition labelled {:?}: changes to / live on tmpfs and are lost at shutdown",
                    cfg.labels.overlay
                )
            }),
            kind: "tmpfs",
        }
    } else {
        let base = layout.part("overlay");
        UpperPlan {
            tmpfs: None,
            upper: base.join("upper"),
            work: base.join("work"),
            base,
            persistent,
            rotate: true,
            warning: None,
            kind: "partition",
        }
    }
}

/// The overlay mount of the new root.
pub fn overlay_mount(up: &UpperPlan, layout: &Layout) -> MountOp {
    let ro = layout.ro();
    let lower = match &up.persistent {
        Some(p) => format!("{}:{}", p.display(), ro.display()),
        None => ro.display().to_string(),
    };
    MountOp {
        source: "overlay".into(),
        target: layout.sysroot.clone(),
        fstype: "overlay".into(),
        access: Access::ReadWrite,
        data: format!(
            "lowerdir={lower},upperdir={},workdir={}",
            up.upper.display(),
            up.work.display()
        ),
    }
}

/// Alpine's views of the layers inside the new root.
pub fn layer_binds(up: &UpperPlan, layout: &Layout) -> Vec<MountOp> {
    let bind = |src: &Path, dst: &str| MountOp {
        source: src.display().to_string(),
        target: layout.sysroot.join(dst),
        fstype: String::new(),
        access: Access::Bind,
        data: String::new(),
    };
    vec![
        bind(&layout.ro(), "media/root-ro"),
        bind(&up.base, "media/root-rw"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::parse;

    fn layout() -> Layout {
        Layout {
            run: "/run/keel".into(),
            sysroot: "/sysroot".into(),
        }
    }

    #[test]
    fn partition_backed_overlay() {
        let (cfg, _) = parse("");
        let up = upper_plan(&cfg, true, &layout());
        assert!(up.rotate && up.tmpfs.is_none() && up.warning.is_none());
        assert_eq!(
            overlay_mount(&up, &layout()).data,
            "lowerdir=/run/keel/overlay/persistent:/run/keel/ro,upperdir=/run/keel/overlay/upper,workdir=/run/keel/overlay/work"
        );
        let binds = layer_binds(&up, &layout());
        assert_eq!(binds[0].target, PathBuf::from("/sysroot/media/root-ro"));
        assert_eq!(binds[1].source, "/run/keel/overlay");
    }

    #[test]
    fn overlaytmpfs_keeps_persistent() {
        let (cfg, _) = parse("overlaytmpfs=yes overlaytmpfsflags=size=32m,nr_inodes=500");
        let up = upper_plan(&cfg, true, &layout());
        assert_eq!(
            up.tmpfs.as_ref().unwrap().data,
            "mode=0755,size=32m,nr_inodes=500"
        );
        assert!(!up.rotate && up.warning.is_none());
        assert_eq!(
            overlay_mount(&up, &layout()).data,
            "lowerdir=/run/keel/overlay/persistent:/run/keel/ro,upperdir=/run/keel/rw/upper,workdir=/run/keel/rw/work"
        );
    }

    #[test]
    fn no_overlay_partition_falls_back_to_tmpfs_with_warning() {
        let (cfg, _) = parse("");
        let up = upper_plan(&cfg, false, &layout());
        assert!(up.warning.as_ref().unwrap().contains("\"overlay\""));
        assert_eq!(up.kind, "tmpfs");
        assert!(overlay_mount(&up, &layout())
            .data
            .starts_with("lowerdir=/run/keel/ro,"));
    }
}
