//! Feeds arbitrary bytes, split at arbitrary points, to the frame decoder and the message
//! parsers: nothing may panic, no frame may exceed the limit, and the decoder must account
//! for every byte.
#![no_main]

use keel_proto::message::{parse_request, parse_response, split_body};
use keel_proto::wire::{Decoder, MAX_FRAME};
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
