//! `keelctl push IMAGE`: offer, send, resume after a cut.

use std::path::{Path, PathBuf};

use keelctl::client::{self, Dial, Pushed};
use keelctl::Endpoint;

use super::{manifest_path, out, read_manifest};
use crate::progress::Progress;

/// Pushes `image` with its manifest to `ep`.
pub fn run(
    ep: &Endpoint,
    dial: &Dial,
    image: &Path,
    manifest: &Option<PathBuf>,
    retries: u32,
) -> anyhow::Result<()> {
    let signed = read_manifest(&manifest_path(image, manifest))?;
    let mut bar = Progress::new(signed.manifest.version);
    let r = client::push(ep, dial, &signed, image, retries, &mut |d, t| {
        bar.update(d, t)
    });
    bar.end();
    match r? {
        Pushed::Staged {
            version,
            sent,
            attempts,
        } => {
            out!(
                "staged version {version} on {ep} ({sent} bytes sent{}); it is installed at the next boot",
                if attempts > 1 {
                    format!(", {attempts} connections")
                } else {
                    String::new()
                }
            );
        }
        Pushed::UpToDate(m) => out!("nothing to do: {m}"),
    }
    Ok(())
}
