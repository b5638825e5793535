//! What a layer's tar entry asks for, decided from its path alone (pure): where it goes, or
//! which lower-layer path it whites out. Paths that would leave the root — absolute, or with
//! a `..` component — are refused here, before any file is touched.

/// The whiteout prefix (`.wh.NAME` deletes `NAME` of lower layers).
pub const WHITEOUT: &[u8] = b".wh.";
/// The opaque-directory marker (`DIR/.wh..wh..opq` hides everything lower layers put in DIR).
pub const OPAQUE: &[u8] = b".wh..wh..opq";

/// What an entry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The root directory itself (`.` or `./`): its metadata.
    Root,
    /// Put an entry at `parent`/`name`.
    Put {
        /// The parent directory's components.
        parent: Vec<Vec<u8>>,
        /// The entry's name.
        name: Vec<u8>,
    },
    /// Remove lower layers' `parent`/`name`.
    Whiteout {
        /// The parent directory's components.
        parent: Vec<Vec<u8>>,
        /// The name removed.
        name: Vec<u8>,
    },
    /// Remove everything lower layers put in `dir`.
    Opaque {
        /// The directory's components.
        dir: Vec<Vec<u8>>,
    },
}

/// A path's components with `.` and empty ones dropped; absolute paths and `..` refused.
pub fn components(path: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    if path.first() == Some(&b'/') {
        return Err("an absolute path (refused: it would name the host's tree)");
    }
    if path.contains(&0) {
        return Err("a NUL byte in the path");
    }
    let mut v = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("a `..` component (refused: it would leave the root)"),
            c => v.push(c.to_vec()),
        }
    }
    Ok(v)
}

/// What the entry at `path` does.
pub fn classify(path: &[u8]) -> Result<Action, &'static str> {
    let mut comps = components(path)?;
    let Some(name) = comps.pop() else {
        return Ok(Action::Root);
    };
    if name == OPAQUE {
        return Ok(Action::Opaque { dir: comps });
    }
    if let Some(target) = name.strip_prefix(WHITEOUT) {
        if target.is_empty() || target == b"." || target == b".." {
            return Err("a whiteout without a name");
        }
        return Ok(Action::Whiteout {
            parent: comps,
            name: target.to_vec(),
        });
    }
    Ok(Action::Put {
        parent: comps,
        name,
    })
}

/// `a/b/c` from components.
pub fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<Vec<u8>> {
        s.iter().map(|c| c.as_bytes().to_vec()).collect()
    }

    #[test]
    fn actions() {
        assert_eq!(classify(b"./").unwrap(), Action::Root);
        assert_eq!(classify(b".").unwrap(), Action::Root);
        assert_eq!(
            classify(b"./usr//bin/sh").unwrap(),
            Action::Put {
                parent: v(&["usr", "bin"]),
                name: b"sh".to_vec()
            }
        );
        assert_eq!(
            classify(b"etc/.wh.a").unwrap(),
            Action::Whiteout {
                parent: v(&["etc"]),
                name: b"a".to_vec()
            }
        );
        assert_eq!(
            classify(b"d/.wh..wh..opq").unwrap(),
            Action::Opaque { dir: v(&["d"]) }
        );
        assert_eq!(
            classify(b".wh..wh..opq").unwrap(),
            Action::Opaque { dir: vec![] }
        );
        for bad in [
            &b"/etc/passwd"[..],
            b"a/../../x",
            b"..",
            b"d/.wh.",
            b"d/.wh..",
            b"a\0b",
        ] {
            assert!(classify(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(join(&v(&["a", "b"])), b"a/b");
    }
}
