//! initstage's errors: each names the step, the device or path, and the system's reason.

use std::io;
use std::path::PathBuf;

impl Error {
    /// Whether the file system was full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }
}

/// Everything that can go wrong in initstage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation, e.g. "create", "fsync", "rename".
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The system's reason.
        source: io::Error,
    },
    /// mount(2) failed.
    #[error("mount {fstype} {source_dev} on {target} ({options}): {source}")]
    Mount {
        /// Device or pseudo-source.
        source_dev: String,
        /// Mount point.
        target: PathBuf,
        /// Filesystem type.
        fstype: String,
        /// Mount options.
        options: String,
        /// The system's reason.
        source: io::Error,
    },
    /// A required partition was not found in time.
    #[error("no partition with filesystem label {label:?} (the {role} partition) appeared within {waited_secs} s; set keel.label.{role}= if it has another label")]
    PartitionNotFound {
        /// Role: img, overlay, newimg, boot.
        role: &'static str,
        /// The label searched for.
        label: String,
        /// How long initstage waited.
        waited_secs: u64,
    },
    /// Two devices carry the same label.
    #[error(
        "filesystem label {label:?} is on more than one device: {devices}; labels must be unique"
    )]
    AmbiguousLabel {
        /// The label.
        label: String,
        /// The devices, comma-separated.
        devices: String,
    },
    /// libblkid could not probe something.
    #[error("libblkid cannot probe {path}: {detail}")]
    Probe {
        /// Device or file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The image is not a filesystem initstage mounts.
    #[error("image {path} is {found}, not squashfs or erofs")]
    ImageType {
        /// The image file.
        path: PathBuf,
        /// What libblkid found.
        found: String,
    },
    /// Attaching a loop device failed.
    #[error("loop device for {file}: {step}: {source}")]
    Loop {
        /// Backing file.
        file: PathBuf,
        /// Which step failed.
        step: &'static str,
        /// The system's reason.
        source: io::Error,
    },
    /// A copied image does not have its manifest's digest.
    #[error("{path}: sha256 is {found}, the manifest says {expected}")]
    HashMismatch {
        /// The copy.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Computed.
        found: String,
    },
    /// A device-mapper step failed, or verity refused the image.
    #[error("verity: {0}")]
    Dm(String),
    /// A copied image's verity tree is not the one its manifest signed.
    #[error("{path}: {detail}")]
    Verity {
        /// The image.
        path: PathBuf,
        /// What did not match.
        detail: String,
    },
    /// A copied image does not have its manifest's size.
    #[error("{path}: {found} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// From the manifest.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// The boot state or a manifest could not be used.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A kernel module could not be loaded.
    #[error("module {name}: {detail}")]
    Module {
        /// Module name.
        name: String,
        /// What failed.
        detail: String,
    },
    /// The new root has no init to run.
    #[error("{init} is not an executable file in the new root {sysroot}")]
    InitMissing {
        /// init= path.
        init: String,
        /// The new root.
        sysroot: PathBuf,
    },
    /// A switch_root step failed.
    #[error("switch_root: {step}: {source}")]
    SwitchRoot {
        /// Which step.
        step: &'static str,
        /// The system's reason.
        source: io::Error,
    },
    /// Bad command-line use of the binary.
    #[error("{0}")]
    Usage(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds path context to an io::Result.
pub trait IoContext<T> {
    /// Wraps the error with the operation and path.
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.into(),
            source,
        })
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::Io {
            op,
            path: path.into(),
            source: e.into(),
        })
    }
}
