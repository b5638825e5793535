//! File names on keel's partitions, all derived from the image name (`keel.image=`).
//!
//! On `img`: `root-squashfs.img` (current), `root-squashfs-old.img` (previous),
//! `root-squashfs.img.new` (a promotion in progress), `keel-state.json` (the boot state).
//! On `newimg`: `root-squashfs.img` (staged) and `root-squashfs.img.manifest` (its signed
//! manifest, written last: the commit marker).

/// The boot state's file name on the `img` partition.
pub const STATE_FILE: &str = "keel-state.json";
/// Temporary name the state is written to before the atomic rename.
pub const STATE_TMP: &str = "keel-state.json.tmp";
/// On `img`, while a boot through dm-verity has not been confirmed: the booted image's
/// SHA-256. initstage writes it once the verity root is mounted; `mark-good` (every boot, by
/// the shipped units) removes it. Found at the next boot, the previous one ended before that
/// — perhaps restarted by dm-verity on a corrupt block — and initstage checks every block of
/// the image before it boots it again.
pub const VERITY_UNCONFIRMED_FILE: &str = "keel-verity-unconfirmed";
/// Temporary name of [`VERITY_UNCONFIRMED_FILE`] before its rename.
pub const VERITY_UNCONFIRMED_TMP: &str = "keel-verity-unconfirmed.tmp";
/// The default image file name.
pub const DEFAULT_IMAGE: &str = "root-squashfs.img";

/// Names of every file keel keeps for one image name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The current image, e.g. `root-squashfs.img`.
    pub current: String,
    /// The previous image, e.g. `root-squashfs-old.img`.
    pub old: String,
    /// A temporary link made while the previous image is renamed to `old`.
    pub old_tmp: String,
    /// The new image being copied in, e.g. `root-squashfs.img.new`.
    pub new_tmp: String,
    /// The staged image on `newimg` (same name as the current one).
    pub staged: String,
    /// The staged image's signed manifest on `newimg`: the commit marker.
    pub staged_manifest: String,
    /// Temporary name of a staged image being received.
    pub staged_partial: String,
    /// The signed manifest of the partial upload (lets a cut upload resume).
    pub partial_manifest: String,
    /// Temporary name the staged manifest is written to before its rename.
    pub staged_manifest_tmp: String,
}

/// Whether `name` is a plain file name keel accepts as an image name.
pub fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name != STATE_FILE
        && name != VERITY_UNCONFIRMED_FILE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
}

impl Names {
    /// Derives all names from the image name: `-old` goes before the extension.
    pub fn for_image(image: &str) -> Names {
        let old = match image.rfind('.') {
            Some(dot) if dot > 0 => format!("{}-old{}", &image[..dot], &image[dot..]),
            _ => format!("{image}-old"),
        };
        Names {
            current: image.to_string(),
            old_tmp: format!("{old}.tmp"),
            old,
            new_tmp: format!("{image}.new"),
            staged: image.to_string(),
            staged_manifest: format!("{image}.manifest"),
            staged_partial: format!("{image}.partial"),
            partial_manifest: format!("{image}.partial.manifest"),
            staged_manifest_tmp: format!("{image}.manifest.tmp"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_name_goes_before_extension() {
        assert_eq!(
            Names::for_image("root-squashfs.img").old,
            "root-squashfs-old.img"
        );
        assert_eq!(Names::for_image("rootfs").old, "rootfs-old");
        assert_eq!(Names::for_image("a.b.erofs").old, "a.b-old.erofs");
        assert_eq!(Names::for_image(".img").old, ".img-old");
    }

    #[test]
    fn image_names() {
        assert!(valid_image_name("root-squashfs.img"));
        assert!(!valid_image_name("../x"));
        assert!(!valid_image_name("a/b"));
        assert!(!valid_image_name(""));
        assert!(!valid_image_name(".."));
        assert!(!valid_image_name(STATE_FILE));
    }
}
