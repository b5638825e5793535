//! Whether an offered manifest may be staged: a pure decision over the manifest, the trusted
//! keys and what the device runs and holds. Runs before a single image byte is accepted.

use keel_proto::bootstate::ImageRecord;
use keel_proto::manifest::{ManifestError, SignedManifest, VerifyingKey};
use keel_proto::message::{ErrorCode, Response};

/// What the device knows when a manifest is offered.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Trusted public keys.
    pub keys: &'a [VerifyingKey],
    /// The product name images must carry (config, else the booted image's name).
    pub name: Option<&'a str>,
    /// The booted image (None when initstage left no report).
    pub booted: Option<&'a ImageRecord>,
    /// The complete image staged on `newimg`, if any.
    pub staged: Option<&'a ImageRecord>,
    /// Digests that were rolled back on this device.
    pub rejected: &'a [String],
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Accept the image bytes.
    Accept,
    /// Nothing to do (same version already running or staged).
    UpToDate(String),
}

/// A refusal, sent to the client as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The class.
    pub code: ErrorCode,
    /// What was wrong.
    pub message: String,
}

impl Refusal {
    /// A refusal of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<Refusal> for Response {
    fn from(r: Refusal) -> Response {
        Response::error(r.code, r.message)
    }
}

/// Decides whether `signed` may be staged.
pub fn admit(signed: &SignedManifest, ctx: &Context<'_>) -> Result<Admit, Refusal> {
    let m = &signed.manifest;
    m.validate()
        .map_err(|e| Refusal::new(ErrorCode::BadManifest, e.to_string()))?;
    signed.verify(ctx.keys).map_err(|e| match e {
        ManifestError::BadSignature { .. } | ManifestError::SignatureEncoding => {
            Refusal::new(ErrorCode::BadSignature, e.to_string())
        }
        ManifestError::NoKeys => Refusal::new(ErrorCode::Unavailable, e.to_string()),
        other => Refusal::new(ErrorCode::BadManifest, other.to_string()),
    })?;
    let expected = ctx.name.ok_or_else(|| {
        Refusal::new(
            ErrorCode::Unavailable,
            "this device's product name is unknown (the booted image has no manifest): set name in agent.toml",
        )
    })?;
    if m.name != expected {
        return Err(Refusal::new(
            ErrorCode::WrongName,
            format!("image is for {:?}, this device runs {expected:?}", m.name),
        ));
    }
    let sha = m.sha256.to_ascii_lowercase();
    if ctx.rejected.iter().any(|r| r.eq_ignore_ascii_case(&sha)) {
        return Err(Refusal::new(
            ErrorCode::Rejected,
            format!(
                "version {} (sha256 {}) was rolled back on this device before",
                m.version,
                &sha[..12]
            ),
        ));
    }
    let running = ctx.booted.map(|b| b.version).unwrap_or(0);
    if let Some(min) = m.min_version {
        if running < min {
            return Err(Refusal::new(
                ErrorCode::MinVersion,
                format!("image needs version {min} or later running, this device runs {running}"),
            ));
        }
    }
    if let Some(b) = ctx.booted {
        if m.version == b.version {
            if !b.sha256.is_empty() && !b.sha256.eq_ignore_ascii_case(&sha) {
                return Err(Refusal::new(
                    ErrorCode::Downgrade,
                    format!(
                        "version {} is running with another digest: versions are never reused",
                        m.version
                    ),
                ));
            }
            return Ok(Admit::UpToDate(format!(
                "version {} is already running",
                m.version
            )));
        }
        if m.version < b.version {
            return Err(Refusal::new(
                ErrorCode::Downgrade,
                format!(
                    "version {} is older than the running version {}",
                    m.version, b.version
                ),
            ));
        }
    }
    if let Some(s) = ctx.staged {
        if m.version == s.version && s.sha256.eq_ignore_ascii_case(&sha) {
            return Ok(Admit::UpToDate(format!(
                "version {} is already staged",
                m.version
            )));
        }
        if m.version <= s.version {
            return Err(Refusal::new(
                ErrorCode::Downgrade,
                format!(
                    "version {} is not newer than the staged version {}",
                    m.version, s.version
                ),
            ));
        }
    }
    Ok(Admit::Accept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::manifest::{Manifest, SigningKey, MANIFEST_FORMAT};

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn signed(version: u64, byte: u8, min: Option<u64>) -> SignedManifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "app".into(),
            version,
            size: 10,
            sha256: format!("{byte:02x}").repeat(32),
            created: 1,
            min_version: min,
            verity: None,
        }
        .sign(&key(1))
    }

    fn rec(version: u64, byte: u8) -> ImageRecord {
        ImageRecord {
            name: "app".into(),
            version,
            sha256: format!("{byte:02x}").repeat(32),
            size: 10,
        }
    }

    fn check(
        m: &SignedManifest,
        booted: Option<&ImageRecord>,
        staged: Option<&ImageRecord>,
    ) -> Result<Admit, Refusal> {
        let keys = [key(1).verifying_key()];
        admit(
            m,
            &Context {
                keys: &keys,
                name: Some("app"),
                booted,
                staged,
                rejected: &[],
            },
        )
    }

    fn code(r: Result<Admit, Refusal>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn newer_is_accepted() {
        assert_eq!(
            check(&signed(2, 2, None), Some(&rec(1, 1)), None),
            Ok(Admit::Accept)
        );
        assert_eq!(
            check(&signed(3, 3, None), Some(&rec(1, 1)), Some(&rec(2, 2))),
            Ok(Admit::Accept)
        );
        assert_eq!(check(&signed(1, 1, None), None, None), Ok(Admit::Accept));
    }

    #[test]
    fn equal_versions_are_no_ops() {
        assert!(matches!(
            check(&signed(1, 1, None), Some(&rec(1, 1)), None),
            Ok(Admit::UpToDate(m)) if m.contains("running")
        ));
        assert!(matches!(
            check(&signed(2, 2, None), Some(&rec(1, 1)), Some(&rec(2, 2))),
            Ok(Admit::UpToDate(m)) if m.contains("staged")
        ));
    }

    #[test]
    fn older_or_reused_versions_are_downgrades() {
        let b = rec(5, 5);
        assert_eq!(
            code(check(&signed(4, 4, None), Some(&b), None)),
            ErrorCode::Downgrade
        );
        assert_eq!(
            code(check(&signed(5, 9, None), Some(&b), None)),
            ErrorCode::Downgrade
        );
        assert_eq!(
            code(check(&signed(6, 6, None), Some(&b), Some(&rec(7, 7)))),
            ErrorCode::Downgrade
        );
        assert_eq!(
            code(check(&signed(7, 8, None), Some(&b), Some(&rec(7, 7)))),
            ErrorCode::Downgrade
        );
    }

    #[test]
    fn signature_name_min_version_and_rejections() {
        let mut m = signed(2, 2, None);
        m.manifest.version = 3;
        assert_eq!(code(check(&m, None, None)), ErrorCode::BadSignature);
        let other = Manifest {
            ..signed(2, 2, None).manifest
        }
        .sign(&key(2));
        assert_eq!(code(check(&other, None, None)), ErrorCode::BadSignature);
        let mut n = signed(2, 2, None).manifest;
        n.name = "other".into();
        let r = check(&n.sign(&key(1)), None, None).unwrap_err();
        assert_eq!(r.code, ErrorCode::WrongName);
        assert!(r.message.contains("\"other\""), "{}", r.message);
        assert_eq!(
            code(check(&signed(9, 9, Some(3)), Some(&rec(2, 2)), None)),
            ErrorCode::MinVersion
        );
        let keys = [key(1).verifying_key()];
        let rejected = ["22".repeat(32)];
        let ctx = Context {
            keys: &keys,
            name: Some("app"),
            booted: None,
            staged: None,
            rejected: &rejected,
        };
        assert_eq!(
            admit(&signed(2, 0x22, None), &ctx).unwrap_err().code,
            ErrorCode::Rejected
        );
        let ctx = Context {
            name: None,
            rejected: &[],
            ..ctx
        };
        assert_eq!(
            admit(&signed(2, 2, None), &ctx).unwrap_err().code,
            ErrorCode::Unavailable
        );
        let ctx = Context {
            keys: &[],
            name: Some("app"),
            ..ctx
        };
        assert_eq!(
            admit(&signed(2, 2, None), &ctx).unwrap_err().code,
            ErrorCode::Unavailable
        );
    }
}
