//! The vhost-user-blk request path (`parallax_server::vhost_user`) over a
//! mock split virtqueue in 1 MiB of guest memory: arbitrary descriptor
//! chains (addresses, lengths, flags, including indirect and ones outside
//! guest memory) pointing at arbitrary guest memory contents, against a
//! store in memory with a 1 MiB disk and a read-only snapshot of it.
//!
//! Input: byte 0 picks the disk (even) or the snapshot (odd); then up to 8
//! descriptors of 8 bytes (address u32 within or past memory, length u16,
//! flags u8, unused u8); the rest is copied into guest memory at 64 KiB
//! (headers, data, segments). Checks: no panic, the used length never
//! exceeds what the chain's writable buffers hold, and the store passes
//! `check` afterwards.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallax_device::MemDevice;
use parallax_engine::{CreateOptions, ReadDisk, Store};
use parallax_server::vhost_user::BlkBackend;
use std::sync::{Arc, OnceLock};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = Store::create(Arc::new(MemDevice::new(32 << 20)), &CreateOptions::default())
            .expect("store");
        let d = store.create_vdi("d", 1 << 20).expect("disk");
        d.write(&[7u8; 8192], 0).expect("write");
        d.snapshot(Some("s")).expect("snapshot");
        store
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let store = store();
    let disk: Arc<dyn ReadDisk> = if pick % 2 == 0 {
        Arc::new(store.open_vdi("d").expect("open"))
    } else {
        Arc::new(store.open_snapshot("d", "s").expect("open"))
    };
    let backend = BlkBackend::new(disk, "parallax-1".into(), 1).expect("backend");
    let count = (rest.len() / 8).min(8);
    let mut descs = Vec::with_capacity(count.max(1));
    let mut writable = 0u64;
    for d in rest.chunks(8).take(count) {
        if d.len() < 8 {
            break;
        }
        let addr = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as u64 % (2 * MEM as u64);
        let len = u16::from_le_bytes([d[4], d[5]]) as u32;
        let flags = u16::from(d[6]) & 0x6; // WRITE and INDIRECT; NEXT is set by the mock
        if flags & 2 != 0 {
            writable += u64::from(len);
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0)));
    }
    if descs.is_empty() {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let contents = &rest[(count * 8).min(rest.len())..];
    let n = contents.len().min(MEM - 0x10000);
    mem.write_slice(&contents[..n], GuestAddress(0x10000)).expect("fill");
    let vq = MockSplitQueue::new(&mem, 16);
    let Ok(chain) = vq.build_desc_chain(&descs) else {
        return;
    };
    let used = backend.execute(chain, &mem);
    // Indirect tables may hold more writable buffers than the chain shows.
    assert!(
        u64::from(used) <= writable || descs.iter().any(|d| SplitDescriptor::from(*d).flags() & 4 != 0),
        "used {used} > writable {writable}"
    );
    let report = store.check().expect("check");
    assert!(report.is_clean(), "{report:?}");
});
