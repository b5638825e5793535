//! Debian roots for the init-system scenarios: a Debian 12 tree per init system (systemd,
//! OpenRC), debootstrap'd once and cached by its recipe; keel added the way a user installs
//! it (the static binaries, the units or OpenRC scripts from `systemd/` enabled with the
//! init's own tool, `agent.toml`, keys); packed as squashfs, cached by content.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::*;

/// The init system of a Debian root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// systemd as `/sbin/init` (`systemd-sysv`), udev, systemd-networkd.
    Systemd,
    /// OpenRC under sysvinit's `/sbin/init` (Debian's `openrc` + `sysvinit-core`).
    OpenRc,
}

/// The Debian mirror debootstrap fetches from.
const MIRROR: &str = "http://deb.debian.org/debian";

/// What the roots drop: documentation, locales, caches (the image gets smaller, boots the same).
const TRIM: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/lib/udev/hwdb.bin",
];

impl Init {
    fn name(self) -> &'static str {
        match self {
            Init::Systemd => "systemd",
            Init::OpenRc => "openrc",
        }
    }

    /// What debootstrap and apt put in the tree (OpenRC: its `sysvinit-core` dependency would
    /// pull in `sysv-rc`, which conflicts with `openrc`, in debootstrap's resolver; apt picks
    /// the alternative).
    fn recipe(self) -> Recipe {
        match self {
            Init::Systemd => Recipe {
                name: "systemd",
                include: "systemd,systemd-sysv,udev,kmod,iproute2",
                apt: &[],
            },
            // ifupdown after openrc, so its `networking` script lands in OpenRC's runlevels.
            Init::OpenRc => Recipe {
                name: "openrc",
                include: "kmod,iproute2",
                apt: &[&["openrc", "sysvinit-core"], &["ifupdown"]],
            },
        }
    }
}

/// How a Debian tree is made: debootstrap's minbase with `--include`, then each `apt` group
/// installed in the tree in turn.
#[derive(Debug)]
pub struct Recipe {
    /// The tree's directory name (before its recipe's hash).
    pub name: &'static str,
    pub include: &'static str,
    pub apt: &'static [&'static [&'static str]],
}

/// The debootstrap'd tree of `init` (made once, cached by recipe under the kit's work dir;
/// `.complete` marks a finished one).
pub fn deb_tree(init: Init) -> PathBuf {
    tree(&init.recipe())
}

/// The tree a recipe makes, cached by it.
pub fn tree(r: &Recipe) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let (include, apt) = (r.include, r.apt);
    let recipe = format!("bookworm minbase {include} apt:{apt:?} trim:{TRIM:?}");
    let key = keel_proto::hex::encode(&Sha256::digest(recipe.as_bytes())[..6]);
    let dir = kit().work.join("debroot").join(format!("{}-{key}", r.name));
    if dir.join(".complete").exists() {
        return dir;
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let log = dir.with_extension("log");
    let step = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut text = out.stdout.clone();
        text.extend_from_slice(&out.stderr);
        let mut all = fs::read(&log).unwrap_or_default();
        all.extend_from_slice(&text);
        fs::write(&log, &all).unwrap();
        let tail: String = String::from_utf8_lossy(&text)
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{tail}",
            out.status
        );
    };
    let _ = fs::remove_file(&log);
    step(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={include}")])
            .arg("bookworm")
            .arg(&dir)
            .arg(MIRROR),
        "debootstrap (apt-get install debootstrap; needs the Debian mirror)",
    );
    for pkgs in apt {
        step(
            Command::new("chroot")
                .arg(&dir)
                .args(["apt-get", "install", "-y", "-q", "--no-install-recommends"])
                .args(*pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install in the Debian root",
        );
    }
    for t in TRIM {
        let p = dir.join(t);
        if p.is_dir() {
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
        } else {
            let _ = fs::remove_file(&p);
        }
    }
    fs::write(dir.join(".complete"), recipe).unwrap();
    dir
}

/// The agent's configuration in the Debian roots: TCP (the tests reach it through QEMU's
/// forward), the local socket the mark-good service uses, exec by the kit's key.
pub const DEB_AGENT_TOML: &str = r#"unix = "/run/keel/agent.sock"
tcp = "0.0.0.0:7447"
trusted_keys = "/etc/keel/trusted.pem"
# On the img partition: the root's upper layer is cleared each boot.
identity = "/run/keel/img/keel-identity.pem"
idle_timeout_secs = 20

[exec]
enabled = true
authorized_keys = "/etc/keel/authorized.pem"
"#;

/// The units from `systemd/` a systemd root gets, enabled.
const SYSTEMD_UNITS: [&str; 3] = [
    "keel-agent.service",
    "keel-mark-good.service",
    "keel-clean-trash.service",
];

/// systemd-networkd's configuration for QEMU's user network (no DHCP wait: a static address).
const NETWORK: &str =
    "[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n";

/// A health check that fails, ordered before `boot-complete.target` and required by it: the
/// boot-assessment pattern's failing check (in the "bad" image only).
const FAILING_HEALTH_UNIT: &str = "[Unit]
Description=keel test: a health check that fails
Before=boot-complete.target

[Service]
Type=oneshot
ExecStart=/bin/false

[Install]
RequiredBy=boot-complete.target
";

/// The OpenRC root's network: ifupdown's static address on QEMU's user network.
const INTERFACES: &str =
    "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n  address 10.0.2.15/24\n  gateway 10.0.2.2\n";

/// Appended to OpenRC's `/etc/rc.conf`.
const RC_CONF: &str = "\n# keel vm-tests\nrc_logger=\"YES\"\n";

/// A health check for `/etc/keel/health.d` that fails (the OpenRC "bad" image).
const FAILING_HEALTH_SCRIPT: &str =
    "#!/bin/sh\necho 'keel test: failing health check' >&2\nexit 1\n";

fn write_exec(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Adds keel to the Debian tree at `root` as a user would: binaries, config and keys, and
/// the init system's service files from `systemd/`, enabled with its own tool.
fn install_keel(root: &Path, init: Init, version: u64, good: bool) {
    let k = kit();
    // initstage too: `initstage clean-trash` for keel-clean-trash.service.
    for b in ["keel-agent", "keelctl", "initstage"] {
        fs::copy(k.bins.join(b), root.join("usr/bin").join(b)).unwrap();
    }
    fs::create_dir_all(root.join("etc/keel")).unwrap();
    fs::copy(&k.trusted, root.join("etc/keel/trusted.pem")).unwrap();
    fs::copy(&k.authorized, root.join("etc/keel/authorized.pem")).unwrap();
    fs::write(root.join("etc/keel/agent.toml"), DEB_AGENT_TOML).unwrap();
    fs::write(root.join("etc/keel-version"), format!("{version}\n")).unwrap();
    fs::write(root.join("etc/hostname"), format!("keel-{}\n", init.name())).unwrap();
    // A fixed machine id: no first-boot setup, the same journal across boots.
    fs::write(
        root.join("etc/machine-id"),
        "6b65656c2d766d2d7465737473000001\n",
    )
    .unwrap();
    let units = workspace().join("systemd");
    match init {
        Init::Systemd => {
            let sys = root.join("etc/systemd/system");
            for u in SYSTEMD_UNITS {
                fs::copy(units.join(u), sys.join(u)).unwrap();
            }
            fs::create_dir_all(root.join("etc/systemd/network")).unwrap();
            fs::write(root.join("etc/systemd/network/10-qemu.network"), NETWORK).unwrap();
            let mut enable = vec!["systemd-networkd.service"];
            enable.extend(SYSTEMD_UNITS);
            if !good {
                fs::write(sys.join("keel-test-health.service"), FAILING_HEALTH_UNIT).unwrap();
                enable.push("keel-test-health.service");
            }
            // systemctl --root wants a path without `..` in it.
            let root = fs::canonicalize(root).unwrap();
            run(Command::new("systemctl")
                .arg(format!("--root={}", root.display()))
                .arg("enable")
                .args(&enable));
        }
        Init::OpenRc => {
            for (src, name) in [
                ("keel-agent.openrc", "keel-agent"),
                ("keel-mark-good.openrc", "keel-mark-good"),
            ] {
                let text = fs::read_to_string(units.join(src)).unwrap();
                write_exec(&root.join("etc/init.d").join(name), &text);
            }
            fs::write(root.join("etc/network/interfaces"), INTERFACES).unwrap();
            // Services' output in /var/log/rc.log: what a failing test shows.
            let conf = root.join("etc/rc.conf");
            let mut rc = fs::read_to_string(&conf).unwrap();
            rc.push_str(RC_CONF);
            fs::write(&conf, rc).unwrap();
            if !good {
                write_exec(
                    &root.join("etc/keel/health.d/10-fails"),
                    FAILING_HEALTH_SCRIPT,
                );
            }
            // rc-update inside the tree: OpenRC's own tool, no running system needed.
            for s in ["keel-agent", "keel-mark-good"] {
                run(Command::new("chroot")
                    .arg(root)
                    .args(["rc-update", "add", s, "default"]));
            }
        }
    }
}

/// The `init` root of `version` as squashfs (zstd), cached by content: the Debian tree's
/// recipe, the keel binaries, keys, the service files and whether its health check fails
/// (`good == false`).
pub fn deb_image(init: Init, version: u64, good: bool) -> PathBuf {
    let tree = deb_tree(init);
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let k = kit();
    let mut h = Sha256::new();
    h.update(fs::read(tree.join(".complete")).unwrap());
    h.update(format!("{version} {good}").as_bytes());
    for t in [
        DEB_AGENT_TOML,
        NETWORK,
        FAILING_HEALTH_UNIT,
        INTERFACES,
        FAILING_HEALTH_SCRIPT,
        RC_CONF,
    ] {
        h.update(t.as_bytes());
    }
    let units = workspace().join("systemd");
    for f in [
        k.bins.join("keel-agent"),
        k.bins.join("keelctl"),
        k.bins.join("initstage"),
        k.trusted.clone(),
        k.authorized.clone(),
        units.join("keel-agent.service"),
        units.join("keel-mark-good.service"),
        units.join("keel-clean-trash.service"),
        units.join("keel-agent.openrc"),
        units.join("keel-mark-good.openrc"),
    ] {
        h.update(fs::read(&f).unwrap());
    }
    let key = keel_proto::hex::encode(&h.finalize()[..6]);
    let name = format!(
        "{}-v{version}-{}-{key}.squashfs",
        init.name(),
        if good { "good" } else { "bad" }
    );
    let out = k.work.join("images").join(&name);
    if out.exists() {
        return out;
    }
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    let root = k.work.join("images").join(format!("{name}.root"));
    let _ = fs::remove_dir_all(&root);
    run(Command::new("cp").arg("-a").arg(&tree).arg(&root));
    let _ = fs::remove_file(root.join(".complete"));
    install_keel(&root, init, version, good);
    let tmp = out.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    run(Command::new("mksquashfs").arg(&root).arg(&tmp).args([
        "-noappend",
        "-quiet",
        "-no-progress",
        "-comp",
        "zstd",
        // Owners as debootstrap made them (systemd-network, _apt, ...); no xattrs (the
        // host's ACLs), so no file capabilities either: nothing here needs one.
        "-no-xattrs",
    ]));
    fs::rename(&tmp, &out).unwrap();
    let _ = fs::remove_dir_all(&root);
    out
}

/// What an init-system scenario starts from: Debian roots v2 (good) and v3 (its health
/// check fails), both signed with their chunk index, a factory disk holding v1 (good), and
/// a host port for the agent's TCP.
#[derive(Debug)]
pub struct DebScenario {
    /// The good update.
    pub v2: PathBuf,
    /// The update whose health check fails.
    pub v3: PathBuf,
    /// The disk, v1 on it.
    pub disk: Disk,
    /// The host port forwarded to the agent's TCP.
    pub port: u16,
}

/// Makes the [`DebScenario`] of `init` in `dir`, partitions of `sizes` MiB.
pub fn deb_scenario(dir: &Path, init: Init, sizes: [u64; 4]) -> DebScenario {
    let v1 = deb_image(init, 1, true);
    let v2 = deb_image(init, 2, true);
    let v3 = deb_image(init, 3, false);
    sign_chunked(&v2, 2);
    sign_chunked(&v3, 3);
    let disk = Disk::with_sizes(dir, &v1, "root-squashfs.img", sizes);
    DebScenario {
        v2,
        v3,
        disk,
        port: free_port(),
    }
}
