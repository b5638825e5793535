//! Changes to the overlay's `persistent/` layer, staged by the running system (`keelctl
//! persist`) and applied by initstage at the next boot, before the layer is mounted: writing
//! into a lower layer of a mounted overlay is undefined behaviour, so nothing does.
//!
//! On the overlay partition, `persist/<seq>/` is one batch: `blobs/<n>` holds the bytes of
//! each file it writes, and `plan` (written last, atomically) is its commit marker. A
//! batch without a plan is a cut `keelctl persist`: initstage drops it. Complete batches are
//! applied in order of `seq`; every step is idempotent (a file goes in through a temp name
//! and a rename, a removal of what is gone is done), so a power cut replays the batch.
//!
//! The plan is text, one entry a line after a `keel-persist 1` header, paths last and
//! percent-encoded where a byte is a space, a control character, `%` or not ASCII:
//!
//! ```text
//! keel-persist 1
//! dir 755 0 0 /etc/app
//! file 640 1000 1000 0 12 <sha256> /etc/app/conf
//! symlink 777 0 0 /etc/app/current conf
//! remove /etc/old%20name
//! ```
//!
//! (modes octal; a file's blob number, size and SHA-256 before its path). Text, not JSON: a
//! JSON decoder for it would cost initstage tens of KB, and the plan is easy to read by eye.
//!
//! Pure: the plan, its paths and its checks; [`crate::report`] carries the outcome.

/// The directory of staged batches on the overlay partition.
pub const PERSIST_DIR: &str = "persist";
/// A batch's commit marker.
pub const PLAN_FILE: &str = "plan";
/// Its temp name before the rename.
pub const PLAN_TMP: &str = "plan.tmp";
/// A batch's file contents.
pub const BLOBS_DIR: &str = "blobs";
/// Where initstage keeps a batch it refused (not applied, nothing lost): `rejected-<seq>`.
pub const REJECTED_PREFIX: &str = "rejected-";
/// The plan format.
pub const PLAN_FORMAT: u32 = 1;
/// Most entries in one batch.
pub const MAX_OPS: usize = 10_000;
/// Largest plan file.
pub const MAX_PLAN_BYTES: u64 = 4 << 20;
/// Largest single file a batch carries.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Longest path.
pub const MAX_PATH: usize = 4096;

/// One staged batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// [`PLAN_FORMAT`].
    pub format: u32,
    /// What to do, in order.
    pub ops: Vec<Op>,
}

/// Owner and permission bits of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// One change to `persistent/`. Paths are absolute as the running system sees them (`/etc/x`
/// lands at `persistent/etc/x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A directory (made if missing; its mode and owner set).
    Dir {
        /// Where.
        path: String,
        /// Mode and owner.
        meta: Meta,
    },
    /// A regular file with the bytes of `blobs/<blob>`.
    File {
        /// Where.
        path: String,
        /// Mode and owner.
        meta: Meta,
        /// Its number under `blobs/`.
        blob: u32,
        /// Its size.
        size: u64,
        /// Its SHA-256 (hex).
        sha256: String,
    },
    /// A symbolic link (its target stored as it is: never followed by keel).
    Symlink {
        /// Where.
        path: String,
        /// What it points to.
        target: String,
        /// Owner (a link's mode means nothing).
        meta: Meta,
    },
    /// Whatever is at the path in `persistent/`, a directory with everything under it.
    Remove {
        /// Where.
        path: String,
    },
}

impl Op {
    /// The path the entry changes.
    pub fn path(&self) -> &str {
        match self {
            Op::Dir { path, .. }
            | Op::File { path, .. }
            | Op::Symlink { path, .. }
            | Op::Remove { path } => path,
        }
    }
}

/// The components of `path` if it is absolute and plain: no `.`, `..` or empty component,
/// no NUL, not `/` itself, within [`MAX_PATH`]; the reason otherwise.
pub fn components(path: &str) -> Result<Vec<&str>, String> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("{path:?} is not an absolute path"))?;
    if path.len() > MAX_PATH {
        return Err(format!("a path of {} bytes is too long", path.len()));
    }
    if path.contains('\0') {
        return Err(format!("{path:?} holds a NUL byte"));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if rest.is_empty() {
        return Err("\"/\" itself cannot be persisted: name files or directories under it".into());
    }
    if let Some(bad) = parts
        .iter()
        .find(|c| c.is_empty() || **c == "." || **c == ".." || c.len() > 255)
    {
        return Err(format!(
            "{path:?} has a {bad:?} component: give a plain absolute path"
        ));
    }
    Ok(parts)
}

/// The path as [`components`] would accept it: `//etc/./x/` → `/etc/x` (no `..` resolved:
/// that is the caller's, against the live file system).
pub fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

impl Plan {
    /// Parses and checks a plan read from disk: header, every line, entry count, paths,
    /// modes, sizes, digests, distinct blobs.
    pub fn parse(bytes: &[u8]) -> Result<Plan, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "the plan is not text".to_string())?;
        let mut lines = text.lines();
        let head = lines.next().unwrap_or_default();
        let format = head
            .strip_prefix("keel-persist ")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("not a keel persist plan (first line {head:?})"))?;
        if format != PLAN_FORMAT {
            return Err(format!(
                "plan format {format} (this initstage reads {PLAN_FORMAT})"
            ));
        }
        let mut ops = Vec::new();
        for (i, l) in lines.enumerate() {
            let op = parse_line(l).ok_or_else(|| {
                format!(
                    "plan line {}: {l:?} is not an entry this initstage knows",
                    i + 2
                )
            })?;
            ops.push(op);
        }
        let p = Plan { format, ops };
        p.check()?;
        Ok(p)
    }

    /// The checks of [`Plan::parse`].
    pub fn check(&self) -> Result<(), String> {
        if self.format != PLAN_FORMAT {
            return Err(format!(
                "plan format {} (this initstage reads {PLAN_FORMAT})",
                self.format
            ));
        }
        if self.ops.is_empty() || self.ops.len() > MAX_OPS {
            return Err(format!(
                "{} entries (1 to {MAX_OPS} in a batch)",
                self.ops.len()
            ));
        }
        let mut blobs = Vec::new();
        for op in &self.ops {
            let path = op.path();
            components(path).map_err(|e| format!("entry {path:?}: {e}"))?;
            let why = match op {
                Op::Dir { meta, .. } | Op::Symlink { meta, .. } | Op::File { meta, .. }
                    if meta.mode > 0o7777 =>
                {
                    "its mode has more than the permission bits"
                }
                Op::File { size, .. } if *size > MAX_FILE_BYTES => "its size is over the cap",
                Op::File { sha256, .. }
                    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    "its digest is not a SHA-256"
                }
                Op::Symlink { target, .. }
                    if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') =>
                {
                    "its link target is empty, too long or holds a NUL"
                }
                Op::File { blob, .. } => {
                    blobs.push(*blob);
                    continue;
                }
                _ => continue,
            };
            return Err(format!("entry {path:?}: {why}"));
        }
        blobs.sort_unstable();
        if let Some(w) = blobs.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("blob {} is used twice", w[0]));
        }
        Ok(())
    }

    /// The plan as text ([`Plan::parse`] reads it back).
    pub fn to_text(&self) -> Vec<u8> {
        let mut t = format!("keel-persist {}\n", self.format);
        let m = |m: &Meta| format!("{:o} {} {}", m.mode, m.uid, m.gid);
        for op in &self.ops {
            t += &match op {
                Op::Dir { path, meta } => format!("dir {} {}", m(meta), encode(path)),
                Op::File {
                    path,
                    meta,
                    blob,
                    size,
                    sha256,
                } => format!("file {} {blob} {size} {sha256} {}", m(meta), encode(path)),
                Op::Symlink { path, target, meta } => {
                    format!("symlink {} {} {}", m(meta), encode(path), encode(target))
                }
                Op::Remove { path } => format!("remove {}", encode(path)),
            };
            t.push('\n');
        }
        t.into_bytes()
    }
}

/// `%XX` for a space, a control character, `%` and every non-ASCII byte.
fn encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b <= b' ' || b == b'%' || b >= 0x7f {
            o += &format!("%{b:02X}");
        } else {
            o.push(char::from(b));
        }
    }
    o
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut o = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            o.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            o.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(o).ok()
}

/// One entry line; `None` for anything else (the caller names the line).
fn parse_line(l: &str) -> Option<Op> {
    let f: Vec<&str> = l.split(' ').collect();
    let n = |i: usize, radix: u32| f.get(i).and_then(|v| u32::from_str_radix(v, radix).ok());
    let meta = || {
        Some(Meta {
            mode: n(1, 8)?,
            uid: n(2, 10)?,
            gid: n(3, 10)?,
        })
    };
    let text = |i: usize| f.get(i).and_then(|v| decode(v));
    match (f[0], f.len()) {
        ("dir", 5) => Some(Op::Dir {
            meta: meta()?,
            path: text(4)?,
        }),
        ("file", 8) => Some(Op::File {
            meta: meta()?,
            blob: n(4, 10)?,
            size: f[5].parse().ok()?,
            sha256: f[6].to_string(),
            path: text(7)?,
        }),
        ("symlink", 6) => Some(Op::Symlink {
            meta: meta()?,
            path: text(4)?,
            target: text(5)?,
        }),
        ("remove", 2) => Some(Op::Remove { path: text(1)? }),
        _ => None,
    }
}

/// A batch's sequence number from its directory name (`7` → 7); `None` for anything else
/// (a rejected batch, a stray file).
pub fn batch_seq(name: &str) -> Option<u64> {
    (!name.is_empty() && name.len() <= 20 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: Meta = Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
    };

    fn file(path: &str, blob: u32) -> Op {
        Op::File {
            path: path.into(),
            meta: M,
            blob,
            size: 3,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn paths_must_be_plain_and_absolute() {
        assert_eq!(components("/etc/ssh/x").unwrap(), ["etc", "ssh", "x"]);
        for (p, why) in [
            ("etc/x", "not an absolute"),
            ("/", "\"/\" itself"),
            ("/etc/../x", "\"..\" component"),
            ("/etc/./x", "\".\" component"),
            ("/etc//x", "\"\" component"),
            ("/etc/x/", "\"\" component"),
            ("/a\0b", "NUL"),
        ] {
            let e = components(p).unwrap_err();
            assert!(e.contains(why), "{p:?}: {e}");
        }
        assert!(components(&format!("/{}", "a".repeat(256)))
            .unwrap_err()
            .contains("component"));
        assert_eq!(normalize("//etc/./x/"), "/etc/x");
    }

    #[test]
    fn a_plan_round_trips_and_bad_ones_are_named() {
        let p = Plan {
            format: PLAN_FORMAT,
            ops: vec![
                Op::Dir {
                    path: "/etc/app".into(),
                    meta: M,
                },
                file("/etc/app/conf", 0),
                Op::Symlink {
                    path: "/etc/app/current".into(),
                    target: "conf".into(),
                    meta: M,
                },
                Op::Remove {
                    path: "/etc/old".into(),
                },
            ],
        };
        assert_eq!(Plan::parse(&p.to_text()).unwrap(), p);
        // Odd names survive the text form.
        let odd = Plan {
            format: PLAN_FORMAT,
            ops: vec![Op::Symlink {
                path: "/etc/a b%c\u{e9}\n".into(),
                target: "../x y".into(),
                meta: M,
            }],
        };
        assert_eq!(Plan::parse(&odd.to_text()).unwrap(), odd);
        let bad = |ops: Vec<Op>, want: &str| {
            let e = Plan {
                format: PLAN_FORMAT,
                ops,
            }
            .check()
            .unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(vec![], "0 entries");
        bad(vec![file("/a", 1), file("/b", 1)], "blob 1 is used twice");
        bad(vec![file("/../etc/shadow", 0)], "\"..\" component");
        bad(
            vec![Op::Dir {
                path: "/d".into(),
                meta: Meta { mode: 0o17777, ..M },
            }],
            "its mode",
        );
        let mut f = file("/a", 0);
        if let Op::File { sha256, size, .. } = &mut f {
            *sha256 = "xyz".into();
            *size = 1;
        }
        bad(vec![f], "not a SHA-256");
        for (text, want) in [
            (&b"keel-persist 2\nremove /a\n"[..], "plan format 2"),
            (b"{", "not a keel persist plan"),
            (
                b"keel-persist 1\nfile 644 0 0 /a\n",
                "line 2: \"file 644 0 0 /a\" is not an entry",
            ),
            (b"keel-persist 1\ndir 9z 0 0 /a\n", "line 2"),
            (b"keel-persist 1\nremove /a%2\n", "line 2"),
            (
                b"keel-persist 1\nmkfifo /a\n",
                "not an entry this initstage knows",
            ),
            (b"keel-persist 1\nremove /a/../b\n", "\"..\" component"),
        ] {
            let e = Plan::parse(text).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn only_numbered_directories_are_batches() {
        assert_eq!(batch_seq("12"), Some(12));
        for n in ["", "rejected-3", "1a", "-1", "123456789012345678901"] {
            assert_eq!(batch_seq(n), None, "{n}");
        }
    }
}
