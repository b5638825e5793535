//! `keelctl initramfs`: an initramfs with initstage as `/init`, the kernel modules it needs
//! (resolved from `modules.dep`, dependencies included) and the trusted keys, written as a
//! cpio "newc" archive by this module, gzip- or zstd-compressed ([`crate::compress`]).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use keel_proto::moddep::{name_of, parse_builtin, resolve, ModuleDeps};
use keel_unpack::Format;

use crate::compress::{Compression, Effort, Encoder};
use crate::error::{Error, IoContext, Result};

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file with its permission bits.
    File {
        /// Permission bits (e.g. 0o755).
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A character device.
    Char {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// Writes a cpio newc archive of `entries` (paths without a leading `/`), parents first.
pub fn write_cpio(entries: &[(String, Node)], mut w: impl Write) -> io::Result<()> {
    fn header(
        w: &mut impl Write,
        ino: u32,
        mode: u32,
        size: usize,
        rdev: (u32, u32),
        name: &str,
    ) -> io::Result<()> {
        let namesize = name.len() + 1;
        write!(
            w,
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 1, 0, 0, 0, rdev.0, rdev.1, 0
        )?;
        w.write_all(name.as_bytes())?;
        w.write_all(&[0])?;
        pad(w, 110 + namesize)
    }
    fn pad(w: &mut impl Write, len: usize) -> io::Result<()> {
        let n = (4 - len % 4) % 4;
        w.write_all(&[0u8; 3][..n])
    }
    for (i, (path, node)) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).map_err(|_| io::Error::other("too many archive members"))?;
        match node {
            Node::Dir => header(&mut w, ino, 0o040755, 0, (0, 0), path)?,
            Node::File { mode, data } => {
                header(&mut w, ino, 0o100000 | mode, data.len(), (0, 0), path)?;
                w.write_all(data)?;
                pad(&mut w, data.len())?;
            }
            Node::Char { major, minor } => {
                header(&mut w, ino, 0o020600, 0, (*major, *minor), path)?
            }
        }
    }
    header(&mut w, 0, 0, 0, (0, 0), "TRAILER!!!")
}

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The static initstage binary.
    pub init: PathBuf,
    /// A kernel's `lib/modules/<version>` directory (its name is the version).
    pub kernel_modules: Option<PathBuf>,
    /// Modules to include, with their dependencies.
    pub modules: Vec<String>,
    /// Trusted public keys (PEM) for `/etc/keel/trusted.pem`.
    pub keys: Option<PathBuf>,
    /// Pack compressed modules (`.ko.gz`, `.ko.xz`, `.ko.zst`) as they are, for a kernel
    /// that decompresses them itself. By default they are unpacked to `.ko`: any kernel
    /// loads them, the boot spends no time decoding, and the archive's own gzip compresses
    /// them about as well.
    pub keep_compressed: bool,
    /// Extra files: (source, path in the archive).
    pub files: Vec<(PathBuf, String)>,
}

/// What was packed, for the user.
#[derive(Debug, Clone, Default)]
pub struct Packed {
    /// Module files included, in load order.
    pub modules: Vec<String>,
    /// Requested modules that are built into the kernel.
    pub builtin: Vec<String>,
    /// Module files unpacked, per format (gzip, xz, zstd).
    pub unpacked: [usize; 3],
    /// zstd modules kept compressed: initstage cannot decode them, only a kernel with
    /// zstd module decompression loads them.
    pub kept_zstd: usize,
}

/// The largest module the builder unpacks.
pub const MAX_MODULE: u64 = 256 << 20;

/// A module's path in the archive once unpacked: `kernel/a.ko.xz` → `kernel/a.ko`.
pub fn unpacked_path(rel: &str) -> &str {
    Format::of_path(rel).map_or(rel, |f| f.strip(rel))
}

/// A `modules.dep` line with every path unpacked.
pub fn unpacked_dep_line(line: &str) -> String {
    match line.split_once(':') {
        Some((m, deps)) => {
            let deps: Vec<&str> = deps.split_whitespace().map(unpacked_path).collect();
            if deps.is_empty() {
                format!("{}:", unpacked_path(m))
            } else {
                format!("{}: {}", unpacked_path(m), deps.join(" "))
            }
        }
        None => line.to_string(),
    }
}

fn read(p: &Path) -> Result<Vec<u8>> {
    fs::read(p).ctx("read", p)
}

/// Builds the member list.
pub fn entries(spec: &Spec) -> Result<(Vec<(String, Node)>, Packed)> {
    let mut dirs = BTreeSet::new();
    let mut files: Vec<(String, Node)> = Vec::new();
    let mut add_file = |dirs: &mut BTreeSet<String>, path: String, mode: u32, data: Vec<u8>| {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            dirs.insert(parent.to_string());
            p = parent;
        }
        files.push((path, Node::File { mode, data }));
    };
    for d in ["dev", "proc", "sys", "run", "sysroot", "tmp", "etc/keel"] {
        dirs.insert(d.to_string());
        if let Some((parent, _)) = d.rsplit_once('/') {
            dirs.insert(parent.to_string());
        }
    }
    add_file(&mut dirs, "init".into(), 0o755, read(&spec.init)?);
    if let Some(k) = &spec.keys {
        add_file(&mut dirs, "etc/keel/trusted.pem".into(), 0o644, read(k)?);
    }
    let mut packed = Packed::default();
    if let Some(kdir) = &spec.kernel_modules {
        let version = kdir
            .file_name()
            .and_then(|v| v.to_str())
            .ok_or_else(|| Error::Input {
                path: kdir.clone(),
                detail: "not a lib/modules/<version> directory".into(),
            })?
            .to_string();
        let dep_text = String::from_utf8_lossy(&read(&kdir.join("modules.dep"))?).into_owned();
        let deps = ModuleDeps::parse(&dep_text);
        let builtin_text = fs::read_to_string(kdir.join("modules.builtin")).unwrap_or_default();
        let builtin = parse_builtin(&builtin_text);
        let (order, missing) = resolve(&spec.modules, &deps, &builtin, &Default::default());
        if !missing.is_empty() {
            return Err(Error::Input {
                path: kdir.join("modules.dep"),
                detail: format!("no such module(s): {}", missing.join(", ")),
            });
        }
        packed.builtin = spec
            .modules
            .iter()
            .filter(|m| builtin.contains(&keel_proto::moddep::normalize(m)))
            .cloned()
            .collect();
        let base = format!("lib/modules/{version}");
        let mut dep_lines = String::new();
        for rel in &order {
            let src = kdir.join(rel);
            let format = Format::of_path(rel);
            let (path, data) = match format {
                Some(f) if !spec.keep_compressed => {
                    let mut data = Vec::new();
                    keel_unpack::decode_file(&src, &mut data, MAX_MODULE).map_err(|e| {
                        Error::Input {
                            path: src.clone(),
                            detail: format!("cannot unpack this module: {e}"),
                        }
                    })?;
                    packed.unpacked[f as usize] += 1;
                    (unpacked_path(rel), data)
                }
                _ => {
                    if format == Some(Format::Zstd) {
                        packed.kept_zstd += 1;
                    }
                    (rel.as_str(), read(&src)?)
                }
            };
            add_file(&mut dirs, format!("{base}/{path}"), 0o644, data);
            // Keep each packed module's own modules.dep line (its paths as packed).
            if let Some(line) = dep_text
                .lines()
                .find(|l| l.split(':').next() == Some(rel.as_str()))
            {
                if spec.keep_compressed {
                    dep_lines.push_str(line);
                } else {
                    dep_lines.push_str(&unpacked_dep_line(line));
                }
                dep_lines.push('\n');
            }
            packed.modules.push(name_of(rel));
        }
        add_file(
            &mut dirs,
            format!("{base}/modules.dep"),
            0o644,
            dep_lines.into_bytes(),
        );
        add_file(
            &mut dirs,
            format!("{base}/modules.builtin"),
            0o644,
            builtin_text.into_bytes(),
        );
    }
    for (src, dst) in &spec.files {
        let dst = dst.trim_start_matches('/').to_string();
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(src).ctx("stat", src)?.permissions().mode() & 0o7777
        };
        add_file(&mut dirs, dst, mode, read(src)?);
    }
    let mut out: Vec<(String, Node)> = dirs.into_iter().map(|d| (d, Node::Dir)).collect();
    out.push(("dev/console".into(), Node::Char { major: 5, minor: 1 }));
    out.extend(files);
    Ok((out, packed))
}

/// Writes the compressed initramfs to `out` (temporary file, then rename).
pub fn build(spec: &Spec, out: &Path, compression: Compression) -> Result<Packed> {
    let (entries, packed) = entries(spec)?;
    let tmp = out.with_extension("tmp");
    let f = fs::File::create(&tmp).ctx("create", &tmp)?;
    let mut w = Encoder::new(compression, Effort::Best, f).ctx("create", &tmp)?;
    if let Err(e) = write_cpio(&entries, &mut w).ctx("write", &tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    w.finish(&tmp, out)?;
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut v = Vec::new();
        write_cpio(
            &[
                ("etc".into(), Node::Dir),
                (
                    "etc/a".into(),
                    Node::File {
                        mode: 0o644,
                        data: b"hello".to_vec(),
                    },
                ),
            ],
            &mut v,
        )
        .unwrap();
        assert!(v.starts_with(b"070701"));
        // Every header starts on a 4-byte boundary; the trailer ends the archive.
        let s = String::from_utf8_lossy(&v);
        for (i, _) in s.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
        assert!(s.contains("etc/a\0"));
        assert!(s.contains("hello"));
        assert!(s.ends_with("TRAILER!!!\0\0\0\0") || s.contains("TRAILER!!!"));
        assert_eq!(v.len() % 4, 0);
    }
}
