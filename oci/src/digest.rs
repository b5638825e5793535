//! Content digests (`sha256:<hex>`): parsed strictly (a digest names a blob file, so it is
//! never a path), and checked over a blob's bytes before any of them is used.

use std::io::Read;

use sha2::{Digest as _, Sha256};

use crate::error::OciError;

/// A `sha256:` digest, its 64 hex digits lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lower-case hex digits>`; anything else (another algorithm, a `/`,
    /// upper case) is refused.
    pub fn parse(s: &str) -> Result<Digest, OciError> {
        let ok = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if !ok {
            return Err(OciError::Spec {
                what: format!("digest {s:?}"),
                why: "not sha256:<64 lower-case hex digits>".into(),
            });
        }
        Ok(Digest(s.to_string()))
    }

    /// The hex digits (the blob's file name in a layout).
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hashes everything `r` gives (in 64 KiB reads) and checks it is `want`, `size` bytes when
/// given.
pub fn check<R: Read>(mut r: R, want: &Digest, size: Option<u64>) -> Result<u64, OciError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(|e| OciError::Layer {
            layer: want.to_string(),
            why: format!("reading: {e}"),
        })?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let actual = format!("sha256:{}", hex(&h.finalize()));
    if actual != want.0 {
        return Err(OciError::Digest {
            digest: want.to_string(),
            actual,
            size: n,
        });
    }
    if let Some(s) = size {
        if s != n {
            return Err(OciError::Spec {
                what: format!("blob {want}"),
                why: format!("{n} bytes, the manifest says {s}"),
            });
        }
    }
    Ok(n)
}

/// `sha256:<hex>` of `bytes`.
pub fn of(bytes: &[u8]) -> Digest {
    Digest(format!("sha256:{}", hex(&Sha256::digest(bytes))))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let d = of(b"hello");
        assert_eq!(
            d.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
        assert!(check(&b"hello"[..], &d, Some(5)).is_ok());
        assert!(matches!(
            check(&b"hellO"[..], &d, None),
            Err(OciError::Digest { .. })
        ));
        assert!(check(&b"hello"[..], &d, Some(6)).is_err());
        for bad in [
            "sha512:ab",
            "sha256:../../etc/passwd",
            &d.as_str().to_uppercase(),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }
}
