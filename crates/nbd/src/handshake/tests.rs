use super::*;

/// "disk" (1 MiB, read-write, described), "ro" (read-only, 4 KiB, no
/// description); "" is the default export and maps to "disk".
fn test_exports() -> ExportTable {
    ExportTable::default()
        .with("disk", 1 << 20, false, Some("main disk"))
        .with("ro", 4096, true, None)
        .with_default("disk")
}

fn config() -> Config {
    Config {
        block_sizes: BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25,
        },
        multi_conn: true,
        max_option_len: 1024,
        tls: TlsMode::Off,
    }
}

const RW_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_SEND_CACHE
    | TF_SEND_FAST_ZERO
    | TF_CAN_MULTI_CONN;
const RO_FLAGS: u16 =
    TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_CACHE | TF_CAN_MULTI_CONN;

/// A client option, built by hand (independently of `client_option`).
fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// An option reply, built by hand (independently of `option_reply`).
fn rep(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn ack(option: u32) -> Vec<u8> {
    rep(option, REP_ACK, &[])
}

fn info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut d = vec![0, 0];
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    rep(option, REP_INFO, &d)
}

fn info_block_size(option: u32) -> Vec<u8> {
    rep(
        option,
        REP_INFO,
        &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 2, 0, 0, 0],
    )
}

fn meta_reply(option: u32, id: u32) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(b"base:allocation");
    rep(option, REP_META_CONTEXT, &d)
}

/// Splits `out` into (option, reply type, data) triples.
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert_eq!(b[..8], OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        v.push((option, kind, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    v
}

fn kinds(out: &[u8]) -> Vec<u32> {
    replies(out).into_iter().map(|r| r.1).collect()
}

/// Runs a whole client stream (client flags included) in one call.
fn run(stream: &[u8]) -> (Result<Progress, HandshakeError>, Vec<u8>, Vec<u8>) {
    let mut hs = Handshake::new(config());
    let mut input = stream.to_vec();
    let mut out = Vec::new();
    let result = hs.receive(&mut input, &test_exports(), &mut out);
    (result, out, input)
}

/// Client flags `flags` followed by `options`.
fn session(flags: u32, options: &[Vec<u8>]) -> Vec<u8> {
    let mut v = flags.to_be_bytes().to_vec();
    for o in options {
        v.extend_from_slice(o);
    }
    v
}

const BOTH: u32 = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

#[test]
fn greeting_bytes() {
    let hs = Handshake::new(config());
    let mut out = vec![0xee];
    hs.greeting(&mut out);
    let mut expect = vec![0xee];
    expect.extend_from_slice(b"NBDMAGICIHAVEOPT");
    expect.extend_from_slice(&[0, 3]);
    assert_eq!(out, expect);
    assert_eq!(out.len(), 1 + GREETING_LEN);
}

#[test]
fn client_flags() {
    for flags in [0, 1, 2, 3] {
        let (result, out, input) = run(&session(flags, &[]));
        assert_eq!(result, Ok(Progress::NeedInput), "flags {flags}");
        assert!(out.is_empty() && input.is_empty());
    }
    for flags in [4, 0x8000_0000, 0xffff_ffff, 7] {
        let mut hs = Handshake::new(config());
        let mut input = session(flags, &[opt(OPT_LIST, &[])]);
        let mut out = Vec::new();
        let result = hs.receive(&mut input, &test_exports(), &mut out);
        assert_eq!(result, Err(HandshakeError::BadClientFlags(flags)));
        assert!(out.is_empty());
        assert!(hs.is_finished());
        assert_eq!(
            hs.receive(&mut input, &test_exports(), &mut out),
            Err(HandshakeError::Finished)
        );
    }
}

#[test]
fn partial_client_flags_need_input() {
    let mut hs = Handshake::new(config());
    let mut out = Vec::new();
    let mut input = vec![0, 0, 0];
    assert_eq!(
        hs.receive(&mut input, &test_exports(), &mut out),
        Ok(Progress::NeedInput)
    );
    assert_eq!(input, [0, 0, 0], "a partial message stays in input");
    let mut input = vec![];
    assert_eq!(
        hs.receive(&mut input, &test_exports(), &mut out),
        Ok(Progress::NeedInput)
    );
}

#[test]
fn bad_option_magic() {
    let mut o = opt(OPT_LIST, &[]);
    o[0] = b'X';
    let (result, out, _) = run(&session(BOTH, &[o]));
    assert_eq!(
        result,
        Err(HandshakeError::BadOptionMagic(0x5848_4156_454F_5054))
    );
    assert!(out.is_empty());
}

#[test]
fn option_too_long_fails_on_header_alone() {
    let mut header = b"IHAVEOPT".to_vec();
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&1025u32.to_be_bytes());
    let (result, out, _) = run(&session(BOTH, &[header.clone()]));
    assert_eq!(
        result,
        Err(HandshakeError::OptionTooLong {
            option: OPT_GO,
            length: 1025,
            max: 1024
        })
    );
    assert!(out.is_empty());

    // At the limit: waits for the data, then handles it.
    let mut header = b"IHAVEOPT".to_vec();
    header.extend_from_slice(&99u32.to_be_bytes());
    header.extend_from_slice(&1024u32.to_be_bytes());
    let (result, out, input) = run(&session(BOTH, &[header.clone()]));
    assert_eq!(result, Ok(Progress::NeedInput));
    assert!(out.is_empty());
    assert_eq!(input, header);
    let (result, out, input) = run(&session(BOTH, &[opt(99, &[7; 1024])]));
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(kinds(&out), [REP_ERR_UNSUP]);
    assert!(input.is_empty());
}

#[test]
fn export_name_with_zeroes() {
    let (result, out, input) = run(&session(
        CLIENT_FLAG_FIXED_NEWSTYLE,
        &[opt(OPT_EXPORT_NAME, b"disk")],
    ));
    let mut expect = (1u64 << 20).to_be_bytes().to_vec();
    expect.extend_from_slice(&RW_FLAGS.to_be_bytes());
    expect.extend_from_slice(&[0; 124]);
    assert_eq!(out, expect);
    assert_eq!(out.len(), 134);
    assert!(input.is_empty());
    assert_eq!(
        result,
        Ok(Progress::Done(Negotiated {
            export: "disk".into(),
            info: test_exports().lookup("disk").unwrap(),
            transmission_flags: RW_FLAGS,
            structured_replies: false,
            base_allocation: None,
            meta_contexts: Vec::new(),
            tls: false,
        }))
    );
}

#[test]
fn export_name_without_zeroes_keeps_trailing_bytes() {
    let mut stream = session(BOTH, &[opt(OPT_EXPORT_NAME, b"ro")]);
    stream.extend_from_slice(&[1, 2, 3]);
    let (result, out, input) = run(&stream);
    let mut expect = 4096u64.to_be_bytes().to_vec();
    expect.extend_from_slice(&RO_FLAGS.to_be_bytes());
    assert_eq!(out, expect);
    assert_eq!(input, [1, 2, 3], "transmission bytes stay in input");
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert_eq!(n.export, "ro");
    assert!(n.info.read_only);
    assert_eq!(n.transmission_flags, RO_FLAGS);
}

#[test]
fn export_name_default_and_unknown() {
    let (result, out, _) = run(&session(BOTH, &[opt(OPT_EXPORT_NAME, b"")]));
    assert_eq!(out.len(), 10);
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert_eq!(n.export, "");
    assert_eq!(n.info.size, 1 << 20);

    for name in [&b"nope"[..], &[0xff, 0xfe]] {
        let mut stream = session(BOTH, &[opt(OPT_EXPORT_NAME, name)]);
        stream.extend_from_slice(&[9; 5]);
        let (result, out, input) = run(&stream);
        assert_eq!(result, Ok(Progress::Close));
        assert!(out.is_empty(), "EXPORT_NAME has no error reply");
        assert_eq!(input, [9; 5]);
    }
}

#[test]
fn abort_acks_and_closes() {
    for data in [&[][..], b"ignored"] {
        let mut stream = session(BOTH, &[opt(OPT_ABORT, data)]);
        stream.extend_from_slice(&opt(OPT_LIST, &[]));
        let (result, out, input) = run(&stream);
        assert_eq!(result, Ok(Progress::Close));
        assert_eq!(out, ack(OPT_ABORT));
        assert_eq!(input, opt(OPT_LIST, &[]), "nothing is read after ABORT");
    }
}

#[test]
fn list_exports() {
    let (result, out, _) = run(&session(BOTH, &[opt(OPT_LIST, &[])]));
    assert_eq!(result, Ok(Progress::NeedInput));
    let mut expect = rep(OPT_LIST, REP_SERVER, b"\0\0\0\x04diskmain disk");
    expect.extend(rep(OPT_LIST, REP_SERVER, b"\0\0\0\x02ro"));
    expect.extend(ack(OPT_LIST));
    assert_eq!(out, expect);

    let (result, out, _) = run(&session(BOTH, &[opt(OPT_LIST, b"x")]));
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(kinds(&out), [REP_ERR_INVALID]);
}

#[test]
fn unsupported_options() {
    for option in [
        OPT_STARTTLS,
        OPT_PEEK_EXPORT,
        OPT_EXTENDED_HEADERS,
        12,
        0,
        0xffff_ffff,
    ] {
        let (result, out, input) = run(&session(BOTH, &[opt(option, b"abc")]));
        assert_eq!(result, Ok(Progress::NeedInput));
        let r = replies(&out);
        assert_eq!(r.len(), 1, "option {option}");
        assert_eq!((r[0].0, r[0].1), (option, REP_ERR_UNSUP));
        assert!(!r[0].2.is_empty(), "error replies carry a message");
        assert!(input.is_empty());
    }
}

#[test]
fn info_exact_replies() {
    let (result, out, _) = run(&session(
        BOTH,
        &[opt(OPT_INFO, &crate::proto::info_request("disk", &[]))],
    ));
    assert_eq!(
        result,
        Ok(Progress::NeedInput),
        "INFO does not end negotiation"
    );
    let mut expect = info_export(OPT_INFO, 1 << 20, RW_FLAGS);
    expect.extend(info_block_size(OPT_INFO));
    expect.extend(ack(OPT_INFO));
    assert_eq!(out, expect);
}

#[test]
fn info_with_name_and_description() {
    let requests = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77];
    let (_, out, _) = run(&session(
        BOTH,
        &[opt(
            OPT_INFO,
            &crate::proto::info_request("disk", &requests),
        )],
    ));
    let mut expect = info_export(OPT_INFO, 1 << 20, RW_FLAGS);
    expect.extend(rep(OPT_INFO, REP_INFO, b"\0\x01disk"));
    expect.extend(rep(OPT_INFO, REP_INFO, b"\0\x02main disk"));
    expect.extend(info_block_size(OPT_INFO));
    expect.extend(ack(OPT_INFO));
    assert_eq!(out, expect);

    // No description to send for "ro".
    let (_, out, _) = run(&session(
        BOTH,
        &[opt(OPT_INFO, &crate::proto::info_request("ro", &requests))],
    ));
    let mut expect = info_export(OPT_INFO, 4096, RO_FLAGS);
    expect.extend(rep(OPT_INFO, REP_INFO, b"\0\x01ro"));
    expect.extend(info_block_size(OPT_INFO));
    expect.extend(ack(OPT_INFO));
    assert_eq!(out, expect);
}

#[test]
fn go_enters_transmission() {
    let mut stream = session(
        BOTH,
        &[
            opt(OPT_INFO, &crate::proto::info_request("ro", &[])),
            opt(
                OPT_GO,
                &crate::proto::info_request("ro", &[INFO_BLOCK_SIZE]),
            ),
        ],
    );
    stream.extend_from_slice(&[0x25, 0x60]);
    let (result, out, input) = run(&stream);
    let mut expect = info_export(OPT_INFO, 4096, RO_FLAGS);
    expect.extend(info_block_size(OPT_INFO));
    expect.extend(ack(OPT_INFO));
    expect.extend(info_export(OPT_GO, 4096, RO_FLAGS));
    expect.extend(info_block_size(OPT_GO));
    expect.extend(ack(OPT_GO));
    assert_eq!(out, expect, "no zero padding after GO");
    assert_eq!(input, [0x25, 0x60]);
    assert_eq!(
        result,
        Ok(Progress::Done(Negotiated {
            export: "ro".into(),
            info: test_exports().lookup("ro").unwrap(),
            transmission_flags: RO_FLAGS,
            structured_replies: false,
            base_allocation: None,
            meta_contexts: Vec::new(),
            tls: false,
        }))
    );
}

#[test]
fn go_default_export() {
    let (result, _, _) = run(&session(
        BOTH,
        &[opt(OPT_GO, &crate::proto::info_request("", &[]))],
    ));
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert_eq!(n.export, "");
    assert_eq!(n.info.size, 1 << 20);
}

#[test]
fn go_unknown_export_keeps_negotiating() {
    let stream = session(
        BOTH,
        &[
            opt(OPT_GO, &crate::proto::info_request("nope", &[])),
            opt(OPT_GO, &crate::proto::info_request("disk", &[])),
        ],
    );
    let (result, out, _) = run(&stream);
    let r = replies(&out);
    assert_eq!(
        (r[0].0, r[0].1, r[0].2.as_slice()),
        (OPT_GO, REP_ERR_UNKNOWN, &b"export 'nope' not found"[..])
    );
    assert_eq!(kinds(&out)[1..], [REP_INFO, REP_INFO, REP_ACK]);
    assert!(matches!(result, Ok(Progress::Done(_))));
}

#[test]
fn info_go_malformed() {
    let good = crate::proto::info_request("disk", &[INFO_NAME]);
    let mut name_too_long = good.clone();
    name_too_long[3] = 200;
    let mut count_too_big = good.clone();
    count_too_big[9] = 2;
    let mut trailing = good.clone();
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short name length", vec![0, 0, 0]),
        ("name past the end", name_too_long),
        ("no request count", b"\0\0\0\x04disk".to_vec()),
        ("count past the end", count_too_big),
        ("half a request", good[..good.len() - 1].to_vec()),
        ("trailing byte", trailing),
        ("bad utf-8 name", info_data_raw(&[0xc3, 0x28])),
        ("name too long", info_data_raw(&[b'a'; 4097])),
    ];
    for option in [OPT_INFO, OPT_GO] {
        for (what, data) in &cases {
            let mut cfg = config();
            cfg.max_option_len = 8192;
            let mut hs = Handshake::new(cfg);
            let mut input = session(BOTH, &[opt(option, data)]);
            let mut out = Vec::new();
            let result = hs.receive(&mut input, &test_exports(), &mut out);
            assert_eq!(result, Ok(Progress::NeedInput), "{what}");
            assert_eq!(kinds(&out), [REP_ERR_INVALID], "{what}");
            assert!(input.is_empty(), "{what}");
        }
    }
}

fn info_data_raw(name: &[u8]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&[0, 0]);
    v
}

#[test]
fn structured_reply_negotiation() {
    let stream = session(
        BOTH,
        &[
            opt(OPT_STRUCTURED_REPLY, b"x"),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_GO, &crate::proto::info_request("disk", &[])),
        ],
    );
    let (result, out, _) = run(&stream);
    let r = replies(&out);
    assert_eq!((r[0].0, r[0].1), (OPT_STRUCTURED_REPLY, REP_ERR_INVALID));
    assert_eq!(rep(r[1].0, r[1].1, &r[1].2), ack(OPT_STRUCTURED_REPLY));
    assert_eq!((r[2].0, r[2].1), (OPT_STRUCTURED_REPLY, REP_ERR_INVALID));
    // DF is advertised once structured replies are on.
    assert_eq!(
        r[3].2,
        info_export(OPT_GO, 1 << 20, RW_FLAGS | TF_SEND_DF)[20..]
    );
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert!(n.structured_replies);
    assert_eq!(n.transmission_flags, RW_FLAGS | TF_SEND_DF);
    assert_eq!(n.base_allocation, None);
}

#[test]
fn meta_context_requires_structured_replies() {
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let stream = session(
            BOTH,
            &[opt(
                option,
                &crate::proto::meta_context_request("disk", &["base:allocation"]),
            )],
        );
        let (result, out, _) = run(&stream);
        assert_eq!(result, Ok(Progress::NeedInput));
        assert_eq!(kinds(&out), [REP_ERR_INVALID]);
    }
}

/// Replies to one meta context option sent after STRUCTURED_REPLY.
fn meta(option: u32, data: &[u8]) -> Vec<u8> {
    let stream = session(BOTH, &[opt(OPT_STRUCTURED_REPLY, &[]), opt(option, data)]);
    let (result, out, _) = run(&stream);
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(out[..20], ack(OPT_STRUCTURED_REPLY));
    out[20..].to_vec()
}

#[test]
fn list_meta_context() {
    let listed = [
        meta_reply(OPT_LIST_META_CONTEXT, 0),
        ack(OPT_LIST_META_CONTEXT),
    ]
    .concat();
    let nothing = ack(OPT_LIST_META_CONTEXT);
    let cases: &[(&[&str], &Vec<u8>)] = &[
        (&[], &listed),
        (&["base:"], &listed),
        (&["base:allocation"], &listed),
        (&["base:allocation", "base:"], &listed),
        (&["qemu:dirty-bitmap:a", "base:"], &listed),
        (&["base:alloc"], &nothing),
        (&["qemu:"], &nothing),
        (&["base"], &nothing),
        (&[""], &nothing),
    ];
    for (queries, expect) in cases {
        let out = meta(
            OPT_LIST_META_CONTEXT,
            &crate::proto::meta_context_request("disk", queries),
        );
        assert_eq!(&out, *expect, "{queries:?}");
    }
    let out = meta(
        OPT_LIST_META_CONTEXT,
        &crate::proto::meta_context_request("nope", &[]),
    );
    assert_eq!(kinds(&out), [REP_ERR_UNKNOWN]);
}

#[test]
fn set_meta_context() {
    let selected = [
        meta_reply(OPT_SET_META_CONTEXT, 1),
        ack(OPT_SET_META_CONTEXT),
    ]
    .concat();
    let nothing = ack(OPT_SET_META_CONTEXT);
    let cases: &[(&[&str], &Vec<u8>)] = &[
        (&[], &nothing),
        (&["base:"], &nothing),
        (&["base:allocation"], &selected),
        (&["x-foo:bar", "base:allocation"], &selected),
        (&["base:allocation", "base:allocation"], &selected),
        (&["base:allocationX"], &nothing),
    ];
    for (queries, expect) in cases {
        let out = meta(
            OPT_SET_META_CONTEXT,
            &crate::proto::meta_context_request("ro", queries),
        );
        assert_eq!(&out, *expect, "{queries:?}");
    }
    let out = meta(
        OPT_SET_META_CONTEXT,
        &crate::proto::meta_context_request("nope", &["base:allocation"]),
    );
    assert_eq!(kinds(&out), [REP_ERR_UNKNOWN]);
}

#[test]
fn meta_context_malformed() {
    let good = crate::proto::meta_context_request("disk", &["base:allocation"]);
    let mut count_too_big = good.clone();
    count_too_big[11] = 2;
    let mut count_huge = good.clone();
    count_huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut query_too_long = good.clone();
    query_too_long[15] = 100;
    let mut trailing = good.clone();
    trailing.push(b'!');
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("name past the end", vec![0, 0, 0, 9, b'd']),
        ("no count", b"\0\0\0\x04disk".to_vec()),
        ("count too big", count_too_big),
        ("count huge", count_huge),
        ("query past the end", query_too_long),
        ("trailing", trailing),
        (
            "bad utf-8 name",
            [&[0, 0, 0, 1, 0xff][..], &[0, 0, 0, 0]].concat(),
        ),
    ];
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        for (what, data) in &cases {
            assert_eq!(kinds(&meta(option, data)), [REP_ERR_INVALID], "{what}");
        }
    }
}

/// STRUCTURED_REPLY, then `options`, then GO on `export`: the negotiated
/// base_allocation.
fn base_allocation_after(options: &[Vec<u8>], export: &str) -> Option<u32> {
    let mut all = vec![opt(OPT_STRUCTURED_REPLY, &[])];
    all.extend_from_slice(options);
    all.push(opt(OPT_GO, &crate::proto::info_request(export, &[])));
    let (result, _, _) = run(&session(BOTH, &all));
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert!(n.structured_replies);
    n.base_allocation
}

#[test]
fn base_allocation_follows_the_last_set() {
    let set = |name: &str, queries: &[&str]| {
        opt(
            OPT_SET_META_CONTEXT,
            &crate::proto::meta_context_request(name, queries),
        )
    };
    let list = opt(
        OPT_LIST_META_CONTEXT,
        &crate::proto::meta_context_request("disk", &[]),
    );
    assert_eq!(base_allocation_after(&[], "disk"), None);
    assert_eq!(
        base_allocation_after(std::slice::from_ref(&list), "disk"),
        None,
        "LIST selects nothing"
    );
    assert_eq!(
        base_allocation_after(&[set("disk", &["base:allocation"])], "disk"),
        Some(1)
    );
    assert_eq!(
        base_allocation_after(&[set("disk", &["base:allocation"]), list], "disk"),
        Some(1),
        "LIST does not change the selection"
    );
    assert_eq!(
        base_allocation_after(&[set("disk", &["base:allocation"])], "ro"),
        None,
        "selected for another export"
    );
    assert_eq!(
        base_allocation_after(&[set("disk", &["base:allocation"])], ""),
        None,
        "names are compared as sent, not resolved"
    );
    assert_eq!(
        base_allocation_after(
            &[set("disk", &["base:allocation"]), set("disk", &["base:"])],
            "disk"
        ),
        None,
        "a SET that matches nothing clears the selection"
    );
    assert_eq!(
        base_allocation_after(
            &[
                set("disk", &["base:allocation"]),
                set("nope", &["base:allocation"])
            ],
            "disk"
        ),
        None,
        "a failed SET clears the selection"
    );
    assert_eq!(
        base_allocation_after(
            &[
                set("disk", &["base:allocation"]),
                opt(OPT_SET_META_CONTEXT, b"junk")
            ],
            "disk"
        ),
        None,
        "a malformed SET clears the selection"
    );
    assert_eq!(
        base_allocation_after(
            &[
                set("ro", &["base:allocation"]),
                set("disk", &["base:allocation"])
            ],
            "disk"
        ),
        Some(1)
    );

    // Same through EXPORT_NAME.
    let stream = session(
        BOTH,
        &[
            opt(OPT_STRUCTURED_REPLY, &[]),
            set("ro", &["base:allocation"]),
            opt(OPT_EXPORT_NAME, b"ro"),
        ],
    );
    let (result, _, _) = run(&stream);
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
    assert_eq!(n.transmission_flags, RO_FLAGS | TF_SEND_DF);
}

#[test]
fn transmission_flag_table() {
    let rw = ExportInfo {
        size: 0,
        read_only: false,
        description: None,
    };
    let ro = ExportInfo {
        size: 0,
        read_only: true,
        description: None,
    };
    let single = Config {
        multi_conn: false,
        ..config()
    };
    let multi = config();
    assert_eq!(transmission_flags(&single, &rw, false), 0b1100_0110_1101);
    assert_eq!(transmission_flags(&single, &rw, true), 0b1100_1110_1101);
    assert_eq!(transmission_flags(&multi, &rw, true), 0b1101_1110_1101);
    assert_eq!(transmission_flags(&single, &ro, false), 0b0100_0000_0111);
    assert_eq!(transmission_flags(&multi, &ro, true), 0b0101_1000_0111);
}

#[test]
fn finished_after_done_or_close() {
    let streams = [
        session(
            BOTH,
            &[opt(OPT_GO, &crate::proto::info_request("disk", &[]))],
        ),
        session(BOTH, &[opt(OPT_EXPORT_NAME, b"disk")]),
        session(BOTH, &[opt(OPT_EXPORT_NAME, b"nope")]),
        session(BOTH, &[opt(OPT_ABORT, &[])]),
    ];
    for stream in streams {
        let mut hs = Handshake::new(config());
        let mut input = stream;
        let mut out = Vec::new();
        let first = hs.receive(&mut input, &test_exports(), &mut out);
        assert!(matches!(first, Ok(Progress::Done(_) | Progress::Close)));
        assert!(hs.is_finished());
        let len = out.len();
        let mut more = opt(OPT_LIST, &[]);
        assert_eq!(
            hs.receive(&mut more, &test_exports(), &mut out),
            Err(HandshakeError::Finished)
        );
        assert_eq!(out.len(), len);
        assert_eq!(more, opt(OPT_LIST, &[]), "nothing consumed");
    }
}

/// A table of single options (after client flags BOTH): expected reply
/// types and whether negotiation goes on.
#[test]
fn option_table() {
    use Progress::NeedInput;
    type Case = (&'static str, Vec<u8>, Vec<u32>, bool);
    let cases: Vec<Case> = vec![
        (
            "list",
            opt(OPT_LIST, &[]),
            vec![REP_SERVER, REP_SERVER, REP_ACK],
            true,
        ),
        (
            "list+data",
            opt(OPT_LIST, &[0]),
            vec![REP_ERR_INVALID],
            true,
        ),
        (
            "starttls",
            opt(OPT_STARTTLS, &[]),
            vec![REP_ERR_UNSUP],
            true,
        ),
        (
            "info",
            opt(OPT_INFO, &crate::proto::info_request("ro", &[])),
            vec![REP_INFO, REP_INFO, REP_ACK],
            true,
        ),
        (
            "info unknown",
            opt(OPT_INFO, &crate::proto::info_request("x", &[])),
            vec![REP_ERR_UNKNOWN],
            true,
        ),
        ("info bad", opt(OPT_INFO, &[1]), vec![REP_ERR_INVALID], true),
        (
            "go",
            opt(OPT_GO, &crate::proto::info_request("ro", &[])),
            vec![REP_INFO, REP_INFO, REP_ACK],
            false,
        ),
        (
            "go unknown",
            opt(OPT_GO, &crate::proto::info_request("x", &[])),
            vec![REP_ERR_UNKNOWN],
            true,
        ),
        ("go bad", opt(OPT_GO, &[]), vec![REP_ERR_INVALID], true),
        (
            "structured",
            opt(OPT_STRUCTURED_REPLY, &[]),
            vec![REP_ACK],
            true,
        ),
        (
            "structured+data",
            opt(OPT_STRUCTURED_REPLY, &[1]),
            vec![REP_ERR_INVALID],
            true,
        ),
        (
            "list meta",
            opt(
                OPT_LIST_META_CONTEXT,
                &crate::proto::meta_context_request("ro", &[]),
            ),
            vec![REP_ERR_INVALID],
            true,
        ),
        (
            "set meta",
            opt(
                OPT_SET_META_CONTEXT,
                &crate::proto::meta_context_request("ro", &[]),
            ),
            vec![REP_ERR_INVALID],
            true,
        ),
        (
            "extended headers",
            opt(OPT_EXTENDED_HEADERS, &[]),
            vec![REP_ERR_UNSUP],
            true,
        ),
        ("unknown", opt(1000, &[1, 2]), vec![REP_ERR_UNSUP], true),
        ("abort", opt(OPT_ABORT, &[]), vec![REP_ACK], false),
    ];
    for (what, option, expect, goes_on) in cases {
        let (result, out, input) = run(&session(BOTH, &[option]));
        assert_eq!(kinds(&out), expect, "{what}");
        assert_eq!(result == Ok(NeedInput), goes_on, "{what}: {result:?}");
        assert!(input.is_empty(), "{what}");
        for (option_in_reply, _, _) in replies(&out) {
            assert!(option_in_reply < 1001, "{what}");
        }
    }
}

/// Client streams of whole sessions, used for the split tests.
fn sample_streams() -> Vec<Vec<u8>> {
    let request = crate::proto::Request {
        flags: 0,
        command: crate::proto::Command::Read,
        cookie: 1,
        offset: 0,
        length: 512,
    };
    let mut go_then_requests = session(
        BOTH,
        &[
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(
                OPT_LIST_META_CONTEXT,
                &crate::proto::meta_context_request("disk", &[]),
            ),
            opt(
                OPT_SET_META_CONTEXT,
                &crate::proto::meta_context_request("disk", &["base:allocation"]),
            ),
            opt(OPT_INFO, &crate::proto::info_request("nope", &[])),
            opt(
                OPT_GO,
                &crate::proto::info_request("disk", &[INFO_NAME, INFO_DESCRIPTION]),
            ),
        ],
    );
    go_then_requests.extend_from_slice(&request.encode());
    vec![
        go_then_requests,
        session(
            CLIENT_FLAG_FIXED_NEWSTYLE,
            &[
                opt(OPT_LIST, &[]),
                opt(OPT_EXPORT_NAME, b"ro"),
                vec![1, 2, 3],
            ],
        ),
        session(BOTH, &[opt(77, &[5; 40]), opt(OPT_ABORT, &[])]),
        session(
            BOTH,
            &[
                opt(OPT_LIST, &[]),
                opt(OPT_INFO, &crate::proto::info_request("ro", &[])),
                opt(OPT_GO, &crate::proto::info_request("", &[])),
            ],
        ),
        session(
            BOTH,
            &[
                opt(OPT_STARTTLS, &[]),
                b"IHAVEOPX\0\0\0\x01\0\0\0\0".to_vec(),
            ],
        ),
        session(8, &[]),
    ]
}

/// Feeds `stream` in pieces cut at `cuts`; returns the final result, all
/// output, and the input left over at the end.
fn feed(stream: &[u8], cuts: &[usize]) -> (Result<Progress, HandshakeError>, Vec<u8>, Vec<u8>) {
    let mut hs = Handshake::new(config());
    let mut input = Vec::new();
    let mut out = Vec::new();
    let mut start = 0;
    let mut result = Ok(Progress::NeedInput);
    for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
        input.extend_from_slice(&stream[start..end]);
        start = end;
        result = hs.receive(&mut input, &test_exports(), &mut out);
        if result != Ok(Progress::NeedInput) {
            break;
        }
    }
    // Bytes never fed belong after what is left in input.
    input.extend_from_slice(&stream[start..]);
    (result, out, input)
}

#[test]
fn split_at_every_position_gives_the_same_result() {
    for stream in sample_streams() {
        let whole = feed(&stream, &[]);
        assert_ne!(whole.0, Ok(Progress::NeedInput), "sample sessions all end");
        for cut in 0..=stream.len() {
            assert_eq!(feed(&stream, &[cut]), whole, "cut at {cut}");
        }
        let every: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(feed(&stream, &every), whole, "one byte at a time");
    }
}

#[test]
fn sample_stream_outcomes() {
    let outcomes: Vec<_> = sample_streams().iter().map(|s| feed(s, &[]).0).collect();
    let Ok(Progress::Done(n)) = &outcomes[0] else {
        panic!("{:?}", outcomes[0])
    };
    assert_eq!(n.base_allocation, Some(1));
    assert!(matches!(&outcomes[1], Ok(Progress::Done(n)) if n.export == "ro"));
    assert_eq!(outcomes[2], Ok(Progress::Close));
    assert!(matches!(&outcomes[3], Ok(Progress::Done(n)) if n.export.is_empty()));
    assert!(matches!(
        outcomes[4],
        Err(HandshakeError::BadOptionMagic(_))
    ));
    assert_eq!(outcomes[5], Err(HandshakeError::BadClientFlags(8)));
}

/// Exports that record which question each option asked.
struct Recording {
    table: ExportTable,
    calls: std::cell::RefCell<Vec<(&'static str, String)>>,
}

impl Exports for Recording {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.calls.borrow_mut().push(("lookup", name.to_string()));
        self.table.lookup(name)
    }
    fn describe(&self, name: &str) -> Option<ExportInfo> {
        self.calls.borrow_mut().push(("describe", name.to_string()));
        self.table.lookup(name)
    }
    fn list(&self) -> Vec<(String, Option<String>)> {
        self.table.list()
    }
}

/// INFO and the meta-context options only describe an export (a server
/// may answer without opening it); GO looks it up, to serve it.
#[test]
fn info_describes_and_go_looks_up() {
    let exports = Recording {
        table: test_exports(),
        calls: Default::default(),
    };
    let mut meta = 4u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&0u32.to_be_bytes());
    let stream = session(
        BOTH,
        &[
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_INFO, &crate::proto::info_request("ro", &[])),
            opt(OPT_LIST_META_CONTEXT, &meta),
            opt(OPT_GO, &crate::proto::info_request("disk", &[])),
        ],
    );
    let mut hs = Handshake::new(config());
    let mut input = stream;
    let mut out = Vec::new();
    let result = hs.receive(&mut input, &exports, &mut out);
    assert!(matches!(result, Ok(Progress::Done(_))), "{result:?}");
    assert_eq!(
        *exports.calls.borrow(),
        [
            ("describe", "ro".to_string()),
            ("describe", "disk".to_string()),
            ("lookup", "disk".to_string())
        ]
    );
}

/// Exports that know why they refuse one name.
struct Refusing;

impl Exports for Refusing {
    fn lookup(&self, _name: &str) -> Option<ExportInfo> {
        None
    }
    fn list(&self) -> Vec<(String, Option<String>)> {
        Vec::new()
    }
    fn why_not(&self, name: &str) -> Option<String> {
        (name == "held").then(|| "disk held is written by host 2".to_string())
    }
}

/// A refused export's error reply carries the server's reason; other
/// names still get "not found".
#[test]
fn refusals_say_why() {
    for (name, want) in [
        ("held", "disk held is written by host 2"),
        ("other", "export 'other' not found"),
    ] {
        let stream = session(BOTH, &[opt(OPT_GO, &info_request(name, &[]))]);
        let mut hs = Handshake::new(config());
        let mut input = stream.clone();
        let mut out = Vec::new();
        let _ = hs.receive(&mut input, &Refusing, &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert_eq!(String::from_utf8_lossy(&r[0].2), want);
    }
}

// ---- TLS ---------------------------------------------------------------------

/// A handshake with TLS policy `tls`, fed `stream` in one call.
fn start(tls: TlsMode, stream: &[u8]) -> (Handshake, Result<Progress, HandshakeError>, Vec<u8>) {
    let mut hs = Handshake::new(Config { tls, ..config() });
    let mut input = stream.to_vec();
    let mut out = Vec::new();
    let result = hs.receive(&mut input, &test_exports(), &mut out);
    assert!(
        input.is_empty() || result.is_err(),
        "unconsumed input {input:?} after {result:?}"
    );
    (hs, result, out)
}

/// Feeds `options` to a handshake that is past its client flags.
fn more(hs: &mut Handshake, options: &[Vec<u8>]) -> (Result<Progress, HandshakeError>, Vec<u8>) {
    let mut input = options.concat();
    let mut out = Vec::new();
    let result = hs.receive(&mut input, &test_exports(), &mut out);
    (result, out)
}

#[test]
fn starttls_acks_and_forgets_what_was_negotiated_before() {
    for mode in [TlsMode::Optional, TlsMode::Require] {
        let before = if mode == TlsMode::Optional {
            vec![
                opt(OPT_STRUCTURED_REPLY, &[]),
                opt(
                    OPT_SET_META_CONTEXT,
                    &crate::proto::meta_context_request("disk", &["base:allocation"]),
                ),
            ]
        } else {
            vec![]
        };
        let mut options = before.clone();
        options.push(opt(OPT_STARTTLS, &[]));
        let (mut hs, result, out) = start(mode, &session(BOTH, &options));
        assert_eq!(result, Ok(Progress::StartTls), "{mode:?}");
        assert_eq!(kinds(&out).last(), Some(&REP_ACK));
        assert!(out.ends_with(&ack(OPT_STARTTLS)), "{mode:?}");
        assert!(!hs.is_finished());
        // Inside TLS: a GO without structured replies negotiated again.
        let (result, out) = more(
            &mut hs,
            &[opt(OPT_GO, &crate::proto::info_request("disk", &[]))],
        );
        let Ok(Progress::Done(n)) = result else {
            panic!("{mode:?}: {result:?}")
        };
        assert!(n.tls);
        assert!(
            !n.structured_replies,
            "structured replies outlived STARTTLS"
        );
        assert_eq!(n.base_allocation, None, "meta context outlived STARTTLS");
        assert!(!kinds(&out).contains(&REP_ERR_TLS_REQD));
    }
}

#[test]
fn starttls_twice_or_with_data_is_invalid_and_off_means_unsupported() {
    let (mut hs, result, _) = start(TlsMode::Optional, &session(BOTH, &[opt(OPT_STARTTLS, &[])]));
    assert_eq!(result, Ok(Progress::StartTls));
    let (result, out) = more(&mut hs, &[opt(OPT_STARTTLS, &[])]);
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(kinds(&out), [REP_ERR_INVALID]);

    let (_, result, out) = start(TlsMode::Require, &session(BOTH, &[opt(OPT_STARTTLS, b"x")]));
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(kinds(&out), [REP_ERR_INVALID]);

    let (_, result, out) = start(TlsMode::Off, &session(BOTH, &[opt(OPT_STARTTLS, &[])]));
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(kinds(&out), [REP_ERR_UNSUP]);
}

#[test]
fn bytes_sent_behind_starttls_end_the_session_without_an_ack() {
    // A client (or a man in the middle) that sends plain text after
    // STARTTLS would have it taken as coming from inside TLS.
    for mode in [TlsMode::Optional, TlsMode::Require] {
        let stream = session(BOTH, &[opt(OPT_STARTTLS, &[]), opt(OPT_LIST, &[])]);
        let mut hs = Handshake::new(Config {
            tls: mode,
            ..config()
        });
        let mut input = stream.clone();
        let mut out = Vec::new();
        let result = hs.receive(&mut input, &test_exports(), &mut out);
        assert_eq!(result, Err(HandshakeError::DataAfterStartTls), "{mode:?}");
        assert!(!kinds(&out).contains(&REP_ACK), "{mode:?}: STARTTLS acked");
        assert!(hs.is_finished());
    }
}

#[test]
fn required_tls_refuses_every_other_option_until_it_runs() {
    let refused = [
        opt(OPT_LIST, &[]),
        opt(OPT_INFO, &crate::proto::info_request("disk", &[])),
        opt(OPT_GO, &crate::proto::info_request("disk", &[])),
        opt(OPT_STRUCTURED_REPLY, &[]),
        opt(
            OPT_LIST_META_CONTEXT,
            &crate::proto::meta_context_request("disk", &[]),
        ),
        opt(
            OPT_SET_META_CONTEXT,
            &crate::proto::meta_context_request("disk", &["base:allocation"]),
        ),
        opt(OPT_EXTENDED_HEADERS, &[]),
        opt(12, b"abc"),
    ];
    let (mut hs, result, out) = start(TlsMode::Require, &session(BOTH, &refused));
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(kinds(&out), vec![REP_ERR_TLS_REQD; refused.len()]);
    // EXPORT_NAME has no error reply: the session ends.
    let (result, out) = more(&mut hs, &[opt(OPT_EXPORT_NAME, b"disk")]);
    assert_eq!(result, Ok(Progress::Close));
    assert!(out.is_empty());
    // ABORT is still acknowledged.
    let (_, result, out) = start(TlsMode::Require, &session(BOTH, &[opt(OPT_ABORT, &[])]));
    assert_eq!((result, out), (Ok(Progress::Close), ack(OPT_ABORT)));
    // A client that cannot ask for TLS is turned away at once.
    let (_, result, _) = start(TlsMode::Require, &session(CLIENT_FLAG_NO_ZEROES, &[]));
    assert_eq!(result, Err(HandshakeError::TlsNeedsFixedNewstyle));
    // Once TLS runs, nothing is refused for its sake.
    let (mut hs, result, _) = start(TlsMode::Require, &session(BOTH, &[opt(OPT_STARTTLS, &[])]));
    assert_eq!(result, Ok(Progress::StartTls));
    let (result, out) = more(&mut hs, &refused[..6]);
    assert!(
        matches!(result, Ok(Progress::NeedInput | Progress::Done(_))),
        "{result:?}"
    );
    assert!(
        !kinds(&out).contains(&REP_ERR_TLS_REQD),
        "{:?}",
        kinds(&out)
    );
}

#[test]
fn optional_tls_serves_plain_clients_as_before() {
    let options = [
        opt(OPT_LIST, &[]),
        opt(OPT_GO, &crate::proto::info_request("disk", &[])),
    ];
    let (_, result, out) = start(TlsMode::Optional, &session(BOTH, &options));
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert!(!n.tls);
    assert!(!kinds(&out).contains(&REP_ERR_TLS_REQD));
}

#[test]
fn a_server_shutting_down_refuses_every_option_but_abort() {
    let mut hs = Handshake::new(config());
    let mut input = session(BOTH, &[opt(OPT_LIST, &[])]);
    let mut out = Vec::new();
    assert_eq!(
        hs.receive(&mut input, &test_exports(), &mut out),
        Ok(Progress::NeedInput)
    );
    hs.shut_down();
    let options = [
        opt(OPT_LIST, &[]),
        opt(OPT_GO, &crate::proto::info_request("disk", &[])),
        opt(OPT_STARTTLS, &[]),
        opt(12, b"x"),
    ];
    let (result, out) = more(&mut hs, &options);
    assert_eq!(result, Ok(Progress::NeedInput));
    assert_eq!(kinds(&out), vec![REP_ERR_SHUTDOWN; options.len()]);
    let (result, out) = more(&mut hs, &[opt(OPT_ABORT, &[])]);
    assert_eq!((result, out), (Ok(Progress::Close), ack(OPT_ABORT)));
}

/// Exports whose `ro` offers two extra contexts.
struct WithContexts(ExportTable);

impl Exports for WithContexts {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.0.lookup(name)
    }
    fn list(&self) -> Vec<(String, Option<String>)> {
        self.0.list()
    }
    fn meta_contexts(&self, name: &str) -> Vec<String> {
        match name {
            "ro" => vec![
                "qemu:allocation-depth".into(),
                "qemu:dirty-bitmap:monday".into(),
            ],
            _ => Vec::new(),
        }
    }
}

/// The context names (with ids) in `out`'s META_CONTEXT replies.
fn contexts_in(out: &[u8]) -> Vec<(u32, String)> {
    replies(out)
        .into_iter()
        .filter(|r| r.1 == REP_META_CONTEXT)
        .map(|r| {
            let id = u32::from_be_bytes(r.2[..4].try_into().unwrap());
            (id, String::from_utf8(r.2[4..].to_vec()).unwrap())
        })
        .collect()
}

/// Other contexts an export offers are listed by namespace, by prefix
/// ending in `:` and by name, selected by exact name with ids from 2 in
/// the order asked, and handed to the transmission phase; another
/// export's are not (mutation tried: the prefix rule without the `:`
/// check lists `qemu:dirty-bitmap:monday` for `qemu:dirty` -> fails).
#[test]
fn other_contexts_are_listed_selected_and_negotiated() {
    let exports = WithContexts(test_exports());
    let talk = |options: &[Vec<u8>]| {
        let mut all = vec![opt(OPT_STRUCTURED_REPLY, &[])];
        all.extend_from_slice(options);
        let mut hs = Handshake::new(config());
        let mut input = session(BOTH, &all);
        let mut out = Vec::new();
        let result = hs.receive(&mut input, &exports, &mut out);
        (result, out)
    };
    let list = |export: &str, queries: &[&str]| {
        let (_, out) = talk(&[opt(
            OPT_LIST_META_CONTEXT,
            &crate::proto::meta_context_request(export, queries),
        )]);
        contexts_in(&out)
            .into_iter()
            .map(|(id, n)| {
                assert_eq!(id, 0);
                n
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list("ro", &[]),
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:monday"
        ]
    );
    assert_eq!(
        list("ro", &["qemu:"]),
        ["qemu:allocation-depth", "qemu:dirty-bitmap:monday"]
    );
    assert_eq!(
        list("ro", &["qemu:dirty-bitmap:"]),
        ["qemu:dirty-bitmap:monday"]
    );
    assert_eq!(list("ro", &["qemu:dirty"]), Vec::<String>::new());
    assert_eq!(
        list("ro", &["qemu:allocation-depth", "base:"]),
        ["base:allocation", "qemu:allocation-depth"]
    );
    assert_eq!(list("disk", &["qemu:"]), Vec::<String>::new());

    let set = |export: &str, queries: &[&str]| {
        opt(
            OPT_SET_META_CONTEXT,
            &crate::proto::meta_context_request(export, queries),
        )
    };
    let go = |export: &str| opt(OPT_GO, &crate::proto::info_request(export, &[]));
    let queries = [
        "qemu:dirty-bitmap:monday",
        "qemu:dirty-bitmap:tuesday",
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:monday",
    ];
    let (result, out) = talk(&[set("ro", &queries), go("ro")]);
    assert_eq!(
        contexts_in(&out),
        [
            (2, "qemu:dirty-bitmap:monday".to_string()),
            (1, "base:allocation".to_string()),
            (3, "qemu:allocation-depth".to_string()),
        ]
    );
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert_eq!(n.base_allocation, Some(1));
    assert_eq!(
        n.meta_contexts,
        [
            (2, "qemu:dirty-bitmap:monday".to_string()),
            (3, "qemu:allocation-depth".to_string())
        ]
    );
    // Only extra contexts selected: still a selection.
    let (result, _) = talk(&[set("ro", &["qemu:allocation-depth"]), go("ro")]);
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert_eq!((n.base_allocation, n.meta_contexts.len()), (None, 1));
    // Selected for one export, another chosen: nothing.
    let (result, _) = talk(&[set("ro", &["qemu:allocation-depth"]), go("disk")]);
    let Ok(Progress::Done(n)) = result else {
        panic!("{result:?}")
    };
    assert!(n.meta_contexts.is_empty());
}
