//! `keelctl exec`: runs a command in the guest with its output on ours, stdin forwarded,
//! signals forwarded, and its exit code as ours.
//!
//! Exit codes: the remote code; 128 + N when the process died of signal N; 127 when it could
//! not be started (no such program or directory); 255 when the agent refused the exec or the
//! connection failed.

use std::io::IsTerminal;

use keel_proto::exec::{ExecSpec, WinSize};
use keel_proto::message::ErrorCode;
use keelctl::client::Client;
use keelctl::error::Error;
use keelctl::exec::{attach, start, start_detached, Signaller};

/// The signals forwarded to the remote process group.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The local terminal's size (of stdout, else stdin), if either is a terminal.
pub fn term_size() -> Option<WinSize> {
    for fd in [1, 0] {
        // SAFETY: winsize is plain data; TIOCGWINSZ writes one into the live local.
        let mut w: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `fd` is one of our standard descriptors.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &raw mut w) } == 0 && w.ws_row > 0 {
            return Some(WinSize {
                rows: w.ws_row,
                cols: w.ws_col,
            });
        }
    }
    None
}

/// The local terminal in raw mode until dropped (keys go to the remote pty as they are
/// typed, Ctrl-C included).
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        // SAFETY: termios is plain data filled by tcgetattr before use; fd 0 is our stdin.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &raw mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&raw mut t);
            if libc::tcsetattr(0, libc::TCSANOW, &raw const t) != 0 {
                return None;
            }
            Some(RawMode(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the termios tcgetattr gave us on fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw const self.0) };
    }
}

/// Blocks the forwarded signals in this thread (so in every thread spawned after it) and
/// sends each one that arrives to the process through `s`, from a thread of its own. A
/// signal keelctl was started with ignored (`nohup`, a background job) stays ignored. With
/// `tty`, SIGWINCH sends the terminal's new size instead.
fn forward_signals(s: Signaller, tty: bool) {
    // SAFETY: sigset_t and sigaction are plain data, initialised (zeroed, sigemptyset)
    // before use; every pointer passed is to a live local or null where the call allows it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        if tty {
            libc::sigaddset(&raw mut set, libc::SIGWINCH);
        }
        for sig in FORWARDED {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &raw mut old);
            if old.sa_sigaction != libc::SIG_IGN {
                libc::sigaddset(&raw mut set, sig);
            }
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t owned by this thread; sigwait writes one
        // int into `sig`.
        if unsafe { libc::sigwait(&raw const set, &raw mut sig) } != 0 {
            continue;
        }
        let sent = if sig == libc::SIGWINCH {
            term_size().map_or(Ok(()), |ws| s.resize(ws))
        } else {
            s.signal(sig)
        };
        if sent.is_err() {
            return;
        }
    });
}

/// Runs `spec` over `client` and exits with the process's code. `interactive` forwards stdin
/// even from a terminal (it is forwarded anyway when stdin is not one). With `detach` it
/// prints the process's id and returns at once.
pub fn run(client: Client, spec: ExecSpec, interactive: bool, detach: bool) -> ! {
    if detach {
        match start_detached(client, spec) {
            Ok((id, pid)) => {
                println!("{id}");
                eprintln!("keelctl: process {id} (pid {pid}) runs detached: keelctl attach {id}, keelctl kill {id}");
                std::process::exit(0)
            }
            Err(e) => exit_for(e),
        }
    }
    let timeout = spec.timeout_secs;
    let tty = spec.tty.is_some();
    follow(start(client, spec), timeout, tty, interactive)
}

/// `keelctl attach ID`: watches the process as `exec` does, from what it wrote meanwhile.
pub fn attach_run(client: Client, id: u64) -> ! {
    follow(attach(client, id), None, false, false)
}

fn exit_for(e: Error) -> ! {
    eprintln!("keelctl: {e}");
    std::process::exit(match e {
        Error::Refused {
            code: ErrorCode::ExecFailed,
            ..
        } => 127,
        _ => 255,
    })
}

fn follow(
    started: keelctl::error::Result<keelctl::exec::Running>,
    timeout: Option<u64>,
    tty: bool,
    interactive: bool,
) -> ! {
    let code = match started {
        Ok(running) => {
            let s = running.signaller();
            forward_signals(s.clone(), tty);
            let raw = (tty && std::io::stdin().is_terminal())
                .then(RawMode::enter)
                .flatten();
            if tty || interactive || !std::io::stdin().is_terminal() {
                running.feed_stdin(Box::new(std::io::stdin()));
            } else if s.close_stdin().is_err() {
                eprintln!("keelctl: the connection closed before the process started");
            }
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let r = running.wait(&mut out, &mut err, &mut |n| {
                eprintln!("keelctl: {n} bytes of output were dropped while no client was attached")
            });
            drop(raw);
            match r {
                Ok(st) => {
                    if st.timed_out {
                        eprintln!(
                            "keelctl: the process ran out of its --timeout ({} s) and was killed",
                            timeout.unwrap_or(0)
                        );
                    }
                    st.shell_code()
                }
                Err(e) => {
                    eprintln!("keelctl: {e}");
                    255
                }
            }
        }
        Err(e) => exit_for(e),
    };
    std::process::exit(code)
}
