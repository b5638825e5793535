//! Kernel modules named by `modules=`, with their dependencies from `modules.dep`.
//!
//! [`resolve`] is pure: it turns requested names into an ordered list of `.ko` files
//! (dependencies first, each once, built-ins and loaded ones skipped). [`load_all`] then calls
//! `finit_module(2)` on each; a module that is already loaded is not an error.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use keel_proto::moddep::{
    name_of, normalize, parse_builtin, parse_proc_modules, resolve, ModuleDeps,
};

const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

/// Loads one module file with finit_module(2). `EEXIST` (already loaded) is success.
pub fn load_file(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    let s = path.to_string_lossy();
    let flags = if s.ends_with(".xz") || s.ends_with(".zst") || s.ends_with(".gz") {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params: &CStr = c"";
    // SAFETY: finit_module reads the module from the open fd and the NUL-terminated
    // parameter string; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(e)
    }
}

/// Loads `wanted` from `dir` (a `/lib/modules/<version>` tree). Returns the names it could
/// not find there, to try elsewhere (e.g. the boot partition).
pub fn load_all(dir: &Path, wanted: &[String]) -> Result<Vec<String>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let dep_text = std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default();
    let deps = ModuleDeps::parse(&dep_text);
    let builtin =
        parse_builtin(&std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default());
    let loaded = parse_proc_modules(&std::fs::read_to_string("/proc/modules").unwrap_or_default());
    let (order, missing) = resolve(wanted, &deps, &builtin, &loaded);
    for rel in order {
        let p: PathBuf = dir.join(&rel);
        load_file(&p).map_err(|e| Error::Module {
            name: name_of(&rel),
            detail: format!("{}: {e}", p.display()),
        })?;
    }
    Ok(missing)
}
