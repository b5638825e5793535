//! How an initramfs is compressed: gzip, which every kernel unpacks, or zstd
//! (`CONFIG_RD_ZSTD`, Linux ≥ 5.9, Debian's kernels), which unpacks several times faster.
//! Written to a temporary file that is synced and renamed into place only once the stream
//! is complete.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::error::{IoContext, Result};

/// An initramfs compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// gzip (RFC 1952).
    #[default]
    Gzip,
    /// zstd (RFC 8878), with a content checksum.
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!("{s:?}: expected gzip or zstd")),
        }
    }
}

/// How hard to try: `Best` for small archives (keel's initramfs), `Default` for whole roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    /// gzip 6, zstd 3.
    Default,
    /// gzip 9, zstd 19.
    Best,
}

/// A compressing writer into a file.
pub(crate) enum Encoder {
    Gzip(flate2::write::GzEncoder<BufWriter<fs::File>>),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<fs::File>>),
}

impl Encoder {
    /// Starts a stream into `f`.
    pub(crate) fn new(c: Compression, effort: Effort, f: fs::File) -> io::Result<Encoder> {
        let w = BufWriter::new(f);
        Ok(match c {
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                match effort {
                    Effort::Default => flate2::Compression::default(),
                    Effort::Best => flate2::Compression::best(),
                },
            )),
            Compression::Zstd => {
                let mut z = zstd::stream::write::Encoder::new(
                    w,
                    match effort {
                        Effort::Default => 3,
                        Effort::Best => 19,
                    },
                )?;
                z.include_checksum(true)?;
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                z.multithread(u32::try_from(threads).unwrap_or(1))?;
                Encoder::Zstd(z)
            }
        })
    }

    /// Ends the stream written to `tmp`, syncs the file and renames it to `out`.
    pub(crate) fn finish(self, tmp: &Path, out: &Path) -> Result<()> {
        let w = match self {
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
        }
        .ctx("write", tmp)?;
        w.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .ctx("write", tmp)?;
        fs::rename(tmp, out).ctx("rename into place", out)
    }
}

impl Write for Encoder {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(g) => g.write(b),
            Encoder::Zstd(z) => z.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn both_round_trip() {
        let dir = std::env::temp_dir().join(format!("keel-compress-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [Compression::Gzip, Compression::Zstd] {
            let (tmp, out) = (dir.join("t"), dir.join(format!("{c:?}")));
            let mut e = Encoder::new(c, Effort::Best, fs::File::create(&tmp).unwrap()).unwrap();
            e.write_all(&data).unwrap();
            e.finish(&tmp, &out).unwrap();
            let f = fs::File::open(&out).unwrap();
            let mut back = Vec::new();
            match c {
                Compression::Gzip => flate2::read::GzDecoder::new(f).read_to_end(&mut back),
                Compression::Zstd => zstd::stream::read::Decoder::new(f)
                    .unwrap()
                    .read_to_end(&mut back),
            }
            .unwrap();
            assert_eq!(back, data, "{c:?}");
            assert!(!tmp.exists());
        }
        assert_eq!("zstd".parse(), Ok(Compression::Zstd));
        assert!("xz".parse::<Compression>().is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
