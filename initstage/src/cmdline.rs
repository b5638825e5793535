//! Kernel command line parsing (pure).
//!
//! Unknown words are ignored; a malformed value is reported as a [`Warning`] and the documented
//! default is used, so a typo never stops a boot.

use std::time::Duration;

use keel_proto::layout::{valid_image_name, DEFAULT_IMAGE};

/// Default boots a trial image gets.
pub const DEFAULT_TRIES: u32 = 3;
/// Largest `keel.watchdog=` accepted (i6300esb counts to about 2046 s).
pub const MAX_WATCHDOG_SECS: u32 = 2000;
/// Largest `keel.tries=` accepted.
pub const MAX_TRIES: u32 = 100;
/// Default seconds to wait for partitions.
pub const DEFAULT_WAIT_SECS: u64 = 10;
/// Largest `keel.wait=` accepted.
pub const MAX_WAIT_SECS: u64 = 3600;

/// Filesystem labels of keel's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// Partition holding the current and previous image and the boot state.
    pub img: String,
    /// Partition holding `persistent/`, `upper/`, `work/`.
    pub overlay: String,
    /// Partition the agent stages new images on.
    pub newimg: String,
    /// Optional partition with kernel modules under `modules/<version>/`.
    pub boot: String,
}

impl Default for Labels {
    fn default() -> Self {
        Labels {
            img: "img".into(),
            overlay: "overlay".into(),
            newimg: "newimg".into(),
            boot: "boot".into(),
        }
    }
}

/// Everything initstage takes from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `init=`: the real init.
    pub init: String,
    /// `init_args=`: its arguments (split on spaces), before any passed on by the kernel.
    pub init_args: Vec<String>,
    /// `modules=a,b`: modules to load first.
    pub modules: Vec<String>,
    /// `overlaytmpfs=yes`: upper layer on tmpfs.
    pub overlay_tmpfs: bool,
    /// `overlaytmpfsflags=`: extra tmpfs mount options.
    pub overlay_tmpfs_flags: Option<String>,
    /// `keel.image=`: image file name on `img`.
    pub image: String,
    /// `keel.label.*=`: label overrides.
    pub labels: Labels,
    /// `keel.tries=`: boots a trial image gets.
    pub tries: u32,
    /// `keel.wait=`: how long to wait for partitions.
    pub wait: Duration,
    /// `keel.debug`: a shell instead of a reboot on failure.
    pub debug: bool,
    /// `keel.failpoint=N` (failpoints builds only): abort at the N-th write step.
    pub failpoint: Option<u64>,
    /// `keel.verity=required|auto|off`: when the image is mounted through dm-verity.
    pub verity: VerityMode,
    /// `keel.watchdog=SECS`: arm `/dev/watchdog` with this timeout for a trial boot.
    pub watchdog: Option<u32>,
}

/// `keel.verity=`: whether the image is read through dm-verity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerityMode {
    /// Every image must carry a verity tree in its signed manifest and be mounted through it.
    Required,
    /// The image is mounted through dm-verity whenever its manifest carries a tree.
    #[default]
    Auto,
    /// Never (the image's digest is still checked at staging and promotion).
    Off,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            init: "/sbin/init".into(),
            init_args: Vec::new(),
            modules: Vec::new(),
            overlay_tmpfs: false,
            overlay_tmpfs_flags: None,
            image: DEFAULT_IMAGE.into(),
            labels: Labels::default(),
            tries: DEFAULT_TRIES,
            wait: Duration::from_secs(DEFAULT_WAIT_SECS),
            debug: false,
            failpoint: None,
            verity: VerityMode::Auto,
            watchdog: None,
        }
    }
}

/// A malformed value that was replaced by its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The word as written, e.g. `keel.tries=abc`.
    pub word: String,
    /// What is wrong and what is used instead.
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.word, self.message)
    }
}

/// Splits a command line into words; double quotes group spaces and are removed.
pub fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has {
                    words.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if has {
        words.push(cur);
    }
    words
}

fn valid_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.contains(['/', '\0'])
}

fn valid_mount_options(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
}

fn parse_bool(v: Option<&str>) -> Option<bool> {
    match v {
        None | Some("1") | Some("yes") | Some("y") | Some("true") | Some("on") => Some(true),
        Some("0") | Some("no") | Some("n") | Some("false") | Some("off") => Some(false),
        _ => None,
    }
}

/// Parses a whole command line.
pub fn parse(line: &str) -> (Config, Vec<Warning>) {
    let mut cfg = Config::default();
    let mut warnings = Vec::new();
    for word in split_words(line) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        let mut warn = |message: String| {
            warnings.push(Warning {
                word: word.clone(),
                message,
            })
        };
        match key {
            "init" => match value {
                Some(v) if v.starts_with('/') => cfg.init = v.to_string(),
                _ => warn("not an absolute path; using /sbin/init".into()),
            },
            "init_args" => {
                cfg.init_args = value
                    .unwrap_or("")
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            }
            "modules" => {
                cfg.modules = value
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect();
                if cfg.modules.iter().any(|m| m.contains('/')) {
                    warn("module names may not contain '/'; loading none".into());
                    cfg.modules.clear();
                }
            }
            "overlaytmpfs" => match parse_bool(value) {
                Some(b) => cfg.overlay_tmpfs = b,
                None => warn("expected yes or no; using no".into()),
            },
            "overlaytmpfsflags" => match value {
                Some(v) if valid_mount_options(v) => cfg.overlay_tmpfs_flags = Some(v.to_string()),
                _ => warn("expected comma-separated mount options; using none".into()),
            },
            "keel.image" => match value {
                Some(v) if valid_image_name(v) => cfg.image = v.to_string(),
                _ => warn(format!(
                    "expected a plain file name (A-Z a-z 0-9 . _ - +); using {DEFAULT_IMAGE}"
                )),
            },
            "keel.label.img" | "keel.label.overlay" | "keel.label.newimg" | "keel.label.boot" => {
                let slot = match key {
                    "keel.label.img" => &mut cfg.labels.img,
                    "keel.label.overlay" => &mut cfg.labels.overlay,
                    "keel.label.newimg" => &mut cfg.labels.newimg,
                    _ => &mut cfg.labels.boot,
                };
                match value {
                    Some(v) if valid_label(v) => *slot = v.to_string(),
                    _ => {
                        let default = slot.clone();
                        warn(format!("expected a filesystem label; using {default}"))
                    }
                }
            }
            "keel.tries" => match value.and_then(|v| v.parse::<u32>().ok()) {
                Some(n) if (1..=MAX_TRIES).contains(&n) => cfg.tries = n,
                _ => warn(format!(
                    "expected a whole number from 1 to {MAX_TRIES}; using {DEFAULT_TRIES}"
                )),
            },
            "keel.wait" => match value.and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n <= MAX_WAIT_SECS => cfg.wait = Duration::from_secs(n),
                _ => warn(format!(
                    "expected whole seconds from 0 to {MAX_WAIT_SECS}; using {DEFAULT_WAIT_SECS}"
                )),
            },
            "keel.debug" => match parse_bool(value) {
                Some(b) => cfg.debug = b,
                None => warn("expected nothing, yes or no; using on".into()),
            },
            "keel.verity" => match value {
                Some("required") => cfg.verity = VerityMode::Required,
                Some("auto") => cfg.verity = VerityMode::Auto,
                Some("off") => cfg.verity = VerityMode::Off,
                _ => warn("expected required, auto or off; using auto".into()),
            },
            "keel.watchdog" => match value.and_then(|v| v.parse::<u32>().ok()) {
                Some(n) if (1..=MAX_WATCHDOG_SECS).contains(&n) => cfg.watchdog = Some(n),
                _ => warn(format!(
                    "expected whole seconds from 1 to {MAX_WATCHDOG_SECS}; no watchdog"
                )),
            },
            "keel.failpoint" => match value.and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n > 0 => cfg.failpoint = Some(n),
                _ => warn("expected a step number from 1; ignoring".into()),
            },
            _ => {}
        }
        if key == "keel.debug" && parse_bool(value).is_none() {
            cfg.debug = true;
        }
    }
    (cfg, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let (c, w) = parse("console=ttyS0 quiet root=/dev/vda");
        assert_eq!(c, Config::default());
        assert!(w.is_empty());
    }

    #[test]
    fn every_option() {
        let (c, w) = parse(
            "init=/lib/systemd/systemd init_args=\"--unit rescue.target\" modules=virtio_blk,loop,squashfs \
             overlaytmpfs=yes overlaytmpfsflags=size=64m,nr_inodes=1000 keel.image=rootfs.erofs \
             keel.label.img=IMG keel.label.overlay=OV keel.label.newimg=NEW keel.label.boot=BOOT \
             keel.tries=5 keel.wait=30 keel.debug keel.verity=required keel.watchdog=45",
        );
        assert_eq!(c.verity, VerityMode::Required);
        assert_eq!(c.watchdog, Some(45));
        assert_eq!(parse("").0.watchdog, None);
        assert_eq!(parse("keel.verity=off").0.verity, VerityMode::Off);
        assert_eq!(parse("").0.verity, VerityMode::Auto);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.init, "/lib/systemd/systemd");
        assert_eq!(c.init_args, vec!["--unit", "rescue.target"]);
        assert_eq!(c.modules, vec!["virtio_blk", "loop", "squashfs"]);
        assert!(c.overlay_tmpfs);
        assert_eq!(
            c.overlay_tmpfs_flags.as_deref(),
            Some("size=64m,nr_inodes=1000")
        );
        assert_eq!(c.image, "rootfs.erofs");
        assert_eq!(
            c.labels,
            Labels {
                img: "IMG".into(),
                overlay: "OV".into(),
                newimg: "NEW".into(),
                boot: "BOOT".into()
            }
        );
        assert_eq!(c.tries, 5);
        assert_eq!(c.wait, Duration::from_secs(30));
        assert!(c.debug);
    }

    #[test]
    fn malformed_values_warn_and_use_defaults() {
        let cases: &[(&str, &str)] = &[
            ("keel.tries=abc", "1 to 100; using 3"),
            ("keel.watchdog=0", "1 to 2000; no watchdog"),
            ("keel.watchdog=x", "1 to 2000; no watchdog"),
            ("keel.tries=0", "1 to 100; using 3"),
            ("keel.tries=1000", "1 to 100; using 3"),
            ("keel.wait=-1", "using 10"),
            ("keel.wait=", "using 10"),
            ("keel.image=../etc/passwd", "using root-squashfs.img"),
            ("keel.image=", "using root-squashfs.img"),
            ("keel.label.img=", "using img"),
            ("keel.label.img=a/b", "using img"),
            ("init=sbin/init", "using /sbin/init"),
            ("overlaytmpfs=maybe", "using no"),
            ("overlaytmpfsflags=", "using none"),
            ("modules=../x", "loading none"),
            ("keel.debug=perhaps", "using on"),
            ("keel.verity=yes", "required, auto or off; using auto"),
        ];
        for (line, expect) in cases {
            let (c, w) = parse(line);
            assert_eq!(w.len(), 1, "{line}: {w:?}");
            assert_eq!(w[0].word, *line);
            assert!(w[0].message.contains(expect), "{line}: {}", w[0]);
            let d = Config {
                debug: line.starts_with("keel.debug"),
                ..Default::default()
            };
            assert_eq!(c, d, "{line}");
        }
    }

    #[test]
    fn quoting_and_spacing() {
        assert_eq!(
            split_words("  a \"b c\"  d=\"e f\" "),
            vec!["a", "b c", "d=e f"]
        );
        assert_eq!(split_words(""), Vec::<String>::new());
        assert_eq!(split_words("x=\"\""), vec!["x="]);
    }

    #[test]
    fn later_words_win_and_empty_modules() {
        let (c, _) = parse("keel.tries=2 keel.tries=4 modules=");
        assert_eq!(c.tries, 4);
        assert!(c.modules.is_empty());
        let (c, _) = parse("keel.debug=no overlaytmpfs=1");
        assert!(!c.debug);
        assert!(c.overlay_tmpfs);
    }
}
