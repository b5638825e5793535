//! Decoders for compressed kernel modules, for the kernels that cannot decompress them.
//!
//! Debian 13 ships `.ko.xz`, Alpine `.ko.gz`, Ubuntu and Arch `.ko.zst`. A kernel built with
//! `CONFIG_MODULE_DECOMPRESS` takes them from `finit_module(2)` with
//! `MODULE_INIT_COMPRESSED_FILE`, but only in the one format it was configured for; Debian 12's
//! kernel takes none. keel decodes them itself: the initramfs builder when it packs modules,
//! initstage when a module on the boot partition is compressed in a form the kernel refuses.
//!
//! | item | what |
//! |---|---|
//! | [`Format`], [`Format::of_path`], [`Format::sniff`] | which format a file is in, by name and by magic |
//! | [`decode`] | one format, from a reader to a writer, with a cap on the output; checksums checked |
//! | [`decode_file`] | a module file to a writer, by its name, magic checked |
//! | [`Error`] | what was wrong: an unsupported format, corrupt or truncated data, a size over the cap |
//!
//! Memory is constant in the input size: gzip keeps its 32 KiB window, xz the dictionary the
//! stream asks for (at most [`MAX_XZ_DICT`]), zstd its window. gzip and xz are always built;
//! zstd only with the `zstd` feature (the builder has it; initstage does not, to stay in its
//! size budget, and says so).

use std::io::{Read, Write};

mod gzip;

/// The largest xz dictionary accepted (`xz -9` uses 64 MiB; the kernel's module install 1 MiB).
pub const MAX_XZ_DICT: usize = 64 << 20;

/// A compression format a module file may be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// gzip (RFC 1952), `.gz`.
    Gzip = 0,
    /// xz (LZMA2), `.xz`.
    Xz = 1,
    /// Zstandard, `.zst`.
    Zstd = 2,
}

impl Format {
    /// Every format, in the order of their discriminants (`f as usize` indexes this).
    pub const ALL: [Format; 3] = [Format::Gzip, Format::Xz, Format::Zstd];

    /// The format a file's name says (`.gz`, `.xz`, `.zst`), or `None` for a plain file.
    pub fn of_path(name: &str) -> Option<Format> {
        if name.ends_with(".gz") {
            Some(Format::Gzip)
        } else if name.ends_with(".xz") {
            Some(Format::Xz)
        } else if name.ends_with(".zst") {
            Some(Format::Zstd)
        } else {
            None
        }
    }

    /// The format the first bytes of a stream are the magic number of.
    pub fn sniff(head: &[u8]) -> Option<Format> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Format::Gzip)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Format::Xz)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Format::Zstd)
        } else {
            None
        }
    }

    /// The file name suffix, without the dot.
    pub fn suffix(self) -> &'static str {
        match self {
            Format::Gzip => "gz",
            Format::Xz => "xz",
            Format::Zstd => "zst",
        }
    }

    /// Whether this build decodes the format (zstd needs the `zstd` feature).
    pub fn supported(self) -> bool {
        self != Format::Zstd || cfg!(feature = "zstd")
    }

    /// The same name without this format's suffix (`a.ko.xz` → `a.ko`).
    pub fn strip(self, name: &str) -> &str {
        name.strip_suffix(self.suffix())
            .and_then(|n| n.strip_suffix('.'))
            .unwrap_or(name)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Gzip => "gzip",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
        })
    }
}

/// What went wrong decoding a stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This build has no decoder for the format.
    #[error("{0} is not supported here (this build decodes gzip and xz{zstd})", zstd = if cfg!(feature = "zstd") { " and zstd" } else { " only" })]
    Unsupported(Format),
    /// The file's magic number is not that of the format its name says.
    #[error("not {expected} data (the name says {expected}; the first bytes say {found})")]
    WrongMagic {
        /// The format the name says.
        expected: Format,
        /// What the bytes look like instead.
        found: String,
    },
    /// The stream is not valid in its format, or its checksum does not match.
    #[error("corrupt {format} data: {detail}")]
    Corrupt {
        /// The format being decoded.
        format: Format,
        /// What the decoder found.
        detail: String,
    },
    /// The stream ended before its end marker.
    #[error("truncated {0} data (the stream ends before its end marker)")]
    Truncated(Format),
    /// The decoded data would be larger than the cap.
    #[error("{format} data decodes to more than {max} bytes (the cap)")]
    TooLarge {
        /// The format being decoded.
        format: Format,
        /// The cap.
        max: u64,
    },
    /// Reading the input or writing the output failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Decodes one `format` stream from `input` into `out`, at most `max` bytes of output. Returns
/// the number of bytes written. Checksums the format carries are checked (gzip CRC-32 and
/// length, xz CRC-32/CRC-64, zstd XXH64 when present); a stream that ends early is
/// [`Error::Truncated`].
pub fn decode(
    format: Format,
    input: &mut dyn Read,
    out: &mut dyn Write,
    max: u64,
) -> Result<u64, Error> {
    match format {
        Format::Gzip => gzip::decode(input, out, max),
        Format::Xz => decode_xz(input, out, max),
        Format::Zstd => decode_zstd(input, out, max),
    }
}

/// Decodes the module file `path` (its format from its name; its magic number must agree)
/// into `out`, at most `max` bytes. `Ok(None)` for a file whose name says it is not
/// compressed: the caller uses it as it is.
pub fn decode_file(
    path: &std::path::Path,
    out: &mut dyn Write,
    max: u64,
) -> Result<Option<(Format, u64)>, Error> {
    let Some(format) = Format::of_path(&path.to_string_lossy()) else {
        return Ok(None);
    };
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 6];
    let n = read_full(&mut f, &mut head)?;
    match Format::sniff(&head[..n]) {
        Some(found) if found == format => {}
        found => {
            return Err(Error::WrongMagic {
                expected: format,
                found: found.map_or_else(|| "neither gzip, xz nor zstd".into(), |f| f.to_string()),
            })
        }
    }
    let mut input = std::io::Read::chain(&head[..n], f);
    decode(format, &mut input, out, max).map(|len| Some((format, len)))
}

/// Reads until `buf` is full or the input ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn decode_xz(input: &mut dyn Read, out: &mut dyn Write, max: u64) -> Result<u64, Error> {
    use xz4rust::{XzDecoder, XzError};
    let corrupt = |e: XzError| Error::Corrupt {
        format: Format::Xz,
        detail: format!("{e:?}"),
    };
    // The dictionary grows to what the stream header asks for, up to the cap.
    let mut dec = XzDecoder::in_heap_with_alloc_dict_size(4096, MAX_XZ_DICT);
    let mut inb = Refill::new(input);
    let mut outb = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        if inb.is_empty() {
            inb.refill()?;
        }
        let (progress, end) = match dec.decode(inb.data(), &mut outb) {
            Ok(r) => {
                inb.consume(r.input_consumed());
                let n = r.output_produced();
                total += n as u64;
                if total > max {
                    return Err(Error::TooLarge {
                        format: Format::Xz,
                        max,
                    });
                }
                out.write_all(&outb[..n])?;
                (r.made_progress(), r.is_end_of_stream())
            }
            Err(XzError::NeedsLargerInputBuffer) => (false, false),
            Err(e) => return Err(corrupt(e)),
        };
        if end {
            return Ok(total);
        }
        if !progress {
            if inb.eof {
                return Err(Error::Truncated(Format::Xz));
            }
            inb.more()?;
        }
    }
}

#[cfg(feature = "zstd")]
fn decode_zstd(input: &mut dyn Read, out: &mut dyn Write, max: u64) -> Result<u64, Error> {
    use ruzstd::decoding::StreamingDecoder;
    let corrupt = |detail: String| Error::Corrupt {
        format: Format::Zstd,
        detail,
    };
    // ruzstd reports a short read inside its own error; whether the input ran out tells a
    // truncated stream from a corrupt one.
    let mut src = EofWatch {
        inner: input,
        ended: false,
    };
    let classify = |e: String, ended: bool| {
        if ended {
            Error::Truncated(Format::Zstd)
        } else {
            corrupt(e)
        }
    };
    let mut dec = match StreamingDecoder::new(&mut src) {
        Ok(d) => d,
        Err(e) => {
            let e = e.to_string();
            return Err(classify(e, src.ended));
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let e = e.to_string();
                return Err(classify(e, dec.get_ref().ended));
            }
        };
        n += k as u64;
        if n > max {
            return Err(Error::TooLarge {
                format: Format::Zstd,
                max,
            });
        }
        out.write_all(&buf[..k])?;
    }
    let frame = dec.into_frame_decoder();
    if !frame.is_finished() {
        return Err(Error::Truncated(Format::Zstd));
    }
    match (
        frame.get_checksum_from_data(),
        frame.get_calculated_checksum(),
    ) {
        (Some(want), Some(got)) if want != got => Err(corrupt(format!(
            "content checksum {got:08x} does not match the frame's {want:08x}"
        ))),
        _ => Ok(n),
    }
}

/// A reader that remembers whether its input ended.
#[cfg(feature = "zstd")]
struct EofWatch<'r> {
    inner: &'r mut dyn Read,
    ended: bool,
}

#[cfg(feature = "zstd")]
impl Read for EofWatch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended = true;
        }
        Ok(n)
    }
}

#[cfg(not(feature = "zstd"))]
fn decode_zstd(_: &mut dyn Read, _: &mut dyn Write, _: u64) -> Result<u64, Error> {
    Err(Error::Unsupported(Format::Zstd))
}

/// An input buffer over a reader: the decoders that take slices read through it.
pub(crate) struct Refill<'r> {
    reader: &'r mut dyn Read,
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    /// The reader has ended.
    pub(crate) eof: bool,
}

impl<'r> Refill<'r> {
    pub(crate) fn new(reader: &'r mut dyn Read) -> Self {
        Refill {
            reader,
            buf: vec![0u8; 64 << 10],
            lo: 0,
            hi: 0,
            eof: false,
        }
    }

    /// The bytes read and not consumed yet.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.lo..self.hi]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lo == self.hi
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.lo = (self.lo + n).min(self.hi);
    }

    /// The next byte, `None` at the end of the input.
    pub(crate) fn byte(&mut self) -> std::io::Result<Option<u8>> {
        if self.is_empty() {
            self.refill()?;
        }
        if self.is_empty() {
            return Ok(None);
        }
        self.lo += 1;
        Ok(Some(self.buf[self.lo - 1]))
    }

    /// Reads more when all was consumed (nothing at the end of the input).
    pub(crate) fn refill(&mut self) -> std::io::Result<()> {
        self.lo = 0;
        self.hi = 0;
        self.more()
    }

    /// Keeps the unconsumed bytes and reads more after them.
    pub(crate) fn more(&mut self) -> std::io::Result<()> {
        if self.eof {
            return Ok(());
        }
        self.buf.copy_within(self.lo..self.hi, 0);
        self.hi -= self.lo;
        self.lo = 0;
        if self.hi == self.buf.len() {
            // A decoder that wants more than this to make progress is reading garbage.
            if self.buf.len() >= 1 << 20 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the decoder made no progress on 1 MiB of input",
                ));
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        loop {
            match self.reader.read(&mut self.buf[self.hi..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.hi += n;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
