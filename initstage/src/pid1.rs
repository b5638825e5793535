//! PID 1 mode: the `/init` of the initramfs.
//!
//! Mounts the API filesystems, reads the command line, loads modules, prepares the new root
//! ([`crate::boot::prepare`]) and switch_root's into it. PID 1 never exits and never panics
//! out: any failure prints why and reboots, or with `keel.debug` starts a shell first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::mount::{mount, MountFlags};

use crate::boot::{self, Options};
use crate::cmdline;
use crate::error::{Error, Result};
use crate::kmsg::{self, step};
use crate::mountplan::Layout;
use crate::probe::Scope;
use crate::switch_root;
use crate::{failpoint, modules};

/// Trusted keys inside the initramfs.
pub const TRUSTED_KEYS: &str = "/etc/keel/trusted.pem";
/// Where the partitions are mounted; moved into the new root with /run.
pub const RUN_DIR: &str = "/run/keel";
/// Where the new root is assembled.
pub const SYSROOT: &str = "/sysroot";

/// (source, target, fstype, data) of the API filesystems, mounted in order; nosuid and nodev
/// are mount flags, not filesystem options (tmpfs refuses them as data: found by the first
/// real-kernel boot).
const API_MOUNTS: &[(&str, &str, &str, &str)] = &[
    ("proc", "/proc", "proc", ""),
    ("sysfs", "/sys", "sysfs", ""),
    ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
    ("tmpfs", "/run", "tmpfs", "mode=0755"),
];

fn api_mounts() -> Result<()> {
    for (src, target, fstype, data) in API_MOUNTS {
        let _ = std::fs::create_dir_all(target);
        let data = std::ffi::CString::new(*data).expect("static options");
        let flags = match *fstype {
            "proc" | "sysfs" => MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            "devtmpfs" => MountFlags::NOSUID,
            _ => MountFlags::NOSUID | MountFlags::NODEV,
        };
        match mount(*src, *target, *fstype, flags, Some(data.as_c_str())) {
            Ok(()) | Err(rustix::io::Errno::BUSY) => {}
            Err(e) => {
                return Err(Error::Mount {
                    source_dev: src.to_string(),
                    target: PathBuf::from(target),
                    fstype: fstype.to_string(),
                    options: data.to_string_lossy().into_owned(),
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

fn console_stdio() {
    if let Ok(c) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        let _ = rustix::stdio::dup2_stdin(&c);
        let _ = rustix::stdio::dup2_stdout(&c);
        let _ = rustix::stdio::dup2_stderr(&c);
    }
}

/// Reboots (or, with `keel.debug`, first starts a shell). Never returns.
fn fail(e: &Error, debug: bool) -> ! {
    log::error!("boot failed: {e}");
    if debug && Path::new("/bin/sh").exists() {
        log::error!("keel.debug: starting /bin/sh; exit it to reboot");
        let _ = std::process::Command::new("/bin/sh").status();
    } else {
        log::error!("rebooting in 5 s (add keel.debug to the kernel command line for a shell)");
        std::thread::sleep(Duration::from_secs(5));
    }
    reboot()
}

fn reboot() -> ! {
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Starts a low-priority child that, after switch_root, deletes the initramfs's files
/// (through `old_root`, an fd of it) and empties the old upper layers: neither is on the boot
/// path any more. The real init reaps it.
fn spawn_cleaner(old_root: &std::fs::File, trash: Option<&Path>) {
    // SAFETY: PID 1 is single-threaded here (the module workers have ended); the child only
    // touches the filesystem and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: setpriority on our own process.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        switch_root::free_initramfs(old_root);
        if let Some(t) = trash {
            let _ = boot::clean_trash(t);
        }
        // SAFETY: _exit ends the child without running PID 1's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        // No child: do the initramfs now, leave the trash for the next boot.
        switch_root::free_initramfs(old_root);
    }
}

/// Seconds since boot on the clock the kernel log's timestamps use (CLOCK_MONOTONIC).
fn uptime() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Runs PID 1 mode. `argv` is what the kernel passed (arguments it did not recognise).
pub fn run(argv: Vec<String>) -> ! {
    let entered = uptime();
    kmsg::init();
    std::panic::set_hook(Box::new(|info| {
        log::error!("initstage panicked: {info}");
        reboot();
    }));
    if let Err(e) = api_mounts() {
        fail(&e, false);
    }
    console_stdio();
    let devkmsg = kmsg::unlimit();
    kmsg::open_kmsg();
    log::info!(
        "initstage {} started ({} s after boot; API filesystems mounted)",
        env!("CARGO_PKG_VERSION"),
        kmsg::Secs(entered)
    );
    let line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (cfg, warnings) = cmdline::parse(&line);
    for w in &warnings {
        log::warn!("{w}");
    }
    failpoint::arm(cfg.failpoint);
    let debug = cfg.debug;
    kmsg::set_verbose(debug);

    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let modules_pending = match step("load modules", || {
        modules::load_all(&Path::new("/lib/modules").join(&release), &cfg.modules)
    }) {
        Ok(missing) => missing,
        Err(e) => {
            log::error!("{e}; continuing");
            Vec::new()
        }
    };
    // No key file: staged images are checked by hash only (documented). A key file that
    // does not parse: nothing is promoted (fail closed), the current image boots.
    let (keys, keys_error) = match std::fs::read_to_string(TRUSTED_KEYS) {
        Ok(pem) => match keel_proto::manifest::public_keys_from_pem(&pem) {
            Ok(k) => (k, None),
            Err(e) => {
                log::error!("{TRUSTED_KEYS}: {e}: no staged image is promoted until it is fixed");
                (Vec::new(), Some(format!("{TRUSTED_KEYS}: {e}")))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), None),
        Err(e) => (Vec::new(), Some(format!("{TRUSTED_KEYS}: {e}"))),
    };
    let opts = Options {
        cfg: cfg.clone(),
        layout: Layout {
            run: RUN_DIR.into(),
            sysroot: SYSROOT.into(),
        },
        scope: Scope::All,
        keys,
        keys_error,
        modules_pending,
    };
    let prepared = match boot::prepare(&opts) {
        Ok(p) => p,
        Err(e) => fail(&e, debug),
    };
    let old_root = match step("switch_root", || {
        switch_root::switch_root(Path::new(SYSROOT))
    }) {
        Ok(f) => f,
        Err(e) => fail(&e, debug),
    };
    // After switch_root the run directory (and the trash) is at the same path in the new root.
    spawn_cleaner(&old_root, prepared.trash.as_deref());
    drop(old_root);
    let mut args = cfg.init_args.clone();
    args.extend(argv.into_iter().skip(1));
    log::info!("exec {} {}", cfg.init, args.join(" "));
    kmsg::restore_limit(devkmsg);
    let e = switch_root::exec_init(&cfg.init, &args);
    fail(&e, debug)
}
