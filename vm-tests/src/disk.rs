//! A GPT disk with partitions labelled `img`, `overlay`, `newimg`, `boot`, built without
//! mounting (`mkfs.ext4 -d`, `sfdisk`, `dd`); read back with `debugfs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keel_proto::manifest::SignedManifest;

use crate::*;

/// Partition sizes in MiB, in disk order.
pub const PARTS: [(&str, u64); 4] = [("img", 64), ("overlay", 32), ("newimg", 48), ("boot", 8)];

/// A GPT disk image.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// (label, MiB) of each partition, in order.
    pub layout: Vec<(&'static str, u64)>,
}

impl Disk {
    /// Builds the disk with `v1` (and its manifest) as the factory image named `image_name`,
    /// `/etc/persisted` in the overlay's persistent layer.
    pub fn new(dir: &Path, v1: &Path, image_name: &str) -> Disk {
        Disk::with_old_upper(dir, v1, image_name, 0)
    }

    /// [`Disk::new`], with `files` empty files left in the overlay's upper layer (as a
    /// previous boot would have left them).
    pub fn with_old_upper(dir: &Path, v1: &Path, image_name: &str, files: usize) -> Disk {
        Disk::build(dir, v1, image_name, files, false, None)
    }

    /// [`Disk::new`] with a `newimg` partition of `mib` MiB (room for large `cp` files).
    pub fn with_newimg(dir: &Path, v1: &Path, image_name: &str, mib: u64) -> Disk {
        Disk::build(dir, v1, image_name, 0, false, Some(mib))
    }

    /// [`Disk::new`] with partitions of the given sizes (MiB, in [`PARTS`] order): room for
    /// a Debian root, whose promotion holds three copies on img at its peak (current, -old
    /// and the new one being copied in).
    pub fn with_sizes(dir: &Path, v1: &Path, image_name: &str, mib: [u64; 4]) -> Disk {
        Disk::build_sized(dir, v1, None, image_name, 0, false, None, Some(mib))
    }

    /// [`Disk::with_old_upper`] as a disk looks after its first boot: the image adopted in
    /// the boot state, so a boot changes nothing (the state of every later boot).
    pub fn steady(dir: &Path, v1: &Path, image_name: &str, files: usize) -> Disk {
        Disk::build(dir, v1, image_name, files, true, None)
    }

    /// [`Disk::steady`] with `image` and its own signed manifest `m` (one with a verity
    /// tree, say) instead of a plain one made here.
    pub fn steady_signed(dir: &Path, image: &Path, m: &SignedManifest, image_name: &str) -> Disk {
        Disk::build_with(dir, image, Some(m), image_name, 0, true, None)
    }

    fn build(
        dir: &Path,
        v1: &Path,
        image_name: &str,
        files: usize,
        adopted: bool,
        newimg_mib: Option<u64>,
    ) -> Disk {
        Disk::build_with(dir, v1, None, image_name, files, adopted, newimg_mib)
    }

    fn build_with(
        dir: &Path,
        v1: &Path,
        signed: Option<&SignedManifest>,
        image_name: &str,
        files: usize,
        adopted: bool,
        newimg_mib: Option<u64>,
    ) -> Disk {
        Disk::build_sized(
            dir, v1, signed, image_name, files, adopted, newimg_mib, None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build_sized(
        dir: &Path,
        v1: &Path,
        signed: Option<&SignedManifest>,
        image_name: &str,
        files: usize,
        adopted: bool,
        newimg_mib: Option<u64>,
        sizes: Option<[u64; 4]>,
    ) -> Disk {
        fs::create_dir_all(dir).unwrap();
        let path = dir.join("disk.img");
        let m = signed.cloned().unwrap_or_else(|| sign(v1, 1));
        // 100,000 inodes need room: the overlay grows with the files.
        let layout: Vec<(&'static str, u64)> = PARTS
            .iter()
            .zip(sizes.unwrap_or(PARTS.map(|(_, s)| s)))
            .map(|(&(l, _), s)| {
                (
                    l,
                    match l {
                        "overlay" => s + (files as u64 / 2000),
                        "newimg" => newimg_mib.unwrap_or(s),
                        _ => s,
                    },
                )
            })
            .collect();
        let parts: Vec<Part> = layout
            .iter()
            .map(|(label, size)| {
                let p = Part::new(label, *size);
                match *label {
                    "img" => {
                        let p = p
                            .file(image_name, fs::read(v1).unwrap())
                            .file(&format!("{image_name}.manifest"), m.to_json());
                        if adopted {
                            let state = keel_proto::bootstate::BootState {
                                boot_count: 1,
                                current: Some(keel_proto::bootstate::ImageRecord::from_manifest(
                                    &m.manifest,
                                )),
                                ..Default::default()
                            };
                            p.file(keel_proto::layout::STATE_FILE, state.to_json())
                        } else {
                            p
                        }
                    }
                    "overlay" => {
                        let mut p = p.file("persistent/etc/persisted", b"kept\n".to_vec());
                        for i in 0..files {
                            p = p.file(&format!("upper/old/{}/f{i}", i / 1000), Vec::new());
                        }
                        if files > 0 {
                            p.inodes = Some(files + files / 1000 + 1024);
                        }
                        p
                    }
                    _ => p,
                }
            })
            .collect();
        gpt_disk(&path, &parts, &dir.join("parts"));
        Disk { path, layout }
    }

    /// The partition labelled `label`: (first MiB, MiB).
    fn extent(&self, label: &str) -> (u64, u64) {
        let mut start = 1;
        for &(l, s) in &self.layout {
            if l == label {
                return (start, s);
            }
            start += s;
        }
        panic!("no partition {label}");
    }

    /// The partition labelled `label` copied out to a file of its own.
    fn extract(&self, label: &str) -> PathBuf {
        let (start, size) = self.extent(label);
        let part = self.path.with_extension(format!("{label}.part"));
        run(Command::new("dd")
            .arg(format!("if={}", self.path.display()))
            .arg(format!("of={}", part.display()))
            .args(["bs=1M", "status=none"])
            .arg(format!("skip={start}"))
            .arg(format!("count={size}")));
        part
    }

    /// Flips the bits of `mask` in the byte at `offset` of file `path` on partition `label`,
    /// in place on the disk (as a failing flash cell or an attacker with the disk would): the
    /// byte's block found with debugfs `bmap` on a copy of the partition whose journal e2fsck
    /// has replayed (the guest's last boot was a power cut), and nothing else changed.
    pub fn flip(&self, label: &str, path: &str, offset: u64, mask: u8) {
        use std::os::unix::fs::FileExt;
        let part = self.extract_replayed(label);
        let debugfs = |req: &str| {
            let out = run(Command::new("debugfs").args(["-R", req]).arg(&part));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let bs: u64 = debugfs("stats")
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("block size");
        let pblk: u64 = debugfs(&format!("bmap {path} {}", offset / bs))
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no block {} of {path} on {label}", offset / bs));
        assert!(pblk > 0, "{path} has a hole at {offset}");
        let _ = fs::remove_file(&part);
        let (start, _) = self.extent(label);
        let at = (start << 20) + pblk * bs + offset % bs;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= mask;
        f.write_all_at(&b, at).unwrap();
        f.sync_all().unwrap();
        let part = self.extract_replayed(label);
        let now = self.read_part(&part, path).unwrap();
        let _ = fs::remove_file(&part);
        let at = usize::try_from(offset).unwrap();
        assert_eq!(now[at], b[0], "the flip of byte {offset} of {path} shows");
    }

    /// [`Disk::extract`], its journal replayed by e2fsck (the copy only: the disk is not
    /// touched, and the guest replays the same journal at its next mount).
    fn extract_replayed(&self, label: &str) -> PathBuf {
        let part = self.extract(label);
        let st = Command::new("e2fsck")
            .args(["-fy"])
            .arg(&part)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.code().is_some_and(|c| c <= 1), "e2fsck {label}: {st}");
        part
    }

    /// Reads `path` from the partition labelled `label` with debugfs (no mount), as the
    /// guest's next mount would see it: its journal replayed on the copy first (a guest killed
    /// after an fsync has the write in the journal, not yet in place).
    pub fn read(&self, label: &str, path: &str) -> Option<Vec<u8>> {
        let part = self.extract_replayed(label);
        let r = self.read_part(&part, path);
        let _ = fs::remove_file(&part);
        r
    }

    /// Reads `path` from an extracted partition.
    fn read_part(&self, part: &Path, path: &str) -> Option<Vec<u8>> {
        let out = self.path.with_extension("dump");
        let _ = fs::remove_file(&out);
        let _ = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump -p {path} {}", out.display()))
            .arg(part)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let r = fs::read(&out).ok();
        let _ = fs::remove_file(&out);
        r
    }

    /// The boot state on `img`.
    pub fn state(&self) -> keel_proto::bootstate::BootState {
        let b = self.read("img", "/keel-state.json").expect("state on img");
        keel_proto::bootstate::BootState::from_json(&b).unwrap()
    }
}
