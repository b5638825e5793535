//! Which agent key to expect on a TCP endpoint: the one pinned with `--agent-key`, or the one
//! remembered in the known-agents file the first time (ssh's `known_hosts`, for agents).
//!
//! The file has one line per endpoint, `tcp://HOST:PORT ed25519 BASE64-KEY`; `#` starts a
//! comment. The decision ([`judge`]) is pure; reading and appending are the only I/O.

use std::io::Write;
use std::path::{Path, PathBuf};

use keel_proto::exec::{b64, fingerprint, from_b64};

use crate::error::{Error, Result};

/// The longest known-agents file read.
pub const MAX_FILE: u64 = 4 << 20;

/// How a client decides whether the agent's key is the right one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Only this key (`--agent-key`).
    Pinned([u8; 32]),
    /// The key remembered for the endpoint in this file; on first contact, the key the agent
    /// shows, remembered from then on.
    Remembered(PathBuf),
    /// No file to remember keys in (no `--known-agents`, no `$HOME`: a system service, say).
    /// Local endpoints (Unix socket, vsock) carry no TLS and never ask; a TCP connection stops
    /// and says what to pass.
    NoFile,
}

/// Why a TCP connection under [`Trust::NoFile`] stops.
pub const NO_FILE: &str = "no --known-agents file and no $HOME to keep one in: pass                            --known-agents FILE, or pin the agent's key with --agent-key";

impl Trust {
    /// `--agent-key FILE`: one PEM public key, the agent's `identity.pem.pub`.
    pub fn pinned_from_file(path: &Path) -> Result<Trust> {
        let bad = |detail: String| Error::AgentKeyFile {
            path: path.to_path_buf(),
            detail,
        };
        let pem = keel_sys::durable::read_regular(path, 64 << 10)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("no such file".into()))?;
        let pem = String::from_utf8(pem).map_err(|_| bad("not PEM text".into()))?;
        let keys =
            keel_proto::manifest::public_keys_from_pem(&pem).map_err(|e| bad(e.to_string()))?;
        match keys.as_slice() {
            [k] => Ok(Trust::Pinned(*k.as_bytes())),
            _ => Err(bad(format!("holds {} keys, expected one", keys.len()))),
        }
    }
}

/// One remembered agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The endpoint as written.
    pub endpoint: String,
    /// Its key.
    pub key: [u8; 32],
    /// Its line in the file (1-based).
    pub line: usize,
}

/// Parses a known-agents file; a malformed line is an error naming it (a file the user
/// edited wrong must not silently trust nothing, or everything).
pub fn parse(text: &str) -> std::result::Result<Vec<Known>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let key = match f.as_slice() {
            [_, "ed25519", k] => from_b64::<32>(k),
            _ => None,
        };
        let Some(key) = key else {
            return Err(format!(
                "line {}: expected `tcp://HOST:PORT ed25519 BASE64-KEY`",
                i + 1
            ));
        };
        out.push(Known {
            endpoint: f[0].to_string(),
            key,
            line: i + 1,
        });
    }
    Ok(out)
}

/// The line that remembers `key` for `endpoint`.
pub fn line(endpoint: &str, key: &[u8; 32]) -> String {
    format!("{endpoint} ed25519 {}\n", b64(key))
}

/// What a client does with the key an agent showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The expected key: go on.
    Trusted,
    /// Never seen for this endpoint: go on, and remember it.
    FirstUse,
    /// Not the expected key: stop, saying this.
    Refuse(String),
}

/// Judges the key `seen` at `endpoint` under `trust`, with `known` the remembered entries
/// (empty for a pin).
pub fn judge(trust: &Trust, known: &[Known], endpoint: &str, seen: &[u8; 32]) -> Verdict {
    match trust {
        Trust::Pinned(k) if k == seen => Verdict::Trusted,
        Trust::Pinned(k) => Verdict::Refuse(format!(
            "the agent's key is {}, not the pinned {} (--agent-key): refusing to talk to it",
            fingerprint(seen),
            fingerprint(k)
        )),
        Trust::NoFile => Verdict::Refuse(NO_FILE.into()),
        Trust::Remembered(path) => match known.iter().find(|k| k.endpoint == endpoint) {
            None => Verdict::FirstUse,
            Some(k) if &k.key == seen => Verdict::Trusted,
            Some(k) => Verdict::Refuse(format!(
                "AGENT KEY CHANGED: {endpoint} now shows {}, but {}:{} remembers {}. Someone \
                 may be intercepting this connection, or the agent was given a new identity; \
                 if you know it was, delete line {} of {} (or pin the new key with \
                 --agent-key) and try again",
                fingerprint(seen),
                path.display(),
                k.line,
                fingerprint(&k.key),
                k.line,
                path.display()
            )),
        },
    }
}

/// Reads the entries of `path` (none when it does not exist).
pub fn load(path: &Path) -> Result<Vec<Known>> {
    let bad = |detail: String| Error::KnownAgents {
        path: path.to_path_buf(),
        detail,
    };
    let Some(bytes) =
        keel_sys::durable::read_regular(path, MAX_FILE).map_err(|e| bad(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    parse(&text).map_err(bad)
}

/// Appends the entry for `endpoint` to `path` (creating it and its directory), fsynced.
pub fn remember(path: &Path, endpoint: &str, key: &[u8; 32]) -> Result<()> {
    let bad = |detail: String| Error::KnownAgents {
        path: path.to_path_buf(),
        detail,
    };
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| bad(format!("create {}: {e}", d.display())))?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    f.write_all(line(endpoint, key).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| bad(e.to_string()))
}

/// The default file: `$XDG_CONFIG_HOME/keel/known_agents`, else
/// `$HOME/.config/keel/known_agents`.
pub fn default_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("keel/known_agents"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];

    #[test]
    fn lines_round_trip_and_mistakes_are_named() {
        let text = format!(
            "# agents\n{}\n{}  # lab box\n",
            line("tcp://10.0.0.1:7447", &A).trim(),
            line("tcp://h:1", &B).trim()
        );
        let k = parse(&text).unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(
            (k[0].endpoint.as_str(), k[0].key, k[0].line),
            ("tcp://10.0.0.1:7447", A, 2)
        );
        assert_eq!((k[1].key, k[1].line), (B, 3));
        let e = parse("tcp://h:1 ed25519 !!!\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = parse("\ntcp://h:1 rsa AAAA\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn a_pin_takes_only_its_key() {
        let t = Trust::Pinned(A);
        assert_eq!(judge(&t, &[], "tcp://h:1", &A), Verdict::Trusted);
        match judge(&t, &[], "tcp://h:1", &B) {
            Verdict::Refuse(m) => {
                assert!(
                    m.contains(&fingerprint(&A)) && m.contains(&fingerprint(&B)),
                    "{m}"
                )
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn without_a_file_tls_stops_and_says_what_to_pass() {
        match judge(&Trust::NoFile, &[], "tcp://h:1", &A) {
            Verdict::Refuse(m) => assert!(m.contains("--known-agents FILE"), "{m}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn first_use_is_remembered_and_a_change_refused_loudly() {
        let t = Trust::Remembered("/home/u/.config/keel/known_agents".into());
        let known = parse(&line("tcp://h:1", &A)).unwrap();
        assert_eq!(judge(&t, &known, "tcp://other:1", &B), Verdict::FirstUse);
        assert_eq!(judge(&t, &known, "tcp://h:1", &A), Verdict::Trusted);
        match judge(&t, &known, "tcp://h:1", &B) {
            Verdict::Refuse(m) => assert!(
                m.contains("AGENT KEY CHANGED")
                    && m.contains("known_agents:1")
                    && m.contains("delete line 1"),
                "{m}"
            ),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn remembering_appends_and_reads_back() {
        let d = std::env::temp_dir().join(format!("keel-known-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let p = d.join("sub/known_agents");
        assert!(load(&p).unwrap().is_empty());
        remember(&p, "tcp://a:1", &A).unwrap();
        remember(&p, "tcp://b:2", &B).unwrap();
        let k = load(&p).unwrap();
        assert_eq!((k[0].key, k[1].key, k[1].line), (A, B, 2));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
