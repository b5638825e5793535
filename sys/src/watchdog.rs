//! The kernel's watchdog device (`/dev/watchdog`, any driver: QEMU's `i6300esb`, a board's,
//! `softdog`): armed for a trial boot, disarmed when the boot is confirmed.
//!
//! Arming sets the timeout, pings once and closes the device *without* the magic character:
//! the watchdog core then leaves it running, and nobody pings it, so the machine resets when
//! the timeout runs out unless something disarms it first. Disarming opens the device and
//! writes `V` (the magic close), which stops a driver that allows it
//! (`CONFIG_WATCHDOG_NOWAYOUT` off, as in Debian's kernels).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The device keel arms.
pub const DEVICE: &str = "/dev/watchdog";

/// `_IOWR('W', 6, int)`: set the timeout in seconds (the driver answers what it took).
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xc004_5706;
/// `_IOR('W', 5, int)`: ping.
const WDIOC_KEEPALIVE: libc::c_ulong = 0x8004_5705;

/// Arms the watchdog at `path` with a timeout of `secs`; returns the timeout the driver set
/// (it may round).
pub fn arm(path: &Path, secs: u32) -> std::io::Result<u32> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    let mut t = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: WDIOC_SETTIMEOUT reads and writes one int through the pointer, which lives
    // for the call; the descriptor is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), WDIOC_SETTIMEOUT, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut dummy: libc::c_int = 0;
    // SAFETY: WDIOC_KEEPALIVE takes (and ignores) an int pointer; as above.
    if unsafe { libc::ioctl(f.as_raw_fd(), WDIOC_KEEPALIVE, &mut dummy) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Closed without 'V': it keeps running.
    drop(f);
    Ok(u32::try_from(t).unwrap_or(secs))
}

/// Stops the watchdog at `path` with the magic close.
pub fn disarm(path: &Path) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(b"V")
}
