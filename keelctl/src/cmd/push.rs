//! `keelctl push IMAGE`: offer, send (only the chunks the agent lacks when IMAGE.chunks and
//! the manifest allow), resume after a cut.

use std::path::{Path, PathBuf};

use keelctl::client::{self, Dial, Pushed};
use keelctl::Endpoint;

use super::{manifest_path, out, read_manifest};
use crate::progress::Progress;

/// What to push, and how.
#[derive(Debug)]
pub struct Opts<'a> {
    /// The image file.
    pub image: &'a Path,
    /// Its manifest (default IMAGE.manifest).
    pub manifest: &'a Option<PathBuf>,
    /// Reconnects after a lost connection.
    pub retries: u32,
    /// Offer a delta when IMAGE.chunks is there and the manifest signs it.
    pub delta: bool,
    /// Print the result as JSON.
    pub json: bool,
}

/// Pushes the image with its manifest to `ep`.
pub fn run(ep: &Endpoint, dial: &Dial, o: &Opts<'_>) -> anyhow::Result<()> {
    let signed = read_manifest(&manifest_path(o.image, o.manifest))?;
    let index = super::sign::index_path(o.image);
    let index = (signed.chunks.is_some() && index.is_file()).then_some(index);
    let offer = if o.delta {
        client::Offer::delta(&signed, index.as_deref())
    } else {
        client::Offer::FULL
    };
    let mut bar = Progress::new(signed.manifest.version);
    let r = client::push(ep, dial, &signed, o.image, offer, o.retries, &mut |d, t| {
        bar.update(d, t)
    });
    bar.end();
    let size = signed.manifest.size;
    match r? {
        Pushed::Staged {
            version,
            sent,
            attempts,
            reused,
            delta,
            index,
        } => {
            if o.json {
                out!(
                    "{}",
                    serde_json::json!({
                        "staged": version, "endpoint": ep.to_string(), "size": size,
                        "sent": sent, "reused": reused, "delta": delta, "index": index,
                        "attempts": attempts,
                    })
                );
                return Ok(());
            }
            let how = if delta {
                format!(
                    "delta: {sent} bytes sent and a {index}-byte index, {reused} reused from images on the device ({:.1}% of {size} sent)",
                    percent(sent + index, size)
                )
            } else {
                format!("{sent} bytes sent")
            };
            out!(
                "staged version {version} on {ep} ({how}{}); it is installed at the next boot",
                if attempts > 1 {
                    format!(", {attempts} connections")
                } else {
                    String::new()
                }
            );
        }
        Pushed::UpToDate(m) if o.json => out!("{}", serde_json::json!({ "up_to_date": m })),
        Pushed::UpToDate(m) => out!("nothing to do: {m}"),
    }
    Ok(())
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        // Display only: the precision of f64 is plenty for a percentage.
        #[allow(clippy::cast_precision_loss)]
        let p = part as f64 * 100.0 / whole as f64;
        p
    }
}
