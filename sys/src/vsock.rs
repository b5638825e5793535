//! AF_VSOCK sockets through four libc calls (socket, bind/connect, listen, accept4).
//!
//! rustix names `AF_VSOCK` but has no `sockaddr_vm`; the vsock crates pull in `nix` next to
//! rustix. A connected vsock socket is an ordinary stream file descriptor: reads, writes and
//! shutdown behave as on a Unix stream socket, so it is handed to tokio (or std) as a
//! `UnixStream` and only the address handling lives here.
//!
//! Never used on a development machine: its vsock is the machine's management channel. The
//! vm-tests exercise it inside QEMU guests.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `sizeof(struct sockaddr_vm)` (16) as the kernel takes it.
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_VM_LEN: libc::socklen_t = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// The host's CID as seen from a guest.
pub const CID_HOST: u32 = 2;

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { mem::zeroed() };
    // AF_VSOCK is 40: it fits sa_family_t.
    a.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, ty, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking listening socket on `port`, any CID.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let fd = socket(true)?;
    let a = addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm and its size is passed with it.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&raw const a).cast(), SOCKADDR_VM_LEN) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a descriptor we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accepts one connection (non-blocking): the stream and the peer's CID and port.
pub fn accept(listener: &OwnedFd) -> io::Result<(OwnedFd, u32, u32)> {
    let mut a = addr(0, 0);
    let mut len = SOCKADDR_VM_LEN;
    // SAFETY: `a` and `len` are valid for writes of a sockaddr_vm.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&raw mut a).cast(),
            &raw mut len,
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((owned, a.svm_cid, a.svm_port))
}

/// A blocking connection to `cid:port`.
pub fn connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let fd = socket(false)?;
    let a = addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm and its size is passed with it.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const a).cast(), SOCKADDR_VM_LEN) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
