//! The kit built once per test process: a Debian cloud kernel (fetched by package name,
//! `dpkg -x`, `depmod`), the static binaries, the initramfs (made by `keelctl initramfs`), a
//! signing key.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use keel_proto::manifest::{public_key_to_pem, SigningKey};

use crate::*;

/// Everything built once per test process.
#[derive(Debug)]
pub struct Kit {
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub initramfs: PathBuf,
    pub key: SigningKey,
    pub trusted: PathBuf,
    /// The host's exec key (PEM, for `keelctl --key`) and its public half, which the images
    /// list in `/etc/keel/authorized.pem`.
    pub host_key: PathBuf,
    pub authorized: PathBuf,
    pub bins: PathBuf,
    pub work: PathBuf,
}

static KIT: OnceLock<Kit> = OnceLock::new();

/// The static binaries, built by `make vm-bins` (initstage with failpoints).
pub fn bins() -> PathBuf {
    let d = workspace().join("target/vm/x86_64-unknown-linux-gnu/release");
    for b in ["initstage", "keel-agent", "keelctl"] {
        assert!(
            d.join(b).exists(),
            "{} missing: run `make vm-bins` (or `make test`)",
            d.join(b).display()
        );
    }
    d
}

fn fetch_kernel(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("root");
    let find = || -> Option<(PathBuf, PathBuf)> {
        let boot = fs::read_dir(root.join("boot")).ok()?;
        let vmlinuz = boot.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })?;
        let version = vmlinuz
            .file_name()?
            .to_str()?
            .trim_start_matches("vmlinuz-")
            .to_string();
        let modules = root.join("lib/modules").join(version);
        modules
            .join("modules.dep")
            .exists()
            .then_some((vmlinuz, modules))
    };
    if let Some(found) = find() {
        return found;
    }
    fs::create_dir_all(dir).unwrap();
    // The real package behind linux-image-cloud-amd64 (refresh the lists once if apt does
    // not know it yet, as on a fresh machine).
    let depends = || {
        Command::new("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()
    };
    let mut deps = depends().expect("apt-cache");
    if !deps.status.success() || deps.stdout.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]));
        deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    }
    let text = String::from_utf8_lossy(&deps.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| {
            p.starts_with("linux-image-") && p.chars().nth(12).is_some_and(|c| c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("no kernel package in: {text}"))
        .to_string();
    run(Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(dir));
    let deb = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("downloaded .deb");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root));
    let version = pkg.trim_start_matches("linux-image-").to_string();
    run(Command::new("depmod").arg("-b").arg(&root).arg(&version));
    find().expect("kernel unpacked")
}

/// Builds (once) the kernel, initramfs and key.
pub fn kit() -> &'static Kit {
    KIT.get_or_init(|| {
        let work = work();
        let bins = bins();
        let (kernel, modules) = fetch_kernel(&work.join("kernel"));
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let trusted = work.join("trusted.pem");
        fs::write(&trusted, public_key_to_pem(&key.verifying_key())).unwrap();
        let host = SigningKey::from_bytes(&[11u8; 32]);
        let host_key = work.join("host.pem");
        fs::write(&host_key, keel_proto::manifest::signing_key_to_pem(&host)).unwrap();
        let authorized = work.join("authorized.pem");
        fs::write(&authorized, public_key_to_pem(&host.verifying_key())).unwrap();
        for e in fs::read_dir(&work).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("initramfs-") || n.starts_with("script-initramfs-") {
                let _ = fs::remove_file(e.path());
            }
        }
        let initramfs = work.join(format!("initramfs-{}.cpio.gz", std::process::id()));
        pack(&bins, &modules, &trusted, &initramfs, &[]);
        Kit {
            kernel,
            modules,
            initramfs,
            key,
            trusted,
            host_key,
            authorized,
            bins,
            work,
        }
    })
}

/// A copy of the kit's `lib/modules/<version>` with the modules [`MODULES`] needs recompressed
/// by the real tools, the i-th one in `tools[i % tools.len()]` (`xz` as the kernel's
/// modules_install runs it, `gzip`, `zstd`), and its modules.dep naming the new files. Returns
/// the new directory (named for the version, as `keelctl initramfs` wants).
pub fn recompressed_modules(dir: &Path, tools: &[&str]) -> PathBuf {
    use keel_proto::moddep::{parse_builtin, resolve, ModuleDeps};
    let k = kit();
    let version = k.modules.file_name().unwrap();
    let out = dir.join("lib/modules").join(version);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).unwrap();
    let dep_text = fs::read_to_string(k.modules.join("modules.dep")).unwrap();
    let builtin_text = fs::read_to_string(k.modules.join("modules.builtin")).unwrap_or_default();
    let wanted: Vec<String> = MODULES
        .split(',')
        .chain(VERITY_MODULES.split(','))
        .chain(WATCHDOG_MODULES.split(','))
        .map(str::to_string)
        .collect();
    let (order, missing) = resolve(
        &wanted,
        &ModuleDeps::parse(&dep_text),
        &parse_builtin(&builtin_text),
        &Default::default(),
    );
    assert!(missing.is_empty(), "{missing:?}");
    let mut renamed = std::collections::HashMap::new();
    for (i, rel) in order.iter().enumerate() {
        let (tool, suffix, args): (&str, &str, &[&str]) = match tools[i % tools.len()] {
            "xz" => ("xz", "xz", &["-c", "--check=crc32", "--lzma2=dict=1MiB"]),
            "gzip" => ("gzip", "gz", &["-c", "-9", "-n"]),
            "zstd" => ("zstd", "zst", &["-c", "-q", "-19"]),
            t => panic!("no such tool {t}"),
        };
        let src = fs::File::open(k.modules.join(rel)).unwrap();
        let dst = out.join(format!("{rel}.{suffix}"));
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let st = Command::new(tool)
            .args(args)
            .stdin(src)
            .stdout(fs::File::create(&dst).unwrap())
            .status()
            .unwrap();
        assert!(st.success(), "{tool} {rel}");
        renamed.insert(rel.clone(), format!("{rel}.{suffix}"));
    }
    let name = |p: &str| renamed.get(p).cloned().unwrap_or_else(|| p.to_string());
    let mut dep = String::new();
    for line in dep_text.lines() {
        let Some((m, deps)) = line.split_once(':') else {
            continue;
        };
        if !renamed.contains_key(m) {
            continue;
        }
        dep.push_str(&name(m));
        dep.push(':');
        for d in deps.split_whitespace() {
            dep.push(' ');
            dep.push_str(&name(d));
        }
        dep.push('\n');
    }
    fs::write(out.join("modules.dep"), dep).unwrap();
    fs::write(out.join("modules.builtin"), builtin_text).unwrap();
    out
}

/// `keelctl initramfs` over another modules tree (`extra` are more flags); returns the archive
/// and keelctl's output.
pub fn initramfs_with(modules: &Path, out: &Path, extra: &[&str]) -> (PathBuf, String) {
    let k = kit();
    let o = pack(&k.bins, modules, &k.trusted, out, extra);
    (
        out.to_path_buf(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn pack(bins: &Path, modules: &Path, trusted: &Path, out: &Path, extra: &[&str]) -> Output {
    run(Command::new(bins.join("keelctl"))
        .arg("initramfs")
        .arg("--init")
        .arg(bins.join("initstage"))
        .arg("--kernel-modules")
        .arg(modules)
        .args([
            "--modules",
            &format!("{MODULES},{VERITY_MODULES},{WATCHDOG_MODULES}"),
        ])
        .arg("--keys")
        .arg(trusted)
        .args(extra)
        .arg("-o")
        .arg(out))
}
