//! gzip (RFC 1952): the member header parsed here, the deflate data by miniz_oxide's
//! streaming inflater, the CRC-32 and length trailer checked. Concatenated members decode
//! one after another, as `gzip -d` does.

use std::io::{Read, Write};

use miniz_oxide::inflate::stream::{inflate, InflateState};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};

use crate::{Error, Format, Refill};

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const RESERVED: u8 = 0xe0;

fn corrupt(detail: impl Into<String>) -> Error {
    Error::Corrupt {
        format: Format::Gzip,
        detail: detail.into(),
    }
}

/// The next byte of a member, its absence an error: the stream is truncated.
fn need(r: &mut Refill<'_>) -> Result<u8, Error> {
    r.byte()?.ok_or(Error::Truncated(Format::Gzip))
}

fn need_u32(r: &mut Refill<'_>) -> Result<u32, Error> {
    let mut b = [0u8; 4];
    for x in &mut b {
        *x = need(r)?;
    }
    Ok(u32::from_le_bytes(b))
}

/// Skips a member header, the magic number included.
fn header(r: &mut Refill<'_>) -> Result<(), Error> {
    if need(r)? != 0x1f || need(r)? != 0x8b {
        return Err(corrupt("no gzip magic number"));
    }
    if need(r)? != 8 {
        return Err(corrupt("compression method is not deflate"));
    }
    let flags = need(r)?;
    if flags & RESERVED != 0 {
        return Err(corrupt(format!("reserved header flags set ({flags:#04x})")));
    }
    for _ in 0..6 {
        need(r)?; // mtime, extra flags, OS
    }
    if flags & FEXTRA != 0 {
        let len = u16::from_le_bytes([need(r)?, need(r)?]);
        for _ in 0..len {
            need(r)?;
        }
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            while need(r)? != 0 {}
        }
    }
    if flags & FHCRC != 0 {
        need(r)?;
        need(r)?;
    }
    Ok(())
}

/// Decodes every member of a gzip stream into `out`, at most `max` bytes.
pub(crate) fn decode(input: &mut dyn Read, out: &mut dyn Write, max: u64) -> Result<u64, Error> {
    let mut r = Refill::new(input);
    let mut state = InflateState::new_boxed(DataFormat::Raw);
    let mut outb = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        header(&mut r)?;
        state.reset(DataFormat::Raw);
        let mut crc = crc32fast::Hasher::new();
        let mut member = 0u64;
        loop {
            if r.is_empty() {
                r.refill()?;
            }
            let res = inflate(&mut state, r.data(), &mut outb, MZFlush::None);
            r.consume(res.bytes_consumed);
            let n = res.bytes_written;
            total += n as u64;
            if total > max {
                return Err(Error::TooLarge {
                    format: Format::Gzip,
                    max,
                });
            }
            crc.update(&outb[..n]);
            member += n as u64;
            out.write_all(&outb[..n])?;
            match res.status {
                Ok(MZStatus::StreamEnd) => break,
                Ok(_) => {}
                Err(MZError::Buf) if r.eof => return Err(Error::Truncated(Format::Gzip)),
                Err(MZError::Buf) => {}
                Err(e) => return Err(corrupt(format!("invalid deflate data ({e:?})"))),
            }
            if res.bytes_consumed == 0 && n == 0 {
                if r.eof {
                    return Err(Error::Truncated(Format::Gzip));
                }
                r.more()?;
            }
        }
        let (want_crc, want_len) = (need_u32(&mut r)?, need_u32(&mut r)?);
        let got = crc.finalize();
        if got != want_crc {
            return Err(corrupt(format!(
                "CRC-32 {got:08x} does not match the trailer's {want_crc:08x}"
            )));
        }
        // ISIZE is the length modulo 2^32.
        if (member & 0xffff_ffff) != u64::from(want_len) {
            return Err(corrupt(format!(
                "length {member} does not match the trailer's {want_len}"
            )));
        }
        if r.is_empty() {
            r.refill()?;
        }
        if r.is_empty() {
            return Ok(total);
        }
    }
}
