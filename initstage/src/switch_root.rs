//! switch_root the canonical way (util-linux / systemd order), then exec the real init.
//!
//! sync; move /dev /proc /sys /run into the new root (unmount when the target is missing);
//! chdir to the new root; keep an fd of the old root; move the new root onto `/`; chroot;
//! delete the initramfs's files through the fd, only when it is tmpfs/ramfs and never crossing
//! into another filesystem; exec init.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{fstat, fstatfs, openat, unlinkat, AtFlags, Dir, Mode, OFlags};
use rustix::mount::{mount_move, unmount, UnmountFlags};

use crate::error::{Error, Result};

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

fn sr(step: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |e| Error::SwitchRoot {
        step,
        source: e.into(),
    }
}

/// Moves the API filesystems into `newroot` and makes it `/`. Returns the old root's fd.
pub fn switch_root(newroot: &Path) -> Result<File> {
    rustix::fs::sync();
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = newroot.join(&m[1..]);
        if target.is_dir() {
            if let Err(e) = mount_move(m, &target) {
                log::warn!("move {m} to {}: {e}; unmounting it", target.display());
                let _ = unmount(m, UnmountFlags::DETACH);
            }
        } else {
            log::warn!(
                "{} is missing in the new root; unmounting {m}",
                target.display()
            );
            let _ = unmount(m, UnmountFlags::DETACH);
        }
    }
    rustix::process::chdir(newroot).map_err(sr("chdir to the new root"))?;
    let old = File::open("/").map_err(|e| Error::SwitchRoot {
        step: "open the old root",
        source: e,
    })?;
    mount_move(".", "/").map_err(sr("move the new root onto /"))?;
    rustix::process::chroot(".").map_err(sr("chroot"))?;
    rustix::process::chdir("/").map_err(sr("chdir /"))?;
    Ok(old)
}

/// Deletes everything below `dir` on its filesystem, without crossing into other mounts.
fn remove_tree(dir: BorrowedFd<'_>, dev: u64) {
    let Ok(d) = openat(dir, ".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) else {
        return;
    };
    let Ok(mut entries) = Dir::read_from(&d) else {
        return;
    };
    while let Some(Ok(e)) = entries.next() {
        let name = e.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let is_dir = (st.st_mode & libc::S_IFMT) == libc::S_IFDIR;
        if is_dir {
            if st.st_dev != dev {
                continue; // another filesystem mounted here: never cross
            }
            if let Ok(sub) = openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                Mode::empty(),
            ) {
                remove_tree(sub.as_fd(), dev);
            }
            let _ = unlinkat(dir, name, AtFlags::REMOVEDIR);
        } else {
            let _ = unlinkat(dir, name, AtFlags::empty());
        }
    }
}

/// Frees the initramfs's memory: deletes its files if it is tmpfs or ramfs.
pub fn free_initramfs(old_root: &File) {
    let Ok(fs) = fstatfs(old_root) else { return };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = fs.f_type as i64;
    if magic != TMPFS_MAGIC && magic != RAMFS_MAGIC {
        log::warn!("old root is not tmpfs/ramfs; leaving its files");
        return;
    }
    let Ok(st) = fstat(old_root) else { return };
    remove_tree(old_root.as_fd(), st.st_dev);
}

/// Replaces this process with `init`; returns only on failure.
pub fn exec_init(init: &str, args: &[String]) -> Error {
    let to_c = |s: &str| CString::new(s).unwrap_or_else(|_| c"?".to_owned());
    let prog = to_c(init);
    let mut argv: Vec<CString> = vec![prog.clone()];
    argv.extend(args.iter().map(|a| to_c(a)));
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: prog and every argv entry are NUL-terminated and outlive the call; the array is
    // NULL-terminated; execv only returns on failure; environ is the process's own.
    unsafe { libc::execv(prog.as_ptr(), ptrs.as_ptr()) };
    Error::SwitchRoot {
        step: "exec init",
        source: std::io::Error::last_os_error(),
    }
}

/// Resolves `path` inside `root` as if `root` were `/` (absolute links stay inside).
/// Returns the host path of the final file, or `None` if a component is missing.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<std::path::PathBuf> {
    let mut parts: Vec<Vec<u8>> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|c| c.as_bytes().to_vec())
        .rev()
        .collect();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut hops = 0;
    while let Some(c) = parts.pop() {
        match c.as_slice() {
            b"." => continue,
            b".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let mut host = root.to_path_buf();
        for p in &cur {
            host.push(OsStr::from_bytes(p));
        }
        host.push(OsStr::from_bytes(&c));
        let md = std::fs::symlink_metadata(&host).ok()?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            let t = target.as_os_str().as_bytes();
            if t.starts_with(b"/") {
                cur.clear();
            }
            for comp in t.split(|b| *b == b'/').filter(|c| !c.is_empty()).rev() {
                parts.push(comp.to_vec());
            }
        } else {
            cur.push(c);
        }
    }
    let mut host = root.to_path_buf();
    for p in &cur {
        host.push(OsStr::from_bytes(p));
    }
    Some(host)
}

/// Whether `init` names an executable regular file inside `root`.
pub fn init_present(root: &Path, init: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    resolve_in_root(root, init)
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_absolute_and_relative_links_inside_root() {
        let t = std::env::temp_dir().join(format!("keel-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join("usr/lib/systemd")).unwrap();
        std::fs::create_dir_all(t.join("usr/sbin")).unwrap();
        std::fs::write(t.join("usr/lib/systemd/systemd"), b"#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            t.join("usr/lib/systemd/systemd"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("usr/sbin", t.join("sbin")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/systemd/systemd", t.join("usr/sbin/init")).unwrap();
        std::os::unix::fs::symlink("/nowhere", t.join("usr/sbin/broken")).unwrap();
        assert_eq!(
            resolve_in_root(&t, "/sbin/init"),
            Some(t.join("usr/lib/systemd/systemd"))
        );
        assert!(init_present(&t, "/sbin/init"));
        assert!(!init_present(&t, "/sbin/broken"));
        assert!(!init_present(&t, "/sbin/missing"));
        std::fs::remove_dir_all(&t).unwrap();
    }
}
