//! Who may do what: the one place every request is checked, before it is dispatched (as
//! Kata's agent checks each request first). Pure: a decision over the caller and the
//! settings, unit-tested below.
//!
//! | request | who |
//! |---|---|
//! | hello, status, push, auth | anyone who can connect (a push is admitted only if signed by a trusted key; `auth` checks its own key) |
//! | mark-good, reboot, unstage | root on the local Unix socket, or a session authenticated with a key from `[exec] authorized_keys` (or the host CID with `trust_host_cid`) |
//! | exec, attach, ps, kill, copy-in, copy-out | the same principals, with `[exec] enabled`; a vsock peer also needs its CID in `allowed_cids` |
//! | close-stdin, signal | only inside an exec (the exec loop takes them; outside one they are out of order) |

use std::fmt;

use keel_proto::message::{ErrorCode, Request};

use crate::config::ExecConfig;
use crate::transport::Peer;
use crate::verify::Refusal;

/// The host's vsock CID.
pub const HOST_CID: u32 = 2;

/// Who a session acts as, for the requests beyond status and push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Root on the local Unix socket (`SO_PEERCRED`).
    LocalRoot,
    /// A key from `authorized_keys`, by fingerprint.
    Key(String),
    /// The host's CID on vsock, trusted by `trust_host_cid`.
    HostCid,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::LocalRoot => f.write_str("local-root"),
            Principal::Key(k) => write!(f, "key {k}"),
            Principal::HostCid => f.write_str("host-cid"),
        }
    }
}

/// The connection's side of a decision: its peer and the key it proved, if any.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Who is connected.
    pub peer: &'a Peer,
    /// The fingerprint of the key the session authenticated with.
    pub key: Option<&'a str>,
}

/// Who `caller` acts as under `exec` (the `[exec]` table, if any).
pub fn principal(caller: Caller<'_>, exec: Option<&ExecConfig>) -> Option<Principal> {
    if is_local_root(caller.peer) {
        return Some(Principal::LocalRoot);
    }
    if let Some(k) = caller.key {
        return Some(Principal::Key(k.to_string()));
    }
    match (caller.peer, exec) {
        (Peer::Vsock { cid: HOST_CID, .. }, Some(e)) if e.trust_host_cid => {
            Some(Principal::HostCid)
        }
        _ => None,
    }
}

/// Whether `caller` may make `req`; the principal it acts as for the requests that need one.
/// The refusal names the rule and what to do.
pub fn authorize(
    req: &Request,
    caller: Caller<'_>,
    exec: Option<&ExecConfig>,
) -> Result<Option<Principal>, Refusal> {
    let who = principal(caller, exec);
    let needs_principal = |what: &str| -> Result<Option<Principal>, Refusal> {
        match &who {
            Some(p) => Ok(Some(p.clone())),
            None => Err(Refusal::new(
                ErrorCode::NotAuthorized,
                format!(
                    "{what} needs an authorized key or root on the local Unix socket; this \
                     session ({}) has neither: run keelctl with --key (a key listed in [exec] \
                     authorized_keys)",
                    caller.peer
                ),
            )),
        }
    };
    match req {
        Request::Hello { .. } | Request::Status | Request::Push { .. } | Request::Auth { .. } => {
            Ok(None)
        }
        Request::MarkGood | Request::Reboot | Request::Unstage | Request::PullNow => {
            needs_principal(req.op())
        }
        Request::Exec(_)
        | Request::CopyIn { .. }
        | Request::CopyOut { .. }
        | Request::Attach { .. }
        | Request::Ps
        | Request::Kill { .. } => {
            let Some(e) = exec.filter(|e| e.enabled) else {
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    "exec is off on this agent: agent.toml needs an [exec] table with \
                     enabled = true",
                ));
            };
            if let Peer::Vsock { cid, .. } = caller.peer {
                if !e.allowed_cids.contains(cid) {
                    return Err(Refusal::new(
                        ErrorCode::NotAuthorized,
                        format!(
                            "vsock CID {cid} may not {} (allowed_cids = {:?})",
                            req.op(),
                            e.allowed_cids
                        ),
                    ));
                }
            }
            needs_principal(req.op())
        }
        Request::CloseStdin | Request::Signal { .. } | Request::Resize(_) => Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("{} outside an exec", req.op()),
        )),
    }
}

/// Root on the local Unix socket, by its credentials.
pub fn is_local_root(peer: &Peer) -> bool {
    matches!(peer, Peer::Unix { uid: Some(0), .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::exec::ExecSpec;

    fn peers() -> [Peer; 5] {
        [
            Peer::Unix {
                uid: Some(0),
                pid: Some(1),
            },
            Peer::Unix {
                uid: Some(1000),
                pid: None,
            },
            Peer::Unix {
                uid: None,
                pid: None,
            },
            Peer::Tcp("127.0.0.1:9".parse().unwrap()),
            Peer::Vsock { cid: 2, port: 9 },
        ]
    }

    fn on() -> ExecConfig {
        ExecConfig {
            enabled: true,
            ..ExecConfig::default()
        }
    }

    #[test]
    fn control_is_for_local_root_or_a_key() {
        let [root, user, unknown, tcp, vsock] = peers();
        for req in [
            Request::MarkGood,
            Request::Reboot,
            Request::Unstage,
            Request::PullNow,
        ] {
            let who = authorize(
                &req,
                Caller {
                    peer: &root,
                    key: None,
                },
                None,
            )
            .unwrap();
            assert_eq!(who, Some(Principal::LocalRoot));
            for p in [&user, &unknown, &tcp, &vsock] {
                let e = authorize(&req, Caller { peer: p, key: None }, Some(&on())).unwrap_err();
                assert_eq!(e.code, ErrorCode::NotAuthorized);
                assert!(e.message.contains(&p.to_string()), "{}", e.message);
                assert!(e.message.contains("--key"), "{}", e.message);
                let who = authorize(
                    &req,
                    Caller {
                        peer: p,
                        key: Some("SHA256:x"),
                    },
                    None,
                );
                assert_eq!(who.unwrap(), Some(Principal::Key("SHA256:x".into())));
            }
        }
        for p in &peers() {
            assert!(authorize(&Request::Status, Caller { peer: p, key: None }, None).is_ok());
        }
    }

    #[test]
    fn exec_needs_the_table_a_principal_and_an_allowed_cid() {
        let [root, user, _, _, host] = peers();
        let exec = Request::Exec(ExecSpec::default());
        let off = ExecConfig::default();
        for cfg in [None, Some(&off)] {
            let e = authorize(
                &exec,
                Caller {
                    peer: &root,
                    key: None,
                },
                cfg,
            )
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert!(e.message.contains("enabled = true"));
        }
        let on = on();
        assert!(authorize(
            &exec,
            Caller {
                peer: &root,
                key: None
            },
            Some(&on)
        )
        .is_ok());
        let e = authorize(
            &exec,
            Caller {
                peer: &user,
                key: None,
            },
            Some(&on),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAuthorized);
        let with_key = Caller {
            peer: &user,
            key: Some("SHA256:k"),
        };
        assert!(authorize(&exec, with_key, Some(&on)).is_ok());
        // vsock: the CID list applies even with a key.
        let guest = Peer::Vsock { cid: 5, port: 1 };
        let e = authorize(
            &exec,
            Caller {
                peer: &guest,
                key: Some("SHA256:k"),
            },
            Some(&on),
        )
        .unwrap_err();
        assert!(e.message.contains("CID 5"), "{}", e.message);
        assert!(authorize(
            &exec,
            Caller {
                peer: &host,
                key: Some("k")
            },
            Some(&on)
        )
        .is_ok());
        // The host CID alone only with trust_host_cid.
        assert!(authorize(
            &exec,
            Caller {
                peer: &host,
                key: None
            },
            Some(&on)
        )
        .is_err());
        let trusting = ExecConfig {
            trust_host_cid: true,
            ..on.clone()
        };
        let who = authorize(
            &exec,
            Caller {
                peer: &host,
                key: None,
            },
            Some(&trusting),
        );
        assert_eq!(who.unwrap(), Some(Principal::HostCid));
    }

    #[test]
    fn stream_requests_are_out_of_order_outside_an_exec() {
        let [root, ..] = peers();
        for req in [Request::CloseStdin, Request::Signal { signal: 2 }] {
            let e = authorize(
                &req,
                Caller {
                    peer: &root,
                    key: None,
                },
                None,
            )
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
        }
    }
}
