//! keel as a container image's init (PID 1 of a microVM booted from `keelctl build --format
//! initramfs`, or any root without an init of its own): what it mounts ([`MOUNTS`]), and a
//! supervisor that turns what happens — a child exits, a signal arrives — into what to do
//! ([`Supervisor::on`], pure). The syscalls are in [`crate::pid1`].
//!
//! PID 1 starts two children: the image's program ([`keel_proto::runconfig::launch`]) and
//! the agent (the same binary, as an ordinary daemon, so its `exec` children are its own to
//! wait for); PID 1 reaps everything else that is reparented to it. Signals sent to PID 1
//! (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) go to the program. When the program
//! exits, `[init] on_exit` says what follows: power off (default), reboot, or stay up with
//! the agent serving. An agent that exits is started again, backing off.

use serde::Deserialize;

/// The filesystems PID 1 mounts where they are not mounted yet: (fstype, target, data).
pub const MOUNTS: &[(&str, &str, &str)] = &[
    ("proc", "/proc", ""),
    ("sysfs", "/sys", ""),
    ("devtmpfs", "/dev", "mode=0755"),
    ("devpts", "/dev/pts", "mode=0620,ptmxmode=0666,gid=5"),
    ("tmpfs", "/dev/shm", "mode=1777"),
    ("tmpfs", "/run", "mode=0755"),
    ("tmpfs", "/tmp", "mode=1777"),
];

/// What happens when the image's program exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Power the machine off (a microVM ends with its program).
    #[default]
    Poweroff,
    /// Reboot.
    Reboot,
    /// Keep running: the agent still serves.
    Stay,
}

/// The `[init]` table of agent.toml (read only when keel is PID 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitConfig {
    /// After the program exits.
    pub on_exit: OnExit,
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// What PID 1 saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A child was reaped.
    Exited {
        /// Its pid.
        pid: i32,
        /// How.
        how: Ended,
    },
    /// A signal for PID 1.
    Signal(i32),
}

/// What PID 1 does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send this signal to the program.
    Forward(i32),
    /// Start the agent again after this many seconds.
    RestartAgent(u64),
    /// Stop everything and power off or reboot.
    Shutdown(OnExit),
    /// Say that the program ended, and how.
    Report(Ended),
}

/// The signals PID 1 takes and forwards.
pub const FORWARDED: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// PID 1's view of its two children.
#[derive(Debug, Clone, Default)]
pub struct Supervisor {
    /// The program's pid, while it runs.
    pub program: Option<i32>,
    /// The agent's pid, while it runs.
    pub agent: Option<i32>,
    /// Agent restarts so far.
    pub restarts: u32,
    /// What follows the program's exit.
    pub on_exit: OnExit,
    /// A shutdown was decided.
    pub stopping: bool,
}

impl Supervisor {
    /// What to do about `ev`.
    pub fn on(&mut self, ev: Event) -> Vec<Action> {
        match ev {
            Event::Exited { pid, how } if Some(pid) == self.program => {
                self.program = None;
                let mut v = vec![Action::Report(how)];
                if self.on_exit != OnExit::Stay && !self.stopping {
                    self.stopping = true;
                    v.push(Action::Shutdown(self.on_exit));
                }
                v
            }
            Event::Exited { pid, .. } if Some(pid) == self.agent => {
                self.agent = None;
                if self.stopping {
                    return Vec::new();
                }
                let delay = 1u64 << self.restarts.min(5);
                self.restarts += 1;
                vec![Action::RestartAgent(delay)]
            }
            Event::Exited { .. } => Vec::new(),
            Event::Signal(s) => match self.program {
                Some(_) => vec![Action::Forward(s)],
                None if (s == libc::SIGTERM || s == libc::SIGINT) && !self.stopping => {
                    self.stopping = true;
                    vec![Action::Shutdown(OnExit::Poweroff)]
                }
                None => Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(pid: i32, how: Ended) -> Event {
        Event::Exited { pid, how }
    }

    #[test]
    fn supervises() {
        let mut s = Supervisor {
            program: Some(10),
            agent: Some(11),
            ..Supervisor::default()
        };
        assert_eq!(
            s.on(Event::Signal(libc::SIGTERM)),
            [Action::Forward(libc::SIGTERM)]
        );
        assert_eq!(s.on(exited(99, Ended::Code(0))), []);
        assert_eq!(
            s.on(exited(11, Ended::Signal(9))),
            [Action::RestartAgent(1)]
        );
        s.agent = Some(12);
        assert_eq!(s.on(exited(12, Ended::Code(1))), [Action::RestartAgent(2)]);
        s.agent = Some(13);
        assert_eq!(
            s.on(exited(10, Ended::Code(3))),
            [
                Action::Report(Ended::Code(3)),
                Action::Shutdown(OnExit::Poweroff)
            ]
        );
        // Stopping: the agent is not restarted, signals go nowhere.
        assert_eq!(s.on(exited(13, Ended::Code(0))), []);
        assert_eq!(s.on(Event::Signal(libc::SIGTERM)), []);

        let mut stay = Supervisor {
            program: Some(5),
            on_exit: OnExit::Stay,
            ..Supervisor::default()
        };
        assert_eq!(
            stay.on(exited(5, Ended::Code(0))),
            [Action::Report(Ended::Code(0))]
        );
        assert_eq!(
            stay.on(Event::Signal(libc::SIGINT)),
            [Action::Shutdown(OnExit::Poweroff)]
        );
        let cfg: InitConfig = toml::from_str("on_exit = \"reboot\"").unwrap();
        assert_eq!(cfg.on_exit, OnExit::Reboot);
        assert!(toml::from_str::<InitConfig>("on_exit = \"later\"").is_err());
    }
}
