//! A client byte stream fed to the NBD server handshake in chunks, then
//! (after a successful negotiation) decoded as transmission requests: no
//! panic, never more consumed than given, bounded output, and the same
//! outcome as feeding the whole stream at once.
//!
//! Input: one byte that drives the chunking (255: one chunk; otherwise
//! chunks of 1..=byte+1 bytes from a small xorshift sequence seeded by it),
//! then the client stream. Seeds: `crates/nbd/tests/fuzz_seeds.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallax_nbd::handshake::*;
use parallax_nbd::proto::*;

fn config() -> Config {
    Config {
        max_option_len: 8192,
        ..Config::default()
    }
}

/// Feeds `stream` in chunks; returns the outcome, the output, and every
/// byte not consumed by the handshake (left in input, then never fed).
fn negotiate(stream: &[u8], split: u8) -> (Result<Progress, HandshakeError>, Vec<u8>, Vec<u8>) {
    let mut hs = Handshake::new(config());
    let mut input = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut consumed = 0;
    let mut rng = u32::from(split) | 0x100;
    let result = loop {
        let n = if split == 255 {
            stream.len() - fed
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            1 + rng as usize % (usize::from(split) + 1)
        };
        let end = (fed + n).min(stream.len());
        input.extend_from_slice(&stream[fed..end]);
        fed = end;
        let before = input.len();
        let result = hs.receive(&mut input, &ExportTable::fuzz_fixture(), &mut out);
        assert!(input.len() <= before);
        consumed += before - input.len();
        assert!(
            out.len() <= 10 * consumed + 256,
            "out {} for {consumed} in",
            out.len()
        );
        if result != Ok(Progress::NeedInput) {
            assert!(hs.is_finished());
            let mut more = vec![0; 16];
            assert_eq!(
                hs.receive(&mut more, &ExportTable::fuzz_fixture(), &mut out),
                Err(HandshakeError::Finished)
            );
            break result;
        }
        if fed == stream.len() {
            break result;
        }
    };
    input.extend_from_slice(&stream[fed..]);
    (result, out, input)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let (result, out, rest) = negotiate(stream, split);
    if split != 255 {
        // However the stream was cut, the outcome is the same.
        assert_eq!(negotiate(stream, 255), (result.clone(), out, rest.clone()));
    }
    let Ok(Progress::Done(negotiated)) = result else {
        return;
    };
    assert!(negotiated.transmission_flags & TF_HAS_FLAGS != 0);
    assert_eq!(
        negotiated.info.read_only,
        negotiated.transmission_flags & TF_READ_ONLY != 0
    );
    assert!(negotiated.base_allocation.is_none() || negotiated.structured_replies);
    let mut rest = &rest[..];
    while let Some((header, tail)) = rest.split_first_chunk::<REQUEST_HEADER_LEN>() {
        let Ok(request) = Request::decode(header) else {
            return;
        };
        assert_eq!(&request.encode(), header);
        let payload = usize::try_from(request.payload_len()).unwrap_or(usize::MAX);
        let Some(tail) = tail.get(payload..) else {
            return;
        };
        rest = tail;
    }
});
