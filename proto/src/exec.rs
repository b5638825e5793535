//! Remote execution and key authentication on the wire (pure).
//!
//! **Authentication.** The agent's `hello` reply carries a fresh random challenge. A client
//! holding an ed25519 key signs [`auth_message`] over it (and over the session's channel
//! binding where there is one) and sends [`crate::message::Request::Auth`]; the agent checks
//! the key against its `authorized_keys` and the signature, and from then on the session acts
//! as that key ([`fingerprint`] names it in logs and refusals). A signature is good for one
//! session only: the challenge is new each time.
//!
//! **Exec.** [`ExecSpec`] starts a process; the agent answers `started`, then the connection
//! carries the process's streams until `exited`: stdout and stderr as [`KIND_STDOUT`] and
//! [`KIND_STDERR`] frames from the agent, in the order the process wrote them to each;
//! stdin as [`KIND_STDIN`] frames from the client, `close-stdin` for its EOF, `signal` for
//! a signal to the process group. A slow reader slows the process (the agent never buffers
//! more than a frame per stream).

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Frame kind: bytes for the process's stdin (client to agent).
pub const KIND_STDIN: u8 = 0x03;
/// Frame kind: bytes the process wrote to stdout (agent to client).
pub const KIND_STDOUT: u8 = 0x04;
/// Frame kind: bytes the process wrote to stderr (agent to client).
pub const KIND_STDERR: u8 = 0x05;

/// Bytes of a challenge.
pub const CHALLENGE_LEN: usize = 32;

/// What a process to run looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecSpec {
    /// The program and its arguments (the program is looked up in `PATH` if it has no `/`).
    pub argv: Vec<String>,
    /// Environment variables added to the agent's base environment (`PATH`, `HOME`, `USER`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Working directory (default: the user's home, else `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Run as this user, by name or number (default: the agent's own user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill the process group after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Run on a pseudo-terminal of this size: stdin, stdout and stderr are its slave, the
    /// output one stream ([`KIND_STDOUT`]), the process a session leader with it as its
    /// controlling terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<WinSize>,
    /// Answer `started` and return: the process runs on without a client (no grace period);
    /// `attach` watches it later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

/// One process, as `ps` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// Its id for `attach` and `kill`.
    pub id: u64,
    /// Its pid in the guest.
    pub pid: u32,
    /// What runs.
    pub argv: Vec<String>,
    /// When it started (Unix seconds).
    pub started: u64,
    /// A client is attached.
    pub attached: bool,
    /// Started detached.
    pub detached: bool,
    /// Output bytes buffered for the next client.
    pub buffered: u64,
    /// How it ended, if it has.
    pub exit: Option<ExitStatus>,
    /// Who started it.
    pub owner: String,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout ran out.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// The exit code a shell would give: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// The TLS exporter label (RFC 8446 §7.5) of a session's channel binding on TCP: both ends
/// export [`TLS_BINDING_LEN`] bytes under it and the `auth` signature covers them, so a
/// signature made for one TLS session is worthless in any other.
pub const TLS_BINDING_LABEL: &[u8] = b"EXPORTER-keel-auth-binding-v1";
/// Bytes of the TLS channel binding.
pub const TLS_BINDING_LEN: usize = 32;

/// The bytes a client signs to authenticate: a domain tag, the agent's challenge and the
/// session's channel binding (empty where the transport has none).
pub fn auth_message(challenge: &[u8], binding: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + challenge.len() + binding.len());
    m.extend_from_slice(b"keel-auth-v1\0");
    m.extend_from_slice(
        &u32::try_from(challenge.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    m.extend_from_slice(challenge);
    m.extend_from_slice(binding);
    m
}

/// Signs the authentication of a session over `challenge` and `binding` (the client side).
pub fn sign_auth(key: &SigningKey, challenge: &[u8], binding: &[u8]) -> [u8; 64] {
    key.sign(&auth_message(challenge, binding)).to_bytes()
}

/// Whether `signature` is `key`'s signature of the authentication over `challenge` and
/// `binding` (strict ed25519 verification).
pub fn verify_auth(
    key: &VerifyingKey,
    challenge: &[u8],
    binding: &[u8],
    signature: &[u8; 64],
) -> bool {
    key.verify_strict(
        &auth_message(challenge, binding),
        &ed25519_dalek::Signature::from_bytes(signature),
    )
    .is_ok()
}

/// Standard padded base64 of `bytes` (keys and signatures in `auth`).
pub fn b64(bytes: &[u8]) -> String {
    use base64ct::Encoding;
    base64ct::Base64::encode_string(bytes)
}

/// Decodes standard base64 that must be exactly `N` bytes.
pub fn from_b64<const N: usize>(s: &str) -> Option<[u8; N]> {
    use base64ct::Encoding;
    let mut out = [0u8; N];
    match base64ct::Base64::decode(s, &mut out) {
        Ok(d) if d.len() == N => Some(out),
        _ => None,
    }
}

/// A public key's name, as ssh prints it: `SHA256:` and the unpadded base64 of the SHA-256
/// of the 32 raw key bytes.
pub fn fingerprint(public_key: &[u8; 32]) -> String {
    use base64ct::Encoding;
    let d = Sha256::digest(public_key);
    format!("SHA256:{}", base64ct::Base64Unpadded::encode_string(&d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        let st = |code, signal| ExitStatus {
            code,
            signal,
            timed_out: false,
        };
        assert_eq!(st(Some(3), None).shell_code(), 3);
        assert_eq!(st(None, Some(9)).shell_code(), 137);
        assert_eq!(st(None, None).shell_code(), 255);
    }

    #[test]
    fn auth_message_binds_challenge_and_channel() {
        let a = auth_message(b"abc", b"");
        assert!(a.starts_with(b"keel-auth-v1\0\0\0\0\x03abc"));
        assert_ne!(auth_message(b"abc", b"x"), a);
        assert_ne!(auth_message(b"ab", b"cx"), auth_message(b"abc", b"x"));
    }

    #[test]
    fn sign_and_verify_and_base64() {
        let k = SigningKey::from_bytes(&[5; 32]);
        let sig = sign_auth(&k, b"c", b"");
        assert!(verify_auth(&k.verifying_key(), b"c", b"", &sig));
        assert!(!verify_auth(&k.verifying_key(), b"d", b"", &sig));
        assert_eq!(from_b64::<64>(&b64(&sig)), Some(sig));
        assert_eq!(from_b64::<32>(&b64(&sig)), None);
        assert_eq!(from_b64::<4>("!!"), None);
    }

    #[test]
    fn fingerprint_is_sshs_format() {
        let f = fingerprint(&[0u8; 32]);
        assert!(f.starts_with("SHA256:"));
        assert_eq!(f.len(), 7 + 43);
    }
}
