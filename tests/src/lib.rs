//! Harness for keel's privileged integration tests.
//!
//! Every test runs in a private mount namespace of its own thread ([`Sandbox::new`]:
//! `unshare(CLONE_NEWNS)` + `MS_REC|MS_PRIVATE` on `/`), builds real disks (partitions made
//! with `mkfs.ext4 -d`, a GPT written by `sfdisk`, attached with `losetup -P`), real
//! squashfs/erofs images, and runs the real `initstage prepare`. On drop it unmounts
//! everything below its temporary directory and detaches the loop devices it attached.
#![allow(missing_docs)]
#![allow(clippy::undocumented_unsafe_blocks)]

pub mod agent;
pub mod channel;
pub mod garage;
pub mod nginx;
pub mod oci;
pub mod registry;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_proto::manifest::{Manifest, SignedManifest, SigningKey, MANIFEST_FORMAT};
use keel_proto::report::BootReport;
use sha2::{Digest, Sha256};

/// Whether we can run privileged tests; prints why not otherwise. Under CI (`CI` set, as
/// `.ci/run` is run) or with `KEEL_REQUIRE_ROOT=1` a skip is a failure: a green run must have
/// run them.
pub fn privileged() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let required = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty() && x != "0");
    assert!(
        !(required("CI") || required("KEEL_REQUIRE_ROOT")),
        "this test needs root (loop devices, mounts) and CI requires it to run: run as root"
    );
    eprintln!("SKIP: needs root (loop devices, mounts)");
    false
}

/// Path of a workspace binary (built by `make test` before the tests run).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("KEEL_{}", name.to_uppercase().replace('-', "_"))) {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    assert!(p.exists(), "{} is not built: run `make test` (or cargo build --workspace --features initstage/failpoints)", p.display());
    p
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sha256_file(p: &Path) -> String {
    keel_proto::hex::encode(&Sha256::digest(fs::read(p).unwrap()))
}

/// The signing key tests use.
pub fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

/// A signed manifest for `image`.
pub fn manifest_for(image: &Path, name: &str, version: u64) -> SignedManifest {
    let size = fs::metadata(image).unwrap().len();
    Manifest {
        format: MANIFEST_FORMAT,
        name: name.into(),
        version,
        size,
        sha256: sha256_file(image),
        created: 1_700_000_000,
        min_version: None,
        verity: None,
    }
    .sign(&test_key())
}

/// Appends a verity tree to `image` (salt of 0x5a bytes) and signs it as format 2; with
/// `root`, that root hash is signed instead of the tree's (a manifest that lies).
pub fn verity_manifest_for(
    image: &Path,
    name: &str,
    version: u64,
    root: Option<&str>,
) -> SignedManifest {
    let mut b = fs::read(image).unwrap();
    b.resize(b.len().div_ceil(4096) * 4096, 0);
    let data_size = b.len() as u64;
    let r = keel_verity::check::append_tree(&mut b, &[0x5a; 32], [1; 16]).unwrap();
    fs::write(image, &b).unwrap();
    let mut m = manifest_for(image, name, version).manifest;
    m.format = keel_proto::manifest::MANIFEST_FORMAT_VERITY;
    m.verity = Some(keel_proto::manifest::VerityInfo {
        data_size,
        hash_offset: data_size,
        salt: "5a".repeat(32),
        root_hash: root.map_or_else(|| keel_proto::hex::encode(&r), str::to_string),
    });
    m.validate().unwrap();
    m.sign(&test_key())
}

/// One partition to build.
#[derive(Debug)]
pub struct Part {
    pub label: String,
    pub size_mb: u64,
    /// Files to put in it: (relative path, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// Inodes to make room for (`mkfs.ext4 -N`), when the default is too few.
    pub inodes: Option<usize>,
}

impl Part {
    pub fn new(label: &str, size_mb: u64) -> Part {
        Part {
            label: label.into(),
            size_mb,
            files: Vec::new(),
            inodes: None,
        }
    }

    pub fn file(mut self, rel: &str, contents: Vec<u8>) -> Part {
        self.files.push((rel.into(), contents));
        self
    }
}

/// Writes a GPT disk image at `disk` whose partitions (1 MiB aligned, in order) are ext4
/// filesystems made with `mkfs.ext4 -L <label> -d` from `parts` — no mount, no loop device.
/// `scratch` is a directory for the partition images, removed afterwards. Returns each
/// partition's start in MiB.
pub fn gpt_disk(disk: &Path, parts: &[Part], scratch: &Path) -> Vec<u64> {
    fs::create_dir_all(scratch).unwrap();
    let mut script = String::from("label: gpt\n");
    let mut start_mb = 1;
    let mut files = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let content = scratch.join(format!("content{i}"));
        fs::create_dir_all(&content).unwrap();
        for (rel, data) in &p.files {
            let f = content.join(rel);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(&f, data).unwrap();
        }
        let img = scratch.join(format!("part{i}.ext4"));
        let mut mkfs = Command::new("mkfs.ext4");
        if let Some(n) = p.inodes {
            mkfs.arg("-N").arg(n.to_string());
        }
        run(mkfs
            .args(["-q", "-F", "-L", &p.label])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
            .arg(&content)
            .arg(&img)
            .arg(format!("{}M", p.size_mb)));
        script.push_str(&format!(
            "start={start_mb}MiB, size={}MiB, name={}\n",
            p.size_mb, p.label
        ));
        files.push((img, start_mb));
        start_mb += p.size_mb;
    }
    let f = fs::File::create(disk).unwrap();
    f.set_len((start_mb + 1) * 1024 * 1024).unwrap();
    drop(f);
    let mut sf = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    sf.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(sf.wait().unwrap().success(), "sfdisk failed");
    let starts = files.iter().map(|(_, s)| *s).collect();
    for (img, start) in files {
        run(Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={start}")));
    }
    let _ = fs::remove_dir_all(scratch);
    starts
}

/// A disk's partitions, each attached as a loop device (names like `loop7`).
#[derive(Debug, Clone)]
pub struct Disk {
    pub devs: Vec<String>,
}

/// A test's private world.
#[derive(Debug)]
pub struct Sandbox {
    pub dir: PathBuf,
    loops: Vec<String>,
    n: u32,
}

impl Sandbox {
    /// A temp dir and a private mount namespace for this thread.
    pub fn new(name: &str) -> Sandbox {
        // SAFETY (test): CLONE_NEWNS (with its implied CLONE_FS) applies to this thread only;
        // it shares no file-system state with other threads afterwards.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
            .expect("unshare(CLONE_NEWNS)");
        rustix::mount::mount_change(
            "/",
            rustix::mount::MountPropagationFlags::REC
                | rustix::mount::MountPropagationFlags::PRIVATE,
        )
        .expect("make / rprivate");
        let dir = std::env::temp_dir().join(format!("keel-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Sandbox {
            dir,
            loops: Vec::new(),
            n: 0,
        }
    }

    /// A second file maker below this sandbox, for use while one of its partitions is mounted
    /// (same thread and namespace; it owns no mounts or loop devices).
    pub fn files(&self) -> Sandbox {
        let dir = self.dir.join("files");
        fs::create_dir_all(&dir).unwrap();
        Sandbox {
            dir,
            loops: Vec::new(),
            n: 0,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// A fresh path below the sandbox.
    pub fn fresh(&mut self, stem: &str) -> PathBuf {
        self.n += 1;
        self.dir.join(format!("{stem}{}", self.n))
    }

    /// A minimal root filesystem tree: `/sbin/init`, `/etc/keel-version`.
    pub fn rootfs(&mut self, version: u64) -> PathBuf {
        let d = self.fresh("rootfs");
        fs::create_dir_all(d.join("sbin")).unwrap();
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::create_dir_all(d.join("media")).unwrap();
        for api in ["dev", "proc", "sys", "run"] {
            fs::create_dir_all(d.join(api)).unwrap();
        }
        fs::write(d.join("sbin/init"), b"#!/bin/sh\necho init\n").unwrap();
        fs::set_permissions(d.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(d.join("etc/keel-version"), format!("{version}\n")).unwrap();
        d
    }

    /// A squashfs image of `rootfs(version)`.
    pub fn squashfs(&mut self, version: u64) -> PathBuf {
        let root = self.rootfs(version);
        let out = self.fresh("img").with_extension("squashfs");
        run(Command::new("mksquashfs").arg(&root).arg(&out).args([
            "-noappend",
            "-quiet",
            "-comp",
            "gzip",
            "-all-root",
        ]));
        out
    }

    /// The `img` partition holding a squashfs v1 and its signed manifest (the factory image).
    pub fn img_with_v1(&mut self, size_mb: u64) -> Part {
        let v1 = self.squashfs(1);
        let m1 = manifest_for(&v1, "demo", 1);
        Part::new("img", size_mb)
            .file("root-squashfs.img", fs::read(&v1).unwrap())
            .file("root-squashfs.img.manifest", m1.to_json())
    }

    /// An erofs image of `rootfs(version)`.
    pub fn erofs(&mut self, version: u64) -> PathBuf {
        let root = self.rootfs(version);
        let out = self.fresh("img").with_extension("erofs");
        run(Command::new("mkfs.erofs").arg(&out).arg(&root));
        out
    }

    /// Builds a GPT disk of ext4 partitions and attaches its partitions as loop devices.
    pub fn disk(&mut self, parts: &[Part]) -> Disk {
        let disk = self.fresh("disk").with_extension("img");
        let scratch = self.fresh("gpt");
        gpt_disk(&disk, parts, &scratch);
        // This machine's kernel has no partition-table support (CONFIG_EFI_PARTITION and
        // CONFIG_MSDOS_PARTITION are off), so `losetup -P` shows no partitions: attach each
        // partition of the GPT disk at its offset instead. The block devices, filesystems and
        // labels libblkid probes are the same; the VM tests boot the GPT disk itself.
        let mut devs = Vec::new();
        let mut start = 1;
        for p in parts {
            let out = run(Command::new("losetup")
                .args(["--show", "-f"])
                .arg(format!("--offset={}", start * 1024 * 1024))
                .arg(format!("--sizelimit={}", p.size_mb * 1024 * 1024))
                .arg(&disk));
            let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
            let name = dev.trim_start_matches("/dev/").to_string();
            self.loops.push(name.clone());
            devs.push(name);
            start += p.size_mb;
        }
        Disk { devs }
    }

    /// Attaches each partition of an existing GPT disk image (as `sfdisk --json` lists them)
    /// at its offset, as [`Sandbox::disk`] does.
    pub fn attach_gpt(&mut self, disk: &Path) -> Disk {
        let out = run(Command::new("sfdisk").arg("--json").arg(disk));
        let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let sector = t["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
        let mut devs = Vec::new();
        for p in t["partitiontable"]["partitions"].as_array().unwrap() {
            let (start, size) = (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap());
            let out = run(Command::new("losetup")
                .args(["--show", "-f"])
                .arg(format!("--offset={}", start * sector))
                .arg(format!("--sizelimit={}", size * sector))
                .arg(disk));
            let name = String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .trim_start_matches("/dev/")
                .to_string();
            self.loops.push(name.clone());
            devs.push(name);
        }
        Disk { devs }
    }

    /// Mounts partition `n` (1-based) of `disk` at a fresh directory, runs `f`, unmounts.
    pub fn with_partition<T>(&mut self, disk: &Disk, n: u32, f: impl FnOnce(&Path) -> T) -> T {
        let mnt = self.fresh("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let dev = format!("/dev/{}", disk.devs[n as usize - 1]);
        rustix::mount::mount(
            dev.as_str(),
            &mnt,
            "ext4",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap_or_else(|e| panic!("mount {dev}: {e}"));
        let r = f(&mnt);
        unmount_retry(&mnt).unwrap_or_else(|e| panic!("unmount {}: {e}", mnt.display()));
        r
    }

    /// Writes a boot command line file.
    pub fn cmdline(&mut self, line: &str) -> PathBuf {
        let p = self.fresh("cmdline");
        fs::write(&p, line).unwrap();
        p
    }

    /// An `initstage prepare` command for `disk` with boot command line `line`.
    pub fn prepare_cmd(&mut self, disk: &Disk, line: &str) -> Command {
        let cl = self.cmdline(line);
        let mut cmd = Command::new(bin("initstage"));
        cmd.arg("prepare")
            .arg("--sysroot")
            .arg(self.sysroot())
            .arg("--cmdline")
            .arg(&cl)
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--devices")
            .arg(disk.devs.join(","));
        cmd
    }

    /// Runs `initstage prepare` on `disk` with `line`; `env` adds variables.
    pub fn prepare_raw(&mut self, disk: &Disk, line: &str, env: &[(&str, &str)]) -> Output {
        let mut cmd = self.prepare_cmd(disk, line);
        cmd.envs(env.iter().copied());
        cmd.output().unwrap()
    }

    /// Runs `initstage prepare` and expects success; returns the boot report.
    pub fn prepare(&mut self, disk: &Disk, line: &str) -> BootReport {
        let out = self.prepare_raw(disk, line, &[]);
        assert!(
            out.status.success(),
            "initstage prepare failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        BootReport::from_json(&fs::read(self.run_dir().join("boot.json")).unwrap()).unwrap()
    }

    pub fn sysroot(&self) -> PathBuf {
        self.dir.join("sysroot")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The version the assembled root shows.
    pub fn booted_version(&self) -> u64 {
        fs::read_to_string(self.sysroot().join("etc/keel-version"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Mount points below the sandbox, from this thread's mount table.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let info = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&self.dir))
            .collect()
    }

    /// This thread's mountinfo line for `target`.
    pub fn mount_line(&self, target: &Path) -> Option<String> {
        let info = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        info.lines()
            .find(|l| l.split(' ').nth(4).map(Path::new) == Some(target))
            .map(str::to_string)
    }

    /// Unmounts everything below the sandbox, deepest first (a "power off").
    pub fn teardown(&self) {
        for _ in 0..4 {
            let mut m = self.mounts();
            if m.is_empty() {
                return;
            }
            m.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
            for p in m {
                let _ = unmount_retry(&p);
            }
        }
        panic!(
            "mounts left below {}: {:?}",
            self.dir.display(),
            self.mounts()
        );
    }

    /// Loop devices whose backing file is below the sandbox.
    pub fn loops_in_use(&self) -> Vec<String> {
        let mut v = Vec::new();
        for e in fs::read_dir("/sys/block").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
                if Path::new(b.trim()).starts_with(&self.dir) {
                    v.push(name);
                }
            }
        }
        v
    }

    /// Detaches the disks, then checks no loop device is left.
    pub fn finish(mut self) {
        self.teardown();
        for l in std::mem::take(&mut self.loops) {
            run(Command::new("losetup").arg("-d").arg(format!("/dev/{l}")));
        }
        for _ in 0..100 {
            if self.loops_in_use().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            self.loops_in_use(),
            Vec::<String>::new(),
            "loop devices left attached"
        );
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Clean up after a failed test too; `finish` already emptied `loops` on success.
        if self.loops.is_empty() {
            return;
        }
        let mut m = self.mounts();
        m.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in m {
            let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
        }
        for l in &self.loops {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(format!("/dev/{l}"))
                .status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Unmounts `p`, retrying while it is busy: a process another test thread is forking holds
/// copies of every open file descriptor until it execs, which can briefly pin a mount.
pub fn unmount_retry(p: &Path) -> rustix::io::Result<()> {
    let mut tries = 0;
    loop {
        match rustix::mount::unmount(p, rustix::mount::UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Reads the boot state from the img partition (partition 1 by convention in these tests).
pub fn read_state(dir: &Path) -> keel_proto::bootstate::BootState {
    keel_proto::bootstate::BootState::from_json(&fs::read(dir.join("keel-state.json")).unwrap())
        .unwrap()
}

/// Writes the boot state atomically (temp, fsync, rename, fsync dir), as the agent does.
pub fn write_state(dir: &Path, s: &keel_proto::bootstate::BootState) {
    let tmp = dir.join("keel-state.json.tmp");
    let f = fs::File::create(&tmp).unwrap();
    use std::io::Write;
    (&f).write_all(&s.to_json()).unwrap();
    f.sync_all().unwrap();
    fs::rename(&tmp, dir.join("keel-state.json")).unwrap();
    fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// Puts `image` and its manifest in the staged slot (image first, manifest last).
pub fn stage(newimg: &Path, image: &Path, m: &SignedManifest) {
    fs::copy(image, newimg.join("root-squashfs.img")).unwrap();
    fs::write(newimg.join("root-squashfs.img.manifest"), m.to_json()).unwrap();
}
