//! device-mapper through the `/dev/mapper/control` ioctls (`linux/dm-ioctl.h`), without
//! libdevmapper or udev: create a device, load a table, resume (which swaps a loaded table
//! in), read a table or its status, remove. The block node is made here too
//! (`/dev/mapper/<name>`), as udev would.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The control device.
pub const CONTROL: &str = "/dev/mapper/control";
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
const DM_SKIP_LOCKFS_FLAG: u32 = 1 << 10;
/// Bytes of the ioctl buffer: the header, and a table or status line.
const BUF: usize = 16 * 1024;

/// `struct dm_ioctl`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; 16],
}

const HEADER: usize = std::mem::size_of::<DmIoctl>();
const SPEC: usize = std::mem::size_of::<DmTargetSpec>();

/// The commands used here (`DM_*_CMD`).
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Version = 0,
    Create = 3,
    Remove = 4,
    Suspend = 6,
    TableLoad = 9,
    TableStatus = 12,
}

impl Cmd {
    /// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
    fn request(self) -> libc::c_ulong {
        let size = u32::try_from(HEADER).expect("header size fits");
        libc::c_ulong::from((3u32 << 30) | (size << 16) | (0xfd << 8) | self as u32)
    }
}

/// A device-mapper error: which step on which device, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("device-mapper {op} {name}: {source}")]
pub struct DmError {
    /// The step.
    pub op: &'static str,
    /// The device name.
    pub name: String,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

/// One target line of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub length: u64,
    /// Target type (`verity`, `linear`, ...).
    pub kind: String,
    /// Its parameters (or, read back as status, its status line).
    pub params: String,
}

/// An open control device.
#[derive(Debug)]
pub struct Control {
    file: File,
}

/// An ioctl buffer: 8-byte aligned, header first.
struct Buf(Vec<u64>);

impl Buf {
    /// A buffer addressed to device `name` (`None` for control-wide commands).
    fn new(name: Option<&str>, flags: u32) -> Result<Self, std::io::Error> {
        let bad = name.is_some_and(|n| n.is_empty() || n.len() >= DM_NAME_LEN || n.contains('/'));
        let name = name.unwrap_or_default();
        if bad {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a device-mapper name is 1-127 bytes without '/'",
            ));
        }
        let mut b = Buf(vec![0u64; BUF / 8]);
        let h = b.header_mut();
        h.version = [4, 0, 0];
        h.data_size = u32::try_from(BUF).expect("buffer size fits");
        h.data_start = u32::try_from(HEADER).expect("header size fits");
        h.flags = flags;
        h.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(b)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the Vec<u64> owns BUF initialised bytes; u8 has no alignment or validity
        // requirement, and the borrow is tied to `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), BUF) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: as in bytes_mut, shared.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), BUF) }
    }

    fn header_mut(&mut self) -> &mut DmIoctl {
        // SAFETY: the buffer is 8-byte aligned and longer than DmIoctl, a plain-data repr(C)
        // struct for which every bit pattern is valid.
        unsafe { &mut *self.0.as_mut_ptr().cast::<DmIoctl>() }
    }

    fn header(&self) -> DmIoctl {
        // SAFETY: as in header_mut; a copy is read.
        unsafe { *self.0.as_ptr().cast::<DmIoctl>() }
    }
}

impl Control {
    /// Opens `/dev/mapper/control` and checks the kernel speaks ioctl version 4.
    pub fn open() -> Result<Self, DmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(|source| DmError {
                op: "open",
                name: CONTROL.into(),
                source,
            })?;
        let c = Control { file };
        c.call(Cmd::Version, None, 0, |_| Ok(())).map(|_| ())?;
        Ok(c)
    }

    /// Whether the kernel offers device-mapper here (the control node exists).
    pub fn available() -> bool {
        Path::new(CONTROL).exists()
    }

    fn call(
        &self,
        cmd: Cmd,
        name: Option<&str>,
        flags: u32,
        fill: impl FnOnce(&mut Buf) -> Result<(), std::io::Error>,
    ) -> Result<Buf, DmError> {
        let op = match cmd {
            Cmd::Version => "version",
            Cmd::Create => "create",
            Cmd::Remove => "remove",
            Cmd::Suspend => "resume",
            Cmd::TableLoad => "load table",
            Cmd::TableStatus => "table status",
        };
        let err = |source| DmError {
            op,
            name: name.unwrap_or("control").to_string(),
            source,
        };
        let mut b = Buf::new(name, flags).map_err(err)?;
        fill(&mut b).map_err(err)?;
        // SAFETY: the request's size field is size_of::<DmIoctl>() and the buffer holds a
        // DmIoctl header followed by data_size - HEADER bytes, all owned by `b` for the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd.request(), b.0.as_mut_ptr()) };
        if r < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(b)
    }

    /// Creates device `name` with no table; its device number.
    pub fn create(&self, name: &str) -> Result<u64, DmError> {
        Ok(self
            .call(Cmd::Create, Some(name), 0, |_| Ok(()))?
            .header()
            .dev)
    }

    /// Loads `targets` as the inactive table of `name` (read-only).
    pub fn load(&self, name: &str, targets: &[Target]) -> Result<(), DmError> {
        self.call(Cmd::TableLoad, Some(name), DM_READONLY_FLAG, |b| {
            let count = u32::try_from(targets.len()).map_err(std::io::Error::other)?;
            b.header_mut().target_count = count;
            let bytes = b.bytes_mut();
            let mut at = HEADER;
            for t in targets {
                let need = (SPEC + t.params.len() + 1).next_multiple_of(8);
                if at + need > BUF || t.kind.len() >= 16 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "table too long for the ioctl buffer",
                    ));
                }
                let mut kind = [0u8; 16];
                kind[..t.kind.len()].copy_from_slice(t.kind.as_bytes());
                let spec = DmTargetSpec {
                    sector_start: t.start,
                    length: t.length,
                    status: 0,
                    next: u32::try_from(need).expect("below BUF"),
                    target_type: kind,
                };
                // SAFETY: `at + SPEC <= BUF`; write_unaligned has no alignment requirement.
                unsafe {
                    bytes
                        .as_mut_ptr()
                        .add(at)
                        .cast::<DmTargetSpec>()
                        .write_unaligned(spec)
                };
                bytes[at + SPEC..at + SPEC + t.params.len()].copy_from_slice(t.params.as_bytes());
                bytes[at + SPEC + t.params.len()] = 0;
                at += need;
            }
            Ok(())
        })
        .map(|_| ())
    }

    /// Resumes `name`: a loaded inactive table becomes live (a live device is suspended for
    /// the swap, without freezing its filesystem).
    pub fn resume(&self, name: &str) -> Result<(), DmError> {
        self.call(Cmd::Suspend, Some(name), DM_SKIP_LOCKFS_FLAG, |_| Ok(()))
            .map(|_| ())
    }

    /// Removes `name` (it must be unused).
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        self.call(Cmd::Remove, Some(name), 0, |_| Ok(()))
            .map(|_| ())
    }

    /// The live table of `name` (`table`), or each target's status line.
    pub fn table(&self, name: &str, table: bool) -> Result<Vec<Target>, DmError> {
        let flags = if table { DM_STATUS_TABLE_FLAG } else { 0 };
        let b = self.call(Cmd::TableStatus, Some(name), flags, |_| Ok(()))?;
        let h = b.header();
        if h.flags & DM_BUFFER_FULL_FLAG != 0 {
            return Err(DmError {
                op: "table status",
                name: name.into(),
                source: std::io::Error::other("the table is longer than the buffer"),
            });
        }
        let bytes = b.bytes();
        let start = usize::try_from(h.data_start).unwrap_or(BUF);
        let mut out = Vec::new();
        let mut at = start;
        for _ in 0..h.target_count {
            if at + SPEC > BUF {
                break;
            }
            // SAFETY: `at + SPEC <= BUF`; read_unaligned has no alignment requirement.
            let spec = unsafe {
                bytes
                    .as_ptr()
                    .add(at)
                    .cast::<DmTargetSpec>()
                    .read_unaligned()
            };
            let params = CStr::from_bytes_until_nul(&bytes[at + SPEC..])
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = CStr::from_bytes_until_nul(&spec.target_type)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(Target {
                start: spec.sector_start,
                length: spec.length,
                kind,
                params,
            });
            at = start + usize::try_from(spec.next).unwrap_or(BUF);
        }
        Ok(out)
    }
}

/// `major:minor` of a device number as the kernel returns it (`huge_encode_dev`).
pub fn major_minor(dev: u64) -> (u32, u32) {
    let major = u32::try_from((dev >> 8) & 0xfff).expect("12 bits");
    let minor = u32::try_from((dev & 0xff) | ((dev >> 12) & 0xfff00)).expect("20 bits");
    (major, minor)
}

/// Makes the block node `/dev/mapper/<name>` for `dev` (replacing a stale one).
pub fn make_node(name: &str, dev: u64) -> std::io::Result<PathBuf> {
    let dir = Path::new("/dev/mapper");
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let (major, minor) = major_minor(dev);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(major, minor),
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernel_header() {
        assert_eq!(HEADER, 312);
        assert_eq!(SPEC, 40);
        assert_eq!(Cmd::TableLoad.request(), 0xc138_fd09);
        assert_eq!(major_minor(0xfd00), (253, 0));
        assert_eq!(major_minor((253 << 8) | 0x1_00005), (253, 0x105));
    }

    #[test]
    fn names_are_checked_before_any_ioctl() {
        assert!(Buf::new(Some(""), 0).is_err());
        assert!(Buf::new(Some("a/b"), 0).is_err());
        assert!(Buf::new(Some(&"x".repeat(128)), 0).is_err());
        assert!(Buf::new(Some("keel-root"), 0).is_ok());
        assert!(Buf::new(None, 0).is_ok_and(|b| b.header().name == [0; DM_NAME_LEN]));
    }
}
