//! Damaged metadata never turns into wrong data: a property test.
//!
//! A small store is given a history (disks written and flushed several
//! times, a snapshot, a clone), with the device image kept after every
//! flush. Then one metadata block of a chosen kind (superblock, bitmap,
//! registry, VDI header, tree node, snapshot log) is damaged: bits flipped,
//! zeroed, torn, or put back to what an earlier image held at that address
//! (a lost write). The store is reopened, and:
//!
//! - it opens, or refuses with an error;
//! - every disk it serves reads exactly as it did at its last flush (not
//!   an earlier one: that would be flushed data lost; never another disk's
//!   data, never zeros that were not there), or is refused with an error;
//! - a snapshot it serves reads as it did when taken, or is refused;
//! - if `gc` runs, everything that was served before reads the same after;
//! - if a write is accepted, every other disk still reads the same.
//!
//! `PROPTEST_CASES=5000 cargo test -p parallax-engine --test corruption`
//! runs it longer.

use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{CreateOptions, OpenOptions, ReadDisk, Store};
use parallax_format::MAGIC;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const STORE: u64 = 16 << 20;
const DISK: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What the history left: the final image, the images after each flush,
/// every flushed content of every disk, and the snapshot's content.
struct History {
    image: Vec<u8>,
    earlier: Vec<Vec<u8>>,
    states: BTreeMap<String, Vec<Vec<u8>>>,
    snapshot: Vec<u8>,
}

fn image(dev: &MemDevice) -> Vec<u8> {
    let mut b = vec![0u8; dev.len() as usize];
    dev.read_at(&mut b, 0).unwrap();
    b
}

fn history(seed: u8) -> History {
    let dev = Arc::new(MemDevice::new(STORE));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    let mut states: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut earlier = Vec::new();
    let zeros = vec![0u8; DISK as usize];
    let record = |store: &Store,
                  name: &str,
                  states: &mut BTreeMap<String, Vec<Vec<u8>>>,
                  earlier: &mut Vec<Vec<u8>>| {
        let mut buf = vec![0u8; DISK as usize];
        store.open_vdi(name).unwrap().read(&mut buf, 0).unwrap();
        states.entry(name.to_string()).or_default().push(buf);
        store.flush_all().unwrap();
        earlier.push(image(&dev));
    };
    let a = store.create_vdi("a", DISK).unwrap();
    let b = store.create_vdi("b", DISK).unwrap();
    a.write(&pattern(seed, 98304), 0).unwrap();
    a.flush().unwrap();
    record(&store, "a", &mut states, &mut earlier);
    let snap = a.snapshot(Some("s")).unwrap();
    assert_eq!(snap.name, "s");
    let mut snapshot = vec![0u8; DISK as usize];
    store
        .open_snapshot("a", "s")
        .unwrap()
        .read(&mut snapshot, 0)
        .unwrap();
    a.write(&pattern(seed ^ 1, 40000), 20000).unwrap();
    a.flush().unwrap();
    record(&store, "a", &mut states, &mut earlier);
    b.write(&pattern(seed ^ 2, 65536), 4096).unwrap();
    b.flush().unwrap();
    record(&store, "b", &mut states, &mut earlier);
    b.write(&pattern(seed ^ 3, 65536), 4096).unwrap();
    b.write(&pattern(seed ^ 4, 8192), 500_000).unwrap();
    b.flush().unwrap();
    record(&store, "b", &mut states, &mut earlier);
    let c = store.clone_snapshot("a", "s", "c").unwrap();
    states.entry("c".into()).or_default().push(snapshot.clone());
    c.write(&pattern(seed ^ 5, 12288), 8192).unwrap();
    c.flush().unwrap();
    record(&store, "c", &mut states, &mut earlier);
    states
        .entry("a".into())
        .or_default()
        .insert(0, zeros.clone());
    states.entry("b".into()).or_default().insert(0, zeros);
    drop((a, b, c));
    drop(store);
    History {
        image: image(&dev),
        earlier,
        states,
        snapshot,
    }
}

/// Addresses of the blocks of metadata kind `kind` (the header's kind byte).
fn blocks_of_kind(image: &[u8], kind: u8) -> Vec<usize> {
    (0..image.len() / 4096)
        .filter(|&a| {
            let b = &image[a * 4096..(a + 1) * 4096];
            b[..4] == MAGIC && b[4] == kind
        })
        .collect()
}

/// Damages block `addr` of `image` in way `how` (0 flip bits, 1 zero,
/// 2 tear, 3 put back an older content of that address).
fn damage(h: &History, image: &mut [u8], addr: usize, how: u8, bits: u64) {
    let block = &mut image[addr * 4096..(addr + 1) * 4096];
    match how {
        0 => {
            for k in 0..3 {
                let bit = (bits >> (k * 15)) as usize % (4096 * 8);
                block[bit / 8] ^= 1 << (bit % 8);
            }
        }
        1 => block.fill(0),
        2 => block[2048..].fill(0),
        _ => {
            let older = h
                .earlier
                .iter()
                .rev()
                .map(|img| &img[addr * 4096..(addr + 1) * 4096])
                .find(|old| *old != &*block);
            match older {
                Some(old) => block.copy_from_slice(old),
                None => block.fill(0),
            }
        }
    }
}

/// Reads every disk and the snapshot that the store serves; panics on
/// wrong data. Returns what was served.
fn served(store: &Store, h: &History, what: &str, written: &[String]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (name, states) in &h.states {
        if written.contains(name) {
            continue;
        }
        let Ok(d) = store.open_vdi(name) else {
            continue;
        };
        let mut buf = vec![0u8; DISK as usize];
        if d.read(&mut buf, 0).is_err() {
            continue;
        }
        // The last flushed state: an older one would be a flushed write
        // lost (a header gone back a generation, served as if nothing
        // happened).
        assert!(
            states.last() == Some(&buf),
            "{what}: disk {name} does not read as it was last flushed{}",
            if states.contains(&buf) {
                " (it reads as an earlier flush)"
            } else {
                ""
            }
        );
        out.insert(name.clone(), buf);
    }
    if let Ok(view) = store.open_snapshot("a", "s") {
        let mut buf = vec![0u8; DISK as usize];
        if view.read(&mut buf, 0).is_ok() {
            assert!(buf == h.snapshot, "{what}: snapshot a@s changed");
            out.insert("a@s".into(), buf);
        }
    }
    out
}

fn run(seed: u8, kind: u8, which: u16, how: u8, bits: u64) {
    let h = history(seed);
    let candidates = blocks_of_kind(&h.image, kind);
    if candidates.is_empty() {
        return;
    }
    let addr = candidates[which as usize % candidates.len()];
    let mut image = h.image.clone();
    damage(&h, &mut image, addr, how, bits);
    let what = format!("kind {kind} block {addr} damage {how}");
    let dev = Arc::new(MemDevice::from_bytes(image));
    let Ok(store) = Store::open(dev, &OpenOptions::default()) else {
        return;
    };
    let before = served(&store, &h, &what, &[]);
    if store.gc().is_ok() {
        let after = served(&store, &h, &format!("{what}, after gc"), &[]);
        for (name, content) in &before {
            assert!(
                after.get(name) == Some(content),
                "{what}: gc changed or lost {name}"
            );
        }
    }
    // A write to each disk in turn; whatever is accepted, the disks not
    // written yet read as before.
    let mut written = Vec::new();
    for name in h.states.keys() {
        let Ok(d) = store.open_vdi(name) else {
            continue;
        };
        if d.write(&[0xa5; 8192], 900_000).is_err() || d.flush().is_err() {
            continue;
        }
        written.push(name.clone());
        let now = served(
            &store,
            &h,
            &format!("{what}, after writing {written:?}"),
            &written,
        );
        for (other, content) in before.iter().filter(|(o, _)| !written.contains(o)) {
            assert!(
                now.get(other) == Some(content),
                "{what}: writing {name} changed {other}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn damaged_metadata_never_serves_wrong_data(
        seed in any::<u8>(),
        kind in 1u8..=6,
        which in any::<u16>(),
        how in 0u8..4,
        bits in any::<u64>(),
    ) {
        run(seed, kind, which, how, bits);
    }
}

/// Every kind and every damage, at the newest block of the kind (the one
/// the current state depends on most).
#[test]
fn every_kind_and_damage_at_the_newest_blocks() {
    for kind in 1u8..=6 {
        for how in 0u8..4 {
            for which in 0..4u16 {
                run(7, kind, which.wrapping_neg(), how, 0x1234_5678_9abc_def0);
            }
        }
    }
}
