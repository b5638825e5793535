//! Delta pushes in memory: the agent's session over `tokio::io::duplex`, with the current and
//! old images as plain files in a temporary `img`. Each test asserts what ends up staged.

mod common;

use common::*;
use keel_proto::chunks::{ChunkRef, Index, NeedMap, Params};

/// Pseudo-random bytes (xorshift): chunk boundaries as real data gives them.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// v1, and v2 = v1 with 100 KB inserted in the middle and its last 50 KB changed.
fn pair() -> (Vec<u8>, Vec<u8>) {
    let v1 = noise(1, 4 << 20);
    let mut v2 = v1[..(2 << 20)].to_vec();
    v2.extend_from_slice(&noise(2, 100_000));
    v2.extend_from_slice(&v1[(2 << 20)..v1.len() - 50_000]);
    v2.extend_from_slice(&noise(3, 50_000));
    (v1, v2)
}

/// The signed manifest of `img` with its chunk index bound to it, and the index's bytes.
fn signed_with_index(img: &[u8], version: u64) -> (SignedManifest, Index, Vec<u8>) {
    let m = manifest(img, version, "demo");
    let idx = Index::build(&mut &img[..], Params::default()).unwrap();
    let bytes = idx.encode();
    let mut s = m.clone().sign(&key());
    s.chunks = Some(ChunkRef::sign(&m, &bytes, &key()));
    (s, idx, bytes)
}

async fn offer_delta(c: &mut Client, m: &SignedManifest, resume: bool) -> Response {
    c.send(&Request::Push {
        manifest: m.clone(),
        resume,
        delta: true,
    })
    .await;
    c.recv().await
}

/// The chunks the need map asks for, in order.
fn needed(idx: &Index, img: &[u8], need: &NeedMap) -> Vec<Vec<u8>> {
    idx.chunks
        .iter()
        .enumerate()
        .filter(|(i, _)| need.get(*i))
        .map(|(_, c)| {
            let s = usize::try_from(c.offset).unwrap();
            img[s..s + c.len as usize].to_vec()
        })
        .collect()
}

/// Offers, sends the index, reads the need map: (offset, chunks asked for, reused bytes).
async fn start_delta(
    c: &mut Client,
    m: &SignedManifest,
    idx: &Index,
    index: &[u8],
    img: &[u8],
    resume: bool,
) -> (u64, Vec<Vec<u8>>, u64) {
    match offer_delta(c, m, resume).await {
        Response::SendIndex { size } => assert_eq!(size, index.len() as u64),
        other => panic!("send-index expected, got {other:?}"),
    }
    c.data(index).await;
    c.end().await;
    match c.recv().await {
        Response::SendChunks {
            offset,
            need,
            chunks,
            bytes,
            reused,
        } => {
            let need = NeedMap::from_base64(&need, idx.chunks.len()).unwrap();
            let want = needed(idx, img, &need);
            assert_eq!(want.len() as u64, chunks);
            assert_eq!(want.iter().map(|c| c.len() as u64).sum::<u64>(), bytes);
            (offset, want, reused)
        }
        other => panic!("send-chunks expected, got {other:?}"),
    }
}

fn put_current(d: &Dev, name: &str, b: &[u8]) {
    fs::write(d.root.join("img").join(name), b).unwrap();
}

#[tokio::test]
async fn a_delta_reuses_the_current_image_and_stages_the_exact_bytes() {
    let d = Dev::new("delta-current", 1, 30);
    let (v1, v2) = pair();
    put_current(&d, IMAGE, &v1);
    let (m, idx, index) = signed_with_index(&v2, 2);
    let mut c = d.client(tcp()).await;
    let (offset, want, reused) = start_delta(&mut c, &m, &idx, &index, &v2, false).await;
    assert_eq!(offset, 0);
    let sent: u64 = want.iter().map(|c| c.len() as u64).sum();
    assert_eq!(sent + reused, v2.len() as u64);
    // 150 KB changed: a few chunks around each change, not the image.
    assert!(sent < 1 << 20, "{sent} bytes asked for");
    for ch in &want {
        c.data(ch).await;
    }
    c.end().await;
    match c.recv().await {
        Response::Staged {
            image,
            received,
            reused: r,
            ..
        } => {
            assert_eq!(image.version, 2);
            assert_eq!(received, sent);
            assert_eq!(r, reused);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.slot().0.unwrap(), v2);
    c.send(&Request::Status).await;
    let Response::Status(s) = c.recv().await else {
        panic!("status")
    };
    let t = s.last_transfer.unwrap();
    assert!(t.delta && t.received == sent && t.reused == reused, "{t:?}");
    assert_eq!(t.index, index.len() as u64);
}

#[tokio::test]
async fn the_old_image_is_a_source_too() {
    let d = Dev::new("delta-old", 1, 30);
    let (v1, v2) = pair();
    put_current(&d, "root-squashfs-old.img", &v1);
    put_current(&d, IMAGE, &noise(9, 1 << 20));
    let (m, idx, index) = signed_with_index(&v2, 2);
    let mut c = d.client(tcp()).await;
    let (_, want, reused) = start_delta(&mut c, &m, &idx, &index, &v2, false).await;
    assert!(reused > 3 << 20, "{reused} bytes reused");
    for ch in &want {
        c.data(ch).await;
    }
    c.end().await;
    assert!(matches!(c.recv().await, Response::Staged { .. }));
    assert_eq!(d.slot().0.unwrap(), v2);
}

#[tokio::test]
async fn a_corrupt_chunk_from_the_sender_is_named_and_nothing_is_staged() {
    let d = Dev::new("delta-corrupt", 1, 30);
    let (v1, v2) = pair();
    put_current(&d, IMAGE, &v1);
    let (m, idx, index) = signed_with_index(&v2, 2);
    let mut c = d.client(tcp()).await;
    let (_, mut want, _) = start_delta(&mut c, &m, &idx, &index, &v2, false).await;
    want[0][10] ^= 0xff;
    for ch in &want {
        c.data(ch).await;
    }
    c.end().await;
    let (code, msg) = code(c.recv().await);
    assert_eq!(code, ErrorCode::HashMismatch);
    assert!(
        msg.contains("chunk") && msg.contains("the index says"),
        "{msg}"
    );
    assert_eq!(d.slot(), (None, None));
    assert!(!d.partial_exists());
}

#[tokio::test]
async fn an_index_that_is_not_the_signed_one_is_refused() {
    let d = Dev::new("delta-index", 1, 30);
    let (v1, v2) = pair();
    put_current(&d, IMAGE, &v1);
    let (m, _, mut index) = signed_with_index(&v2, 2);
    let mut c = d.client(tcp()).await;
    assert!(matches!(
        offer_delta(&mut c, &m, false).await,
        Response::SendIndex { .. }
    ));
    index[HEADER_PLUS] ^= 1;
    c.data(&index).await;
    c.end().await;
    let (code, msg) = code(c.recv().await);
    assert_eq!(code, ErrorCode::BadIndex);
    assert!(msg.contains("hashes to"), "{msg}");
    assert_eq!(d.slot(), (None, None));
    // The session goes on: a full push of the same manifest works.
    match c.offer(&m, false).await {
        Response::Send { offset: 0 } => {}
        other => panic!("{other:?}"),
    }
    c.data(&v2).await;
    c.end().await;
    assert!(matches!(c.recv().await, Response::Staged { reused: 0, .. }));
    assert_eq!(d.slot().0.unwrap(), v2);
}

const HEADER_PLUS: usize = keel_proto::chunks::HEADER + 10;

#[tokio::test]
async fn a_cut_delta_resumes_from_a_chunk_boundary() {
    let d = Dev::new("delta-resume", 1, 30);
    let v1 = noise(1, 4 << 20);
    // Everything after 1 MiB is new: the cut falls among chunks the client sends.
    let mut v2 = v1[..(1 << 20)].to_vec();
    v2.extend_from_slice(&noise(5, 3 << 20));
    put_current(&d, IMAGE, &v1);
    let (m, idx, index) = signed_with_index(&v2, 2);
    {
        let mut c = d.client(tcp()).await;
        let (_, want, _) = start_delta(&mut c, &m, &idx, &index, &v2, true).await;
        // Half the chunks, the last of them cut short, then the connection drops.
        let half = want.len() / 2;
        for ch in &want[..half] {
            c.data(ch).await;
        }
        c.data(&want[half][..1000]).await;
        drop(c);
    }
    // The agent notices the drop, keeps the partial upload.
    let partial = d.newimg().join(format!("{IMAGE}.partial"));
    let mut kept = 0;
    for _ in 0..100 {
        kept = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if kept > 1 << 20 && d.sh.push.try_lock().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(kept > 1 << 20, "partial holds {kept} bytes");
    let mut c = d.client(tcp()).await;
    let (offset, want, _) = start_delta(&mut c, &m, &idx, &index, &v2, true).await;
    assert!(
        offset > 1 << 20 && offset <= kept,
        "resumed at {offset} of {kept}"
    );
    assert!(idx.chunks.iter().any(|ch| ch.offset == offset));
    for ch in &want {
        c.data(ch).await;
    }
    c.end().await;
    match c.recv().await {
        Response::Staged { resumed_from, .. } => assert_eq!(resumed_from, offset),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.slot().0.unwrap(), v2);
}

#[tokio::test]
async fn without_a_source_or_an_index_the_push_is_whole() {
    let d = Dev::new("delta-none", 1, 30);
    let (_, v2) = pair();
    let (m, _, _) = signed_with_index(&v2, 2);
    let mut c = d.client(tcp()).await;
    // No image on img to take chunks from.
    assert!(matches!(
        offer_delta(&mut c, &m, false).await,
        Response::Send { offset: 0 }
    ));
    drop(c);
    // A chunk reference signed by another key is ignored: a whole push, not a refusal.
    let d = Dev::new("delta-foreign", 1, 30);
    put_current(&d, IMAGE, &v2[..(1 << 20)]);
    let (mut m, _, index) = signed_with_index(&v2, 2);
    m.chunks = Some(ChunkRef::sign(
        &m.manifest,
        &index,
        &SigningKey::from_bytes(&[3; 32]),
    ));
    let mut c = d.client(tcp()).await;
    assert!(matches!(
        offer_delta(&mut c, &m, false).await,
        Response::Send { offset: 0 }
    ));
}

#[tokio::test]
async fn the_same_bytes_under_a_new_version_are_copied_not_sent() {
    let d = Dev::new("delta-same", 1, 30);
    let v1 = noise(4, (3 << 20) + 12345);
    put_current(&d, IMAGE, &v1);
    let img = d.root.join("img");
    let mut st = keel_sys::state::load(&img).unwrap().unwrap();
    st.current = Some(ImageRecord {
        name: "demo".into(),
        version: 1,
        sha256: digest(&v1),
        size: v1.len() as u64,
    });
    keel_sys::state::save(&img, &st, no_hook).unwrap();
    // A rebuild that changed nothing, signed as version 2 (no chunk index needed).
    let m = signed(&v1, 2);
    let mut c = d.client(tcp()).await;
    match offer_delta(&mut c, &m, false).await {
        Response::SendChunks {
            chunks: 0,
            bytes: 0,
            reused,
            ..
        } => assert_eq!(reused, v1.len() as u64),
        other => panic!("{other:?}"),
    }
    c.end().await;
    match c.recv().await {
        Response::Staged {
            received: 0,
            reused,
            image,
            ..
        } => {
            assert_eq!(reused, v1.len() as u64);
            assert_eq!(image.version, 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.slot().0.unwrap(), v1);
    // A record that lies about the file (same digest, other bytes) is caught by the hash.
    fs::write(img.join(IMAGE), noise(5, v1.len())).unwrap();
    let m3 = signed(&v1, 3);
    match offer_delta(&mut c, &m3, false).await {
        // The current image's record matches first, and its file holds other bytes.
        Response::SendChunks { chunks: 0, .. } => {}
        other => panic!("{other:?}"),
    }
    c.end().await;
    let (code, _) = code(c.recv().await);
    assert_eq!(code, ErrorCode::HashMismatch);
    assert_eq!(d.slot().0.unwrap(), v1, "the staged v2 is untouched");
}

#[tokio::test]
async fn a_cut_upload_of_another_image_is_a_source() {
    let d = Dev::new("delta-partial", 1, 30);
    let (_, v2) = pair();
    let (m2, _, _) = signed_with_index(&v2, 2);
    // v2 pushed whole (nothing on the device to reuse) and cut after 3 MiB.
    {
        let mut c = d.client(tcp()).await;
        assert!(matches!(
            offer_delta(&mut c, &m2, true).await,
            Response::Send { offset: 0 }
        ));
        c.data(&v2[..3 << 20]).await;
        drop(c);
    }
    let partial = d.newimg().join(format!("{IMAGE}.partial"));
    for _ in 0..100 {
        if fs::metadata(&partial).is_ok_and(|m| m.len() == 3 << 20) && d.sh.push.try_lock().is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // v3 (v2 with a new tail) supersedes it: its first 3 MiB come from the partial upload.
    let mut v3 = v2[..3 << 20].to_vec();
    v3.extend_from_slice(&noise(8, 1 << 20));
    let (m3, idx, index) = signed_with_index(&v3, 3);
    let mut c = d.client(tcp()).await;
    let (offset, want, reused) = start_delta(&mut c, &m3, &idx, &index, &v3, true).await;
    assert_eq!(offset, 0);
    assert!(reused > (5 << 20) / 2, "{reused} bytes reused");
    for ch in &want {
        c.data(ch).await;
    }
    c.end().await;
    assert!(matches!(c.recv().await, Response::Staged { .. }));
    assert_eq!(d.slot().0.unwrap(), v3);
    assert!(!d.partial_exists());
}
