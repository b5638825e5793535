//! The few libblkid functions initstage calls, declared by hand (the Rust wrappers are stale
//! and need libclang). libblkid is LGPL-2.1+, from util-linux; linked statically in release.

use std::ffi::{c_char, c_int, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[allow(non_camel_case_types)]
type blkid_probe = *mut std::ffi::c_void;

#[link(name = "blkid")]
extern "C" {
    fn blkid_new_probe_from_filename(filename: *const c_char) -> blkid_probe;
    fn blkid_free_probe(pr: blkid_probe);
    fn blkid_probe_enable_superblocks(pr: blkid_probe, enable: c_int) -> c_int;
    fn blkid_probe_set_superblocks_flags(pr: blkid_probe, flags: c_int) -> c_int;
    fn blkid_do_safeprobe(pr: blkid_probe) -> c_int;
    fn blkid_probe_filter_superblocks_usage(pr: blkid_probe, flag: c_int, usage: c_int) -> c_int;
    fn blkid_probe_lookup_value(
        pr: blkid_probe,
        name: *const c_char,
        data: *mut *const c_char,
        len: *mut usize,
    ) -> c_int;
}

const BLKID_SUBLKS_LABEL: c_int = 1 << 1;
const BLKID_SUBLKS_TYPE: c_int = 1 << 5;
const BLKID_FLTR_ONLYIN: c_int = 2;
const BLKID_USAGE_FILESYSTEM: c_int = 1 << 1;

/// What libblkid says is on a device or in a file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    /// Filesystem type, e.g. `ext4`, `squashfs`, `erofs`.
    pub fstype: Option<String>,
    /// Filesystem label.
    pub label: Option<String>,
}

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeError {
    /// The device or file could not be opened.
    Open(std::io::Error),
    /// libblkid reported an error or conflicting signatures.
    Probe(&'static str),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Open(e) => write!(f, "cannot open: {e}"),
            ProbeError::Probe(s) => f.write_str(s),
        }
    }
}

struct Probe(blkid_probe);

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: self.0 came from blkid_new_probe_from_filename, is non-null and freed once.
        unsafe { blkid_free_probe(self.0) }
    }
}

impl Probe {
    fn value(&self, name: &CStr) -> Option<String> {
        let mut data: *const c_char = std::ptr::null();
        let mut len: usize = 0;
        // SAFETY: the probe is valid; data/len are valid out-pointers; libblkid keeps the
        // returned string alive until the probe is freed, and we copy it before that.
        let rc =
            unsafe { blkid_probe_lookup_value(self.0, name.as_ptr(), &raw mut data, &raw mut len) };
        if rc != 0 || data.is_null() {
            return None;
        }
        // SAFETY: libblkid returns a NUL-terminated string on success.
        let s = unsafe { CStr::from_ptr(data) };
        Some(s.to_string_lossy().into_owned())
    }
}

/// Probes `path` (a block device or an image file) for a filesystem superblock. Only
/// filesystem probers run: RAID, crypto and swap signatures are not looked for (most of them
/// sit at the end of the device, one more read each; keel mounts filesystems, nothing else).
pub fn probe(path: &Path) -> Result<Superblock, ProbeError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| ProbeError::Probe("path contains NUL"))?;
    // SAFETY: c is a valid NUL-terminated path; the function returns NULL on failure.
    let raw = unsafe { blkid_new_probe_from_filename(c.as_ptr()) };
    if raw.is_null() {
        return Err(ProbeError::Open(std::io::Error::last_os_error()));
    }
    let pr = Probe(raw);
    // SAFETY: pr.0 is a valid probe for the calls below.
    let rc = unsafe {
        blkid_probe_enable_superblocks(pr.0, 1);
        blkid_probe_set_superblocks_flags(pr.0, BLKID_SUBLKS_LABEL | BLKID_SUBLKS_TYPE);
        blkid_probe_filter_superblocks_usage(pr.0, BLKID_FLTR_ONLYIN, BLKID_USAGE_FILESYSTEM);
        blkid_do_safeprobe(pr.0)
    };
    match rc {
        0 => Ok(Superblock {
            fstype: pr.value(c"TYPE"),
            label: pr.value(c"LABEL"),
        }),
        1 => Ok(Superblock::default()),
        -2 => Err(ProbeError::Probe("conflicting filesystem signatures")),
        _ => Err(ProbeError::Probe("probe failed")),
    }
}
