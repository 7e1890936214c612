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
//! - if a write is accepted, every other disk still reads the same;
//! - `repair` (run on the damaged image, with the decisions an operator
//!   would make: serve a disk at an intact generation, else forget it)
//!   leaves a store that opens undamaged and checks clean, where every
//!   disk it did not ask about reads as last flushed, every disk served
//!   at an older generation reads block by block as one of its flushed
//!   states (never another disk's data), and `gc` and writes change
//!   nothing else.
//!
//! `PROPTEST_CASES=5000 cargo test -p parallax-engine --test corruption`
//! runs it longer.

mod common;

use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{CreateOptions, OpenOptions, ReadDisk, RepairOptions, Store};
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
/// 2 tear, 3 put back an older content of that address, 4 for a
/// superblock or bitmap: put back both copies as an earlier image held
/// them, both lost writes; else as 3).
fn damage(h: &History, image: &mut [u8], kind: u8, addr: usize, how: u8, bits: u64) {
    if how == 4 && (kind == 1 || kind == 2) {
        // Both copies of the pair (superblocks 0 and 1; an extent's
        // bitmap slots, at an even address and the next one here).
        let earlier = &h.earlier[bits as usize % h.earlier.len()];
        let pair = addr & !1;
        image[pair * 4096..(pair + 2) * 4096]
            .copy_from_slice(&earlier[pair * 4096..(pair + 2) * 4096]);
        return;
    }
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
    damage(&h, &mut image, kind, addr, how, bits);
    let what = format!("kind {kind} block {addr} damage {how}");
    repaired(&h, image.clone(), &what);
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

/// Plans a repair of `image`, decides as an operator would (serve each
/// disk asked about at its newest intact, servable generation that is not
/// blamed for sharing; forget it otherwise), applies it, and checks the
/// result.
fn repaired(h: &History, image: Vec<u8>, what: &str) {
    let dev = Arc::new(MemDevice::from_bytes(image));
    let Ok(store) = Store::open(dev.clone(), &OpenOptions::default()) else {
        return;
    };
    let mut options = RepairOptions::default();
    let plan = store.repair(&options).unwrap();
    if !plan.needed() {
        assert!(
            store.damage().is_none(),
            "{what}: the store is damaged ({:?}) but repair finds nothing to do",
            store.damage()
        );
        return;
    }
    options.apply = true;
    let mut report = store.repair(&options).unwrap();
    for _ in 0..4 {
        if report.applied {
            break;
        }
        for d in report.undecided() {
            let intact = d.copies.iter().filter(|c| {
                c.servable
                    && c.unreadable.is_empty()
                    && !d
                        .decision
                        .as_deref()
                        .unwrap_or("")
                        .contains("reached by disk")
            });
            match intact.filter_map(|c| c.generation.clone().ok()).max() {
                Some(g) if !options.use_generation.contains_key(&d.name) => {
                    options.use_generation.insert(d.name.clone(), g);
                }
                _ => {
                    options.use_generation.remove(&d.name);
                    options.forget.insert(d.name.clone());
                }
            }
        }
        report = store.repair(&options).unwrap();
    }
    assert!(
        report.applied,
        "{what}: repair was not applied: {report:#?}"
    );
    let asked: Vec<&str> = report.disks.iter().map(|d| d.name.as_str()).collect();
    drop(store);
    let store = Store::open(dev, &OpenOptions::default()).unwrap();
    assert_eq!(store.damage(), None, "{what}: damaged after repair");
    let check = store.check().unwrap();
    assert!(check.is_clean(), "{what}: check after repair: {check:?}");
    let read_all = |store: &Store, stage: &str| {
        let mut out = BTreeMap::new();
        for (name, states) in &h.states {
            if options.forget.contains(name) {
                assert!(
                    store.open_vdi(name).is_err(),
                    "{what}: {name} was forgotten"
                );
                continue;
            }
            let mut buf = vec![0u8; DISK as usize];
            let read = store.open_vdi(name).and_then(|d| d.read(&mut buf, 0));
            if !asked.contains(&name.as_str()) {
                read.unwrap();
                assert!(
                    states.last() == Some(&buf),
                    "{what}, {stage}: disk {name}, not asked about, does not read as last flushed"
                );
            } else if read.is_ok() {
                for (i, block) in buf.chunks(4096).enumerate() {
                    assert!(
                        states.iter().any(|s| &s[i * 4096..(i + 1) * 4096] == block),
                        "{what}, {stage}: disk {name} block {i} is none of its flushed contents"
                    );
                }
            }
            out.insert(name.clone(), buf);
        }
        out
    };
    let before = read_all(&store, "after repair");
    if !options.forget.contains("a") && !asked.contains(&"a") {
        let mut buf = vec![0u8; DISK as usize];
        store
            .open_snapshot("a", "s")
            .unwrap()
            .read(&mut buf, 0)
            .unwrap();
        assert!(buf == h.snapshot, "{what}: snapshot a@s changed by repair");
    }
    store.gc().unwrap();
    assert_eq!(
        before,
        read_all(&store, "after gc"),
        "{what}: gc after repair changed a disk"
    );
    for name in before.keys() {
        let d = store.open_vdi(name).unwrap();
        d.write(&[0x5a; 8192], 950_000).unwrap();
        d.flush().unwrap();
    }
    let mut buf = vec![0u8; DISK as usize];
    for (name, content) in &before {
        store.open_vdi(name).unwrap().read(&mut buf, 0).unwrap();
        assert_eq!(
            buf[..950_000],
            content[..950_000],
            "{what}: writes after repair changed {name}"
        );
    }
    let check = store.check().unwrap();
    assert!(
        check.is_clean(),
        "{what}: check after repair and writes: {check:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(200), ..ProptestConfig::default() })]
    #[test]
    fn damaged_metadata_never_serves_wrong_data(
        seed in any::<u8>(),
        kind in 1u8..=6,
        which in any::<u16>(),
        how in 0u8..5,
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
        for how in 0u8..5 {
            for which in 0..4u16 {
                run(7, kind, which.wrapping_neg(), how, 0x1234_5678_9abc_def0);
            }
        }
    }
}

/// The newest header copy of a disk is lost: the store refuses the disk,
/// and repair writes nothing until the operator names the generation to
/// serve it at; then the disk is served again, and everything checks.
#[test]
fn repair_asks_before_serving_an_older_generation() {
    use parallax_format::VdiHeader;
    let dev = Arc::new(MemDevice::new(STORE));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    let a = store.create_vdi("a", DISK).unwrap();
    let b = store.create_vdi("b", DISK).unwrap();
    b.write(&pattern(9, 65536), 0).unwrap();
    for round in 0..3u8 {
        a.write(&pattern(round, 200_000), 4096 * u64::from(round))
            .unwrap();
        store.flush_all().unwrap();
    }
    drop((a, b, store));
    let mut img = image(&dev);
    let copies: Vec<(usize, VdiHeader)> = blocks_of_kind(&img, 4)
        .into_iter()
        .filter_map(|addr| {
            let h =
                VdiHeader::decode(&img[addr * 4096..(addr + 1) * 4096], addr as u64, None).ok()?;
            (h.name == "a").then_some((addr, h))
        })
        .collect();
    assert_eq!(copies.len(), 2);
    let (newest, older) = if copies[0].1.generation > copies[1].1.generation {
        (&copies[0], &copies[1])
    } else {
        (&copies[1], &copies[0])
    };
    img[newest.0 * 4096..(newest.0 + 1) * 4096].fill(0);
    let damaged = img.clone();
    let dev = Arc::new(MemDevice::from_bytes(img));
    let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
    assert!(store.damage().is_some());
    assert!(store.open_vdi("a").is_err());
    assert!(store.gc().is_err(), "gc must refuse a damaged store");
    let mut options = RepairOptions {
        apply: true,
        ..RepairOptions::default()
    };
    let report = store.repair(&options).unwrap();
    assert!(!report.applied);
    let undecided: Vec<&str> = report.undecided().iter().map(|d| d.name.as_str()).collect();
    assert_eq!(undecided, ["a"]);
    assert_eq!(image(&dev), damaged, "repair wrote without a decision");
    options
        .use_generation
        .insert("a".into(), older.1.generation);
    let report = store.repair(&options).unwrap();
    assert!(report.applied, "{report:?}");
    drop(store);
    let store = Store::open(dev, &OpenOptions::default()).unwrap();
    assert_eq!(store.damage(), None);
    let check = store.check().unwrap();
    assert!(check.is_clean(), "{check:?}");
    let mut buf = vec![0u8; 65536];
    store.open_vdi("b").unwrap().read(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(9, 65536));
    let a = store.open_vdi("a").unwrap();
    a.read(&mut buf, 0).unwrap();
    a.write(&[1; 4096], 0).unwrap();
    a.flush().unwrap();
    store.gc().unwrap();
    assert!(store.check().unwrap().is_clean());
}

/// Both bitmap copies of an extent are lost: without them nothing says
/// which blocks are in use, so the store takes no writes (before, it
/// loaded the extent as empty and allocated over live data); repair
/// rebuilds the bitmap from the metadata, with no decision to make.
#[test]
fn an_extent_without_bitmaps_is_damage_and_repair_rebuilds_it() {
    // Extents of 64 blocks: the disk's data fills several, its tree nodes
    // (allocated at commit) come after; extent 1 holds data only, so no
    // header's root or top node is there to give the loss away.
    let dev = Arc::new(MemDevice::new(STORE));
    let options = CreateOptions {
        extent_data_blocks: 64,
        ..CreateOptions::default()
    };
    let store = Store::create(dev.clone(), &options).unwrap();
    let a = store.create_vdi("a", DISK).unwrap();
    let data = pattern(5, DISK as usize);
    a.write(&data, 0).unwrap();
    a.flush().unwrap();
    drop(a);
    drop(store);
    let mut img = image(&dev);
    let extent1 = 2 + 66;
    img[extent1 * 4096..(extent1 + 2) * 4096].fill(0);
    let dev = Arc::new(MemDevice::from_bytes(img));
    let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
    assert!(
        store.damage().is_some(),
        "an extent without bitmaps went unnoticed"
    );
    assert!(store.create_vdi("b", DISK).is_err());
    assert!(!store.check().unwrap().is_clean());
    assert!(store.gc().is_err());
    let report = store
        .repair(&RepairOptions {
            apply: true,
            ..RepairOptions::default()
        })
        .unwrap();
    assert_eq!(report.lost_bitmaps, [1]);
    assert!(
        report.applied && report.undecided().is_empty(),
        "{report:?}"
    );
    drop(store);
    let store = Store::open(dev, &OpenOptions::default()).unwrap();
    assert_eq!(store.damage(), None);
    let check = store.check().unwrap();
    assert!(check.is_clean() && check.leaked_blocks == 0, "{check:?}");
    let b = store.create_vdi("b", DISK).unwrap();
    b.write(&pattern(6, DISK as usize), 0).unwrap();
    b.flush().unwrap();
    let mut buf = vec![0u8; DISK as usize];
    store.open_vdi("a").unwrap().read(&mut buf, 0).unwrap();
    assert!(buf == data, "disk a changed");
}
