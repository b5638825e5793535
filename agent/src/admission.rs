//! Which connections are served: a pure count of who holds what, so that no remote peer can
//! starve local control. Two pools — the local Unix socket, and remote peers (TCP and vsock)
//! — each of `max_connections`; within the remote pool, at most `max_connections_per_peer`
//! from one IP address or vsock CID. A refused connection is answered `busy`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::transport::Peer;

/// What a remote peer is counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A TCP client's address (any port).
    Ip(IpAddr),
    /// A vsock client's CID (any port).
    Cid(u32),
}

/// The pool a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The local Unix socket.
    Local,
    /// TCP and vsock, keyed by peer.
    Remote(PeerKey),
}

impl Pool {
    /// The pool of `peer`.
    pub fn of(peer: &Peer) -> Pool {
        match peer {
            Peer::Unix { .. } => Pool::Local,
            Peer::Tcp(a) => Pool::Remote(PeerKey::Ip(a.ip())),
            Peer::Vsock { cid, .. } => Pool::Remote(PeerKey::Cid(*cid)),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The pool is full.
    Pool(usize),
    /// This peer holds its share.
    Peer(usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Pool(n) => write!(f, "the agent already serves {n} connections of this kind"),
            Full::Peer(n) => write!(f, "this address already holds {n} connections"),
        }
    }
}

/// The counts (pure; the [`Gate`] wraps it for concurrent use).
#[derive(Debug, Default)]
pub struct Counts {
    local: usize,
    remote: usize,
    per_peer: HashMap<PeerKey, usize>,
}

impl Counts {
    /// Admits one connection of `pool` under the limits, or says which is full.
    pub fn admit(&mut self, pool: Pool, max: usize, per_peer: usize) -> Result<(), Full> {
        match pool {
            Pool::Local if self.local >= max => Err(Full::Pool(max)),
            Pool::Local => {
                self.local += 1;
                Ok(())
            }
            Pool::Remote(_) if self.remote >= max => Err(Full::Pool(max)),
            Pool::Remote(k) => {
                let n = self.per_peer.entry(k).or_insert(0);
                if *n >= per_peer {
                    return Err(Full::Peer(per_peer));
                }
                *n += 1;
                self.remote += 1;
                Ok(())
            }
        }
    }

    /// Releases one connection of `pool`.
    pub fn release(&mut self, pool: Pool) {
        match pool {
            Pool::Local => self.local = self.local.saturating_sub(1),
            Pool::Remote(k) => {
                self.remote = self.remote.saturating_sub(1);
                if let Some(n) = self.per_peer.get_mut(&k) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_peer.remove(&k);
                    }
                }
            }
        }
    }
}

/// The shared gate every accept loop asks.
#[derive(Debug, Clone)]
pub struct Gate {
    counts: Arc<Mutex<Counts>>,
    max: usize,
    per_peer: usize,
}

/// One admitted connection; released on drop.
#[derive(Debug)]
pub struct Ticket {
    gate: Gate,
    pool: Pool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.lock().release(self.pool);
    }
}

impl Gate {
    /// A gate with these limits.
    pub fn new(max: usize, per_peer: usize) -> Gate {
        Gate {
            counts: Arc::default(),
            max,
            per_peer,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every update is one step.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `peer`, or says why not.
    pub fn admit(&self, peer: &Peer) -> Result<Ticket, Full> {
        let pool = Pool::of(peer);
        self.lock().admit(pool, self.max, self.per_peer)?;
        Ok(Ticket {
            gate: self.clone(),
            pool,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str, port: u16) -> Peer {
        Peer::Tcp(std::net::SocketAddr::new(ip.parse().unwrap(), port))
    }

    #[test]
    fn remote_peers_never_starve_local_root() {
        let g = Gate::new(3, 2);
        let root = Peer::Unix {
            uid: Some(0),
            pid: None,
        };
        let mut held = Vec::new();
        held.push(g.admit(&tcp("127.0.0.1", 1)).unwrap());
        held.push(g.admit(&tcp("127.0.0.1", 2)).unwrap());
        assert_eq!(g.admit(&tcp("127.0.0.1", 3)).unwrap_err(), Full::Peer(2));
        held.push(g.admit(&tcp("127.0.0.2", 1)).unwrap());
        assert_eq!(g.admit(&tcp("127.0.0.3", 1)).unwrap_err(), Full::Pool(3));
        assert_eq!(
            g.admit(&Peer::Vsock { cid: 3, port: 1 }).unwrap_err(),
            Full::Pool(3)
        );
        // The remote pool is full; local root still gets in, up to its own pool.
        let l: Vec<_> = (0..3).map(|_| g.admit(&root).unwrap()).collect();
        assert_eq!(g.admit(&root).unwrap_err(), Full::Pool(3));
        drop(l);
        assert!(g.admit(&root).is_ok());
        // Tickets give their slot back.
        held.remove(0);
        assert!(g.admit(&tcp("127.0.0.1", 4)).is_ok());
    }
}
