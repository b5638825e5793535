//! One QEMU boot (TCG), serial log to a file, a hard timeout, at most two VMs at once.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::*;

/// At most two VMs at once (two cores).
struct Slots {
    used: Mutex<usize>,
    cv: Condvar,
}

static SLOTS: Slots = Slots {
    used: Mutex::new(0),
    cv: Condvar::new(),
};

fn acquire() {
    let mut u = SLOTS.used.lock().unwrap();
    while *u >= 2 {
        u = SLOTS.cv.wait(u).unwrap();
    }
    *u += 1;
}

fn release() {
    *SLOTS.used.lock().unwrap() -= 1;
    SLOTS.cv.notify_one();
}

/// Options of one boot.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    /// Extra kernel command line.
    pub cmdline: String,
    /// Forward this host port on 127.0.0.1 to the agent's TCP port.
    pub tcp_port: Option<u16>,
    /// Forward this host port on 127.0.0.1 to the guest's port 22 (dropbear, in the
    /// benchmark's [`crate::image::ssh_image`]).
    pub ssh_port: Option<u16>,
    /// vhost-user-vsock socket of a running vhost-device-vsock.
    pub vsock: Option<PathBuf>,
    /// Another initramfs than keel's (the benchmark's busybox script).
    pub initramfs: Option<PathBuf>,
    /// Leave out `quiet` (the kernel then prints its own timestamps, e.g. `Run /init`).
    pub verbose: bool,
    /// Virtual CPUs (0 means 1). More than one use multi-threaded TCG: one host thread each.
    pub cpus: u32,
    /// QEMU's CPU model (`-cpu`; QEMU's default `qemu64` when `None`).
    pub cpu: Option<String>,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One QEMU boot.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    pub serial: PathBuf,
    pub started: Instant,
}

impl Vm {
    pub fn start(disk: &Disk, tag: &str, b: &Boot) -> Vm {
        let k = kit();
        acquire();
        let serial = disk.path.with_file_name(format!("serial-{tag}.log"));
        let _ = fs::remove_file(&serial);
        let mem = 256;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-smp",
            &b.cpus.max(1).to_string(),
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(
            b.cpu
                .as_ref()
                .map(|c| ["-cpu", c.as_str()])
                .into_iter()
                .flatten(),
        )
        .arg("-m")
        .arg(format!("{mem}M"))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&k.kernel)
        .arg("-initrd")
        .arg(b.initramfs.as_ref().unwrap_or(&k.initramfs))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 {}modules={MODULES} keel.tries=2 {}",
            if b.verbose { "" } else { "quiet " },
            b.cmdline
        ))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,cache=unsafe",
            disk.path.display()
        ));
        let mut fwd = String::new();
        if let Some(p) = b.tcp_port {
            fwd += &format!(",hostfwd=tcp:127.0.0.1:{p}-:{AGENT_PORT}");
        }
        if let Some(p) = b.ssh_port {
            fwd += &format!(",hostfwd=tcp:127.0.0.1:{p}-:22");
        }
        if fwd.is_empty() {
            cmd.args(["-netdev", "user,id=n0,restrict=on"]);
        } else {
            cmd.arg("-netdev").arg(format!("user,id=n0{fwd}"));
        }
        cmd.args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        if let Some(sock) = &b.vsock {
            cmd.arg("-object")
                .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
                .args(["-numa", "node,memdev=mem", "-chardev"])
                .arg(format!("socket,id=vsc,path={}", sock.display()))
                .args(["-device", "vhost-user-vsock-pci,chardev=vsc"]);
        }
        let err = fs::File::create(serial.with_extension("qemu.err")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
        Vm {
            child: Some(child),
            serial,
            started: Instant::now(),
        }
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits for a console line containing `marker`; returns that line.
    pub fn wait_for(&mut self, marker: &str) -> String {
        let deadline = self.started + BOOT_TIMEOUT;
        loop {
            let log = self.log();
            // Whole lines only: the serial log is read while QEMU writes it, and a line seen
            // half-written would match its marker with half its value.
            let whole = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(l) = whole.lines().find(|l| l.contains(marker)) {
                return l.trim().to_string();
            }
            if self.exited() {
                panic!("VM stopped before {marker:?}; console:\n{log}");
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("no {marker:?} within {BOOT_TIMEOUT:?}; console:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }

    /// Waits for QEMU to exit by itself (the guest rebooted or powered off: -no-reboot).
    pub fn wait_exit(&mut self) {
        self.wait_exit_by(self.started + BOOT_TIMEOUT);
    }

    /// [`Vm::wait_exit`] for a shutdown asked for now: bounded by `within` from now (a real
    /// init's orderly shutdown, begun late in a long scenario).
    pub fn wait_shutdown(&mut self, within: Duration) {
        self.wait_exit_by(Instant::now() + within);
    }

    fn wait_exit_by(&mut self, deadline: Instant) {
        while !self.exited() {
            if Instant::now() > deadline {
                let log = self.log();
                self.kill();
                panic!(
                    "VM did not stop ({:?} after its start); console:\n{log}",
                    self.started.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.reap();
    }

    /// Waits until QEMU exits by itself or `marker` appears, whichever comes first.
    pub fn wait_exit_or(&mut self, marker: &str) {
        let deadline = self.started + BOOT_TIMEOUT;
        while !self.exited() && !self.log().contains(marker) {
            if Instant::now() > deadline {
                let log = self.log();
                self.kill();
                panic!("VM neither stopped nor printed {marker:?}; console:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: a power cut.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
        self.reap();
    }

    fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
            release();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
