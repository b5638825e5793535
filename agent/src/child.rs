//! How every child of the agent starts: the default signal dispositions and an empty signal
//! mask, whatever the agent itself ignores or blocks (PID 1 blocks what it waits for; an agent
//! started in the background of a shell inherits SIGINT ignored, and exec would hand that on).

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`'s child start with every signal at its default and none blocked.
pub fn default_signals(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (signal, sigemptyset, sigprocmask) on its own stack data.
    unsafe {
        cmd.pre_exec(|| {
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut());
            Ok(())
        });
    }
}
