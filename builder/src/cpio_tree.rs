//! A whole directory tree as a cpio "newc" archive, gzip- or zstd-compressed: the initramfs a microVM
//! boots from RAM with no disk (`keelctl build --format initramfs`). Entries sorted, parents
//! first; owners, modes, mtimes, symlinks, device nodes and FIFOs kept; hard links share an
//! inode number and the data goes with the first name (as the kernel's unpacker links the
//! rest to it). File contents are streamed: memory does not grow with the tree. The same
//! tree gives the same bytes (inode numbers counted, not taken from the disk).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::compress::{Compression, Effort, Encoder};
use crate::error::{Error, IoContext, Result};

/// What was packed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Packed {
    /// Archive members.
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

struct Writer<W: Write> {
    w: W,
    at: u64,
}

impl<W: Write> Writer<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.at += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = ((4 - self.at % 4) % 4) as usize;
        self.put(&[0u8; 3][..n])
    }

    fn header(
        &mut self,
        ino: u64,
        m: &fs::Metadata,
        nlink: u64,
        size: u64,
        name: &str,
    ) -> io::Result<()> {
        let (maj, min) = if m.file_type().is_char_device() || m.file_type().is_block_device() {
            let r = m.rdev();
            (libc_major(r), libc_minor(r))
        } else {
            (0, 0)
        };
        let f = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| {
                io::Error::other(format!("{name}: its {what} does not fit newc's 32 bits"))
            })
        };
        let h = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            f(ino, "inode number")?,
            m.mode(),
            m.uid(),
            m.gid(),
            f(nlink, "link count")?,
            f(u64::try_from(m.mtime()).unwrap_or(0), "mtime")?,
            f(size, "size")?,
            0,
            0,
            maj,
            min,
            name.len() + 1,
            0
        );
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }
}

/// glibc's `major()`: the masks keep the value within 32 bits.
fn libc_major(dev: u64) -> u32 {
    u32::try_from(((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)).unwrap_or(0)
}

/// glibc's `minor()`.
fn libc_minor(dev: u64) -> u32 {
    u32::try_from(((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)).unwrap_or(0)
}

/// The paths below `root`, sorted, parents before children.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .ctx("read", &dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .ctx("read", &dir)?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let m = fs::symlink_metadata(root.join(&r)).ctx("stat", root.join(&r))?;
        out.push(r.clone());
        if m.is_dir() {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

/// Packs `root` into `out`, compressed, through a temporary name.
pub fn pack(root: &Path, out: &Path, compression: Compression) -> Result<Packed> {
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths)?;
    let tmp = out.with_extension("keel-build.tmp");
    let f = fs::File::create(&tmp).ctx("create", &tmp)?;
    let enc = Encoder::new(compression, Effort::Default, f).ctx("create", &tmp)?;
    let mut w = Writer { w: enc, at: 0 };
    let r = (|| -> Result<Packed> {
        let mut packed = Packed::default();
        let mut inodes: HashMap<(u64, u64), u64> = HashMap::new();
        let mut buf = vec![0u8; 64 << 10];
        for (i, rel) in paths.iter().enumerate() {
            let p = root.join(rel);
            let m = fs::symlink_metadata(&p).ctx("stat", &p)?;
            let name = rel.to_str().ok_or_else(|| Error::Input {
                path: p.clone(),
                detail: "a name that is not UTF-8 cannot go into the initramfs".into(),
            })?;
            let ft = m.file_type();
            let key = (m.dev(), m.ino());
            let (ino, first) = match inodes.get(&key) {
                Some(&n) if ft.is_file() => (n, false),
                _ => {
                    let n = i as u64 + 1;
                    inodes.insert(key, n);
                    (n, true)
                }
            };
            let nlink = if ft.is_dir() { 2 } else { m.nlink() };
            if ft.is_symlink() {
                let t = fs::read_link(&p).ctx("read link", &p)?;
                let t = t.as_os_str().as_encoded_bytes();
                w.header(ino, &m, nlink, t.len() as u64, name)
                    .ctx("write", &tmp)?;
                w.put(t).ctx("write", &tmp)?;
                w.pad().ctx("write", &tmp)?;
            } else if ft.is_file() && first {
                if m.len() > u64::from(u32::MAX) {
                    return Err(Error::Input {
                        path: p,
                        detail: "larger than newc's 4 GiB per file".into(),
                    });
                }
                w.header(ino, &m, nlink, m.len(), name).ctx("write", &tmp)?;
                let mut f = fs::File::open(&p).ctx("open", &p)?;
                let mut left = m.len();
                while left > 0 {
                    let k = f.read(&mut buf).ctx("read", &p)?;
                    if k == 0 {
                        return Err(Error::Input {
                            path: p,
                            detail: "shrank while being packed".into(),
                        });
                    }
                    let k = k.min(usize::try_from(left).unwrap_or(usize::MAX));
                    w.put(&buf[..k]).ctx("write", &tmp)?;
                    left -= k as u64;
                }
                w.pad().ctx("write", &tmp)?;
                packed.bytes += m.len();
            } else {
                w.header(ino, &m, nlink, 0, name).ctx("write", &tmp)?;
            }
            packed.entries += 1;
        }
        let trailer = fs::symlink_metadata(root).ctx("stat", root)?;
        w.header(0, &trailer, 1, 0, "TRAILER!!!")
            .ctx("write", &tmp)?;
        Ok(packed)
    })();
    let packed = match r {
        Ok(p) => p,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    w.w.finish(&tmp, out)?;
    Ok(packed)
}
