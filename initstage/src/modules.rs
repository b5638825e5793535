//! Kernel modules named by `modules=`, with their dependencies from `modules.dep`.
//!
//! [`resolve`] is pure: it turns requested names into an ordered list of `.ko` files
//! (dependencies first, each once, built-ins and loaded ones skipped). [`load_all`] then calls
//! `finit_module(2)` on each; a module that is already loaded is not an error. A compressed
//! module (`.ko.gz`, `.ko.xz`) the kernel cannot decompress is decoded in user space by
//! [`keel_unpack`] into a memfd ([`load_file`], [`after_refusal`] decides); zstd is not
//! decoded here (it would cost initstage ~58 KB of its 1.5 MB budget) and gets an error saying
//! what to do.

use std::ffi::CStr;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use keel_unpack::Format;

use crate::error::{Error, Result};
pub use keel_proto::moddep::{
    name_of, normalize, parse_builtin, parse_proc_modules, resolve, ModuleDeps,
};

const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

/// The largest module decoded in user space (the biggest in Debian's kernel is ~15 MB; a
/// decompression bomb stops here, not at the end of memory).
pub const MAX_MODULE: u64 = 128 << 20;

/// How a module file reached the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// As it is: a plain `.ko`, or a compressed one the kernel decompressed itself.
    ByKernel(Option<Format>),
    /// Decoded by initstage (the kernel cannot decompress this format).
    InUserSpace(Format),
    /// It was loaded already.
    Already,
}

/// What to do after the kernel refused a compressed module with `errno`: decode it in user
/// space (the kernel has no decompressor, `EOPNOTSUPP`, or one for another format, which
/// rejects the magic number with `EINVAL`), or give up with the reason and what to do.
pub fn after_refusal(format: Format, errno: i32) -> std::result::Result<(), String> {
    if errno != libc::EOPNOTSUPP && errno != libc::EINVAL {
        return Err(std::io::Error::from_raw_os_error(errno).to_string());
    }
    if format.supported() {
        return Ok(());
    }
    Err(format!(
        "the kernel cannot decompress this {format} module ({}) and initstage decodes only gzip \
         and xz; unpack it (`keelctl initramfs` does unless --keep-compressed) or recompress it \
         with xz",
        std::io::Error::from_raw_os_error(errno)
    ))
}

/// Formats the kernel has no decompressor for (it said `EOPNOTSUPP` once): later modules in
/// them go to user space directly.
static KERNEL_REFUSES: [AtomicBool; 3] = [
    AtomicBool::new(false),
    AtomicBool::new(false),
    AtomicBool::new(false),
];

fn refuses(f: Format) -> &'static AtomicBool {
    &KERNEL_REFUSES[f as usize]
}

/// finit_module(2) on `fd`; the errno on failure.
fn finit(fd: &impl AsRawFd, flags: libc::c_int) -> std::result::Result<(), i32> {
    let params: &CStr = c"";
    // SAFETY: finit_module reads the module from the open fd and the NUL-terminated
    // parameter string; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            fd.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

/// Decodes a compressed module into a memfd, capped at [`MAX_MODULE`].
fn decode_to_memfd(path: &Path) -> std::result::Result<File, String> {
    let fd = rustix::fs::memfd_create("keel-module", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    let mut out = File::from(fd);
    {
        let mut w = std::io::BufWriter::with_capacity(256 << 10, &mut out);
        keel_unpack::decode_file(path, &mut w, MAX_MODULE).map_err(|e| e.to_string())?;
        w.flush().map_err(|e| format!("memfd: {e}"))?;
    }
    Ok(out)
}

/// Loads one module file with finit_module(2). A compressed one goes to the kernel as it is
/// first (`MODULE_INIT_COMPRESSED_FILE`); if the kernel cannot decompress it, initstage
/// decodes it into a memfd and loads that ([`after_refusal`] decides). `EEXIST` (already
/// loaded) is success.
pub fn load_file(path: &Path) -> std::result::Result<Loaded, String> {
    let format = Format::of_path(&path.to_string_lossy());
    if let Some(f) = format.filter(|f| refuses(*f).load(Ordering::Relaxed)) {
        return load_decoded(path, f);
    }
    let file = File::open(path).map_err(|e| e.to_string())?;
    let flags = if format.is_some() {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    match finit(&file, flags) {
        Ok(()) => Ok(Loaded::ByKernel(format)),
        Err(libc::EEXIST) => Ok(Loaded::Already),
        Err(errno) => match format {
            None => Err(std::io::Error::from_raw_os_error(errno).to_string()),
            Some(f) => {
                after_refusal(f, errno)?;
                // No decompressor at all: the next modules skip the kernel's attempt (an
                // EINVAL may be this file's own fault, so it is not remembered).
                if errno == libc::EOPNOTSUPP {
                    refuses(f).store(true, Ordering::Relaxed);
                }
                load_decoded(path, f)
            }
        },
    }
}

fn load_decoded(path: &Path, f: Format) -> std::result::Result<Loaded, String> {
    let mem = decode_to_memfd(path)?;
    match finit(&mem, 0) {
        Ok(()) => Ok(Loaded::InUserSpace(f)),
        Err(libc::EEXIST) => Ok(Loaded::Already),
        Err(e) => Err(format!(
            "{} (after decoding it from {f} in user space)",
            std::io::Error::from_raw_os_error(e)
        )),
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
        let how = load_file(&p).map_err(|e| Error::Module {
            name: name_of(rel),
            detail: format!("{}: {e}", p.display()),
        })?;
        let ms = crate::kmsg::Ms(t.elapsed());
        match how {
            Loaded::InUserSpace(f) => log::debug!(
                "module {}: {ms} ms ({f}, decoded in user space: the kernel cannot)",
                name_of(rel)
            ),
            _ => log::debug!("module {}: {ms} ms", name_of(rel)),
        }
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

    /// A kernel without a decompressor (EOPNOTSUPP) or with another one (EINVAL on the magic
    /// number) sends gzip and xz to user space; zstd only where this build decodes it (the
    /// initstage binary does not: it is built alone, without the builder's `zstd` feature);
    /// any other refusal is the module's own error.
    #[test]
    fn refusals_that_send_a_module_to_user_space() {
        for f in [Format::Gzip, Format::Xz] {
            assert_eq!(after_refusal(f, libc::EOPNOTSUPP), Ok(()));
            assert_eq!(after_refusal(f, libc::EINVAL), Ok(()));
        }
        let e = after_refusal(Format::Xz, libc::ENOEXEC).unwrap_err();
        assert!(e.contains("Exec format error"), "{e}");
        let z = after_refusal(Format::Zstd, libc::EOPNOTSUPP);
        if Format::Zstd.supported() {
            assert_eq!(z, Ok(()));
        } else {
            let e = z.unwrap_err();
            assert!(
                e.contains("zstd module") && e.contains("--keep-compressed"),
                "{e}"
            );
        }
    }

    /// The memfd holds exactly the module's bytes; a corrupt file is named, not loaded.
    #[test]
    fn a_compressed_module_decodes_into_a_memfd() {
        use std::io::{Read, Seek};
        let dir = std::env::temp_dir().join(format!("keel-modz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        std::fs::write(dir.join("m.ko"), &plain).unwrap();
        let st = std::process::Command::new("xz")
            .args(["-k", "-f", "--check=crc32"])
            .arg(dir.join("m.ko"))
            .status()
            .unwrap();
        assert!(st.success());
        let mut mem = decode_to_memfd(&dir.join("m.ko.xz")).unwrap();
        mem.rewind().unwrap();
        let mut back = Vec::new();
        mem.read_to_end(&mut back).unwrap();
        assert!(back == plain);
        let mut bad = std::fs::read(dir.join("m.ko.xz")).unwrap();
        let n = bad.len();
        bad[n / 2] ^= 1;
        std::fs::write(dir.join("b.ko.xz"), &bad).unwrap();
        let e = decode_to_memfd(&dir.join("b.ko.xz")).unwrap_err();
        assert!(e.contains("corrupt xz data"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
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
