//! Pseudo-terminals for `exec` with a tty: open one of a size, resize it.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use keel_proto::exec::WinSize;

fn winsize(ws: WinSize) -> libc::winsize {
    libc::winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a pty of size `ws`: (master, slave), both close-on-exec (the child gets the slave
/// through its stdio, which exec keeps).
pub fn open(ws: WinSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave): (libc::c_int, libc::c_int) = (-1, -1);
    let w = winsize(ws);
    // SAFETY: openpty writes two descriptors into the ints; the name buffer is null (not
    // wanted), the termios null (defaults) and the winsize points to a live local.
    let rc = unsafe {
        libc::openpty(
            &raw mut master,
            &raw mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &raw const w,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: both are open descriptors that nothing else owns.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&m, &s] {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    }
    Ok((m, s))
}

/// Sets the size of the pty whose master is `fd` (the process gets SIGWINCH).
pub fn resize(fd: RawFd, ws: WinSize) {
    let w = winsize(ws);
    // SAFETY: TIOCSWINSZ reads one winsize from a live local; `fd` is the open master.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &raw const w) };
}
