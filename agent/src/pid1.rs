//! The syscalls of keel as PID 1 ([`crate::init`] decides): mounts, the signal mask,
//! starting the program and the agent, reaping, and powering off. One log line per step on
//! the console.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_proto::runconfig::{self, RunConfig};

use crate::config::{Config, DEFAULT_CONFIG};
use crate::init::{Action, Ended, Event, OnExit, Supervisor, FORWARDED, MOUNTS};

fn say(msg: &str) {
    eprintln!("keel-init: {msg}");
}

/// Mounts what [`MOUNTS`] lists, making the mount points; one already there (`EBUSY`) is
/// left as it is.
fn mount_all() {
    for (fstype, target, data) in MOUNTS {
        let t = Instant::now();
        let _ = std::fs::create_dir_all(target);
        let data = std::ffi::CString::new(*data).unwrap_or_default();
        let r = rustix::mount::mount(
            *fstype,
            *target,
            *fstype,
            rustix::mount::MountFlags::NOSUID,
            Some(data.as_c_str()),
        );
        match r {
            Ok(()) => say(&format!(
                "mounted {fstype} on {target} ({} ms)",
                t.elapsed().as_millis()
            )),
            Err(rustix::io::Errno::BUSY) => {}
            Err(e) => say(&format!("mount {fstype} on {target}: {e}")),
        }
    }
}

/// Loads the modules [`runconfig::MODULES`] lists, in order (already loaded or built in:
/// fine).
fn load_modules() {
    let Ok(list) = std::fs::read_to_string(runconfig::MODULES) else {
        return;
    };
    for m in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let t = Instant::now();
        let r = std::fs::File::open(m).and_then(|f| {
            // SAFETY: finit_module with an open fd and an empty NUL-terminated parameter
            // string; the kernel reads the module from the fd.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_finit_module,
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    c"".as_ptr(),
                    0,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
        match r {
            Ok(()) => say(&format!("loaded {m} ({} ms)", t.elapsed().as_millis())),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => say(&format!("module {m}: {e}")),
        }
    }
}

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&raw mut set) };
    for &s in sigs {
        // SAFETY: as above; `s` is a valid signal number from our own list.
        unsafe { libc::sigaddset(&raw mut set, s) };
    }
    set
}

/// The program, from the image's run config; `None` when it names nothing.
fn program() -> Option<Command> {
    let cfg: RunConfig = match std::fs::read(runconfig::PATH) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(c) => c,
            Err(e) => {
                say(&format!("{}: {e}: nothing to run", runconfig::PATH));
                return None;
            }
        },
        Err(_) => return None,
    };
    let l = runconfig::launch(&cfg)?;
    let mut c = Command::new(&l.argv[0]);
    c.args(&l.argv[1..]).env_clear().current_dir(&l.cwd);
    let mut home = None;
    if let Some(u) = &l.user {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        match crate::users::resolve(&passwd, &group, u) {
            Ok(user) => {
                c.uid(user.uid).gid(user.gid);
                home = Some(user.home);
            }
            Err(e) => {
                say(&format!("{e}: not starting the program"));
                return None;
            }
        }
    }
    if !l.env.iter().any(|(k, _)| k == "HOME") {
        c.env("HOME", home.unwrap_or_else(|| "/root".into()));
    }
    c.envs(l.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    say(&format!(
        "starting {:?} in {} as {}",
        l.argv,
        l.cwd,
        l.user.as_deref().unwrap_or("root")
    ));
    crate::child::default_signals(&mut c);
    Some(c)
}

fn start_agent() -> Option<i32> {
    let mut c = Command::new("/proc/self/exe");
    if Path::new(DEFAULT_CONFIG).exists() {
        c.arg("--config").arg(DEFAULT_CONFIG);
    }
    crate::child::default_signals(&mut c);
    match c.spawn() {
        Ok(child) => {
            let pid = i32::try_from(child.id()).ok();
            say(&format!("agent started (pid {})", child.id()));
            pid
        }
        Err(e) => {
            say(&format!("agent: {e}"));
            None
        }
    }
}

/// Reaps every child that has ended.
fn reap(events: &mut Vec<Event>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let how = if libc::WIFSIGNALED(status) {
            Ended::Signal(libc::WTERMSIG(status))
        } else {
            Ended::Code(libc::WEXITSTATUS(status))
        };
        events.push(Event::Exited { pid, how });
    }
}

fn shutdown(kind: OnExit) -> ! {
    say("stopping: SIGTERM to every process");
    // SAFETY: kill(-1) signals every process but PID 1; no memory is involved.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let t = Instant::now();
    let mut ev = Vec::new();
    while t.elapsed() < Duration::from_secs(5) {
        reap(&mut ev);
        // SAFETY: as above, signal 0 only checks whether any process is left.
        if unsafe { libc::kill(-1, 0) } != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    rustix::fs::sync();
    let cmd = match kind {
        OnExit::Reboot => rustix::system::RebootCommand::Restart,
        _ => rustix::system::RebootCommand::PowerOff,
    };
    say(match kind {
        OnExit::Reboot => "rebooting",
        _ => "powering off",
    });
    let _ = rustix::system::reboot(cmd);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Runs as PID 1; never returns.
pub fn run() -> ! {
    let t0 = Instant::now();
    mount_all();
    load_modules();
    let mut sigs = FORWARDED.to_vec();
    sigs.push(libc::SIGCHLD);
    let set = sigset(&sigs);
    // SAFETY: `set` is initialized; blocking signals in PID 1 so sigwaitinfo takes them.
    // Children get an empty mask back (std's spawn resets it).
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    let cfg = Config::load(Path::new(DEFAULT_CONFIG), false)
        .map(|c| c.init)
        .unwrap_or_else(|e| {
            say(&format!("{e}: [init] defaults"));
            Default::default()
        });
    let mut prog = program();
    if prog.is_none() && Path::new("/sbin/init").exists() {
        say("the image names no program and has /sbin/init: handing over to it");
        let mut c = Command::new("/sbin/init");
        crate::child::default_signals(&mut c);
        let e = c.exec();
        say(&format!("/sbin/init: {e}"));
    }
    let mut sup = Supervisor {
        on_exit: cfg.on_exit,
        ..Supervisor::default()
    };
    sup.agent = start_agent();
    if let Some(c) = prog.as_mut() {
        match c.spawn() {
            Ok(child) => sup.program = i32::try_from(child.id()).ok(),
            Err(e) => say(&format!("the program: {e}")),
        }
    }
    say(&format!("up in {} ms", t0.elapsed().as_millis()));
    if sup.program.is_none() && cfg.on_exit != OnExit::Stay {
        say("nothing to run");
        shutdown(cfg.on_exit);
    }
    let mut restart_at: Option<Instant> = None;
    loop {
        let mut info: libc::siginfo_t =
            // SAFETY: siginfo_t is plain data, filled by sigtimedwait.
            unsafe { std::mem::zeroed() };
        let ts = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: valid set, out-pointer and timeout.
        let sig = unsafe { libc::sigtimedwait(&raw const set, &raw mut info, &raw const ts) };
        let mut events = Vec::new();
        if sig == libc::SIGCHLD {
            reap(&mut events);
        } else if sig > 0 {
            events.push(Event::Signal(sig));
        }
        reap(&mut events);
        for ev in events {
            for a in sup.on(ev) {
                match a {
                    Action::Forward(s) => {
                        if let Some(p) = sup.program {
                            // SAFETY: kill with a pid we started and a valid signal.
                            unsafe { libc::kill(p, s) };
                        }
                    }
                    Action::Report(Ended::Code(c)) => {
                        say(&format!("the program exited with code {c}"))
                    }
                    Action::Report(Ended::Signal(s)) => {
                        say(&format!("the program was killed by signal {s}"))
                    }
                    Action::RestartAgent(secs) => {
                        say(&format!("the agent exited: starting it again in {secs} s"));
                        restart_at = Some(Instant::now() + Duration::from_secs(secs));
                    }
                    Action::Shutdown(kind) => shutdown(kind),
                }
            }
        }
        if restart_at.is_some_and(|t| Instant::now() >= t) {
            restart_at = None;
            sup.agent = start_agent();
        }
    }
}
