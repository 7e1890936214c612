//! A client byte stream fed to the NBD server handshake in chunks, then
//! (after a successful negotiation) decoded as transmission requests: no
//! panic, never more consumed than given, bounded output, and the same
//! outcome as feeding the whole stream at once.
//!
//! Input: one byte that drives the chunking (255: one chunk; otherwise
//! chunks of 1..=byte+1 bytes from a small xorshift sequence seeded by it)
//! and the TLS mode (byte % 3: off, optional, require), then the client
//! stream. After `StartTls` the stream goes on as if inside TLS. Seeds:
//! `crates/nbd/tests/fuzz_seeds.rs`.
//!
//! The outcome may depend on the cuts in one case only: bytes already
//! received behind `NBD_OPT_STARTTLS` are refused, bytes arriving after it
//! are not (the server cannot tell them apart from bytes sent inside TLS),
//! so streams that reach STARTTLS are not compared across cuts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallax_nbd::handshake::*;
use parallax_nbd::proto::*;

fn config(tls: TlsMode) -> Config {
    Config {
        max_option_len: 8192,
        tls,
        ..Config::default()
    }
}

/// What a run gives: the outcome, the output, the bytes not consumed, and
/// whether STARTTLS was accepted or refused for data behind it.
type Run = (Result<Progress, HandshakeError>, Vec<u8>, Vec<u8>, bool);

/// Feeds `stream` in chunks; returns the outcome, the output, and every
/// byte not consumed by the handshake (left in input, then never fed).
fn negotiate(stream: &[u8], split: u8, tls: TlsMode) -> Run {
    let mut hs = Handshake::new(config(tls));
    let mut started_tls = false;
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
        if result == Ok(Progress::StartTls) {
            assert_ne!(tls, TlsMode::Off);
            assert!(hs.in_tls() && !hs.is_finished());
            started_tls = true;
        } else if result != Ok(Progress::NeedInput) {
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
    started_tls |= result == Err(HandshakeError::DataAfterStartTls);
    (result, out, input, started_tls)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let tls = [TlsMode::Off, TlsMode::Optional, TlsMode::Require][usize::from(split % 3)];
    let (result, out, rest, started_tls) = negotiate(stream, split, tls);
    if split != 255 && !started_tls {
        // However the stream was cut, the outcome is the same.
        let whole = negotiate(stream, 255, tls);
        if !whole.3 {
            assert_eq!(whole, (result.clone(), out, rest.clone(), false));
        }
    }
    if let Ok(Progress::Done(n)) = &result {
        // Under `require`, nothing is chosen outside TLS.
        assert!(tls != TlsMode::Require || n.tls);
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
