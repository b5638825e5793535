//! Every format as the real tools write it (`gzip`, `xz`, `zstd` from Debian), decoded back
//! to the same bytes; and every way a stream can be bad, each with its own error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keel_unpack::{decode, decode_file, Error, Format};

/// 3 MiB that compress like a module: text, repeats and noise.
fn sample() -> Vec<u8> {
    let mut v = Vec::with_capacity(3 << 20);
    let mut x: u32 = 0x1234_5678;
    while v.len() < 3 << 20 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        match x >> 30 {
            0 => v.extend_from_slice(b"virtio_ring: vring_new_virtqueue\0__this_module\0"),
            1 => v.extend(std::iter::repeat_n(0u8, (x >> 20) as usize & 0x3ff)),
            _ => v.extend_from_slice(&x.to_le_bytes()),
        }
    }
    v
}

/// Runs `tool args` with `input` on stdin and returns its stdout.
fn run(tool: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut c = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e} (make deps installs it)"));
    let mut stdin = c.stdin.take().unwrap();
    let data = input.to_vec();
    let t = std::thread::spawn(move || stdin.write_all(&data));
    let out = c.wait_with_output().unwrap();
    t.join().unwrap().unwrap();
    assert!(out.status.success(), "{tool} {args:?} failed");
    out.stdout
}

fn unpack(format: Format, data: &[u8], max: u64) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let n = decode(format, &mut &data[..], &mut out, max)?;
    assert_eq!(n, out.len() as u64);
    Ok(out)
}

/// Each tool's way of writing its format.
fn variants() -> Vec<(Format, &'static str, Vec<&'static str>)> {
    vec![
        (Format::Gzip, "gzip", vec!["-c", "-9"]),
        (Format::Gzip, "gzip", vec!["-c", "-1", "-n"]),
        // What the kernel's modules_install runs for CONFIG_MODULE_COMPRESS_XZ.
        (
            Format::Xz,
            "xz",
            vec!["-c", "--check=crc32", "--lzma2=dict=1MiB"],
        ),
        (Format::Xz, "xz", vec!["-c", "-6"]),
        (Format::Xz, "xz", vec!["-c", "--check=none", "-0"]),
        (Format::Zstd, "zstd", vec!["-c", "-q", "-19"]),
        (Format::Zstd, "zstd", vec!["-c", "-q", "--no-check"]),
    ]
}

#[test]
fn the_real_tools_output_decodes_to_the_same_bytes() {
    let data = sample();
    for (format, tool, args) in variants() {
        let packed = run(tool, &args, &data);
        assert_eq!(Format::sniff(&packed), Some(format), "{tool} {args:?}");
        match unpack(format, &packed, u64::MAX) {
            Ok(out) => assert!(out == data, "{tool} {args:?}: different bytes"),
            Err(Error::Unsupported(Format::Zstd)) => assert!(!Format::Zstd.supported()),
            Err(e) => panic!("{tool} {args:?}: {e}"),
        }
    }
}

#[test]
fn concatenated_gzip_members_decode_one_after_another() {
    let (a, b) = (b"first member ".repeat(1000), b"second".repeat(777));
    let mut packed = run("gzip", &["-c"], &a);
    packed.extend(run("gzip", &["-c", "-n"], &b));
    let out = unpack(Format::Gzip, &packed, u64::MAX).unwrap();
    assert_eq!(out, [a, b].concat());
}

#[test]
fn a_flipped_byte_or_a_cut_stream_is_named_not_decoded() {
    let data = sample();
    for (format, tool, args) in variants() {
        if !format.supported() {
            continue;
        }
        let packed = run(tool, &args, &data);
        let what = format!("{tool} {args:?}");
        for cut in [packed.len() / 2, packed.len() - 1, 10] {
            match unpack(format, &packed[..cut], u64::MAX) {
                Err(Error::Truncated(f)) => assert_eq!(f, format, "{what}"),
                other => panic!("{what} cut at {cut}: {:?}", other.map(|v| v.len())),
            }
        }
        // A flipped bit in the data (past any header) or in the checksum trailer.
        for at in [packed.len() / 3, packed.len() - 3] {
            let mut bad = packed.clone();
            bad[at] ^= 0x10;
            match unpack(format, &bad, u64::MAX) {
                Err(Error::Corrupt { format: f, detail }) => {
                    assert_eq!(f, format, "{what}");
                    assert!(!detail.is_empty());
                }
                // zstd without a checksum (--no-check) cannot see a flip in its
                // literals; every other variant must.
                Ok(out) if args.contains(&"--no-check") || args.contains(&"--check=none") => {
                    assert!(out != data)
                }
                other => panic!("{what} flipped at {at}: {:?}", other.map(|v| v.len())),
            }
        }
    }
}

#[test]
fn output_over_the_cap_stops_with_too_large() {
    let data = vec![0u8; 8 << 20];
    for (format, tool) in [
        (Format::Gzip, "gzip"),
        (Format::Xz, "xz"),
        (Format::Zstd, "zstd"),
    ] {
        if !format.supported() {
            continue;
        }
        let packed = run(tool, &["-c"], &data);
        // A zero run this long packs small: a bomb in miniature.
        assert!(packed.len() < 64 << 10, "{tool}: {}", packed.len());
        match unpack(format, &packed, 1 << 20) {
            Err(Error::TooLarge { format: f, max }) => assert_eq!((f, max), (format, 1 << 20)),
            other => panic!("{tool}: {:?}", other.map(|v| v.len())),
        }
        assert_eq!(unpack(format, &packed, 8 << 20).unwrap().len(), 8 << 20);
    }
}

fn temp(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-unpack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn unpack_file(p: &Path) -> Result<Option<(Format, u64)>, Error> {
    decode_file(p, &mut std::io::sink(), u64::MAX)
}

#[test]
fn a_file_is_decoded_by_its_name_and_its_magic_must_agree() {
    let data = b"\x7fELF a module".repeat(100);
    let xz = run("xz", &["-c"], &data);
    assert_eq!(
        unpack_file(&temp("m.ko.xz", &xz)).unwrap(),
        Some((Format::Xz, data.len() as u64))
    );
    assert_eq!(unpack_file(&temp("m.ko", &data)).unwrap(), None);
    match unpack_file(&temp("n.ko.gz", &xz)) {
        Err(e @ Error::WrongMagic { .. }) => {
            assert_eq!(
                e.to_string(),
                "not gzip data (the name says gzip; the first bytes say xz)"
            )
        }
        other => panic!("{other:?}"),
    }
    match unpack_file(&temp("e.ko.zst", b"")) {
        Err(Error::WrongMagic { found, .. }) => assert_eq!(found, "neither gzip, xz nor zstd"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn names_and_suffixes() {
    assert_eq!(Format::of_path("kernel/a.ko.zst"), Some(Format::Zstd));
    assert_eq!(Format::of_path("kernel/a.ko"), None);
    assert_eq!(Format::Xz.strip("kernel/a.ko.xz"), "kernel/a.ko");
    assert_eq!(Format::Gzip.strip("kernel/a.ko"), "kernel/a.ko");
}

#[test]
fn zstd_is_decoded_exactly_when_the_feature_is_built() {
    let packed = run("zstd", &["-c", "-q"], b"hello");
    let r = unpack(Format::Zstd, &packed, 100);
    if cfg!(feature = "zstd") {
        assert_eq!(r.unwrap(), b"hello");
    } else {
        match r {
            Err(e @ Error::Unsupported(Format::Zstd)) => {
                assert!(e.to_string().contains("gzip and xz only"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
