//! OCI images for the build tests: layouts made by `umoci` from directory trees (the
//! reference), layouts written by hand from raw layer blobs (for layers no tool would
//! make), and trees listed entry by entry to compare what keel built with what umoci unpacked.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::run;

/// Runs `umoci` with `args` in `dir`; panics with its output on failure.
pub fn umoci(dir: &Path, args: &[&str]) {
    let out = Command::new("umoci")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("umoci (apt-get install umoci)");
    assert!(out.status.success(), "umoci {args:?}: {out:?}");
}

/// One entry of a tree, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `f`, `d`, `l`, `c`, `b`, `p`.
    pub kind: char,
    /// Permission and set-id bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (files), 0 otherwise.
    pub size: u64,
    /// SHA-256 of a file's contents.
    pub sha256: String,
    /// A symlink's target.
    pub link: String,
    /// A device's number.
    pub rdev: u64,
    /// Hard links (files).
    pub nlink: u64,
    /// Modification time (seconds).
    pub mtime: i64,
    /// Extended attributes, sorted.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 64 << 10];
    let n = rustix::fs::llistxattr(p, &mut names).unwrap_or(0);
    let mut out: Vec<(String, Vec<u8>)> = names[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let name = String::from_utf8_lossy(name).into_owned();
            let mut v = vec![0u8; 64 << 10];
            let k = rustix::fs::lgetxattr(p, name.as_str(), &mut v).unwrap_or(0);
            v.truncate(k);
            (name, v)
        })
        .collect();
    out.sort();
    out
}

/// Every entry below `root` (the root itself as `.`), by path.
pub fn list(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, Entry>) {
        let p = root.join(rel);
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            'f'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else {
            'p'
        };
        let sha256 = if kind == 'f' {
            keel_proto::hex::encode(&Sha256::digest(fs::read(&p).unwrap()))
        } else {
            String::new()
        };
        let key = if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.display().to_string()
        };
        out.insert(
            key,
            Entry {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == 'f' { m.size() } else { 0 },
                sha256,
                link: if kind == 'l' {
                    fs::read_link(&p).unwrap().display().to_string()
                } else {
                    String::new()
                },
                rdev: if kind == 'c' || kind == 'b' {
                    m.rdev()
                } else {
                    0
                },
                nlink: if kind == 'd' { 0 } else { m.nlink() },
                mtime: m.mtime(),
                xattrs: if kind == 'l' { Vec::new() } else { xattrs(&p) },
            },
        );
        if kind == 'd' {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), out);
            }
        }
    }
    walk(root, Path::new(""), &mut out);
    out
}

/// The differences between two listings (`mtimes`: compare them too), one line each.
pub fn diff(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>, mtimes: bool) -> Vec<String> {
    let mut d = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => d.push(format!("only in the first: {k}")),
            Some(vb) => {
                let (mut x, mut y) = (va.clone(), vb.clone());
                if !mtimes {
                    x.mtime = 0;
                    y.mtime = 0;
                }
                if x != y {
                    d.push(format!("{k}: {x:?} != {y:?}"));
                }
            }
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            d.push(format!("only in the second: {k}"));
        }
    }
    d
}

/// `sha256:<hex>` of `b`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", keel_proto::hex::encode(&Sha256::digest(b)))
}

/// Writes an OCI layout at `dir` tagged `tag` whose image has `layers` (raw blobs, each with
/// its media type), as given: nothing checked, so tests can hand keel what no tool makes.
pub fn layout(dir: &Path, tag: &str, layers: &[(&str, Vec<u8>)]) -> PathBuf {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |b: &[u8]| {
        let d = digest(b);
        fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    let mut descs = Vec::new();
    for (mt, b) in layers {
        descs.push(serde_json::json!({"mediaType": mt, "digest": put(b), "size": b.len()}));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/app"], "Env": ["A=1"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest),
                       "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}]
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    dir.to_path_buf()
}

/// A raw tar entry: `name` written into the header as given (no checks), `kind` a tar type
/// byte, `link` the link target, `data` the contents.
pub fn raw_entry(name: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{:0w$o}\0", v, w = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, if kind == b'5' { 0o755 } else { 0o644 });
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, data.len() as u64);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

/// A tar stream of `entries` ([`raw_entry`]) with its end-of-archive blocks.
pub fn raw_tar(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut v: Vec<u8> = entries.concat();
    v.extend_from_slice(&[0u8; 1024]);
    v
}

/// `data` gzip-compressed by Debian's `gzip -n`.
pub fn gzip(dir: &Path, data: &[u8]) -> Vec<u8> {
    let f = dir.join("layer.tar");
    fs::write(&f, data).unwrap();
    run(Command::new("gzip").args(["-n", "-f"]).arg(&f));
    let g = dir.join("layer.tar.gz");
    let b = fs::read(&g).unwrap();
    fs::remove_file(g).unwrap();
    b
}
