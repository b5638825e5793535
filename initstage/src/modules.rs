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
///
/// With more than one CPU the modules load in parallel, each as soon as its dependencies
/// are in (the kernel runs module init functions concurrently; a driver's device probing
/// is most of a module's time): [`schedule`] decides, one worker per CPU (at most 4).
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
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let load = |rel: &str| -> Result<()> {
        let p: PathBuf = dir.join(rel);
        let t = std::time::Instant::now();
        load_file(&p).map_err(|e| Error::Module {
            name: name_of(rel),
            detail: format!("{}: {e}", p.display()),
        })?;
        log::debug!(
            "module {}: {:.1} ms",
            name_of(rel),
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    };
    schedule(&order, |m| deps.deps_of(m), workers, load)?;
    Ok(missing)
}

/// Runs `job` on every item of `order` (a dependency order) with `workers` threads, each
/// item once all of its `needs` that are in `order` have succeeded. The first error stops
/// new starts and is returned once the running jobs end.
pub fn schedule<'n, N, J, E>(
    order: &[String],
    needs: N,
    workers: usize,
    job: J,
) -> std::result::Result<(), E>
where
    N: Fn(&str) -> &'n [String],
    J: Fn(&str) -> std::result::Result<(), E> + Sync,
    E: Send,
{
    if workers <= 1 || order.len() <= 1 {
        return order.iter().try_for_each(|m| job(m));
    }
    // Index of each item's prerequisites within `order`.
    let pre: Vec<Vec<usize>> = order
        .iter()
        .map(|m| {
            needs(m)
                .iter()
                .filter_map(|d| order.iter().position(|o| name_of(o) == name_of(d)))
                .collect()
        })
        .collect();
    struct Board<E> {
        started: Vec<bool>,
        done: Vec<bool>,
        running: usize,
        error: Option<E>,
    }
    let board = std::sync::Mutex::new(Board {
        started: vec![false; order.len()],
        done: vec![false; order.len()],
        running: 0,
        error: None,
    });
    let changed = std::sync::Condvar::new();
    std::thread::scope(|s| {
        for _ in 0..workers.min(order.len()) {
            s.spawn(|| loop {
                let next = {
                    let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if b.error.is_some() || b.started.iter().all(|&x| x) {
                            return;
                        }
                        let unstarted = |i: &usize| !b.started[*i];
                        let ready = (0..order.len())
                            .filter(unstarted)
                            .find(|&i| pre[i].iter().all(|&d| b.done[d]))
                            // Nothing ready and nothing running: a cycle in a broken
                            // modules.dep. Go on in order rather than wait forever (the
                            // kernel names a symbol that is really missing).
                            .or_else(|| {
                                (0..order.len()).filter(unstarted).find(|_| b.running == 0)
                            });
                        match ready {
                            Some(i) => {
                                b.started[i] = true;
                                b.running += 1;
                                break i;
                            }
                            None => b = changed.wait(b).unwrap_or_else(|p| p.into_inner()),
                        }
                    }
                };
                let r = job(&order[next]);
                let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
                b.running -= 1;
                match r {
                    Ok(()) => b.done[next] = true,
                    Err(e) => {
                        if b.error.is_none() {
                            b.error = Some(e);
                        }
                    }
                }
                changed.notify_all();
            });
        }
    });
    match board.into_inner().unwrap_or_else(|p| p.into_inner()).error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Every item runs once, never before what it needs, whatever the worker count.
    #[test]
    fn schedule_respects_dependencies() {
        let order: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let needs = |m: &str| -> &'static [String] {
            static C: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
            static D: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
            match m {
                "c" => C.get_or_init(|| vec!["a".into(), "b".into()]),
                "d" => D.get_or_init(|| vec!["c".into()]),
                _ => &[],
            }
        };
        for workers in [1, 2, 4] {
            let done = Mutex::new(Vec::new());
            schedule(&order, needs, workers, |m| {
                let mut d = done.lock().unwrap();
                for n in needs(m) {
                    assert!(d.contains(n), "{m} ran before {n}");
                }
                d.push(m.to_string());
                Ok::<(), String>(())
            })
            .unwrap();
            let mut d = done.into_inner().unwrap();
            d.sort();
            assert_eq!(d, order, "workers {workers}");
        }
    }

    /// A cycle (a broken modules.dep) does not hang the boot: everything still runs once.
    #[test]
    fn schedule_survives_a_dependency_cycle() {
        let order: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let (needs_a, needs_b) = (["b".to_string()], ["a".to_string()]);
        let ran = Mutex::new(0);
        schedule(
            &order,
            |m| if m == "a" { &needs_a[..] } else { &needs_b[..] },
            2,
            |_| {
                *ran.lock().unwrap() += 1;
                Ok::<(), String>(())
            },
        )
        .unwrap();
        assert_eq!(*ran.lock().unwrap(), 2);
    }

    /// A failure is returned, and nothing that needs the failed item runs.
    #[test]
    fn schedule_stops_at_an_error() {
        let order: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let needs_a = ["a".to_string()];
        let ran_b = Mutex::new(false);
        let r = schedule(
            &order,
            |m| if m == "b" { &needs_a[..] } else { &[] },
            2,
            |m| {
                if m == "a" {
                    Err(format!("{m} failed"))
                } else {
                    *ran_b.lock().unwrap() = true;
                    Ok(())
                }
            },
        );
        assert_eq!(r, Err("a failed".to_string()));
        assert!(!*ran_b.lock().unwrap());
    }
}
