//! Root images: busybox-static, keel-agent, keelctl and an init script that brings up the
//! network, starts the agent, checks health, marks the boot good (unless the image is "bad")
//! and reboots when an update is staged; it prints `KEEL ...` markers. Also the busybox-script
//! initramfs the benchmarks compare against.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use keel_proto::manifest::{Manifest, SignedManifest, MANIFEST_FORMAT};
use sha2::{Digest, Sha256};

use crate::*;

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
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
echo "KEEL booted version=$V"
echo "KEEL fstype=$(sed -n 's/.*"image_fstype": "\([a-z0-9]*\)".*/\1/p' /run/keel/boot.json)"
echo "KEEL persisted=$(cat /etc/persisted 2>/dev/null || echo none)"
echo "KEEL upper=$(sed -n 's/^overlay \/ .*upperdir=\([^,]*\).*/\1/p' /proc/mounts)"
if [ -e /scratch ]; then echo "KEEL scratch=present"; else echo "KEEL scratch=absent"; fi
echo "KEEL kmsg-steps=$(dmesg | sed -n 's/.*keel: \([a-z_ ]*\): ok (.*/\1/p' | tr '\n' ,)"
echo "written in boot of version $V" > /scratch
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
# The pull scenario names its channel on the command line (the host's nginx, as 10.0.2.2).
P=$(sed -n 's/.*keel_test.pull=\([^ ]*\).*/\1/p' /proc/cmdline)
# The config is completed on tmpfs: appending to /etc/keel/agent.toml is an overlayfs copy-up,
# which the kernel aborts with EINTR when a signal (init's SIGCHLD) is pending.
cp /etc/keel/agent.toml /tmp/agent.toml
[ -n "$P" ] && printf '\n[pull]\nurl = "%s"\ninterval_secs = 2\njitter_secs = 1\n' "$P" >> /tmp/agent.toml
keel-agent --config /tmp/agent.toml > /tmp/agent.log 2>&1 &
i=0
while ! keelctl --wait 0 status > /dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 200 ] && echo "KEEL agent-failed" && cat /tmp/agent.log
  sleep 0.05
done
# The verity scenario's file, read only here, after switch_root (its block is not met at mount).
if [ -e /var/verity-later.bin ]; then cat /var/verity-later.bin > /dev/null && echo "KEEL read-later"; fi
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
# On the img partition: the root's upper layer is cleared each boot, img survives reboots
# and updates.
identity = "/run/keel/img/keel-identity.pem"
idle_timeout_secs = 20
announce = "vsock://2:7448"
# A host driving a microVM opens many sessions at once (the exec benchmark: 16).
max_connections = 32
max_connections_per_peer = 32

[exec]
enabled = true
authorized_keys = "/etc/keel/authorized.pem"
max_processes = 32
"#;

/// The host port the guest agent announces readiness to (over vsock).
pub const ANNOUNCE_PORT: u16 = 7448;

/// `keel-rawstream` (`vm-tests/guest/rawstream.c`), the benchmarks' raw vsock stream, built
/// static with the host's cc (cached by its source).
pub fn rawstream() -> PathBuf {
    let src = crate::workspace().join("vm-tests/guest/rawstream.c");
    let text = fs::read(&src).unwrap();
    let key = keel_proto::hex::encode(&Sha256::digest(&text)[..6]);
    let out = kit().work.join(format!("keel-rawstream-{key}"));
    if !out.exists() {
        let tmp = out.with_extension("tmp");
        run(Command::new("cc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src));
        fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// A root image of `version` (cached): busybox-static, the agent, keelctl, the benchmarks'
/// raw stream tool, the init script.
pub fn image(version: u64, good: bool, fs_kind: Fs) -> PathBuf {
    build(version, good, fs_kind, None)
}

/// The benchmark's ssh baseline: a key pair in dropbear's format, made once per kit.
#[derive(Debug, Clone)]
pub struct Ssh {
    /// The client's private key, for `dbclient -i`.
    pub client_key: PathBuf,
    /// Its public line, for the guest's `authorized_keys`.
    client_pub: String,
    /// The guest's host key.
    host_key: PathBuf,
}

/// Makes (once) the ssh keys of the benchmark's baseline with Debian's `dropbearkey`.
pub fn ssh_keys() -> Ssh {
    let dir = kit().work.join("ssh");
    fs::create_dir_all(&dir).unwrap();
    let key = |name: &str| {
        let f = dir.join(name);
        if !f.exists() {
            let tmp = dir.join(format!("{name}.tmp"));
            let _ = fs::remove_file(&tmp);
            run(Command::new("dropbearkey")
                .args(["-t", "ed25519", "-f"])
                .arg(&tmp));
            fs::rename(&tmp, &f).unwrap();
        }
        f
    };
    let client_key = key("client-ed25519");
    let host_key = key("host-ed25519");
    let out = run(Command::new("dropbearkey")
        .args(["-y", "-f"])
        .arg(&client_key));
    let client_pub = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("ssh-ed25519 "))
        .expect("dropbearkey -y prints the public key")
        .to_string();
    Ssh {
        client_key,
        client_pub,
        host_key,
    }
}

/// Version 1's image with Debian's dropbear added (its shared libraries beside it, root's
/// `authorized_keys` holding [`ssh_keys`]' client key): the exec benchmark's ssh baseline.
/// Only the benchmark boots it; the tests' images stay as they are.
pub fn ssh_image() -> (PathBuf, Ssh) {
    let ssh = ssh_keys();
    (build(1, true, Fs::Squashfs, Some(&ssh)), ssh)
}

/// Copies `bin` and every shared library `ldd` names for it into `root`, at their paths.
fn copy_with_libs(bin: &Path, root: &Path) {
    let out = run(Command::new("ldd").arg(bin));
    let mut files = vec![bin.to_path_buf()];
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match l.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dst = root.join(f.strip_prefix("/").unwrap());
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(&f, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
    }
}

/// Debian's dropbear server (package dropbear-bin).
pub const DROPBEAR: &str = "/usr/sbin/dropbear";

fn build(version: u64, good: bool, fs_kind: Fs, ssh: Option<&Ssh>) -> PathBuf {
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
        k.authorized.clone(),
        rawstream(),
    ] {
        h.update(fs::read(&f).unwrap_or_default());
    }
    if let Some(ssh) = ssh {
        for f in [Path::new(DROPBEAR), &ssh.host_key] {
            h.update(fs::read(f).unwrap_or_default());
        }
        h.update(ssh.client_pub.as_bytes());
    }
    let key = keel_proto::hex::encode(&h.finalize()[..6]);
    let name = format!(
        "v{version}-{}{}-{key}.{}",
        if good { "good" } else { "bad" },
        if ssh.is_some() { "-ssh" } else { "" },
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
    root_tree(&root, version, good, ssh);
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

/// Writes the guest root of `version` into `root` (replacing it): busybox, the static keel
/// binaries, the init script, keys, `agent.toml`, `/etc/keel-version`; with `ssh`, dropbear.
pub fn root_tree(root: &Path, version: u64, good: bool, ssh: Option<&Ssh>) {
    let k = kit();
    let _ = fs::remove_dir_all(root);
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
    fs::copy(rawstream(), root.join("usr/bin/keel-rawstream")).unwrap();
    let init = root.join("sbin/init");
    fs::write(&init, init_script(version, good)).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy(&k.trusted, root.join("etc/keel/trusted.pem")).unwrap();
    fs::copy(&k.authorized, root.join("etc/keel/authorized.pem")).unwrap();
    fs::write(root.join("etc/keel/agent.toml"), AGENT_TOML).unwrap();
    fs::write(root.join("etc/keel-version"), format!("{version}\n")).unwrap();
    if let Some(ssh) = ssh {
        copy_with_libs(Path::new(DROPBEAR), root);
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::create_dir_all(root.join("etc/dropbear")).unwrap();
        fs::copy(&ssh.host_key, root.join("etc/dropbear/host-ed25519")).unwrap();
        let dot = root.join("root/.ssh");
        fs::create_dir_all(&dot).unwrap();
        fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&dot, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(dot.join("authorized_keys"), format!("{}\n", ssh.client_pub)).unwrap();
        fs::set_permissions(
            dot.join("authorized_keys"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
}

/// An OCI image layout (`DIR:1`, made by `umoci`) of the v`version` root in two layers: the
/// root without its keel parts, then the keel binaries, init script and configuration.
pub fn oci_image(dir: &Path, version: u64) -> PathBuf {
    let root = dir.join("tree");
    root_tree(&root, version, true, None);
    let umoci = |args: &[&str]| keel_tests::oci::umoci(dir, args);
    umoci(&["init", "--layout", "img"]);
    umoci(&["new", "--image", "img:1"]);
    umoci(&["unpack", "--image", "img:1", "bundle"]);
    let rootfs = dir.join("bundle/rootfs");
    run(Command::new("cp")
        .arg("-a")
        .arg(root.join("bin"))
        .arg(&rootfs));
    for d in [
        "sbin", "usr/bin", "etc/keel", "dev", "proc", "sys", "run", "tmp", "media", "var",
    ] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    umoci(&["repack", "--refresh-bundle", "--image", "img:1", "bundle"]);
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", root.display()))
        .arg(&rootfs));
    umoci(&["repack", "--refresh-bundle", "--image", "img:1", "bundle"]);
    let _ = fs::remove_dir_all(&root);
    dir.join("img")
}

/// A container image for a microVM (an OCI layout `DIR/img:1`, made by `umoci`): busybox,
/// and `/app/run.sh` as its Entrypoint with `FOO=bar` in its Env and `/app` its WorkingDir,
/// which prints `APP started …` and then sleeps. No init, no keel: `keelctl build` adds them.
pub fn app_oci_image(dir: &Path) -> PathBuf {
    let umoci = |args: &[&str]| keel_tests::oci::umoci(dir, args);
    umoci(&["init", "--layout", "img"]);
    umoci(&["new", "--image", "img:1"]);
    umoci(&["unpack", "--image", "img:1", "bundle"]);
    let r = dir.join("bundle/rootfs");
    fs::create_dir_all(r.join("bin")).unwrap();
    fs::create_dir_all(r.join("app")).unwrap();
    fs::copy("/bin/busybox", r.join("bin/busybox")).expect("busybox-static installed");
    let list = run(Command::new("/bin/busybox").arg("--list"));
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && applet != "init" {
            let _ = std::os::unix::fs::symlink("busybox", r.join("bin").join(applet));
        }
    }
    fs::write(
        r.join("app/run.sh"),
        "#!/bin/sh\necho \"APP started cwd=$(pwd) FOO=$FOO uid=$(id -u)\"\nexec sleep 3600\n",
    )
    .unwrap();
    fs::set_permissions(r.join("app/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    umoci(&["repack", "--refresh-bundle", "--image", "img:1", "bundle"]);
    umoci(&[
        "config",
        "--image",
        "img:1",
        "--config.entrypoint",
        "/app/run.sh",
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/app",
    ]);
    dir.join("img")
}

/// The agent.toml a microVM image gets: vsock, the ready announce, exec by the kit's key,
/// power off when the program ends.
pub const MICROVM_AGENT_TOML: &str = r#"unix = "/run/keel/agent.sock"
vsock_port = 7447
trusted_keys = "/etc/keel/trusted.pem"
announce = "vsock://2:7448"

[exec]
enabled = true
authorized_keys = "/etc/keel/authorized.pem"

[init]
on_exit = "poweroff"
"#;

/// `keelctl build --format initramfs` of the app image in `layout` (tag 1) into `dir/name`,
/// with [`MICROVM_AGENT_TOML`], the kit's keys and the vsock modules in it; `extra` are more
/// arguments for `keelctl build` (`--agent`, `--compress`).
pub fn microvm_initramfs(dir: &Path, name: &str, layout: &Path, extra: &[&str]) -> PathBuf {
    let k = kit();
    let toml = dir.join("agent.toml");
    fs::write(&toml, MICROVM_AGENT_TOML).unwrap();
    let out = dir.join(name);
    let from = format!("oci:{}:1", layout.display());
    let injects = [
        format!("{}:/etc/keel/agent.toml", toml.display()),
        format!("{}:/etc/keel/authorized.pem", k.authorized.display()),
        format!("{}:/etc/keel/trusted.pem", k.trusted.display()),
    ];
    let mut args = vec![
        "build",
        "--from",
        &from,
        "--format",
        "initramfs",
        "-o",
        out.to_str().unwrap(),
        "--kernel-modules",
        k.modules.to_str().unwrap(),
        "--modules",
        "virtio_pci,vmw_vsock_virtio_transport",
    ];
    for i in &injects {
        args.extend(["--inject", i.as_str()]);
    }
    args.extend(extra);
    ok(&keelctl(&args));
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
        verity: None,
    }
    .sign(&kit().key);
    let mut p = image.as_os_str().to_owned();
    p.push(".manifest");
    fs::write(PathBuf::from(p), m.to_json()).unwrap();
    m
}

/// `keelctl sign IMAGE` with the kit's key as the product's `version`, plus `extra`
/// options; the manifest it wrote.
fn keelctl_sign(image: &Path, version: u64, extra: &[&str]) -> SignedManifest {
    let key = kit().work.join("signing.pem");
    if !key.exists() {
        fs::write(&key, keel_proto::manifest::signing_key_to_pem(&kit().key)).unwrap();
    }
    let version = version.to_string();
    let mut args = vec!["sign"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--key",
        key.to_str().unwrap(),
        "--name",
        PRODUCT,
        "--version",
        &version,
        "--created",
        "1700000000",
        image.to_str().unwrap(),
    ]);
    ok(&keelctl(&args));
    SignedManifest::from_json(&fs::read(format!("{}.manifest", image.display())).unwrap()).unwrap()
}

/// Signs `image` with `keelctl sign`, which writes its chunk index (`IMAGE.chunks`) and
/// signs it into the manifest: an image a device can take by delta.
pub fn sign_chunked(image: &Path, version: u64) -> SignedManifest {
    let m = keelctl_sign(image, version, &[]);
    assert!(m.chunks.is_some(), "{m:?}");
    m
}

/// The v`version` root as squashfs at `out` with `/var/verity-later.bin` added: 256 KiB that
/// do not compress (stored as they are, so a test finds them in the image) and that only the
/// init script reads. Returns the file's bytes.
pub fn verity_later_image(out: &Path, version: u64) -> Vec<u8> {
    let root = out.with_extension("root");
    root_tree(&root, version, true, None);
    // xorshift64: incompressible and reproducible.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let later: Vec<u8> = (0..256 * 1024 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    fs::write(root.join("var/verity-later.bin"), &later).unwrap();
    let _ = fs::remove_file(out);
    run(Command::new("mksquashfs").arg(&root).arg(out).args([
        "-noappend",
        "-quiet",
        "-comp",
        "gzip",
        "-all-root",
    ]));
    let _ = fs::remove_dir_all(&root);
    later
}

/// A copy of `image` at `out` with a dm-verity tree appended and its format-2 manifest beside
/// it, both made by `keelctl sign --verity` (the user's command) with the kit's key.
pub fn sign_verity(image: &Path, out: &Path, version: u64) -> SignedManifest {
    fs::copy(image, out).unwrap();
    let m = keelctl_sign(out, version, &["--verity"]);
    assert!(m.manifest.verity.is_some(), "{m:?}");
    m
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
