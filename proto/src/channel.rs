//! A pull channel: the static files `keelctl publish` writes and a device's agent reads over
//! HTTP(S), from any web server, CDN or bucket. Under the channel's base URL:
//!
//! ```text
//! manifest.json            the signed manifest of the newest image (replaced last)
//! images/<sha256 hex>      each published image, named by its digest
//! images/<sha256>.chunks   its chunk index, when its manifest signs one (deltas)
//! ```
//!
//! An image's name is its digest, so a name is never reused for other bytes and a device
//! that fetched the manifest always finds the image it names (the image is published first).

/// The manifest's path under the channel's base URL.
pub const MANIFEST: &str = "manifest.json";

/// The folder of the images under the base URL.
pub const IMAGES: &str = "images";

/// The path of the image with digest `sha256` (hex) under the base URL.
pub fn image_path(sha256: &str) -> String {
    format!("{IMAGES}/{}", sha256.to_ascii_lowercase())
}

/// What the chunk index's name adds to its image's.
pub const INDEX_SUFFIX: &str = ".chunks";

/// The path of the chunk index of the image with digest `sha256` under the base URL.
pub fn index_path(sha256: &str) -> String {
    format!("{}{INDEX_SUFFIX}", image_path(sha256))
}

/// `base` joined with `path`, one `/` between them.
pub fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(image_path("AB12"), "images/ab12");
        assert_eq!(index_path("AB12"), "images/ab12.chunks");
        assert_eq!(
            join("http://h/c/", "manifest.json"),
            "http://h/c/manifest.json"
        );
        assert_eq!(join("http://h/c", "/images/x"), "http://h/c/images/x");
    }
}
