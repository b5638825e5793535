//! `keelctl build --from REF -o OUT`: a root image from a container image. The layers are
//! checked against their digests and applied to a temporary tree beside OUT (whiteouts,
//! owners, modes, mtimes, xattrs; nothing may leave the tree: [`keel_oci::unpack`]), what is
//! asked for is injected, the image's run config kept at `/etc/keel/image.json`, and the tree
//! packed reproducibly ([`keel_build::rootimg`]). With `--sign`, its signed manifest beside it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use keel_build::compress::Compression;
use keel_build::rootimg::{self, Format};
use keel_oci::archive::Archive;
use keel_oci::layout::{Layout, Resolved};
use keel_oci::reference::{self, ImageRef};
use keel_oci::registry::Registry;
use keel_oci::spec::{Platform, RunConfig};
use keel_oci::unpack::{LayerStats, Tree};

use super::{hash_file, out};

/// Where the image's run config goes in the tree.
pub const RUN_CONFIG: &str = keel_proto::runconfig::PATH;
/// Where `--agent` puts the agent.
pub const AGENT_PATH: &str = "/usr/sbin/keel-agent";

/// What to build.
#[derive(Debug)]
pub struct Build<'a> {
    /// The image reference.
    pub from: &'a str,
    /// The output file.
    pub out: &'a Path,
    /// `squashfs`, `erofs`.
    pub format: &'a str,
    /// With `--format initramfs`: gzip (none given) or zstd.
    pub compress: Option<Compression>,
    /// `SRC:DST` files to add.
    pub inject: &'a [String],
    /// The agent binary to add at [`AGENT_PATH`].
    pub agent: Option<&'a Path>,
    /// A kernel's `lib/modules/<version>`, for `modules`.
    pub kernel_modules: Option<&'a Path>,
    /// Modules to pack, loaded by keel's init in order.
    pub modules: &'a [String],
    /// `OS/ARCH[/VARIANT]`.
    pub platform: &'a str,
    /// Plain HTTP to the registry.
    pub insecure: bool,
    /// `USER:PASS` for the registry.
    pub creds: Option<&'a str>,
    /// Sign with this key, as `name` `version`.
    pub sign: Option<(&'a Path, &'a str, u64)>,
    /// With `sign`: append a dm-verity tree and sign its root hash.
    pub verity: bool,
    /// Print the result as JSON.
    pub json: bool,
}

/// Removes a temporary tree or file however the build ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if fs::remove_file(&self.0).is_err() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// The filesystem's timestamp: `SOURCE_DATE_EPOCH` when set, else 0.
fn epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

/// Builds the image.
pub fn run(b: &Build<'_>) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let format = match b.format {
        "squashfs" => Some(Format::Squashfs),
        "erofs" => Some(Format::Erofs),
        "initramfs" => None,
        f => bail!("--format {f:?}: expected squashfs, erofs or initramfs"),
    };
    if b.verity && format.is_none() {
        bail!("--verity protects a root image a device mounts from disk; an initramfs is checked whole by its boot loader: drop --verity or build --format squashfs|erofs");
    }
    if b.compress.is_some() && format.is_some() {
        bail!("--compress is for --format initramfs: a squashfs or erofs image is compressed by its own filesystem");
    }
    let platform = Platform::parse(b.platform)?;
    let injects: Vec<(PathBuf, String)> = b
        .inject
        .iter()
        .map(|s| match s.split_once(':') {
            Some((src, dst)) if !src.is_empty() && dst.starts_with('/') => {
                Ok((PathBuf::from(src), dst.to_string()))
            }
            _ => bail!("--inject {s:?}: expected SRC:/ABSOLUTE/DST"),
        })
        .collect::<anyhow::Result<_>>()?;
    let epoch = epoch()?;
    let r = reference::parse(b.from)?;
    let dir = b
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = b
        .out
        .file_name()
        .context("-o must name a file")?
        .to_string_lossy()
        .into_owned();
    let scratch = Scratch(dir.join(format!(".{name}.keel-build-{}", std::process::id())));
    let _ = fs::remove_dir_all(&scratch.0);
    let mut tree = Tree::create(&scratch.0)?;
    let (layers, digest) = match &r {
        ImageRef::Layout { dir, tag } => {
            let layout = Layout::open(Path::new(dir))?;
            let img = layout.resolve(tag.as_deref(), &platform)?;
            let n = apply_layout(&layout, &img, &mut tree)?;
            write_run_config(&mut tree, &img.config.config)?;
            (n, Some(img.digest.to_string()))
        }
        ImageRef::Dir { path } => {
            copy_dir(Path::new(path), &mut tree)?;
            (0, None)
        }
        ImageRef::Registry {
            host,
            repo,
            reference,
        } => {
            let mut reg = Registry::new(host, repo, b.insecure, b.creds);
            let img = reg.resolve(reference, &platform)?;
            let n = apply_registry(&mut reg, &img, &mut tree, dir, &name)?;
            write_run_config(&mut tree, &img.config.config)?;
            (n, Some(img.digest.to_string()))
        }
        ImageRef::DockerArchive { file } => {
            let archive = Archive::open(Path::new(file))?;
            let n = apply_archive(&archive, &mut tree)?;
            write_run_config(&mut tree, &archive.config.config)?;
            (n, Some(archive.id.to_string()))
        }
    };
    if let Some(agent) = b.agent {
        inject(&mut tree, agent, AGENT_PATH, 0o755)?;
    }
    if let Some(kdir) = b.kernel_modules {
        pack_modules(
            &mut tree,
            kdir,
            b.modules,
            b.agent.unwrap_or(Path::new("/proc/self/exe")),
        )?;
    }
    for (src, dst) in &injects {
        let mode = fs::metadata(src)
            .with_context(|| format!("--inject {}", src.display()))?
            .permissions();
        inject(
            &mut tree,
            src,
            dst,
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
        )?;
    }
    if format.is_none() {
        // The kernel runs /init from an initramfs: keel's init when the agent is in, else
        // the image's own.
        if b.agent.is_some() {
            tree.symlink("/init", AGENT_PATH.trim_start_matches('/'))?;
        } else if !tree.exists("/init") {
            if !tree.exists("/sbin/init") {
                bail!("--format initramfs: the image has no /init or /sbin/init: add --agent (keel-agent is then its init)");
            }
            tree.symlink("/init", "sbin/init")?;
        }
    }
    let tree_path = tree.finish()?;
    let t_pack = Instant::now();
    match format {
        Some(f) => rootimg::make(&tree_path, b.out, f, epoch)?,
        None => {
            keel_build::cpio_tree::pack(&tree_path, b.out, b.compress.unwrap_or_default())?;
        }
    }
    let pack_ms = t_pack.elapsed().as_millis();
    drop(scratch);
    if let Some((key, name, version)) = b.sign {
        super::sign::run(&super::sign::Sign {
            image: b.out,
            key,
            name,
            version,
            min_version: None,
            created: Some(epoch),
            out: &None,
            verity: b.verity,
            // Root images are what devices update by delta; an initramfs is not pushed.
            chunks: format.is_some().then(keel_proto::chunks::Params::default),
        })?;
    }
    let (size, sha256) = hash_file(b.out)?;
    let secs = t0.elapsed().as_secs_f64();
    if b.json {
        out!(
            "{}",
            serde_json::json!({
                "output": b.out,
                "format": b.format,
                "size": size,
                "sha256": sha256,
                "layers": layers,
                "image": digest,
                "secs": secs,
            })
        );
    } else {
        out!(
            "built {} ({} bytes, sha256 {sha256}) from {} ({layers} layers) in {secs:.1} s ({} packing {pack_ms} ms)",
            b.out.display(),
            size,
            b.from,
            b.format
        );
    }
    Ok(())
}

/// Applies the image's layers, lowest first, one progress line each on stderr.
fn apply_layout(layout: &Layout, img: &Resolved, tree: &mut Tree) -> anyhow::Result<usize> {
    let n = img.manifest.layers.len();
    for (i, l) in img.manifest.layers.iter().enumerate() {
        let t = Instant::now();
        let blob = layout.blob(l)?;
        let st = tree.apply_layer(&l.digest, blob)?;
        progress(i, n, &l.digest, &st, l.size, t);
    }
    Ok(n)
}

/// The progress line of layer `i` of `n`, `size` bytes as stored, applied since `t`.
fn progress(i: usize, n: usize, digest: &str, st: &LayerStats, size: u64, t: Instant) {
    eprintln!(
        "layer {}/{n} {}: {} entries, {} whiteouts, {:.1} MiB ({:.1} MiB stored) in {:.2} s",
        i + 1,
        &digest[..19.min(digest.len())],
        st.entries,
        st.whiteouts,
        st.bytes as f64 / (1u64 << 20) as f64,
        size as f64 / (1u64 << 20) as f64,
        t.elapsed().as_secs_f64(),
    );
}

/// Applies a docker archive's layers, lowest first, each hashed against its diff ID first;
/// one progress line each on stderr.
fn apply_archive(archive: &Archive, tree: &mut Tree) -> anyhow::Result<usize> {
    let n = archive.layer_count();
    for i in 0..n {
        let t = Instant::now();
        let (diff_id, blob, size) = archive.layer(i)?;
        let st = tree.apply_layer(diff_id.as_str(), blob)?;
        progress(i, n, diff_id.as_str(), &st, size, t);
    }
    Ok(n)
}

/// Downloads each layer beside the output (hashed as it arrives, used once it matches),
/// applies it, removes it; one progress line each on stderr.
fn apply_registry(
    reg: &mut Registry,
    img: &Resolved,
    tree: &mut Tree,
    dir: &Path,
    name: &str,
) -> anyhow::Result<usize> {
    let n = img.manifest.layers.len();
    for (i, l) in img.manifest.layers.iter().enumerate() {
        let t = Instant::now();
        let tmp = Scratch(dir.join(format!(".{name}.layer-{i}-{}", std::process::id())));
        let _ = fs::remove_file(&tmp.0);
        let blob = reg.fetch(l, &tmp.0)?;
        let fetched = t.elapsed().as_secs_f64();
        let st = tree.apply_layer(&l.digest, blob)?;
        let _ = fs::remove_file(&tmp.0);
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "layer {}/{n} {}: {:.1} MiB fetched in {fetched:.2} s ({:.0} MiB/s), {} entries, {} whiteouts, {:.1} MiB in {secs:.2} s",
            i + 1,
            &l.digest[..19.min(l.digest.len())],
            l.size as f64 / (1u64 << 20) as f64,
            l.size as f64 / (1u64 << 20) as f64 / fetched.max(1e-6),
            st.entries,
            st.whiteouts,
            st.bytes as f64 / (1u64 << 20) as f64,
        );
    }
    Ok(n)
}

/// The kernel modules `names` need (dependencies first, unpacked to `.ko`, as `keelctl
/// initramfs` resolves them), written under `/lib/modules/<version>/` with their load order
/// in [`keel_proto::runconfig::MODULES`] for keel's init.
fn pack_modules(
    tree: &mut Tree,
    kdir: &Path,
    names: &[String],
    any_file: &Path,
) -> anyhow::Result<()> {
    let spec = keel_build::initramfs::Spec {
        init: any_file.to_path_buf(),
        kernel_modules: Some(kdir.to_path_buf()),
        modules: names.to_vec(),
        keys: None,
        keep_compressed: false,
        files: Vec::new(),
    };
    let (entries, packed) = keel_build::initramfs::entries(&spec)?;
    let mut order = String::new();
    for (path, node) in entries {
        let keel_build::initramfs::Node::File { mode, data } = node else {
            continue;
        };
        if !path.starts_with("lib/modules/") {
            continue;
        }
        if path.ends_with(".ko") {
            order.push_str(&format!("/{path}\n"));
        }
        tree.write_file(&path, &mut data.as_slice(), mode)?;
    }
    tree.write_file(keel_proto::runconfig::MODULES, &mut order.as_bytes(), 0o644)?;
    eprintln!(
        "modules: {} packed ({} built into the kernel)",
        packed.modules.len(),
        packed.builtin.len()
    );
    Ok(())
}

/// Keeps how to run the image (Entrypoint, Cmd, Env, WorkingDir, User) in the tree.
fn write_run_config(tree: &mut Tree, config: &RunConfig) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(config)?;
    tree.write_file(RUN_CONFIG, &mut json.as_slice(), 0o644)?;
    Ok(())
}

/// Adds one regular file (never through a symlink on our side either).
fn inject(tree: &mut Tree, src: &Path, dst: &str, mode: u32) -> anyhow::Result<()> {
    let meta = fs::symlink_metadata(src).with_context(|| format!("inject {}", src.display()))?;
    if !meta.is_file() {
        bail!("inject {}: not a regular file", src.display());
    }
    let mut f = fs::File::open(src).with_context(|| format!("open {}", src.display()))?;
    tree.write_file(dst, &mut f, mode)?;
    Ok(())
}

/// `dir:PATH`: the tree taken as a single layer would be (a tar of it, streamed).
fn copy_dir(src: &Path, tree: &mut Tree) -> anyhow::Result<()> {
    let meta = fs::symlink_metadata(src).with_context(|| format!("dir:{}", src.display()))?;
    if !meta.is_dir() {
        bail!("dir:{}: not a directory", src.display());
    }
    let (rd, wr) = std::io::pipe().context("pipe")?;
    let src2 = src.to_path_buf();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut b = tar::Builder::new(wr);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        b.append_dir_all(".", &src2)?;
        b.finish()
    });
    let r = tree.apply_layer(&format!("dir:{}", src.display()), rd);
    let w = writer.join().expect("tar writer");
    r?;
    w.with_context(|| format!("reading dir:{}", src.display()))?;
    Ok(())
}
