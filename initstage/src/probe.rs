//! Finding keel's partitions by filesystem LABEL with libblkid, without udev.
//!
//! Candidates come from `/sys/class/block` (optionally limited to some disks); each is probed
//! by libblkid; [`select`] (pure) maps labels to roles and refuses duplicates.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::blkid::{self, Superblock};
use crate::cmdline::Labels;
use crate::error::{Error, Result};

/// Which block devices to consider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every block device the kernel knows (PID 1 mode).
    All,
    /// Only these disks (names under /sys/block, e.g. `loop5`) and their partitions.
    Disks(Vec<String>),
}

/// One partition found for a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `img`, `overlay`, `newimg` or `boot`.
    pub role: &'static str,
    /// The label it carries.
    pub label: String,
    /// The device node.
    pub device: PathBuf,
    /// Its filesystem type.
    pub fstype: String,
}

/// The partitions keel uses; only `img` is required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// The image partition.
    pub img: Found,
    /// The overlay partition.
    pub overlay: Option<Found>,
    /// The staging partition.
    pub newimg: Option<Found>,
    /// The boot partition (modules).
    pub boot: Option<Found>,
    /// Roles refused because their device already serves another role (why, for the log
    /// and `boot.json`).
    pub refused: Vec<String>,
}

impl Partitions {
    /// All found partitions, `img` first.
    pub fn all(&self) -> impl Iterator<Item = &Found> {
        std::iter::once(&self.img)
            .chain(self.overlay.iter())
            .chain(self.newimg.iter())
            .chain(self.boot.iter())
    }
}

const SYS_CLASS_BLOCK: &str = "/sys/class/block";
/// Bytes read ahead at the start of each candidate before probing (btrfs's superblock, the
/// farthest in of the common ones, is at 64 KiB).
const READAHEAD: Option<std::num::NonZeroU64> = std::num::NonZeroU64::new(128 * 1024);

/// Block device names in scope, sorted.
pub fn candidates(scope: &Scope) -> Vec<String> {
    let mut names: Vec<String> = match scope {
        Scope::All => std::fs::read_dir(SYS_CLASS_BLOCK)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        Scope::Disks(disks) => {
            let mut v = Vec::new();
            for disk in disks {
                v.push(disk.clone());
                if let Ok(d) = std::fs::read_dir(Path::new("/sys/block").join(disk)) {
                    for e in d.filter_map(|e| e.ok()) {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if n.starts_with(disk.as_str()) && e.path().join("partition").exists() {
                            v.push(n);
                        }
                    }
                }
            }
            v
        }
    };
    // Empty devices (unbound loop devices, empty drives) cannot hold a filesystem, and a
    // disk with partitions holds its filesystems in them: neither is probed.
    let sys = Path::new(SYS_CLASS_BLOCK);
    let partitioned: Vec<String> = names
        .iter()
        .filter(|n| sys.join(n).join("partition").exists())
        .filter_map(|n| {
            let real = std::fs::canonicalize(sys.join(n)).ok()?;
            Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
        })
        .collect();
    names.retain(|n| {
        !partitioned.contains(n)
            && std::fs::read_to_string(sys.join(n).join("size"))
                .map(|s| s.trim() != "0")
                .unwrap_or(false)
    });
    names.sort();
    names
}

/// Probes every candidate; devices that cannot be probed are skipped.
pub fn scan(scope: &Scope) -> Vec<(PathBuf, Superblock)> {
    let names = candidates(scope);
    // Start reading every candidate's first blocks at once (asynchronous readahead): the
    // superblocks libblkid looks for sit there, and one request per device, all in flight
    // together, replaces a dozen small reads one after another per device.
    for n in &names {
        if let Ok(f) = std::fs::File::open(Path::new("/dev").join(n)) {
            let _ = rustix::fs::fadvise(&f, 0, READAHEAD, rustix::fs::Advice::WillNeed);
        }
    }
    names
        .into_iter()
        .filter_map(|n| {
            let dev = Path::new("/dev").join(&n);
            blkid::probe(&dev).ok().map(|sb| (dev, sb))
        })
        .collect()
}

fn pick(
    scanned: &[(PathBuf, Superblock)],
    role: &'static str,
    label: &str,
) -> Result<Option<Found>> {
    let hits: Vec<&(PathBuf, Superblock)> = scanned
        .iter()
        .filter(|(_, sb)| sb.label.as_deref() == Some(label))
        .collect();
    match hits.as_slice() {
        [] => Ok(None),
        [(dev, sb)] => Ok(Some(Found {
            role,
            label: label.to_string(),
            device: dev.clone(),
            fstype: sb.fstype.clone().unwrap_or_default(),
        })),
        many => Err(Error::AmbiguousLabel {
            label: label.to_string(),
            devices: many
                .iter()
                .map(|(d, _)| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Maps scanned devices to roles (pure). `Ok(None)` when `img` is not there yet.
pub fn select(scanned: &[(PathBuf, Superblock)], labels: &Labels) -> Result<Option<Partitions>> {
    let Some(img) = pick(scanned, "img", &labels.img)? else {
        return Ok(None);
    };
    // One device, one role: two roles on one filesystem would make the staged slot and the
    // current image the same files (and a plan that removes one remove the other).
    let mut taken: Vec<(PathBuf, &'static str)> = vec![(img.device.clone(), "img")];
    let mut refused = Vec::new();
    let mut unique = |role: &'static str, label: &str| -> Result<Option<Found>> {
        let Some(f) = pick(scanned, role, label)? else {
            return Ok(None);
        };
        if let Some((_, first)) = taken.iter().find(|(d, _)| *d == f.device) {
            refused.push(format!(
                "{role} partition refused: {} (label {label:?}) is already the {first} partition; treating {role} as absent (check keel.label.{role}=)",
                f.device.display()
            ));
            return Ok(None);
        }
        taken.push((f.device.clone(), role));
        Ok(Some(f))
    };
    let overlay = unique("overlay", &labels.overlay)?;
    let newimg = unique("newimg", &labels.newimg)?;
    let boot = unique("boot", &labels.boot)?;
    Ok(Some(Partitions {
        img,
        overlay,
        newimg,
        boot,
        refused,
    }))
}

/// Polls until the `img` partition appears or `wait` passes.
pub fn wait_for(scope: &Scope, labels: &Labels, wait: Duration) -> Result<Partitions> {
    let start = Instant::now();
    loop {
        if let Some(p) = select(&scan(scope), labels)? {
            return Ok(p);
        }
        if start.elapsed() >= wait {
            return Err(Error::PartitionNotFound {
                role: "img",
                label: labels.img.clone(),
                waited_secs: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(label: &str, t: &str) -> Superblock {
        Superblock {
            fstype: Some(t.into()),
            label: Some(label.into()),
        }
    }

    #[test]
    fn select_maps_roles() {
        let scanned = vec![
            (PathBuf::from("/dev/vda1"), sb("img", "ext4")),
            (PathBuf::from("/dev/vda2"), sb("overlay", "ext4")),
            (PathBuf::from("/dev/vda3"), sb("other", "vfat")),
        ];
        let p = select(&scanned, &Labels::default()).unwrap().unwrap();
        assert_eq!(p.img.device, PathBuf::from("/dev/vda1"));
        assert_eq!(p.overlay.unwrap().fstype, "ext4");
        assert!(p.newimg.is_none() && p.boot.is_none());
    }

    #[test]
    fn a_device_serves_one_role_only() {
        let scanned = vec![
            (PathBuf::from("/dev/vda1"), sb("img", "ext4")),
            (PathBuf::from("/dev/vda2"), sb("overlay", "ext4")),
        ];
        let labels = Labels {
            newimg: "img".into(),
            boot: "overlay".into(),
            ..Labels::default()
        };
        let p = select(&scanned, &labels).unwrap().unwrap();
        assert!(p.newimg.is_none() && p.boot.is_none());
        assert_eq!(p.overlay.unwrap().device, PathBuf::from("/dev/vda2"));
        assert_eq!(p.refused.len(), 2);
        assert!(
            p.refused[0].contains("already the img partition"),
            "{:?}",
            p.refused
        );
        assert!(
            p.refused[1].contains("already the overlay partition"),
            "{:?}",
            p.refused
        );
    }

    #[test]
    fn missing_img_is_none_and_duplicates_are_refused() {
        let scanned = vec![(PathBuf::from("/dev/vda2"), sb("overlay", "ext4"))];
        assert!(select(&scanned, &Labels::default()).unwrap().is_none());
        let dup = vec![
            (PathBuf::from("/dev/vda1"), sb("img", "ext4")),
            (PathBuf::from("/dev/vdb1"), sb("img", "ext4")),
        ];
        let e = select(&dup, &Labels::default()).unwrap_err().to_string();
        assert!(e.contains("/dev/vda1, /dev/vdb1"), "{e}");
    }
}
