//! Harness for keel's VM tests: builds real artefacts from the project's own code and boots
//! them under QEMU (TCG), one process per boot, serial log to a file, a hard timeout per boot,
//! at most two VMs at once.
//!
//! - [`kit`]: a Debian cloud kernel (fetched by package name, `dpkg -x`, `depmod`), the static
//!   initstage/keel-agent/keelctl, the initramfs (made by `keelctl initramfs`), a signing key.
//! - [`image`]: root images — busybox-static, keel-agent, keelctl and an init script that
//!   brings up the network, starts the agent, checks health, marks the boot good (unless the
//!   image is "bad") and reboots when an update is staged. It prints `KEEL ...` markers.
//! - [`Disk`]: a GPT disk with partitions labelled `img`, `overlay`, `newimg`, `boot`, built
//!   without mounting (`mkfs.ext4 -d`, `sfdisk`, `dd`); read back with `debugfs`.
//! - [`Vm`]: one boot.
#![allow(missing_docs)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use keel_proto::manifest::{
    public_key_to_pem, Manifest, SignedManifest, SigningKey, MANIFEST_FORMAT,
};
use sha2::{Digest, Sha256};

/// Modules the guest needs, by name; `keelctl initramfs` adds their dependencies.
pub const MODULES: &str =
    "virtio_pci,virtio_blk,virtio_net,vmw_vsock_virtio_transport,loop,squashfs,overlay,erofs";
/// The product name of the test images.
pub const PRODUCT: &str = "vmdemo";
/// The agent's port in the guest (TCP and vsock).
pub const AGENT_PORT: u16 = 7447;
/// Hard limit for one boot.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn work() -> PathBuf {
    let w = workspace().join("vm-tests/work");
    fs::create_dir_all(&w).unwrap();
    w
}

pub use keel_tests::{gpt_disk, run, sha256_file, Part};

/// Everything built once per test process.
pub struct Kit {
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub initramfs: PathBuf,
    pub key: SigningKey,
    pub trusted: PathBuf,
    pub bins: PathBuf,
    pub work: PathBuf,
}

static KIT: OnceLock<Kit> = OnceLock::new();

/// The static binaries, built by `make vm-bins` (initstage with failpoints).
pub fn bins() -> PathBuf {
    let d = workspace().join("target/vm/x86_64-unknown-linux-gnu/release");
    for b in ["initstage", "keel-agent", "keelctl"] {
        assert!(
            d.join(b).exists(),
            "{} missing: run `make vm-bins` (or `make test`)",
            d.join(b).display()
        );
    }
    d
}

fn fetch_kernel(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("root");
    let find = || -> Option<(PathBuf, PathBuf)> {
        let boot = fs::read_dir(root.join("boot")).ok()?;
        let vmlinuz = boot.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })?;
        let version = vmlinuz
            .file_name()?
            .to_str()?
            .trim_start_matches("vmlinuz-")
            .to_string();
        let modules = root.join("lib/modules").join(version);
        modules
            .join("modules.dep")
            .exists()
            .then_some((vmlinuz, modules))
    };
    if let Some(found) = find() {
        return found;
    }
    fs::create_dir_all(dir).unwrap();
    // The real package behind linux-image-cloud-amd64 (refresh the lists once if apt does
    // not know it yet, as on a fresh machine).
    let depends = || {
        Command::new("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()
    };
    let mut deps = depends().expect("apt-cache");
    if !deps.status.success() || deps.stdout.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]));
        deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    }
    let text = String::from_utf8_lossy(&deps.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| {
            p.starts_with("linux-image-") && p.chars().nth(12).is_some_and(|c| c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("no kernel package in: {text}"))
        .to_string();
    run(Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(dir));
    let deb = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("downloaded .deb");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root));
    let version = pkg.trim_start_matches("linux-image-").to_string();
    run(Command::new("depmod").arg("-b").arg(&root).arg(&version));
    find().expect("kernel unpacked")
}

/// Builds (once) the kernel, initramfs and key.
pub fn kit() -> &'static Kit {
    KIT.get_or_init(|| {
        let work = work();
        let bins = bins();
        let (kernel, modules) = fetch_kernel(&work.join("kernel"));
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let trusted = work.join("trusted.pem");
        fs::write(&trusted, public_key_to_pem(&key.verifying_key())).unwrap();
        for e in fs::read_dir(&work).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("initramfs-") || n.starts_with("script-initramfs-") {
                let _ = fs::remove_file(e.path());
            }
        }
        let initramfs = work.join(format!("initramfs-{}.cpio.gz", std::process::id()));
        run(Command::new(bins.join("keelctl"))
            .arg("initramfs")
            .arg("--init")
            .arg(bins.join("initstage"))
            .arg("--kernel-modules")
            .arg(&modules)
            .args(["--modules", MODULES])
            .arg("--keys")
            .arg(&trusted)
            .arg("-o")
            .arg(&initramfs));
        Kit {
            kernel,
            modules,
            initramfs,
            key,
            trusted,
            bins,
            work,
        }
    })
}

/// Root image filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Squashfs,
    Erofs,
}

/// The init script of a test image: markers on the console, the agent, a health check,
/// mark-good (unless `good` is false), and a reboot once an update is staged.
fn init_script(version: u64, good: bool) -> String {
    let mark = if good {
        "if keelctl mark-good; then echo \"KEEL marked-good version=$V\"; fi"
    } else {
        "echo \"KEEL not-marking-good version=$V\""
    };
    format!(
        r#"#!/bin/sh
read T _ < /proc/uptime; echo "KEEL t-init=$T"
PATH=/bin:/sbin:/usr/bin:/usr/sbin; export PATH
V={version}
# initstage moved /dev, /proc, /sys and /run in; only /tmp is ours.
mount -t tmpfs tmpfs /tmp
echo "KEEL booted version=$V"
echo "KEEL fstype=$(sed -n 's/.*"image_fstype": "\([a-z0-9]*\)".*/\1/p' /run/keel/boot.json)"
echo "KEEL persisted=$(cat /etc/persisted 2>/dev/null || echo none)"
echo "KEEL upper=$(sed -n 's/^overlay \/ .*upperdir=\([^,]*\).*/\1/p' /proc/mounts)"
if [ -e /scratch ]; then echo "KEEL scratch=present"; else echo "KEEL scratch=absent"; fi
echo "KEEL kmsg-steps=$(dmesg | sed -n 's/.*keel: \([a-z_ ]*\): ok (.*/\1/p' | tr '\n' ,)"
echo "written in boot of version $V" > /scratch
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
keel-agent --config /etc/keel/agent.toml > /tmp/agent.log 2>&1 &
i=0
while ! keelctl --wait 0 status > /dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 200 ] && echo "KEEL agent-failed" && cat /tmp/agent.log
  sleep 0.05
done
# Health check: the agent answers and reports the version this image says it is.
if keelctl status --json | grep -q "\"version\": $V"; then
  {mark}
else
  echo "KEEL health-failed"
fi
sync
echo "KEEL ready version=$V"
while [ ! -e /run/keel/newimg/root-squashfs.img.manifest ] && [ ! -e /run/keel/newimg/rootfs.erofs.manifest ]; do sleep 0.2; done
echo "KEEL staged: rebooting"
keelctl reboot
sleep 60
"#
    )
}

const AGENT_TOML: &str = r#"tcp = "0.0.0.0:7447"
vsock_port = 7447
trusted_keys = "/etc/keel/trusted.pem"
idle_timeout_secs = 20
announce = "vsock://2:7448"
"#;

/// The host port the guest agent announces readiness to (over vsock).
pub const ANNOUNCE_PORT: u16 = 7448;

/// A root image of `version` (cached): busybox-static, the agent, keelctl, the init script.
pub fn image(version: u64, good: bool, fs_kind: Fs) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let k = kit();
    // Cached by content: the script, the config, the binaries and the key.
    let mut h = Sha256::new();
    h.update(init_script(version, good).as_bytes());
    h.update(AGENT_TOML.as_bytes());
    for f in [
        k.bins.join("keel-agent"),
        k.bins.join("keelctl"),
        "/bin/busybox".into(),
        k.trusted.clone(),
    ] {
        h.update(fs::read(&f).unwrap_or_default());
    }
    let key = keel_proto::hex::encode(&h.finalize()[..6]);
    let name = format!(
        "v{version}-{}-{key}.{}",
        if good { "good" } else { "bad" },
        match fs_kind {
            Fs::Squashfs => "squashfs",
            Fs::Erofs => "erofs",
        }
    );
    let out = k.work.join("images").join(&name);
    if out.exists() {
        return out;
    }
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    let root = k.work.join("images").join(format!("{name}.root"));
    let _ = fs::remove_dir_all(&root);
    for d in [
        "bin", "sbin", "usr/bin", "etc/keel", "dev", "proc", "sys", "run", "tmp", "media", "var",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    let list = run(Command::new("/bin/busybox").arg("--list"));
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && applet != "init" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    for b in ["keel-agent", "keelctl"] {
        fs::copy(k.bins.join(b), root.join("usr/bin").join(b)).unwrap();
    }
    let init = root.join("sbin/init");
    fs::write(&init, init_script(version, good)).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy(&k.trusted, root.join("etc/keel/trusted.pem")).unwrap();
    fs::write(root.join("etc/keel/agent.toml"), AGENT_TOML).unwrap();
    fs::write(root.join("etc/keel-version"), format!("{version}\n")).unwrap();
    let tmp = out.with_extension("tmp");
    match fs_kind {
        Fs::Squashfs => run(Command::new("mksquashfs").arg(&root).arg(&tmp).args([
            "-noappend",
            "-quiet",
            "-comp",
            "gzip",
            "-all-root",
        ])),
        Fs::Erofs => run(Command::new("mkfs.erofs")
            .arg("-zlz4hc")
            .arg(&tmp)
            .arg(&root)),
    };
    fs::rename(&tmp, &out).unwrap();
    let _ = fs::remove_dir_all(&root);
    out
}

/// The signed manifest of `image`, written next to it as `<image>.manifest`.
pub fn sign(image: &Path, version: u64) -> SignedManifest {
    let m = Manifest {
        format: MANIFEST_FORMAT,
        name: PRODUCT.into(),
        version,
        size: fs::metadata(image).unwrap().len(),
        sha256: sha256_file(image),
        created: 1_700_000_000,
        min_version: None,
    }
    .sign(&kit().key);
    let mut p = image.as_os_str().to_owned();
    p.push(".manifest");
    fs::write(PathBuf::from(p), m.to_json()).unwrap();
    m
}

/// Partition sizes in MiB, in disk order.
pub const PARTS: [(&str, u64); 4] = [("img", 64), ("overlay", 32), ("newimg", 48), ("boot", 8)];

/// A GPT disk image.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// (label, MiB) of each partition, in order.
    pub layout: Vec<(&'static str, u64)>,
}

impl Disk {
    /// Builds the disk with `v1` (and its manifest) as the factory image named `image_name`,
    /// `/etc/persisted` in the overlay's persistent layer.
    pub fn new(dir: &Path, v1: &Path, image_name: &str) -> Disk {
        Disk::with_old_upper(dir, v1, image_name, 0)
    }

    /// [`Disk::new`], with `files` empty files left in the overlay's upper layer (as a
    /// previous boot would have left them).
    pub fn with_old_upper(dir: &Path, v1: &Path, image_name: &str, files: usize) -> Disk {
        Disk::build(dir, v1, image_name, files, false)
    }

    /// [`Disk::with_old_upper`] as a disk looks after its first boot: the image adopted in
    /// the boot state, so a boot changes nothing (the state of every later boot).
    pub fn steady(dir: &Path, v1: &Path, image_name: &str, files: usize) -> Disk {
        Disk::build(dir, v1, image_name, files, true)
    }

    fn build(dir: &Path, v1: &Path, image_name: &str, files: usize, adopted: bool) -> Disk {
        fs::create_dir_all(dir).unwrap();
        let path = dir.join("disk.img");
        let m = sign(v1, 1);
        // 100,000 inodes need room: the overlay grows with the files.
        let layout: Vec<(&'static str, u64)> = PARTS
            .iter()
            .map(|&(l, s)| {
                (
                    l,
                    if l == "overlay" {
                        s + (files as u64 / 2000)
                    } else {
                        s
                    },
                )
            })
            .collect();
        let parts: Vec<Part> = layout
            .iter()
            .map(|(label, size)| {
                let p = Part::new(label, *size);
                match *label {
                    "img" => {
                        let p = p
                            .file(image_name, fs::read(v1).unwrap())
                            .file(&format!("{image_name}.manifest"), m.to_json());
                        if adopted {
                            let state = keel_proto::bootstate::BootState {
                                boot_count: 1,
                                current: Some(keel_proto::bootstate::ImageRecord::from_manifest(
                                    &m.manifest,
                                )),
                                ..Default::default()
                            };
                            p.file(keel_proto::layout::STATE_FILE, state.to_json())
                        } else {
                            p
                        }
                    }
                    "overlay" => {
                        let mut p = p.file("persistent/etc/persisted", b"kept\n".to_vec());
                        for i in 0..files {
                            p = p.file(&format!("upper/old/{}/f{i}", i / 1000), Vec::new());
                        }
                        if files > 0 {
                            p.inodes = Some(files + files / 1000 + 1024);
                        }
                        p
                    }
                    _ => p,
                }
            })
            .collect();
        gpt_disk(&path, &parts, &dir.join("parts"));
        Disk { path, layout }
    }

    /// Reads `path` from the partition labelled `label` with debugfs (no mount).
    pub fn read(&self, label: &str, path: &str) -> Option<Vec<u8>> {
        let mut start = 1;
        let mut size = 0;
        for &(l, s) in &self.layout {
            if l == label {
                size = s;
                break;
            }
            start += s;
        }
        assert!(size > 0, "no partition {label}");
        let part = self.path.with_extension(format!("{label}.part"));
        run(Command::new("dd")
            .arg(format!("if={}", self.path.display()))
            .arg(format!("of={}", part.display()))
            .args(["bs=1M", "status=none"])
            .arg(format!("skip={start}"))
            .arg(format!("count={size}")));
        let out = self.path.with_extension("dump");
        let _ = fs::remove_file(&out);
        let _ = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump -p {path} {}", out.display()))
            .arg(&part)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_file(&part);
        let r = fs::read(&out).ok();
        let _ = fs::remove_file(&out);
        r
    }

    /// The boot state on `img`.
    pub fn state(&self) -> keel_proto::bootstate::BootState {
        let b = self.read("img", "/keel-state.json").expect("state on img");
        keel_proto::bootstate::BootState::from_json(&b).unwrap()
    }
}

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
    /// vhost-user-vsock socket of a running vhost-device-vsock.
    pub vsock: Option<PathBuf>,
    /// Another initramfs than keel's (the benchmark's busybox script).
    pub initramfs: Option<PathBuf>,
    /// Leave out `quiet` (the kernel then prints its own timestamps, e.g. `Run /init`).
    pub verbose: bool,
    /// Virtual CPUs (0 means 1). More than one use multi-threaded TCG: one host thread each.
    pub cpus: u32,
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
        match b.tcp_port {
            Some(p) => cmd.args(["-netdev"]).arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{p}-:{AGENT_PORT}"
            )),
            None => cmd.args(["-netdev", "user,id=n0,restrict=on"]),
        };
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
            if let Some(l) = log.lines().find(|l| l.contains(marker)) {
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

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }

    /// Waits for QEMU to exit by itself (the guest rebooted or powered off: -no-reboot).
    pub fn wait_exit(&mut self) {
        let deadline = self.started + BOOT_TIMEOUT;
        while !self.exited() {
            if Instant::now() > deadline {
                let log = self.log();
                self.kill();
                panic!("VM did not stop within {BOOT_TIMEOUT:?}; console:\n{log}");
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

/// The classic alternative, for the boot benchmark: a busybox shell-script `/init` that
/// performs the same steps as initstage (load the same modules, find the labels, clear the
/// upper, loop-mount the image, overlay with the persistent lower, switch_root), printing
/// `KEEL-SH <step> <uptime>` after each. Packed by `keelctl initramfs` with the same modules.
pub fn script_initramfs() -> PathBuf {
    let k = kit();
    let mods = MODULES.replace(',', " ");
    let script = format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
$B mount -t tmpfs -o mode=0755 tmpfs /run
t() {{ read U _ < /proc/uptime; echo "KEEL-SH $1 $U"; }}
t start
$B modprobe -a {mods}
t modules
while ! $B findfs LABEL=img > /dev/null 2>&1; do $B usleep 20000; done
IMG=$($B findfs LABEL=img); OV=$($B findfs LABEL=overlay)
t found
$B mkdir -p /run/keel/img /run/keel/overlay /run/keel/ro /sysroot
$B mount -t ext4 $IMG /run/keel/img
$B mount -t ext4 $OV /run/keel/overlay
$B rm -rf /run/keel/overlay/upper /run/keel/overlay/work
$B mkdir -p /run/keel/overlay/upper /run/keel/overlay/work /run/keel/overlay/persistent
t upper-cleared
$B mount -t squashfs -o loop,ro /run/keel/img/root-squashfs.img /run/keel/ro
$B mount -t overlay overlay -o lowerdir=/run/keel/overlay/persistent:/run/keel/ro,upperdir=/run/keel/overlay/upper,workdir=/run/keel/overlay/work /sysroot
t mounted
for m in dev proc sys run; do $B mount --move /$m /sysroot/$m; done
exec $B switch_root /sysroot /sbin/init
"#
    );
    let dir = k.work.join("script-initramfs");
    fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init.sh");
    fs::write(&init, script).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    let out = k
        .work
        .join(format!("script-initramfs-{}.cpio.gz", std::process::id()));
    run(Command::new(k.bins.join("keelctl"))
        .arg("initramfs")
        .arg("--init")
        .arg(&init)
        .arg("--kernel-modules")
        .arg(&k.modules)
        .args(["--modules", MODULES])
        .arg("--file")
        .arg("/bin/busybox:bin/busybox")
        .arg("-o")
        .arg(&out));
    out
}

/// A user-space vsock device (`vhost-device-vsock`) for the guest with CID 3: QEMU connects
/// to `vhost.sock`; the host side is Firecracker-style hybrid vsock on `vm.vsock`.
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

    /// Where guest connections to the host's port `port` arrive.
    pub fn host_listener(&self, port: u16) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keelctl command against the static binary.
pub fn keelctl(args: &[&str]) -> Output {
    Command::new(kit().bins.join("keelctl"))
        .args(args)
        .output()
        .unwrap()
}

/// A scratch directory for one scenario.
pub fn scenario_dir(name: &str) -> PathBuf {
    let d = work()
        .join("runs")
        .join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}
