//! `keelctl initramfs`: initstage, modules and keys as a gzip'd cpio newc archive.

use std::fs;
use std::path::PathBuf;

use anyhow::Context as _;
use keel_build::initramfs::{build, Spec};

use super::out;

/// Builds the archive; `files` are `SRC:PATH-IN-INITRAMFS`.
pub fn run(
    init: PathBuf,
    kernel_modules: Option<PathBuf>,
    modules: Vec<String>,
    keys: Option<PathBuf>,
    files: &[String],
    out: &PathBuf,
) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    for f in files {
        let (src, dst) = f
            .split_once(':')
            .with_context(|| format!("--file {f:?}: expected SRC:PATH"))?;
        extra.push((PathBuf::from(src), dst.to_string()));
    }
    let spec = Spec {
        init,
        kernel_modules,
        modules,
        keys,
        files: extra,
    };
    let packed = build(&spec, out)?;
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
    Ok(())
}
