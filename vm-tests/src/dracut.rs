//! A systemd initramfs built by Debian's `dracut` with keel's module
//! (`systemd/dracut/90keel`): dracut runs in a Debian tree of its own (debootstrap'd like the
//! roots, with `dracut-core`), installed there as a user installs it, against the kit's
//! kernel modules (bind-mounted in a private mount namespace); cached by content.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::*;

/// The build tree: dracut and what its systemd modules install from (systemd, udev, kmod).
pub const DRACUT_RECIPE: Recipe = Recipe {
    name: "dracut",
    include: "systemd,udev,kmod",
    apt: &[&["dracut-core"]],
};

/// dracut's modules for the initramfs (and what they depend on): a systemd initrd with
/// dracut's own hooks, as distributions build them, plus keel.
pub const DRACUT_MODULES: &str = "base systemd-initrd dracut-systemd kernel-modules keel";

/// The only kernel drivers besides what keel's module asks for: the VM's PCI bus, disk and
/// network card (the root images carry no kernel modules: what the booted system uses, the
/// initrd loaded, as under keel's own initramfs).
pub const DRACUT_DRIVERS: &str = "virtio_pci virtio_blk virtio_net";

/// The dracut-built initramfs (gzip), cached under the kit's `images/` by the tree's recipe,
/// the module's files, `initstage`, the signers' key and the kernel version.
pub fn dracut_initramfs() -> PathBuf {
    let tree = tree(&DRACUT_RECIPE);
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let k = kit();
    let module = workspace().join("systemd/dracut/90keel");
    let mut files: Vec<PathBuf> = fs::read_dir(&module)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let version = k.modules.file_name().unwrap().to_str().unwrap().to_string();
    let mut h = Sha256::new();
    h.update(fs::read(tree.join(".complete")).unwrap());
    h.update(format!("{version} {DRACUT_MODULES} {DRACUT_DRIVERS}").as_bytes());
    for f in files.iter().chain([&k.bins.join("initstage"), &k.trusted]) {
        h.update(f.file_name().unwrap().as_encoded_bytes());
        h.update(fs::read(f).unwrap());
    }
    let key = keel_proto::hex::encode(&h.finalize()[..6]);
    let out = k.work.join("images").join(format!("dracut-{key}.img"));
    if out.exists() {
        return out;
    }
    fs::create_dir_all(out.parent().unwrap()).unwrap();

    // Installed as the module's header says: the module directory, initstage, the keys.
    let dest = tree.join("usr/lib/dracut/modules.d/90keel");
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir_all(&dest).unwrap();
    for f in &files {
        fs::copy(f, dest.join(f.file_name().unwrap())).unwrap();
    }
    fs::copy(k.bins.join("initstage"), tree.join("usr/bin/initstage")).unwrap();
    fs::create_dir_all(tree.join("etc/keel")).unwrap();
    fs::copy(&k.trusted, tree.join("etc/keel/trusted.pem")).unwrap();
    fs::create_dir_all(tree.join("lib/modules").join(&version)).unwrap();
    let built = tree.join("tmp/keel-dracut.img");
    let _ = fs::remove_file(&built);
    // Mounts only in a private namespace that ends with the shell: /proc for dracut, the
    // kernel's modules where dracut looks for them.
    let script = r#"set -e
mount -t proc proc "$T/proc"
mount --bind "$M" "$T/lib/modules/$V"
exec chroot "$T" dracut --quiet --force --no-hostonly --kver "$V" -m "$MODS" \
  --drivers "$DRIVERS" --compress gzip /tmp/keel-dracut.img"#;
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("T", &tree)
        .env("M", &k.modules)
        .env("V", &version)
        .env("MODS", DRACUT_MODULES)
        .env("DRIVERS", DRACUT_DRIVERS)
        .output()
        .expect("unshare");
    assert!(
        o.status.success() && built.exists(),
        "dracut in {}: {}\n{}{}",
        tree.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    fs::rename(&built, &out).unwrap();
    out
}
