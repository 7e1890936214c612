//! Seed inputs for the `nbd_handshake` fuzz target: whole valid client
//! sessions, so that the fuzzer starts from real negotiations.
//!
//! Input format of the target: one byte that drives how the stream is cut
//! into chunks, then the client byte stream (client flags, options, and
//! after a successful negotiation, request headers and write payloads).
//! The exports of the target are "disk" (read-write) and "ro" (read-only),
//! as here.
//!
//! `fuzz/corpus/` is not tracked by git; regenerate the seeds with
//! `cargo test -p parallax-nbd --test fuzz_seeds -- --ignored`.

use parallax_nbd::handshake::*;
use parallax_nbd::proto::*;

fn request(command: Command, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_HEADER_LEN] {
    Request {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// (file name, split byte, client stream)
fn seeds() -> Vec<(&'static str, u8, Vec<u8>)> {
    let both = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

    let mut go = both.to_be_bytes().to_vec();
    client_option(
        &mut go,
        OPT_GO,
        &info_request("disk", &[INFO_NAME, INFO_BLOCK_SIZE]),
    );
    go.extend_from_slice(&request(Command::Read, 1, 0, 4096));
    go.extend_from_slice(&request(Command::Disc, 2, 0, 0));

    let mut list = CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    client_option(&mut list, OPT_LIST, &[]);
    client_option(
        &mut list,
        OPT_INFO,
        &info_request("ro", &[INFO_DESCRIPTION]),
    );
    client_option(&mut list, OPT_ABORT, &[]);

    let mut structured = both.to_be_bytes().to_vec();
    client_option(&mut structured, OPT_STRUCTURED_REPLY, &[]);
    client_option(
        &mut structured,
        OPT_LIST_META_CONTEXT,
        &meta_context_request("disk", &[]),
    );
    client_option(
        &mut structured,
        OPT_SET_META_CONTEXT,
        &meta_context_request("disk", &["base:allocation"]),
    );
    client_option(&mut structured, OPT_GO, &info_request("disk", &[]));
    structured.extend_from_slice(&request(Command::Write, 1, 512, 8));
    structured.extend_from_slice(b"payload!");
    structured.extend_from_slice(&request(Command::BlockStatus, 2, 0, 1 << 20));
    structured.extend_from_slice(&request(Command::Read, 3, 512, 8));
    structured.extend_from_slice(&request(Command::Disc, 4, 0, 0));

    let mut export_name = 1u32.to_be_bytes().to_vec();
    client_option(&mut export_name, OPT_STARTTLS, &[]);
    client_option(&mut export_name, OPT_EXPORT_NAME, b"ro");
    export_name.extend_from_slice(&request(Command::Flush, 9, 0, 0));

    vec![
        ("go", 255, go),
        ("list", 7, list),
        ("structured_meta_go", 0, structured),
        ("export_name", 3, export_name),
    ]
}

#[test]
fn seeds_are_valid_sessions() {
    let mut outcomes = Vec::new();
    for (name, _, stream) in seeds() {
        let mut hs = Handshake::new(Config::default());
        let mut input = stream;
        let mut out = Vec::new();
        let result = hs.receive(&mut input, &ExportTable::fuzz_fixture(), &mut out);
        assert!(!out.is_empty(), "{name}");
        match result {
            Ok(Progress::Done(n)) => {
                let mut rest = &input[..];
                let mut commands = Vec::new();
                while let Some((header, tail)) = rest.split_first_chunk::<REQUEST_HEADER_LEN>() {
                    let request = Request::decode(header).unwrap();
                    commands.push(request.command);
                    rest = &tail[request.payload_len() as usize..];
                }
                assert!(rest.is_empty(), "{name}");
                outcomes.push((name, Some(n), commands));
            }
            Ok(Progress::Close) => outcomes.push((name, None, vec![])),
            other => panic!("{name}: {other:?}"),
        }
    }
    let (_, go, commands) = &outcomes[0];
    assert_eq!(go.as_ref().unwrap().export, "disk");
    assert_eq!(commands, &[Command::Read, Command::Disc]);
    assert!(outcomes[1].1.is_none(), "list ends with ABORT");
    let (_, structured, commands) = &outcomes[2];
    assert_eq!(
        structured.as_ref().unwrap().base_allocation,
        Some(BASE_ALLOCATION_ID)
    );
    assert_eq!(
        commands,
        &[
            Command::Write,
            Command::BlockStatus,
            Command::Read,
            Command::Disc
        ]
    );
    let (_, export_name, commands) = &outcomes[3];
    assert!(export_name.as_ref().unwrap().info.read_only);
    assert_eq!(commands, &[Command::Flush]);
}

#[test]
#[ignore = "writes fuzz/corpus/nbd_handshake; run by hand"]
fn write_fuzz_seeds() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_handshake");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, split, stream) in seeds() {
        let mut bytes = vec![split];
        bytes.extend(stream);
        std::fs::write(dir.join(format!("seed_{name}")), bytes).unwrap();
    }
}
