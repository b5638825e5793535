//! The agent's listeners (TCP with TLS, Unix socket, vsock) and who is on the other end.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsAcceptor;

use crate::error::Error;
use keel_sys::vsock;

/// Who is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client (always over TLS).
    Tcp(SocketAddr),
    /// A local client; credentials from `SO_PEERCRED`.
    Unix {
        /// The peer's user id.
        uid: Option<u32>,
        /// The peer's process id.
        pid: Option<i32>,
    },
    /// A vsock client.
    Vsock {
        /// Its context id (2 = the host).
        cid: u32,
        /// Its port.
        port: u32,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "tcp:{a}"),
            Peer::Unix { uid, pid } => {
                write!(f, "unix:uid=")?;
                match uid {
                    Some(u) => write!(f, "{u}")?,
                    None => write!(f, "?")?,
                }
                if let Some(p) = pid {
                    write!(f, ",pid={p}")?;
                }
                Ok(())
            }
            Peer::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// An accepted connection.
pub enum Conn {
    /// TCP, before its TLS handshake (which the connection's own task runs, so that a slow
    /// client never holds up the accept loop).
    Tcp(TcpStream, TlsAcceptor),
    /// Unix socket, or vsock (a stream socket all the same).
    Unix(UnixStream),
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conn::Tcp(s, _) => f.debug_tuple("Tcp").field(s).finish(),
            Conn::Unix(s) => f.debug_tuple("Unix").field(s).finish(),
        }
    }
}

/// A bound listener.
pub enum Listener {
    /// TCP, served over TLS with this acceptor.
    Tcp(TcpListener, TlsAcceptor),
    /// Unix socket; the path is removed on drop.
    Unix(UnixListener, PathBuf),
    /// vsock.
    Vsock(AsyncFd<OwnedFd>, u32),
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Listener {
    /// Binds a TCP address; connections are served over TLS by `tls`.
    pub async fn tcp(addr: &str, tls: TlsAcceptor) -> Result<Listener, Error> {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen {
                addr: format!("tcp://{addr}"),
                source,
            })?;
        Ok(Listener::Tcp(l, tls))
    }

    /// Binds a Unix socket, replacing a stale socket file, mode 0660.
    pub fn unix(path: &Path) -> Result<Listener, Error> {
        let err = |source| Error::Listen {
            addr: format!("unix://{}", path.display()),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let l = UnixListener::bind(path).map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
        Ok(Listener::Unix(l, path.to_path_buf()))
    }

    /// Binds a vsock port (inside a guest).
    pub fn vsock(port: u32) -> Result<Listener, Error> {
        let err = |source| Error::Listen {
            addr: format!("vsock://any:{port}"),
            source,
        };
        let fd = vsock::listen(port).map_err(err)?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and refers to the
        // same socket until the AsyncFd drops it.
        let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| err(e.into()))?;
        Ok(Listener::Vsock(afd, port))
    }

    /// What this listener is, as an endpoint string.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l, _) => match l.local_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".into(),
            },
            Listener::Unix(_, p) => format!("unix://{}", p.display()),
            Listener::Vsock(_, port) => format!("vsock://any:{port}"),
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> std::io::Result<(Conn, Peer)> {
        match self {
            Listener::Tcp(l, tls) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Tcp(s, tls.clone()), Peer::Tcp(a)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let cred = s.peer_cred().ok();
                let peer = Peer::Unix {
                    uid: cred.map(|c| c.uid()),
                    pid: cred.and_then(|c| c.pid()),
                };
                Ok((Conn::Unix(s), peer))
            }
            Listener::Vsock(fd, _) => loop {
                let mut guard = fd.readable().await?;
                match guard.try_io(|fd| vsock::accept(fd.get_ref())) {
                    Ok(Ok((s, cid, port))) => {
                        let std = std::os::unix::net::UnixStream::from(s);
                        return Ok((
                            Conn::Unix(UnixStream::from_std(std)?),
                            Peer::Vsock { cid, port },
                        ));
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                }
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}
