//! Where an agent listens, as both sides write it: `tcp://HOST:PORT`, `unix:///PATH`,
//! `vsock://CID:PORT`, `hvsock:///PATH:PORT`. Parsing only; connecting is each side's own.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// An endpoint string that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {0:?}: expected tcp://HOST:PORT, unix:///PATH, vsock://CID:PORT or hvsock:///PATH:PORT")]
pub struct EndpointError(pub String);

/// Where an agent listens (or a host waits for an announce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://HOST:PORT`
    Tcp(String),
    /// `unix:///PATH`
    Unix(PathBuf),
    /// `vsock://CID:PORT` (from inside a VM, or a host with vhost-vsock)
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// `hvsock:///PATH:PORT`: Firecracker / Cloud Hypervisor hybrid vsock (a Unix socket on
    /// the host; `CONNECT <port>\n` → `OK <n>\n`).
    Hybrid {
        /// The VMM's Unix socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
    },
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        let bad = || EndpointError(s.to_string());
        if let Some(a) = s.strip_prefix("tcp://") {
            let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            Ok(Endpoint::Tcp(a.to_string()))
        } else if let Some(p) = s.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(bad());
            }
            Ok(Endpoint::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("vsock://") {
            let (cid, port) = a.split_once(':').ok_or_else(bad)?;
            Ok(Endpoint::Vsock {
                cid: cid.parse().map_err(|_| bad())?,
                port: port.parse().map_err(|_| bad())?,
            })
        } else if let Some(a) = s.strip_prefix("hvsock://") {
            let (path, port) = a.rsplit_once(':').ok_or_else(bad)?;
            if !path.starts_with('/') {
                return Err(bad());
            }
            Ok(Endpoint::Hybrid {
                path: path.into(),
                port: port.parse().map_err(|_| bad())?,
            })
        } else {
            Err(bad())
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::Hybrid { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_round_trips_and_bad_ones_are_named() {
        for s in [
            "tcp://127.0.0.1:7447",
            "tcp://[::1]:7447",
            "unix:///run/keel/agent.sock",
            "vsock://3:7447",
            "hvsock:///tmp/v.sock:7447",
        ] {
            assert_eq!(s.parse::<Endpoint>().unwrap().to_string(), s);
        }
        for s in [
            "tcp://:1",
            "tcp://h:70000",
            "unix://rel",
            "vsock://x:1",
            "hvsock://rel:1",
            "http://h",
            "",
        ] {
            let e = s.parse::<Endpoint>().unwrap_err();
            assert!(e.to_string().contains("expected tcp://"), "{e}");
        }
    }
}
