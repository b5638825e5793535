//! Feeds arbitrary bytes, split at arbitrary points, to the frame decoder and the message
//! parsers: nothing may panic, no frame may exceed the limit, the decoder must account for
//! every byte, and every frame must re-encode to the same bytes. The decoder checks headers
//! with `wire::frame_len` and frames are written with `wire::encode`: the same two functions
//! the agent and the client use.
#![no_main]

use keel_proto::message::{parse_request, parse_response, split_body};
use keel_proto::wire::{encode, Decoder, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the split size, so the corpus explores partial headers.
    let (split, stream) = match data.split_first() {
        Some((s, rest)) => ((*s as usize % 64) + 1, rest),
        None => return,
    };
    let mut d = Decoder::default();
    let mut consumed = 0usize;
    for piece in stream.chunks(split) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX_FRAME);
                    consumed += 4 + body.len();
                    let (kind, payload) = body.split_first().expect("frame_len refuses empty frames");
                    let again = encode(*kind, payload).expect("a decoded frame fits the limit");
                    assert_eq!(&again[4..], &body[..]);
                    let _ = split_body(&body);
                    let _ = parse_request(&body);
                    let _ = parse_response(&body);
                }
                Ok(None) => break,
                // A refused header ends the stream, as the agent closes the connection.
                Err(_) => return,
            }
        }
    }
    assert_eq!(consumed + d.pending(), stream.len());
});
