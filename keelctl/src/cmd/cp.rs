//! `keelctl cp SRC DST`: one side is a guest path written `:PATH`. Streamed both ways with a
//! progress display; a trailing `/` on a guest directory, or a local directory, takes the
//! source's file name.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use keelctl::client::Client;
use keelctl::files::{copy_in, copy_out};

use super::out;
use crate::progress::Progress;

/// Which way a copy goes, once its arguments are read (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Copy {
    /// A local file into the guest.
    In {
        /// Local source.
        src: PathBuf,
        /// Guest target (absolute).
        dst: String,
    },
    /// A guest file out.
    Out {
        /// Guest source (absolute).
        src: String,
        /// Local target (a directory takes the source's name).
        dst: PathBuf,
    },
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Reads `SRC DST`; exactly one is `:PATH`, an absolute guest path.
pub fn parse(src: &str, dst: &str) -> anyhow::Result<Copy> {
    let guest = |p: &str| -> anyhow::Result<String> {
        if !p.starts_with('/') {
            bail!("guest path {p:?} must be absolute (:/PATH)");
        }
        Ok(p.to_string())
    };
    match (src.strip_prefix(':'), dst.strip_prefix(':')) {
        (None, Some(d)) => {
            let mut d = guest(d)?;
            if d.ends_with('/') {
                let name = Path::new(src)
                    .file_name()
                    .with_context(|| format!("{src:?} has no file name"))?;
                d.push_str(&name.to_string_lossy());
            }
            Ok(Copy::In {
                src: src.into(),
                dst: d,
            })
        }
        (Some(s), None) => {
            let s = guest(s)?;
            let mut d = PathBuf::from(dst);
            if d.is_dir() {
                d.push(base(&s));
            }
            Ok(Copy::Out { src: s, dst: d })
        }
        (Some(_), Some(_)) => bail!("both paths are in the guest: one must be local"),
        (None, None) => bail!("neither path is in the guest: write the guest one as :/PATH"),
    }
}

/// Runs the copy over `c`.
pub fn run(mut c: Client, copy: Copy) -> anyhow::Result<()> {
    match copy {
        Copy::In { src, dst } => {
            let mut bar = Progress::labelled(base(&dst).to_string(), "copied");
            let r = copy_in(&mut c, &src, &dst, &mut |d, t| bar.update(d, t));
            bar.end();
            out!("{}", r?);
        }
        Copy::Out { src, dst } => {
            let mut bar = Progress::labelled(base(&src).to_string(), "copied");
            let r = copy_out(&mut c, &src, &dst, &mut |d, t| bar.update(d, t));
            bar.end();
            out!("copied {} bytes to {}", r?, dst.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_and_names() {
        assert_eq!(
            parse("app.tar", ":/srv/").unwrap(),
            Copy::In {
                src: "app.tar".into(),
                dst: "/srv/app.tar".into()
            }
        );
        assert_eq!(
            parse(":/var/log/app.log", "/").unwrap(),
            Copy::Out {
                src: "/var/log/app.log".into(),
                dst: "/app.log".into()
            }
        );
        for (s, d) in [("a", "b"), (":/a", ":/b"), ("a", ":rel")] {
            assert!(parse(s, d).is_err(), "{s} {d}");
        }
    }
}
