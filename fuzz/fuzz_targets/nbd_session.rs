//! A whole NBD server session with arbitrary client bytes: the real
//! `serve_connection` of the daemon, over an in-memory pipe, on a store in
//! memory with one disk `d` and its snapshot `d@s`.
//!
//! Input: if the first byte is even, a valid negotiation (structured
//! replies, `base:allocation`, GO on `d`, or on `d@s` when the byte is a
//! multiple of 4) is put before the rest, so most runs exercise the
//! transmission phase; otherwise the bytes are the whole client stream.
//!
//! Checks: the session ends (the client's end of input closes it), no
//! panic, and afterwards the store commits and passes `check` cleanly:
//! no client input can damage it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallax_device::MemDevice;
use parallax_engine::{CreateOptions, Store};
use parallax_nbd::proto::{client_option, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY};
use parallax_server::nbd::serve_connection;
use parallax_server::service::Service;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn negotiation(export: &str) -> Vec<u8> {
    let mut s = 3u32.to_be_bytes().to_vec();
    client_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    let mut set = Vec::new();
    set.extend_from_slice(&(export.len() as u32).to_be_bytes());
    set.extend_from_slice(export.as_bytes());
    set.extend_from_slice(&1u32.to_be_bytes());
    set.extend_from_slice(&15u32.to_be_bytes());
    set.extend_from_slice(b"base:allocation");
    client_option(&mut s, OPT_SET_META_CONTEXT, &set);
    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    client_option(&mut s, OPT_GO, &go);
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::new();
    if mode % 2 == 0 {
        stream = negotiation(if mode % 4 == 0 { "d@s" } else { "d" });
    }
    stream.extend_from_slice(rest);

    let store = Store::create(Arc::new(MemDevice::new(8 << 20)), &CreateOptions::default())
        .expect("create store");
    let disk = store.create_vdi("d", 1 << 20).expect("create disk");
    disk.write(&[0x5a; 8192], 4096).expect("write");
    disk.snapshot(Some("s")).expect("snapshot");
    drop(disk);
    let service = Arc::new(Service::new(store.clone(), "/nonexistent".into(), false));

    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let (_keep, shutdown) = tokio::sync::watch::channel(false);
        let session = tokio::spawn(serve_connection(server, "fuzz".into(), service, shutdown));
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let send = async {
            // The server may close early (bad input): stop sending then.
            let _ = wr.write_all(&stream).await;
            let _ = wr.shutdown().await;
        };
        let mut replies = Vec::new();
        let receive = rd.read_to_end(&mut replies);
        let (_, _) = tokio::join!(send, receive);
        drop(client);
        session.await.expect("session task panicked");
    });

    store.flush_all().expect("flush");
    let report = store.check().expect("check");
    assert!(report.is_clean(), "store damaged: {:?}", report.errors);
    assert_eq!(report.leaked_blocks, 0, "leaked blocks");
});
