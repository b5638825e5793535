//! Runs [`MountOp`]s with mount(2) and remembers them, so a failed boot step can undo its
//! mounts in reverse order.

use std::ffi::CString;
use std::path::PathBuf;

use rustix::mount::{mount, mount_bind_recursive, unmount, MountFlags, UnmountFlags};

use crate::error::{Error, IoContext, Result};
use crate::mountplan::{Access, MountOp};

/// Mounts made so far, undone in reverse by [`Mounts::unwind`] (or kept by [`Mounts::keep`]).
#[derive(Debug, Default)]
pub struct Mounts {
    done: Vec<PathBuf>,
}

impl Mounts {
    /// Runs one mount, creating its mount point.
    pub fn mount(&mut self, op: &MountOp) -> Result<()> {
        std::fs::create_dir_all(&op.target).ctx("create mount point", &op.target)?;
        let r = match op.access {
            Access::Bind => mount_bind_recursive(op.source.as_str(), &op.target),
            Access::ReadWrite | Access::ReadOnly => {
                let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
                if op.access == Access::ReadOnly {
                    flags |= MountFlags::RDONLY;
                }
                let data = CString::new(op.data.as_str()).map_err(|_| {
                    Error::Usage(format!(
                        "mount options for {} contain NUL",
                        op.target.display()
                    ))
                })?;
                mount(
                    op.source.as_str(),
                    &op.target,
                    op.fstype.as_str(),
                    flags,
                    Some(data.as_c_str()),
                )
            }
        };
        r.map_err(|e| Error::Mount {
            source_dev: op.source.clone(),
            target: op.target.clone(),
            fstype: if op.fstype.is_empty() {
                "bind".into()
            } else {
                op.fstype.clone()
            },
            options: op.data.clone(),
            source: e.into(),
        })?;
        self.done.push(op.target.clone());
        Ok(())
    }

    /// Unmounts everything since `mark` (a value of [`Mounts::mark`]), newest first.
    pub fn unwind_to(&mut self, mark: usize) {
        while self.done.len() > mark {
            let t = self.done.pop().expect("len > mark");
            if let Err(e) = unmount(&t, UnmountFlags::empty()) {
                log::warn!("unmount {}: {e}; detaching lazily", t.display());
                let _ = unmount(&t, UnmountFlags::DETACH);
            }
        }
    }

    /// Unmounts everything.
    pub fn unwind(&mut self) {
        self.unwind_to(0)
    }

    /// A mark to unwind to later.
    pub fn mark(&self) -> usize {
        self.done.len()
    }

    /// Forgets the mounts: they stay (success).
    pub fn keep(mut self) {
        self.done.clear();
    }
}
