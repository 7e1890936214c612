//! Arbitrary client bytes fed to the handshake and to the request decoder:
//! no panic, bounded output, never more consumed than given, and the same
//! outcome however the stream is split. (The same properties are fuzzed
//! with coverage guidance by `fuzz/fuzz_targets/nbd_handshake.rs`.)

use parallax_nbd::handshake::*;
use parallax_nbd::proto::*;
use proptest::prelude::*;

fn two_exports() -> ExportTable {
    ExportTable::default()
        .with("disk", 1 << 30, false, Some("d"))
        .with("ro", 4096, true, None)
}

fn config() -> Config {
    Config {
        max_option_len: 4096,
        ..Config::default()
    }
}

/// Every reply the handshake can produce for one option is at most this
/// many times the option's size (header included) plus a constant.
const OUT_PER_IN: usize = 10;
const OUT_SLACK: usize = 256;

/// Feeds `stream` in pieces of the given sizes (the rest at the end) and
/// checks the per-call invariants. Returns the outcome, all output and
/// the bytes not consumed.
fn feed(stream: &[u8], pieces: &[usize]) -> (Result<Progress, HandshakeError>, Vec<u8>, Vec<u8>) {
    let mut hs = Handshake::new(config());
    let mut input = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut consumed = 0;
    let mut result = Ok(Progress::NeedInput);
    let sizes = pieces.iter().copied().chain(std::iter::once(usize::MAX));
    for size in sizes {
        let end = fed + size.min(stream.len() - fed);
        input.extend_from_slice(&stream[fed..end]);
        fed = end;
        let before = input.clone();
        result = hs.receive(&mut input, &two_exports(), &mut out);
        assert!(input.len() <= before.len(), "consumed more than given");
        assert!(before.ends_with(&input), "consumed from the middle");
        consumed += before.len() - input.len();
        assert!(
            out.len() <= OUT_PER_IN * consumed + OUT_SLACK,
            "out {} for {} bytes consumed",
            out.len(),
            consumed
        );
        if result != Ok(Progress::NeedInput) {
            assert!(hs.is_finished());
            let len = out.len();
            let mut more = vec![0u8; 64];
            assert_eq!(
                hs.receive(&mut more, &two_exports(), &mut out),
                Err(HandshakeError::Finished)
            );
            assert_eq!((out.len(), more.len()), (len, 64));
            break;
        }
        if fed == stream.len() {
            break;
        }
    }
    input.extend_from_slice(&stream[fed..]);
    (result, out, input)
}

fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    client_option(&mut v, option, data);
    v
}

/// Option data that is well-formed more often than random bytes are.
fn option_data() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just("disk".to_string()),
        Just("ro".to_string()),
        "[a-z:]{0,8}"
    ];
    prop_oneof![
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..48),
        (name.clone(), proptest::collection::vec(any::<u16>(), 0..4)).prop_map(|(n, reqs)| {
            let mut v = (n.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(n.as_bytes());
            v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
            for r in reqs {
                v.extend_from_slice(&(r % 5).to_be_bytes());
            }
            v
        }),
        (
            name,
            proptest::collection::vec(
                prop_oneof![
                    Just("base:allocation".to_string()),
                    Just("base:".to_string()),
                    "[a-z:]{0,6}"
                ],
                0..3
            )
        )
            .prop_map(|(n, queries)| {
                let mut v = (n.len() as u32).to_be_bytes().to_vec();
                v.extend_from_slice(n.as_bytes());
                v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                for q in queries {
                    v.extend_from_slice(&(q.len() as u32).to_be_bytes());
                    v.extend_from_slice(q.as_bytes());
                }
                v
            }),
    ]
}

/// Client flags, then a few plausible options, often a final GO or
/// EXPORT_NAME, then arbitrary bytes; sometimes one byte flipped.
fn plausible_stream() -> impl Strategy<Value = Vec<u8>> {
    let set_meta = |name: &str| {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&15u32.to_be_bytes());
        data.extend_from_slice(b"base:allocation");
        option_bytes(OPT_SET_META_CONTEXT, &data)
    };
    let canned = prop_oneof![
        Just(option_bytes(OPT_STRUCTURED_REPLY, &[])),
        Just(set_meta("disk")),
        Just(set_meta("ro")),
    ];
    let random = (
        prop_oneof![1 => Just(OPT_STRUCTURED_REPLY), 1 => Just(OPT_SET_META_CONTEXT), 4 => 0u32..13],
        option_data(),
    )
        .prop_map(|(option, data)| option_bytes(option, &data));
    let option = prop_oneof![3 => random, 2 => canned];
    let last = (
        prop_oneof![Just(OPT_GO), Just(OPT_EXPORT_NAME)],
        prop_oneof![Just("disk"), Just("ro")],
    );
    (
        prop_oneof![4 => 0u32..4, 1 => any::<u32>()],
        proptest::collection::vec(option, 0..6),
        proptest::option::weighted(0.6, last),
        proptest::option::weighted(0.2, (any::<prop::sample::Index>(), any::<u8>())),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(flags, options, last, flip, tail)| {
            let mut v = flags.to_be_bytes().to_vec();
            for option in options {
                v.extend(option);
            }
            match last {
                Some((OPT_GO, name)) => {
                    let mut data = (name.len() as u32).to_be_bytes().to_vec();
                    data.extend_from_slice(name.as_bytes());
                    data.extend_from_slice(&[0, 0]);
                    v.extend(option_bytes(OPT_GO, &data));
                }
                Some((option, name)) => v.extend(option_bytes(option, name.as_bytes())),
                None => {}
            }
            if let Some((at, x)) = flip {
                let i = at.index(v.len());
                v[i] ^= x;
            }
            v.extend(tail);
            v
        })
}

fn pieces() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..40, 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(stream in proptest::collection::vec(any::<u8>(), 0..2000), pieces in pieces()) {
        let whole = feed(&stream, &[]);
        prop_assert_eq!(feed(&stream, &pieces), whole);
    }

    #[test]
    fn arbitrary_bytes_after_valid_flags(flags in 0u32..4, body in proptest::collection::vec(any::<u8>(), 0..2000), pieces in pieces()) {
        let mut stream = flags.to_be_bytes().to_vec();
        stream.extend_from_slice(b"IHAVEOPT");
        stream.extend(body);
        let whole = feed(&stream, &[]);
        prop_assert_eq!(feed(&stream, &pieces), whole);
    }

    #[test]
    fn plausible_sessions(stream in plausible_stream(), pieces in pieces()) {
        let whole = feed(&stream, &[]);
        if let Ok(Progress::Done(n)) = &whole.0 {
            prop_assert!(n.transmission_flags & TF_HAS_FLAGS != 0);
            prop_assert_eq!(n.info.read_only, n.transmission_flags & TF_READ_ONLY != 0);
            prop_assert!(n.base_allocation.is_none() || n.structured_replies);
        }
        prop_assert_eq!(feed(&stream, &pieces), whole);
    }

    #[test]
    fn request_decode(header in any::<[u8; REQUEST_HEADER_LEN]>(), magic_ok in any::<bool>()) {
        let mut header = header;
        if magic_ok {
            header[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        match Request::decode(&header) {
            Ok(request) => {
                prop_assert_eq!(magic, REQUEST_MAGIC);
                prop_assert_eq!(request.encode(), header);
                prop_assert!(request.payload_len() == 0 || request.command == Command::Write);
            }
            Err(ProtoError::BadMagic(m)) => {
                prop_assert_ne!(magic, REQUEST_MAGIC);
                prop_assert_eq!(m, magic);
            }
        }
    }

    #[test]
    fn request_encode_decode(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), length in any::<u32>()) {
        let request = Request { flags, command: Command::from_wire(kind), cookie, offset, length };
        prop_assert_eq!(Request::decode(&request.encode()), Ok(request));
    }
}
