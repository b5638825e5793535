//! Who may do what: the one place every request is checked, before it is dispatched (as
//! Kata's agent checks each request first).
//!
//! | request | who |
//! |---|---|
//! | hello, status, push | anyone who can connect (a push is admitted only if signed by a trusted key) |
//! | mark-good, reboot, unstage | root on the local Unix socket (`SO_PEERCRED`) |

use keel_proto::message::{ErrorCode, Request};

use crate::transport::Peer;
use crate::verify::Refusal;

/// Whether `peer` may make `req`; the refusal names the rule.
pub fn authorize(req: &Request, peer: &Peer) -> Result<(), Refusal> {
    match req {
        Request::Hello { .. } | Request::Status | Request::Push { .. } => Ok(()),
        Request::MarkGood | Request::Reboot | Request::Unstage => {
            if is_local_root(peer) {
                Ok(())
            } else {
                Err(Refusal::new(
                    ErrorCode::NotPermitted,
                    format!(
                        "{} is allowed only to root on the local Unix socket (this peer: {peer})",
                        req.op()
                    ),
                ))
            }
        }
    }
}

/// Root on the local Unix socket, by its credentials.
pub fn is_local_root(peer: &Peer) -> bool {
    matches!(peer, Peer::Unix { uid: Some(0), .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_is_for_local_root_only() {
        let root = Peer::Unix {
            uid: Some(0),
            pid: Some(1),
        };
        let user = Peer::Unix {
            uid: Some(1000),
            pid: None,
        };
        let unknown = Peer::Unix {
            uid: None,
            pid: None,
        };
        let tcp = Peer::Tcp("127.0.0.1:9".parse().unwrap());
        let vsock = Peer::Vsock { cid: 2, port: 9 };
        for req in [Request::MarkGood, Request::Reboot, Request::Unstage] {
            assert!(authorize(&req, &root).is_ok());
            for p in [&user, &unknown, &tcp, &vsock] {
                let e = authorize(&req, p).unwrap_err();
                assert_eq!(e.code, ErrorCode::NotPermitted);
                assert!(e.message.contains(&p.to_string()), "{}", e.message);
            }
        }
        for p in [&root, &user, &tcp, &vsock] {
            assert!(authorize(&Request::Status, p).is_ok());
        }
    }
}
