//! Image references as `keelctl build --from` takes them, parsed without I/O.

use crate::error::OciError;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `docker://HOST[:PORT]/REPO[:TAG|@sha256:…]`: a registry (API v2).
    Registry {
        /// `HOST[:PORT]`.
        host: String,
        /// The repository, e.g. `library/debian`.
        repo: String,
        /// A tag or a `sha256:…` digest.
        reference: String,
    },
    /// `oci:DIR[:TAG]`: an OCI image layout.
    Layout {
        /// The layout's directory.
        dir: String,
        /// The tag (`org.opencontainers.image.ref.name`); none: the index's only image.
        tag: Option<String>,
    },
    /// `docker-archive:FILE.tar`, as `docker save` writes.
    DockerArchive {
        /// The archive.
        file: String,
    },
    /// `dir:PATH`: a directory tree taken as it is.
    Dir {
        /// The tree.
        path: String,
    },
}

/// Parses a reference.
pub fn parse(s: &str) -> Result<ImageRef, OciError> {
    let bad = |why: &str| OciError::Reference {
        reference: s.to_string(),
        why: why.to_string(),
    };
    if let Some(rest) = s.strip_prefix("docker://") {
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected docker://HOST[:PORT]/REPO[:TAG]"))?;
        if host.is_empty() || path.is_empty() {
            return Err(bad("expected docker://HOST[:PORT]/REPO[:TAG]"));
        }
        let (repo, reference) = if let Some((r, d)) = path.split_once('@') {
            if !d.starts_with("sha256:") || d.len() != 71 {
                return Err(bad("a digest reference must be @sha256:<64 hex digits>"));
            }
            (r, d.to_string())
        } else {
            match path.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t.to_string()),
                _ => (path, "latest".to_string()),
            }
        };
        let repo_ok = repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
        if !repo_ok {
            return Err(bad("the repository must be lower-case path components"));
        }
        if reference.is_empty() || reference.len() > 128 {
            return Err(bad("the tag must be 1 to 128 characters"));
        }
        return Ok(ImageRef::Registry {
            host: host.to_string(),
            repo: repo.to_string(),
            reference,
        });
    }
    if let Some(rest) = s.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !d.is_empty() && !t.contains('/') => (d, Some(t.to_string())),
            _ => (rest, None),
        };
        if dir.is_empty() {
            return Err(bad("expected oci:DIR[:TAG]"));
        }
        return Ok(ImageRef::Layout {
            dir: dir.to_string(),
            tag,
        });
    }
    if let Some(f) = s.strip_prefix("docker-archive:") {
        if f.is_empty() {
            return Err(bad("expected docker-archive:FILE.tar"));
        }
        return Ok(ImageRef::DockerArchive {
            file: f.to_string(),
        });
    }
    if let Some(p) = s.strip_prefix("dir:") {
        if p.is_empty() {
            return Err(bad("expected dir:PATH"));
        }
        return Ok(ImageRef::Dir {
            path: p.to_string(),
        });
    }
    Err(bad(
        "expected docker://HOST/REPO[:TAG], oci:DIR[:TAG], docker-archive:FILE or dir:PATH",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(
            parse("docker://127.0.0.1:5000/keel/app:v2").unwrap(),
            ImageRef::Registry {
                host: "127.0.0.1:5000".into(),
                repo: "keel/app".into(),
                reference: "v2".into()
            }
        );
        let d = format!("docker://r.example/app@sha256:{}", "a".repeat(64));
        assert!(
            matches!(parse(&d).unwrap(), ImageRef::Registry { reference, .. } if reference.starts_with("sha256:"))
        );
        assert!(
            matches!(parse("docker://h/app").unwrap(), ImageRef::Registry { reference, .. } if reference == "latest")
        );
        assert_eq!(
            parse("oci:/tmp/img:t").unwrap(),
            ImageRef::Layout {
                dir: "/tmp/img".into(),
                tag: Some("t".into())
            }
        );
        assert_eq!(
            parse("oci:img").unwrap(),
            ImageRef::Layout {
                dir: "img".into(),
                tag: None
            }
        );
        assert!(matches!(parse("dir:/x").unwrap(), ImageRef::Dir { .. }));
        assert!(matches!(
            parse("docker-archive:a.tar").unwrap(),
            ImageRef::DockerArchive { .. }
        ));
        for bad in [
            "docker://h",
            "docker://h/App",
            "docker://h/a@sha256:12",
            "oci:",
            "ftp:x",
            "dir:",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
