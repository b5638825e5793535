//! Read-only loop devices with one `LOOP_CONFIGURE` ioctl (read-only + autoclear), so the
//! device disappears by itself when its filesystem is unmounted, or when it is never mounted
//! and this handle is dropped: a crash cannot leak it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use linux_raw_sys::loop_device::{
    loop_config, loop_info64, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LO_FLAGS_AUTOCLEAR,
    LO_FLAGS_READ_ONLY,
};
use rustix::io::Errno;
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode, Setter};

use crate::error::{Error, Result};

/// An attached loop device. Dropping it closes this handle; with autoclear the kernel
/// detaches the device once nothing (no mount) uses it any more.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    _dev: File,
}

/// `LOOP_CTL_GET_FREE`: no argument, returns the free device's number.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument pointer and modifies no user memory; its return
// value is the device number.
unsafe impl Ioctl for GetFree {
    type Output = u32;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE as Opcode
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<u32> {
        Ok(out as u32)
    }
}

fn err(file: &Path, step: &'static str, e: impl Into<std::io::Error>) -> Error {
    Error::Loop {
        file: file.to_path_buf(),
        step,
        source: e.into(),
    }
}

/// Attaches `file` read-only to a free loop device.
pub fn attach_read_only(file: &Path) -> Result<LoopDevice> {
    let backing = File::open(file).map_err(|e| err(file, "open image", e))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| err(file, "open /dev/loop-control", e))?;
    let mut last = Errno::BUSY;
    for _ in 0..20 {
        // SAFETY: GetFree describes LOOP_CTL_GET_FREE exactly (no argument, int result).
        let n = unsafe { ioctl::ioctl(&ctl, GetFree) }
            .map_err(|e| err(file, "LOOP_CTL_GET_FREE", e))?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        // devtmpfs creates the node as the device is added; give it a moment.
        let mut dev = None;
        for _ in 0..50 {
            match OpenOptions::new().read(true).open(&path) {
                Ok(f) => {
                    dev = Some(f);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => return Err(err(file, "open loop device", e)),
            }
        }
        let dev = dev.ok_or_else(|| err(file, "open loop device", Errno::NOENT))?;
        // SAFETY: loop_info64 and loop_config are plain C structs; all-zero is valid.
        let mut info: loop_info64 = unsafe { std::mem::zeroed() };
        info.lo_flags = LO_FLAGS_READ_ONLY as u32 | LO_FLAGS_AUTOCLEAR as u32;
        let name = file.as_os_str().as_encoded_bytes();
        let len = name.len().min(info.lo_file_name.len() - 1);
        info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: as above.
        let mut cfg: loop_config = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info = info;
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which Setter passes by pointer;
        // the backing fd stays open for the call.
        let r = unsafe {
            ioctl::ioctl(
                &dev,
                Setter::<{ LOOP_CONFIGURE as Opcode }, loop_config>::new(cfg),
            )
        };
        match r {
            Ok(()) => return Ok(LoopDevice { path, _dev: dev }),
            // Another process configured this device between GET_FREE and CONFIGURE.
            Err(Errno::BUSY) => last = Errno::BUSY,
            Err(e) => return Err(err(file, "LOOP_CONFIGURE", e)),
        }
    }
    Err(err(
        file,
        "LOOP_CONFIGURE (every free device was taken)",
        last,
    ))
}
