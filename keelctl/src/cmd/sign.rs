//! `keelctl sign IMAGE`: the signed manifest of an image; with `--verity`, the dm-verity
//! tree appended to the image first and its root hash signed with the rest.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use keel_proto::chunks::{ChunkRef, Index, Params};
use keel_proto::hex;
use keel_proto::manifest::{
    signing_key_from_pem, Manifest, VerityInfo, MANIFEST_FORMAT, MANIFEST_FORMAT_VERITY,
};
use keel_verity::superblock::Superblock;
use keel_verity::{Geometry, TreeBuilder, BLOCK, BLOCK_USIZE, SALT_LEN};

use super::{hash_file, manifest_path, out};

/// What to sign.
#[derive(Debug)]
pub struct Sign<'a> {
    /// The image file.
    pub image: &'a Path,
    /// The private key (PEM).
    pub key: &'a Path,
    /// Product name.
    pub name: &'a str,
    /// Image version.
    pub version: u64,
    /// Devices must run at least this version.
    pub min_version: Option<u64>,
    /// Creation time (Unix seconds; default now).
    pub created: Option<u64>,
    /// Output file (default IMAGE.manifest).
    pub out: &'a Option<PathBuf>,
    /// Append (or refresh) a dm-verity tree and sign its root hash (manifest format 2).
    pub verity: bool,
    /// Write the chunk index (IMAGE.chunks) with these chunk sizes and sign it into the
    /// manifest, for deltas (`None`: no index).
    pub chunks: Option<Params>,
}

/// Parses `MIN:AVG:MAX` or `AVG` (then MIN = AVG/4, MAX = AVG×4, as casync does), in bytes
/// with an optional K or M suffix.
pub fn parse_chunk_size(s: &str) -> Result<Params, String> {
    fn bytes(s: &str) -> Result<u32, String> {
        let (n, mul) = match s.as_bytes().last() {
            Some(b'K' | b'k') => (&s[..s.len() - 1], 1u32 << 10),
            Some(b'M' | b'm') => (&s[..s.len() - 1], 1u32 << 20),
            _ => (s, 1),
        };
        n.parse::<u32>()
            .ok()
            .and_then(|n| n.checked_mul(mul))
            .ok_or_else(|| format!("{s:?} is not a size (bytes, or a number with K or M)"))
    }
    let p = match s.split(':').collect::<Vec<_>>()[..] {
        [avg] => {
            let avg = bytes(avg)?;
            Params {
                min: avg / 4,
                avg,
                max: avg.saturating_mul(4),
            }
        }
        [min, avg, max] => Params {
            min: bytes(min)?,
            avg: bytes(avg)?,
            max: bytes(max)?,
        },
        _ => return Err(format!("{s:?} is not MIN:AVG:MAX or AVG")),
    };
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

/// Where the chunk index of `image` is kept: `IMAGE.chunks`.
pub fn index_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".chunks");
    s.into()
}

/// Chunks `image` and writes its index to `IMAGE.chunks` (temporary file, rename): the
/// index's bytes.
pub fn write_index(image: &Path, params: Params) -> anyhow::Result<Vec<u8>> {
    let f = File::open(image).with_context(|| format!("open {}", image.display()))?;
    let idx = Index::build(&mut std::io::BufReader::with_capacity(1 << 20, f), params)
        .with_context(|| format!("chunk {}", image.display()))?;
    let bytes = idx.encode();
    if bytes.len() as u64 > keel_proto::chunks::MAX_INDEX {
        bail!(
            "the chunk index of {} would be {} bytes, over the {} a device takes: sign with a larger --chunk-size (average {} now), or --no-chunks",
            image.display(),
            bytes.len(),
            keel_proto::chunks::MAX_INDEX,
            params.avg
        );
    }
    let out = index_path(image);
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, &bytes).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("rename {}", out.display()))?;
    Ok(bytes)
}

/// Hashes the image and writes its signed manifest.
pub fn run(s: &Sign<'_>) -> anyhow::Result<()> {
    let pem = fs::read_to_string(s.key).with_context(|| format!("read key {}", s.key.display()))?;
    let sk = signing_key_from_pem(&pem).with_context(|| format!("key {}", s.key.display()))?;
    let verity = if s.verity {
        Some(append_tree(s.image)?)
    } else {
        None
    };
    let (size, sha256) = hash_file(s.image)?;
    let created = s.created.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let m = Manifest {
        format: if verity.is_some() {
            MANIFEST_FORMAT_VERITY
        } else {
            MANIFEST_FORMAT
        },
        name: s.name.to_string(),
        version: s.version,
        size,
        sha256,
        created,
        min_version: s.min_version,
        verity,
    };
    m.validate()?;
    let index = match s.chunks {
        Some(p) => Some(write_index(s.image, p)?),
        None => None,
    };
    let mut signed = m.clone().sign(&sk);
    signed.chunks = index.as_ref().map(|b| ChunkRef::sign(&m, b, &sk));
    let out = manifest_path(s.image, s.out);
    fs::write(&out, signed.to_json()).with_context(|| format!("write {}", out.display()))?;
    out!(
        "signed {} version {} ({} bytes{}{}) -> {}",
        signed.manifest.name,
        signed.manifest.version,
        signed.manifest.size,
        signed
            .manifest
            .verity
            .as_ref()
            .map(|v| format!(", verity root {}", v.root_hash))
            .unwrap_or_default(),
        index
            .as_ref()
            .map(|b| format!(
                ", {} chunks in {}",
                (b.len() - keel_proto::chunks::HEADER) / keel_proto::chunks::ENTRY,
                index_path(s.image).display()
            ))
            .unwrap_or_default(),
        out.display()
    );
    Ok(())
}

/// The tree an image already carries: its data size and superblock, if its size and the
/// block at the data's end say it has one.
fn existing_tree(f: &File, size: u64) -> Option<(u64, Superblock)> {
    let data_size = Geometry::data_size_for_image(size)?;
    let mut block = vec![0u8; BLOCK_USIZE];
    f.read_exact_at(&mut block, data_size).ok()?;
    let sb = Superblock::decode(&block).ok()?;
    (sb.data_blocks * BLOCK == data_size).then_some((data_size, sb))
}

/// Appends a dm-verity superblock and tree to `image` (its data first padded with zeros to
/// whole 4 KiB blocks) and returns what the manifest signs. An image that already carries a
/// tree gets it rebuilt over the same data with the same salt and UUID: signing twice
/// changes nothing. Memory: the tree (1/127 of the data).
pub fn append_tree(image: &Path) -> anyhow::Result<VerityInfo> {
    let ctx = |what: &str| format!("{what} {}", image.display());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| ctx("open"))?;
    let size = f.metadata().with_context(|| ctx("stat"))?.len();
    if size == 0 {
        bail!("{} is empty: there is nothing to protect", image.display());
    }
    let (data_size, salt, uuid) = match existing_tree(&f, size) {
        Some((d, sb)) => (d, sb.salt, sb.uuid),
        None => {
            let mut salt = vec![0u8; SALT_LEN];
            let mut uuid = [0u8; 16];
            keel_sys::random::fill(&mut salt).context("random salt")?;
            keel_sys::random::fill(&mut uuid).context("random uuid")?;
            uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
            uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
            (size.div_ceil(BLOCK) * BLOCK, salt, uuid)
        }
    };
    f.set_len(data_size).with_context(|| ctx("pad"))?;
    let mut b = TreeBuilder::new(data_size, &salt)?;
    let mut levels: Vec<Vec<u8>> = vec![Vec::new(); b.geometry().levels()];
    let mut sink = |l: usize, block: &[u8]| levels[l].extend_from_slice(block);
    f.seek(SeekFrom::Start(0)).with_context(|| ctx("seek"))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| ctx("read"))?;
        if n == 0 {
            break;
        }
        b.update(&buf[..n], &mut sink)?;
    }
    let root = b.finish(&mut sink)?;
    let sb = Superblock {
        uuid,
        data_blocks: data_size / BLOCK,
        salt: salt.clone(),
    };
    f.write_all(&sb.encode()?).with_context(|| ctx("write"))?;
    for level in levels.iter().rev() {
        f.write_all(level).with_context(|| ctx("write"))?;
    }
    f.sync_all().with_context(|| ctx("fsync"))?;
    Ok(VerityInfo {
        data_size,
        hash_offset: data_size,
        salt: hex::encode(&salt),
        root_hash: hex::encode(&root),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("8K:16K:64K").unwrap(), Params::default());
        let p = parse_chunk_size("8K:32K:128K").unwrap();
        assert_eq!((p.min, p.avg, p.max), (8 << 10, 32 << 10, 128 << 10));
        assert!(parse_chunk_size("48K")
            .unwrap_err()
            .contains("power of two"));
        assert!(parse_chunk_size("1K").is_err());
        assert!(parse_chunk_size("x").unwrap_err().contains("not a size"));
        assert!(parse_chunk_size("1:2").unwrap_err().contains("MIN:AVG:MAX"));
    }
}
