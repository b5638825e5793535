use super::*;
use crate::manifest::MANIFEST_FORMAT;

/// Deterministic pseudo-random bytes (xorshift), so tests need no data files.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

fn index_of(data: &[u8]) -> Index {
    Index::build(&mut &data[..], Params::default()).unwrap()
}

#[test]
fn gear_table_is_fixed() {
    // The table is part of the index format: these words must never change.
    assert_eq!(GEAR[0], 0x53a0_bccb_ad36_3ab6);
    assert_eq!(GEAR[255], 0x94bc_d4c7_321b_23fb);
    let again = {
        let mut state = 0x6b65_656c_6364_6331;
        let mut v = Vec::new();
        for _ in 0..256 {
            let (s, w) = splitmix(state);
            state = s;
            v.push(w);
        }
        v
    };
    assert_eq!(&GEAR[..], &again[..]);
    assert_ne!(GEAR[0], GEAR[1]);
}

#[test]
fn chunks_cover_the_stream_within_bounds() {
    let data = noise(1, 3 << 20);
    let idx = index_of(&data);
    assert_eq!(idx.image_size, data.len() as u64);
    let p = Params::default();
    let n = idx.chunks.len();
    for (i, c) in idx.chunks.iter().enumerate() {
        assert!(c.len <= p.max);
        assert!(c.len >= p.min || i + 1 == n);
        let s = usize::try_from(c.offset).unwrap();
        let want: [u8; 32] = Sha256::digest(&data[s..s + c.len as usize]).into();
        assert_eq!(c.digest, want);
    }
    // About the average on random data: 192 chunks for 3 MiB at 16 KiB (normalized chunking
    // keeps them near it; a third more or fewer would be a broken cut).
    let avg = (3 << 20) / n;
    assert!(
        (12 << 10..=22 << 10).contains(&avg),
        "{n} chunks, {avg} bytes on average"
    );
}

#[test]
fn small_reads_chunk_like_one_read() {
    struct Trickle<'a>(&'a [u8]);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(b.len()).min(1000);
            b[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let data = noise(2, 1 << 20);
    let a = index_of(&data);
    let b = Index::build(&mut Trickle(&data), Params::default()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn an_insertion_changes_only_nearby_chunks() {
    let data = noise(3, 4 << 20);
    let mut edited = data[..(2 << 20)].to_vec();
    edited.extend_from_slice(&noise(4, 5000));
    edited.extend_from_slice(&data[(2 << 20)..]);
    let a = index_of(&data);
    let b = index_of(&edited);
    let have: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.digest).collect();
    let new: u64 = b
        .chunks
        .iter()
        .filter(|c| !have.contains(&c.digest))
        .map(|c| u64::from(c.len))
        .sum();
    // The 5000 new bytes and at most the two chunks around them.
    assert!(
        new >= 5000 && new <= 5000 + 2 * u64::from(DEFAULT_MAX),
        "{new}"
    );
}

#[test]
fn empty_and_tiny_streams() {
    let e = index_of(&[]);
    assert!(e.chunks.is_empty());
    assert_eq!(Index::decode(&e.encode()).unwrap(), e);
    let t = index_of(b"abc");
    assert_eq!(t.chunks.len(), 1);
    assert_eq!(t.chunks[0].len, 3);
}

#[test]
fn index_round_trip_and_refusals() {
    let data = noise(5, 1 << 20);
    let idx = index_of(&data);
    let bytes = idx.encode();
    assert_eq!(bytes.len(), HEADER + ENTRY * idx.chunks.len());
    assert_eq!(Index::decode(&bytes).unwrap(), idx);

    let err = |b: &[u8]| Index::decode(b).unwrap_err().to_string();
    assert!(err(&bytes[..HEADER + 5]).contains("whole number"));
    assert!(err(b"not an index at all, not at all").contains("header"));
    let mut wrong_size = bytes.clone();
    wrong_size[31] ^= 1;
    assert!(err(&wrong_size).contains("add up to"));
    let mut bad_params = bytes.clone();
    bad_params[12..16].copy_from_slice(&3000u32.to_be_bytes());
    assert!(err(&bad_params).contains("chunk sizes"));
    let mut zero = bytes.clone();
    zero[HEADER..HEADER + 4].copy_from_slice(&0u32.to_be_bytes());
    assert!(err(&zero).contains("chunk 0"));
}

#[test]
fn chunk_at_finds_the_restart() {
    let idx = index_of(&noise(6, 1 << 20));
    assert_eq!(idx.chunk_at(0), 0);
    let c1 = idx.chunks[1];
    assert_eq!(idx.chunk_at(c1.offset), 1);
    assert_eq!(idx.chunk_at(c1.offset + 1), 1);
    assert_eq!(idx.chunk_at(idx.image_size), idx.chunks.len());
}

fn manifest(sha: &str) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: "demo".into(),
        version: 3,
        size: 10,
        sha256: sha.into(),
        created: 1,
        min_version: None,
        verity: None,
    }
}

#[test]
fn chunk_ref_is_bound_to_its_image_and_key() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let other = SigningKey::from_bytes(&[8; 32]);
    let m = manifest(&"ab".repeat(32));
    let index = index_of(&noise(7, 200_000)).encode();
    let mut signed = m.clone().sign(&key);
    assert_eq!(signed.verified_chunks(&[key.verifying_key()]), Ok(None));
    signed.chunks = Some(ChunkRef::sign(&m, &index, &key));
    let c = signed
        .verified_chunks(&[key.verifying_key()])
        .unwrap()
        .unwrap();
    c.check(&index).unwrap();
    let mut tampered = index.clone();
    tampered[40] ^= 1;
    assert!(c
        .check(&tampered)
        .unwrap_err()
        .to_string()
        .contains("hashes to"));
    assert!(c
        .check(&index[1..])
        .unwrap_err()
        .to_string()
        .contains("bytes"));
    // Another key, or the same reference on another image, does not verify.
    assert!(signed.verified_chunks(&[other.verifying_key()]).is_err());
    let mut moved = m.clone().sign(&key);
    moved.manifest.version = 4;
    moved.chunks = signed.chunks.clone();
    assert!(moved.verified_chunks(&[key.verifying_key()]).is_err());
    // The manifest's own signature is untouched by the reference: older readers verify it.
    assert!(signed.verify(&[key.verifying_key()]).is_ok());
    let json = signed.to_json();
    let back = SignedManifest::from_json(&json).unwrap();
    assert_eq!(back, signed);
}

#[test]
fn need_map_round_trip() {
    let mut n = NeedMap::new(19);
    for i in [0, 7, 8, 18] {
        n.set(i);
    }
    let back = NeedMap::from_base64(&n.to_base64(), 19).unwrap();
    assert_eq!(back, n);
    assert!(back.get(7) && back.get(18) && !back.get(1) && !back.get(19));
    assert!(NeedMap::from_base64(&n.to_base64(), 30).is_err());
    assert!(NeedMap::from_base64("!!", 3).is_err());
}
