//! `keelctl initramfs`: initstage, modules and keys as a gzip or zstd cpio newc archive.

use std::fs;
use std::path::PathBuf;

use anyhow::Context as _;
use keel_build::compress::Compression;
use keel_build::initramfs::{build, Spec};
use keel_unpack::Format;

use super::out;

/// Builds the archive of `spec` with `files` (`SRC:PATH-IN-INITRAMFS`) added.
pub fn run(
    mut spec: Spec,
    files: &[String],
    compression: Compression,
    out: &PathBuf,
) -> anyhow::Result<()> {
    for f in files {
        let (src, dst) = f
            .split_once(':')
            .with_context(|| format!("--file {f:?}: expected SRC:PATH"))?;
        spec.files.push((PathBuf::from(src), dst.to_string()));
    }
    let packed = build(&spec, out, compression)?;
    let size = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    out!(
        "wrote {} ({size} bytes): {} module file(s){}{}",
        out.display(),
        packed.modules.len(),
        if packed.modules.is_empty() {
            String::new()
        } else {
            format!(" [{}]", packed.modules.join(" "))
        },
        if packed.builtin.is_empty() {
            String::new()
        } else {
            format!("; built in: {}", packed.builtin.join(" "))
        }
    );
    let unpacked: Vec<String> = Format::ALL
        .iter()
        .filter(|f| packed.unpacked[**f as usize] > 0)
        .map(|f| format!("{} {f}", packed.unpacked[*f as usize]))
        .collect();
    if !unpacked.is_empty() {
        out!(
            "unpacked compressed modules to .ko: {}",
            unpacked.join(", ")
        );
    }
    if packed.kept_zstd > 0 {
        eprintln!(
            "warning: kept {} zstd module(s) compressed: initstage decodes gzip and xz in user \
             space, not zstd, so only a kernel with zstd module decompression \
             (CONFIG_MODULE_DECOMPRESS) loads them; leave out --keep-compressed to unpack them",
            packed.kept_zstd
        );
    }
    Ok(())
}
