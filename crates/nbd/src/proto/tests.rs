use super::*;

#[test]
fn magics_spell_their_names() {
    assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
    assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
}

#[test]
fn flag_values_match_the_spec() {
    assert_eq!(
        [
            TF_HAS_FLAGS,
            TF_READ_ONLY,
            TF_SEND_FLUSH,
            TF_SEND_FUA,
            TF_ROTATIONAL,
            TF_SEND_TRIM,
            TF_SEND_WRITE_ZEROES,
            TF_SEND_DF,
            TF_CAN_MULTI_CONN,
            TF_SEND_RESIZE,
            TF_SEND_CACHE,
            TF_SEND_FAST_ZERO
        ],
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    );
    assert_eq!(
        [
            CMD_FLAG_FUA,
            CMD_FLAG_NO_HOLE,
            CMD_FLAG_DF,
            CMD_FLAG_REQ_ONE,
            CMD_FLAG_FAST_ZERO
        ],
        [1, 2, 4, 8, 16]
    );
    assert_eq!(
        [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN],
        [1, 5, 12, 22, 28, 75, 95, 108]
    );
    assert_eq!((STATE_HOLE, STATE_ZERO), (1, 2));
    assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
    assert_eq!(REP_ERR_INVALID, 0x8000_0003);
    assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
    assert_eq!(REPLY_TYPE_ERROR, 0x8001);
}

fn header(magic: u32, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut v = Vec::new();
    v.extend_from_slice(&magic.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.try_into().unwrap()
}

#[test]
fn decode_request_fields() {
    let h = header(
        REQUEST_MAGIC,
        0x0005,
        1,
        0x0102030405060708,
        0x1122334455667788,
        0x9abcdef0,
    );
    assert_eq!(
        &h[..8],
        &[0x25, 0x60, 0x95, 0x13, 0x00, 0x05, 0x00, 0x01],
        "test helper builds big-endian headers"
    );
    let r = Request::decode(&h).unwrap();
    assert_eq!(
        r,
        Request {
            flags: CMD_FLAG_FUA | CMD_FLAG_DF,
            command: Command::Write,
            cookie: 0x0102030405060708,
            offset: 0x1122334455667788,
            length: 0x9abcdef0,
        }
    );
    assert_eq!(r.payload_len(), 0x9abcdef0);
    assert_eq!(r.encode(), h);
}

#[test]
fn decode_rejects_bad_magic_only() {
    let h = header(0x25609514, 0, 0, 0, 0, 0);
    assert_eq!(Request::decode(&h), Err(ProtoError::BadMagic(0x25609514)));
    // Unknown commands and flags are not errors at this level.
    let h = header(REQUEST_MAGIC, 0xffff, 0x1234, 1, 2, 3);
    let r = Request::decode(&h).unwrap();
    assert_eq!(r.command, Command::Unknown(0x1234));
    assert_eq!(r.flags, 0xffff);
    assert_eq!(r.payload_len(), 0);
}

#[test]
fn command_numbers_round_trip() {
    let known = [
        (Command::Read, 0),
        (Command::Write, 1),
        (Command::Disc, 2),
        (Command::Flush, 3),
        (Command::Trim, 4),
        (Command::Cache, 5),
        (Command::WriteZeroes, 6),
        (Command::BlockStatus, 7),
    ];
    for (c, v) in known {
        assert_eq!(Command::from_wire(v), c);
        assert_eq!(c.to_wire(), v);
    }
    for v in [8u16, 9, 0x100, 0xffff] {
        assert_eq!(Command::from_wire(v), Command::Unknown(v));
        assert_eq!(Command::Unknown(v).to_wire(), v);
    }
}

#[test]
fn payload_len_is_length_for_write_only() {
    for v in 0..=8u16 {
        let r = Request {
            flags: 0,
            command: Command::from_wire(v),
            cookie: 0,
            offset: 0,
            length: 4096,
        };
        let expect = if v == 1 { 4096 } else { 0 };
        assert_eq!(r.payload_len(), expect, "command {v}");
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }
}

#[test]
fn simple_reply_layout() {
    let mut out = vec![0xaa];
    simple_reply(&mut out, 0x0102030405060708, EIO);
    assert_eq!(
        out,
        [0xaa, 0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8],
        "appends without clearing"
    );
}

/// magic, flags, type, cookie 0x0102030405060708, length
fn chunk(flags: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut v = vec![0x66, 0x8e, 0x33, 0xef];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    v.extend_from_slice(&len.to_be_bytes());
    v
}

const COOKIE: u64 = 0x0102030405060708;

#[test]
fn structured_data_header_layout() {
    let mut out = vec![];
    structured_data_header(&mut out, COOKIE, 0x1000, 512, false);
    let mut expect = chunk(0, 1, 520);
    expect.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
    assert_eq!(out, expect);
    assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_LEN + 8);

    let mut out = vec![];
    structured_data_header(&mut out, COOKIE, 7, 1, true);
    let mut expect = chunk(1, 1, 9);
    expect.extend_from_slice(&7u64.to_be_bytes());
    assert_eq!(out, expect);
}

#[test]
fn structured_data_header_clamps_huge_lengths() {
    let mut out = vec![];
    structured_data_header(&mut out, COOKIE, 0, usize::MAX, true);
    assert_eq!(out[16..20], u32::MAX.to_be_bytes());
}

#[test]
fn structured_hole_layout() {
    let mut out = vec![];
    structured_hole(&mut out, COOKIE, 0x200, 0x10000, true);
    let mut expect = chunk(1, 2, 12);
    expect.extend_from_slice(&0x200u64.to_be_bytes());
    expect.extend_from_slice(&0x10000u32.to_be_bytes());
    assert_eq!(out, expect);
}

#[test]
fn structured_done_layout() {
    let mut out = vec![9];
    structured_done(&mut out, COOKIE);
    let mut expect = vec![9];
    expect.extend(chunk(1, 0, 0));
    assert_eq!(out, expect);
}

#[test]
fn structured_error_layout() {
    let mut out = vec![];
    structured_error(&mut out, COOKIE, EINVAL, "bad");
    let mut expect = chunk(1, 0x8001, 9);
    expect.extend_from_slice(&[0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
    assert_eq!(out, expect);

    let mut out = vec![];
    structured_error(&mut out, COOKIE, EIO, "");
    let mut expect = chunk(1, 0x8001, 6);
    expect.extend_from_slice(&[0, 0, 0, 5, 0, 0]);
    assert_eq!(out, expect);
}

#[test]
fn structured_error_truncates_on_char_boundary() {
    // 'é' is two bytes: 4095 ASCII bytes + 'é' straddles the limit.
    let msg = format!("{}é and more", "x".repeat(MAX_ERROR_MESSAGE - 1));
    let mut out = vec![];
    structured_error(&mut out, COOKIE, EIO, &msg);
    let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
    assert_eq!(msg_len, MAX_ERROR_MESSAGE - 1);
    assert_eq!(out.len(), 20 + 6 + msg_len);
    let chunk_len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
    assert_eq!(chunk_len, 6 + msg_len);
    assert!(std::str::from_utf8(&out[26..]).is_ok());
}

#[test]
fn structured_block_status_layout() {
    let mut out = vec![];
    structured_block_status(
        &mut out,
        COOKIE,
        1,
        &[(4096, STATE_HOLE | STATE_ZERO), (512, 0)],
        true,
    );
    let mut expect = chunk(1, 5, 4 + 16);
    expect.extend_from_slice(&[0, 0, 0, 1]);
    expect.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 3]);
    expect.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
    assert_eq!(out, expect);

    let mut out = vec![];
    structured_block_status(&mut out, COOKIE, 7, &[(1, 0)], false);
    let mut expect = chunk(0, 5, 12);
    expect.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(out, expect);
}

#[test]
fn option_reply_and_client_option_layout() {
    let mut out = vec![];
    option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, b"no");
    let mut expect = vec![0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
    expect.extend_from_slice(&[0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 2, b'n', b'o']);
    assert_eq!(out, expect);

    let mut out = vec![];
    client_option(&mut out, OPT_LIST, &[]);
    let mut expect = b"IHAVEOPT".to_vec();
    expect.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0]);
    assert_eq!(out, expect);
}

#[test]
fn reader_is_bounds_checked() {
    let mut r = Reader::new(&[1, 2, 3, 4, 5]);
    assert_eq!(r.u16(), Some(0x0102));
    assert_eq!(r.u32(), None);
    assert_eq!(r.remaining(), 3);
    assert_eq!(r.bytes(4), None);
    assert_eq!(r.bytes(3), Some(&[3, 4, 5][..]));
    assert_eq!(r.u64(), None);
    assert_eq!(r.bytes(0), Some(&[][..]));
}

#[test]
fn truncate_str_keeps_whole_chars() {
    assert_eq!(truncate_str("abc", 5), "abc");
    assert_eq!(truncate_str("abc", 2), "ab");
    assert_eq!(truncate_str("aé", 2), "a");
    assert_eq!(truncate_str("éé", 0), "");
}
