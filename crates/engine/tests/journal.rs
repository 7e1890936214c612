//! Entry journals (format 2): what a journal commit writes, that a
//! snapshot between checkpoints is a position in the journal, and that
//! everything comes back after a reopen. (The model test runs every
//! operation with journals on: `model.rs`, `store_matches_model_with_journals`.)

use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{CreateOptions, OpenOptions, ReadDisk, Store};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// A device that counts the bytes written to it.
struct Counting {
    inner: MemDevice,
    written: AtomicU64,
}

impl BlockDevice for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.written.fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

fn counting(len: u64) -> Arc<Counting> {
    Arc::new(Counting {
        inner: MemDevice::new(len),
        written: AtomicU64::new(0),
    })
}

fn block(seed: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i * 31 + seed * 7) as u8).collect()
}

/// Blocks spread over many leaves (one per 504 blocks).
fn spread(i: u64) -> u64 {
    i * 1009 + i % 7
}

/// With journals, a snapshot of a disk whose writes touched 60 leaves
/// writes a few blocks (records, the snapshot log, the header, bitmaps),
/// where a tree commit rewrites every leaf; the snapshot reads back as
/// taken while the disk moves on, and so does everything after a reopen.
#[test]
fn a_snapshot_between_checkpoints_writes_records_not_leaves() {
    let mut written = Vec::new();
    for journal in [false, true] {
        let dev = counting(320 * MIB);
        let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
        if journal {
            store.enable_journal().unwrap();
        }
        let d = store.create_vdi("d", 256 * MIB).unwrap();
        for i in 0..60 {
            d.write(&block(i), spread(i) * 4096).unwrap();
        }
        d.snapshot(Some("s0")).unwrap();
        for i in 0..60 {
            d.write(&block(100 + i), spread(i) * 4096).unwrap();
        }
        let before = dev.written.load(Ordering::SeqCst);
        d.snapshot(Some("s1")).unwrap();
        written.push(dev.written.load(Ordering::SeqCst) - before);
        for i in 0..60 {
            d.write(&block(200 + i), spread(i) * 4096).unwrap();
        }
        d.flush().unwrap();
        let check = |store: &Store| {
            let mut b = vec![0u8; 4096];
            for (snap, seed) in [("s0", 0), ("s1", 100)] {
                let view = store.open_snapshot("d", snap).unwrap();
                for i in 0..60 {
                    view.read(&mut b, spread(i) * 4096).unwrap();
                    assert_eq!(
                        b,
                        block(seed + i),
                        "d@{snap}, block {i} (journal {journal})"
                    );
                }
            }
            let d = store.open_vdi("d").unwrap();
            for i in 0..60 {
                d.read(&mut b, spread(i) * 4096).unwrap();
                assert_eq!(b, block(200 + i), "d, block {i} (journal {journal})");
            }
            let report = store.check().unwrap();
            assert!(report.is_clean(), "{:#?}", report.errors);
            assert_eq!(report.leaked_blocks, 0);
        };
        check(&store);
        drop(d);
        drop(store);
        let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
        check(&store);
    }
    // 60 leaves and their parents (~62 blocks) against a handful.
    assert!(
        written[0] >= 60 * 4096,
        "tree snapshot wrote {} bytes",
        written[0]
    );
    assert!(
        written[1] <= 8 * 4096,
        "journal snapshot wrote {} bytes (tree: {})",
        written[1],
        written[0]
    );
}

/// A deletion of the live tree's parent that fails before its header goes
/// back whole: which journal blocks a snapshot holds included (a promotion
/// changes it), so that a later checkpoint frees none of the snapshot's.
#[test]
fn a_failed_deletion_leaves_the_journal_ownership_as_before() {
    use parallax_device::{CrashDevice, Fault};
    let dev = Arc::new(CrashDevice::new(256 * MIB));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    store.enable_journal().unwrap();
    let d = store.create_vdi("d", 64 * MIB).unwrap();
    // Chains longer than a block (248 records): s2 holds full blocks s1
    // does not.
    for i in 0..300 {
        d.write(&block(i), i * 4096).unwrap();
    }
    d.snapshot(Some("s1")).unwrap();
    for i in 0..300 {
        d.write(&block(1000 + i), (300 + i) * 4096).unwrap();
    }
    d.snapshot(Some("s2")).unwrap();
    d.write(&block(7), 0).unwrap();
    d.flush().unwrap();
    dev.inject(Fault::WriteEio { after_writes: 0 });
    assert!(
        d.delete_snapshot("s2").is_err(),
        "the deletion went through"
    );
    // A checkpoint now: it frees the live chain's blocks no snapshot holds.
    store.set_journal_checkpoint(1);
    d.write(&block(8), 4096).unwrap();
    d.flush().unwrap();
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
    let view = store.open_snapshot("d", "s2").unwrap();
    let mut b = vec![0u8; 4096];
    for i in 0..600 {
        view.read(&mut b, i * 4096).unwrap();
        let want = if i < 300 {
            block(i)
        } else {
            block(1000 + i - 300)
        };
        assert_eq!(b, want, "d@s2, block {i}");
    }
}

/// The newest copy of a journaled disk's header is lost: the older copy
/// names a journal head the newer commit freed (its root is the same
/// base). The disk is refused, as a header gone back in time is, instead
/// of being served from a block the pool may hand out again.
#[test]
fn a_header_gone_back_to_a_freed_journal_head_is_refused() {
    use parallax_engine::Error;
    use parallax_format::VdiHeader;
    let dev = Arc::new(MemDevice::new(64 * MIB));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    store.enable_journal().unwrap();
    let store_id = store.store_id();
    let d = store.create_vdi("d", MIB).unwrap();
    d.write(&block(1), 0).unwrap();
    d.flush().unwrap();
    d.write(&block(2), 4096).unwrap();
    d.flush().unwrap();
    drop(d);
    drop(store);
    let mut newest: Option<(u64, VdiHeader)> = None;
    let mut raw = vec![0u8; 4096];
    for addr in 0..dev.len() / 4096 {
        dev.read_at(&mut raw, addr * 4096).unwrap();
        if let Ok(h) = VdiHeader::decode(&raw, addr, Some(store_id)) {
            if h.vdi_id == 1
                && newest
                    .as_ref()
                    .is_none_or(|(_, n)| h.generation > n.generation)
            {
                newest = Some((addr, h));
            }
        }
    }
    let (addr, header) = newest.expect("a header of disk d");
    assert!(!header.journal_head.is_null(), "the disk has no journal");
    dev.write_at(&[0u8; 4096], addr * 4096).unwrap();
    let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
    match store.open_vdi("d") {
        Err(Error::Inconsistent(msg)) => assert!(msg.contains("marks free"), "{msg}"),
        Ok(_) => panic!("a disk whose header names a freed journal block was served"),
        Err(e) => panic!("unexpected error: {e}"),
    }
}
