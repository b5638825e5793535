//! Root images from a directory tree, with Debian's own tools: `mksquashfs` (squashfs-tools)
//! or `mkfs.erofs` (erofs-utils). Reproducible: the same tree gives the same bytes
//! (`mksquashfs` sorts entries and keeps each file's mtime, the filesystem's own time fixed
//! with `-mkfs-time`; Debian 12's `mkfs.erofs` 1.5 can only fix every inode's time at once,
//! `-T`, with a fixed UUID). Written to a temporary name beside `out`, renamed when complete.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, IoContext, Result};

/// A root image's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// squashfs (gzip), as initstage mounts by default.
    Squashfs,
    /// erofs (lz4hc when the tool has it, else uncompressed).
    Erofs,
}

/// Makes `out` from `tree`; `epoch` is the filesystem's own timestamp (and, for erofs,
/// every inode's).
pub fn make(tree: &Path, out: &Path, format: Format, epoch: u64) -> Result<()> {
    let tmp = out.with_extension("keel-build.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut cmd = match format {
        Format::Squashfs => {
            let mut c = Command::new("mksquashfs");
            c.arg(tree).arg(&tmp).args([
                "-noappend",
                "-no-progress",
                "-quiet",
                "-mkfs-time",
                &epoch.to_string(),
            ]);
            c
        }
        Format::Erofs => {
            let mut c = Command::new("mkfs.erofs");
            c.args([
                "--quiet",
                &format!("-T{epoch}"),
                "-U",
                "6b65656c-0000-4000-8000-000000000000",
            ])
            .arg(&tmp)
            .arg(tree);
            c
        }
    };
    let tool = match format {
        Format::Squashfs => "mksquashfs",
        Format::Erofs => "mkfs.erofs",
    };
    let o = cmd.output().ctx("run", tool)?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Input {
            path: tree.to_path_buf(),
            detail: format!(
                "{tool} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        });
    }
    std::fs::rename(&tmp, out).ctx("rename into place", out)?;
    Ok(())
}
