//! Factory disks (`keelctl disk create`): a GPT disk image whose partitions are ext4
//! filesystems labelled as initstage looks for them — `img` (the signed image and its
//! manifest, adopted as the current image at the first boot), `overlay` (`persistent/`,
//! the upper layer's room), `newimg` (staging) and, when asked, `boot`. Made without root,
//! mounts or loop devices: each filesystem by `mkfs.ext4 -L LABEL -d DIR` into a file, the
//! table by `sfdisk`, the filesystems copied in at their offsets (runs of zeros skipped, so
//! the disk stays sparse). The sizes are decided by a pure [`plan`].

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, IoContext, Result};

const MIB: u64 = 1 << 20;

/// What goes on the disk.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// The image's size in bytes.
    pub image_bytes: u64,
    /// `img` in MiB (default: room for the image twice, current and `-old`, plus 16 MiB).
    pub img_mib: Option<u64>,
    /// `overlay` in MiB (default 64, or what `total_mib` leaves).
    pub overlay_mib: Option<u64>,
    /// `newimg` in MiB (default: the image once plus 16 MiB).
    pub newimg_mib: Option<u64>,
    /// `boot` in MiB when there is one.
    pub boot_mib: Option<u64>,
    /// The whole disk in MiB: `overlay` takes what the others leave.
    pub total_mib: Option<u64>,
}

/// One partition: its label, first MiB and size in MiB.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Planned {
    /// `img`, `overlay`, `newimg`, `boot`.
    pub label: &'static str,
    /// Start, in MiB from the disk's start.
    pub start_mib: u64,
    /// Size in MiB.
    pub size_mib: u64,
}

/// The partitions, 1 MiB aligned, in the order `img`, `overlay`, `newimg`, `boot`; the disk
/// is one MiB longer than the last (the backup GPT).
pub fn plan(s: &DiskSpec) -> std::result::Result<Vec<Planned>, String> {
    let image_mib = s.image_bytes.div_ceil(MIB);
    let img = s.img_mib.unwrap_or(2 * image_mib + 16);
    let newimg = s.newimg_mib.unwrap_or(image_mib + 16);
    if img < image_mib + 8 {
        return Err(format!(
            "img of {img} MiB cannot hold the {image_mib} MiB image and its manifest"
        ));
    }
    if newimg < image_mib + 8 {
        return Err(format!(
            "newimg of {newimg} MiB cannot stage a {image_mib} MiB update"
        ));
    }
    let boot = s.boot_mib.unwrap_or(0);
    let overlay = match (s.total_mib, s.overlay_mib) {
        (Some(_), Some(_)) => return Err("--size and --overlay-size: give one".into()),
        (Some(t), None) => t
            .checked_sub(1 + img + newimg + boot + 1)
            .filter(|&o| o >= 16)
            .ok_or_else(|| format!("a {t} MiB disk leaves less than 16 MiB for overlay"))?,
        (None, o) => o.unwrap_or(64),
    };
    if overlay < 16 {
        return Err("overlay needs at least 16 MiB".into());
    }
    let mut out = Vec::new();
    let mut at = 1;
    for (label, size) in [
        ("img", img),
        ("overlay", overlay),
        ("newimg", newimg),
        ("boot", boot),
    ] {
        if size == 0 {
            continue;
        }
        out.push(Planned {
            label,
            start_mib: at,
            size_mib: size,
        });
        at += size;
    }
    Ok(out)
}

/// The files of one partition: (source, path inside).
pub type Contents = Vec<(PathBuf, String)>;

/// Writes the disk at `out` (through a temporary name) from `parts` and what each holds
/// (`contents[i]`, files copied; `dirs[i]`, a tree taken whole, for `boot`).
pub fn create(
    out: &Path,
    parts: &[Planned],
    contents: &[Contents],
    dirs: &[Option<PathBuf>],
    scratch: &Path,
) -> Result<()> {
    fs::create_dir_all(scratch).ctx("create", scratch)?;
    let r = create_in(out, parts, contents, dirs, scratch);
    let _ = fs::remove_dir_all(scratch);
    r
}

fn create_in(
    out: &Path,
    parts: &[Planned],
    contents: &[Contents],
    dirs: &[Option<PathBuf>],
    scratch: &Path,
) -> Result<()> {
    let mut images = Vec::new();
    let mut script = String::from("label: gpt\n");
    for (i, p) in parts.iter().enumerate() {
        let tree = match dirs.get(i).cloned().flatten() {
            Some(d) => d,
            None => {
                let t = scratch.join(format!("{}-tree", p.label));
                fs::create_dir_all(&t).ctx("create", &t)?;
                for (src, rel) in contents.get(i).into_iter().flatten() {
                    let dst = t.join(rel);
                    if let Some(parent) = dst.parent() {
                        fs::create_dir_all(parent).ctx("create", parent)?;
                    }
                    fs::copy(src, &dst).ctx("copy", src)?;
                }
                if p.label == "overlay" {
                    fs::create_dir_all(t.join("persistent")).ctx("create", &t)?;
                }
                t
            }
        };
        let img = scratch.join(format!("{}.ext4", p.label));
        let o = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                p.label,
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-d",
            ])
            .arg(&tree)
            .arg(&img)
            .arg(format!("{}M", p.size_mib))
            .output()
            .ctx("run", "mkfs.ext4")?;
        if !o.status.success() {
            return Err(Error::Input {
                path: tree,
                detail: format!(
                    "mkfs.ext4 for {} ({} MiB) failed: {}",
                    p.label,
                    p.size_mib,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            });
        }
        script.push_str(&format!(
            "start={}MiB, size={}MiB, name={}\n",
            p.start_mib, p.size_mib, p.label
        ));
        images.push((img, p.start_mib));
    }
    let end = parts.last().map_or(1, |p| p.start_mib + p.size_mib) + 1;
    let tmp = out.with_extension("keel-disk.tmp");
    let f = fs::File::create(&tmp).ctx("create", &tmp)?;
    f.set_len(end * MIB).ctx("size", &tmp)?;
    drop(f);
    let r = (|| {
        let mut sf = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ctx("run", "sfdisk")?;
        sf.stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .ctx("write to", "sfdisk")?;
        let o = sf.wait_with_output().ctx("run", "sfdisk")?;
        if !o.status.success() {
            return Err(Error::Input {
                path: tmp.clone(),
                detail: format!("sfdisk: {}", String::from_utf8_lossy(&o.stderr).trim()),
            });
        }
        let mut disk = fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .ctx("open", &tmp)?;
        for (img, start) in &images {
            copy_sparse(img, &mut disk, start * MIB)?;
        }
        disk.sync_all().ctx("sync", &tmp)?;
        fs::rename(&tmp, out).ctx("rename into place", out)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Copies `src` into `dst` at `offset`, seeking over 64 KiB runs of zeros.
fn copy_sparse(src: &Path, dst: &mut fs::File, offset: u64) -> Result<()> {
    let mut f = fs::File::open(src).ctx("open", src)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut at = offset;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = f.read(&mut buf[n..]).ctx("read", src)?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(at)).ctx("seek", src)?;
            dst.write_all(&buf[..n]).ctx("write", src)?;
        }
        at += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image_mib: u64) -> DiskSpec {
        DiskSpec {
            image_bytes: image_mib * MIB - 100,
            img_mib: None,
            overlay_mib: None,
            newimg_mib: None,
            boot_mib: None,
            total_mib: None,
        }
    }

    #[test]
    fn plans() {
        let p = plan(&spec(10)).unwrap();
        let v: Vec<_> = p
            .iter()
            .map(|p| (p.label, p.start_mib, p.size_mib))
            .collect();
        assert_eq!(
            v,
            vec![("img", 1, 36), ("overlay", 37, 64), ("newimg", 101, 26)]
        );
        let mut s = spec(10);
        s.total_mib = Some(512);
        s.boot_mib = Some(32);
        let p = plan(&s).unwrap();
        let last = p.last().unwrap();
        assert_eq!(
            (last.label, last.start_mib + last.size_mib + 1),
            ("boot", 512)
        );
        s.total_mib = Some(100);
        assert!(plan(&s).unwrap_err().contains("less than 16 MiB"));
        let mut s = spec(10);
        s.img_mib = Some(12);
        assert!(plan(&s).unwrap_err().contains("cannot hold"));
        let mut s = spec(10);
        s.newimg_mib = Some(12);
        assert!(plan(&s).unwrap_err().contains("cannot stage"));
    }
}
