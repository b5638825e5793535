//! The user-space vsock device (`vhost-device-vsock`) and its hybrid-vsock host side.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::*;

/// A user-space vsock device (`vhost-device-vsock`) for the guest with CID 3: QEMU connects
/// to `vhost.sock`; the host side is Firecracker-style hybrid vsock on `vm.vsock`.
#[derive(Debug)]
pub struct VsockDevice {
    child: Child,
    pub vhost: PathBuf,
    pub uds: PathBuf,
}

impl VsockDevice {
    pub fn start(dir: &Path) -> VsockDevice {
        let bin = std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".cargo/bin/vhost-device-vsock"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "vhost-device-vsock".into());
        let vhost = dir.join("vhost.sock");
        let uds = dir.join("vm.vsock");
        let log = fs::File::create(dir.join("vhost-device-vsock.log")).unwrap();
        let child = Command::new(&bin)
            .args(["--guest-cid", "3", "--socket"])
            .arg(&vhost)
            .arg("--uds-path")
            .arg(&uds)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (cargo install vhost-device-vsock --locked)",
                    bin.display()
                )
            });
        let t0 = Instant::now();
        while !vhost.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "vhost-device-vsock did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        VsockDevice { child, vhost, uds }
    }

    /// The hybrid-vsock endpoint of the guest's agent.
    pub fn endpoint(&self) -> String {
        format!("hvsock://{}:{AGENT_PORT}", self.uds.display())
    }

    /// A connection to the guest's vsock `port` through the hybrid socket (`CONNECT`),
    /// retried for up to 20 s while nothing listens there yet.
    pub fn connect(&self, port: u32) -> std::os::unix::net::UnixStream {
        let ep = keelctl::Endpoint::Hybrid {
            path: self.uds.clone(),
            port,
        };
        let trust = keelctl::known::Trust::Pinned([0; 32]); // not TLS: unused
        match keelctl::stream::open(
            &ep,
            std::time::Duration::from_secs(20),
            std::time::Duration::from_secs(60),
            &trust,
        ) {
            Ok(keelctl::stream::Stream::Unix(s)) => s,
            other => panic!("hybrid vsock port {port}: {other:?}"),
        }
    }

    /// Where guest connections to the host's port `port` arrive.
    pub fn host_listener(&self, port: u16) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// Starts `keelctl wait-ready` on the announce port (80 s), returns once it listens;
    /// join the handle for its output (the agent's ready announce as JSON).
    pub fn wait_ready(&self) -> std::thread::JoinHandle<std::process::Output> {
        let announce = self.host_listener(crate::ANNOUNCE_PORT);
        let bin = crate::kit().bins.join("keelctl");
        let waiter = std::thread::spawn(move || {
            std::process::Command::new(bin)
                .arg("wait-ready")
                .arg(format!("unix://{}", announce.display()))
                .args(["--within", "80"])
                .output()
                .expect("keelctl wait-ready")
        });
        // wait-ready binds the socket the device forwards the guest's connection to.
        std::thread::sleep(std::time::Duration::from_millis(300));
        waiter
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
