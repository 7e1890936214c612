//! A whole store image made of arbitrary bytes (over a valid freshly
//! formatted store, so that the fuzzer mutates real structures): opening,
//! listing, reading every disk and `check` must return errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallax_device::MemDevice;
use parallax_engine::{ReadDisk, CreateOptions, OpenOptions, Store};
use std::sync::Arc;

const LEN: usize = 96 * 4096;

fuzz_target!(|data: &[u8]| {
    let dev = Arc::new(MemDevice::new(LEN as u64));
    let Ok(store) = Store::create(
        dev.clone(),
        &CreateOptions { extent_data_blocks: 64, host_id: 1 },
    ) else {
        return;
    };
    if let Ok(d) = store.create_vdi("d", 65536) {
        let _ = d.write(&[7; 10000], 100);
        let _ = d.snapshot(Some("s"));
        let _ = d.flush();
    }
    drop(store);
    let mut image = dev.to_bytes();
    // The input is a list of (u16 position, xor byte) patches; positions are
    // spread over the image by a factor of 7.
    for chunk in data.chunks_exact(3) {
        let off = (u16::from_le_bytes([chunk[0], chunk[1]]) as usize * 7) % LEN;
        image[off] ^= chunk[2];
    }
    let dev = Arc::new(MemDevice::from_bytes(image));
    let Ok(store) = Store::open(dev, &OpenOptions::default()) else { return };
    let _ = store.check();
    for name in store.list() {
        if let Ok(d) = store.open_vdi(&name) {
            let mut buf = vec![0u8; d.size().min(1 << 20) as usize];
            let _ = d.read(&mut buf, 0);
            let _ = d.write(&[1; 5000], 0);
            let _ = d.flush();
            for s in d.snapshots() {
                if let Ok(v) = store.open_snapshot(&name, &s.name) {
                    let mut buf = vec![0u8; v.size().min(1 << 20) as usize];
                    let _ = v.read(&mut buf, 0);
                }
            }
        }
    }
});
