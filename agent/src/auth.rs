//! Key authentication of a session: the challenge each hello carries, the authorized keys,
//! and the check of an `auth` request. What an authenticated key may then do is
//! [`crate::authz`]'s decision, not this module's.

use std::path::Path;

use keel_proto::exec::{fingerprint, from_b64, verify_auth, CHALLENGE_LEN};
use keel_proto::manifest::VerifyingKey;
use keel_proto::message::ErrorCode;

use crate::error::Error;
use crate::verify::Refusal;

/// A session's challenge: fresh random bytes from the kernel.
#[derive(Debug, Clone)]
pub struct Challenge(pub [u8; CHALLENGE_LEN]);

impl Challenge {
    /// A new challenge. `None` if the kernel gave no random bytes (then no session can
    /// authenticate: fail closed).
    pub fn new() -> Option<Challenge> {
        let mut c = [0u8; CHALLENGE_LEN];
        keel_sys::random::fill(&mut c).ok()?;
        Some(Challenge(c))
    }

    /// Hex, as the hello carries it.
    pub fn hex(&self) -> String {
        keel_proto::hex::encode(&self.0)
    }
}

/// Loads `[exec] authorized_keys`: every PEM block must be an ed25519 public key.
pub fn load_authorized(path: &Path) -> Result<Vec<VerifyingKey>, Error> {
    let bad = |detail: String| Error::AuthorizedKeys {
        path: path.to_path_buf(),
        detail,
    };
    let pem = keel_sys::durable::read_regular(path, 1 << 20)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no such file".into()))?;
    let pem = String::from_utf8(pem).map_err(|_| bad("not UTF-8 text".into()))?;
    keel_proto::manifest::public_keys_from_pem(&pem).map_err(|e| bad(e.to_string()))
}

/// Checks an `auth` request: `public_key` (base64 of 32 bytes) must be one of `authorized`
/// (loaded from `path`, named in the refusal) and `signature` (base64 of 64 bytes) its
/// signature over [`keel_proto::exec::auth_message`] of `challenge` and `binding`. Returns the key's
/// fingerprint.
pub fn check(
    public_key: &str,
    signature: &str,
    challenge: &Challenge,
    binding: &[u8],
    authorized: &[VerifyingKey],
    path: Option<&Path>,
) -> Result<String, Refusal> {
    let malformed = |what: &str| Refusal::new(ErrorCode::BadRequest, format!("auth: {what}"));
    let key: [u8; 32] =
        from_b64(public_key).ok_or_else(|| malformed("public_key is not base64 of 32 bytes"))?;
    let sig: [u8; 64] =
        from_b64(signature).ok_or_else(|| malformed("signature is not base64 of 64 bytes"))?;
    let fp = fingerprint(&key);
    let Some(path) = path else {
        return Err(Refusal::new(
            ErrorCode::NotAuthorized,
            format!("key {fp}: this agent authorizes no keys (agent.toml has no [exec] table)"),
        ));
    };
    let Some(vk) = authorized.iter().find(|k| k.as_bytes() == &key) else {
        return Err(Refusal::new(
            ErrorCode::NotAuthorized,
            format!("key {fp} is not in {}", path.display()),
        ));
    };
    if !verify_auth(vk, &challenge.0, binding, &sig) {
        return Err(Refusal::new(
            ErrorCode::NotAuthorized,
            format!("key {fp}: the signature over this session's challenge does not verify"),
        ));
    }
    Ok(fp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::exec::{b64, sign_auth};
    use keel_proto::manifest::SigningKey;

    fn signed(k: &SigningKey, c: &Challenge) -> (String, String) {
        (
            b64(k.verifying_key().as_bytes()),
            b64(&sign_auth(k, &c.0, b"")),
        )
    }

    #[test]
    fn a_listed_key_signing_this_challenge_is_accepted_and_nothing_else() {
        let (good, other) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let list = vec![good.verifying_key()];
        let path = Path::new("/etc/keel/authorized.pem");
        let c = Challenge::new().unwrap();
        let (k, s) = signed(&good, &c);
        let fp = check(&k, &s, &c, b"", &list, Some(path)).unwrap();
        assert_eq!(fp, fingerprint(good.verifying_key().as_bytes()));
        // Another session's challenge: the signature does not carry over.
        let c2 = Challenge::new().unwrap();
        let e = check(&k, &s, &c2, b"", &list, Some(path)).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAuthorized);
        assert!(e.message.contains("does not verify"), "{}", e.message);
        // A key not in the list, even with a good signature.
        let (k2, s2) = signed(&other, &c);
        let e = check(&k2, &s2, &c, b"", &list, Some(path)).unwrap_err();
        assert!(
            e.message.contains("is not in /etc/keel/authorized.pem")
                && e.message.contains("SHA256:"),
            "{}",
            e.message
        );
        // No [exec] table: nothing is authorized.
        let e = check(&k, &s, &c, b"", &list, None).unwrap_err();
        assert!(e.message.contains("no [exec] table"), "{}", e.message);
        // Malformed fields.
        let e = check("!!", &s, &c, b"", &list, Some(path)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = check(&k, "AAAA", &c, b"", &list, Some(path)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }
}
