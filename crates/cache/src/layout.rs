//! The cache device's layout: a superblock, an index of 64-byte entries
//! (one per slot), then the 4 KiB slots.
//!
//! ```text
//! block 0                 superblock (magic, version, store id, slot count, crc32c)
//! blocks 1 ..= I          index: entry k of block b describes slot 64·(b−1) + k
//! blocks I+1 ..           slots: 4 KiB copies of pool blocks
//! ```
//!
//! An index entry is `addr, vdi, snap, created_ns` (u64 each), the crc32c
//! of the slot's contents keyed by those four (see [`data_crc`]), 24
//! reserved bytes and the crc32c of the entry's first 60 bytes. An entry
//! whose own crc fails, or whose `addr` is 0, describes nothing. Nothing
//! on the device is ever trusted without its crc: a torn or stale index
//! entry or slot is a miss, never wrong data.

use crate::Anchor;

/// Bytes per block, per slot and per index block.
pub const BLOCK: usize = 4096;
/// Index entries per index block.
pub const ENTRIES_PER_BLOCK: usize = BLOCK / ENTRY_BYTES;
/// Bytes per index entry.
pub const ENTRY_BYTES: usize = 64;

const MAGIC: &[u8; 8] = b"PXRCACHE";
const VERSION: u32 = 1;

/// Where things are on a cache device of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub slots: u64,
    pub index_blocks: u64,
}

impl Geometry {
    /// The most slots a device of `len` bytes holds with their index.
    /// `None` when it is too small for one index block and one slot.
    pub fn for_len(len: u64) -> Option<Geometry> {
        let blocks = len / BLOCK as u64;
        // Each index block serves 64 slots: 65 blocks per 64 slots.
        let usable = blocks.checked_sub(1)?;
        let per = ENTRIES_PER_BLOCK as u64;
        let mut slots = usable * per / (per + 1);
        // Slot numbers are u32.
        slots = slots.min(u32::MAX as u64);
        let index_blocks = slots.div_ceil(per);
        (slots > 0 && 1 + index_blocks + slots <= blocks).then_some(Geometry {
            slots,
            index_blocks,
        })
    }

    /// Byte offset of slot `slot`.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        (1 + self.index_blocks + slot as u64) * BLOCK as u64
    }

    /// Byte offset of index block `b` (0-based).
    pub fn index_offset(&self, b: u64) -> u64 {
        (1 + b) * BLOCK as u64
    }
}

/// The superblock's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The pool store this cache holds blocks of.
    pub store_id: u64,
    pub geometry: Geometry,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.store_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.geometry.slots.to_le_bytes());
        b[32..40].copy_from_slice(&self.geometry.index_blocks.to_le_bytes());
        let crc = crc32c::crc32c(&b[..BLOCK - 4]);
        b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` for anything but an intact superblock of this version.
    pub fn decode(b: &[u8]) -> Option<Superblock> {
        if b.len() < BLOCK || &b[0..8] != MAGIC || u32_at(b, 8) != VERSION {
            return None;
        }
        if crc32c::crc32c(&b[..BLOCK - 4]) != u32_at(b, BLOCK - 4) {
            return None;
        }
        Some(Superblock {
            store_id: u64_at(b, 16),
            geometry: Geometry {
                slots: u64_at(b, 24),
                index_blocks: u64_at(b, 32),
            },
        })
    }
}

/// One index entry: slot contents are pool block `addr` as version
/// `anchor` held it, with `crc` = [`data_crc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub addr: u64,
    pub anchor: Anchor,
    pub crc: u32,
}

impl IndexEntry {
    pub fn encode(&self, out: &mut [u8]) {
        out[..ENTRY_BYTES].fill(0);
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.anchor.vdi.to_le_bytes());
        out[16..24].copy_from_slice(&self.anchor.snap.to_le_bytes());
        out[24..32].copy_from_slice(&self.anchor.created_ns.to_le_bytes());
        out[32..36].copy_from_slice(&self.crc.to_le_bytes());
        let check = crc32c::crc32c(&out[..ENTRY_BYTES - 4]);
        out[ENTRY_BYTES - 4..ENTRY_BYTES].copy_from_slice(&check.to_le_bytes());
    }

    /// `None` for an empty, torn or corrupt entry.
    pub fn decode(b: &[u8]) -> Option<IndexEntry> {
        let b = &b[..ENTRY_BYTES];
        if crc32c::crc32c(&b[..ENTRY_BYTES - 4]) != u32_at(b, ENTRY_BYTES - 4) {
            return None;
        }
        let addr = u64_at(b, 0);
        (addr != 0).then(|| IndexEntry {
            addr,
            anchor: Anchor {
                vdi: u64_at(b, 8),
                snap: u64_at(b, 16),
                created_ns: u64_at(b, 24),
            },
            crc: u32_at(b, 32),
        })
    }
}

/// The crc32c a slot's contents are checked with: over the block's pool
/// address and anchor, then its bytes. A slot read back for another
/// address or anchor fails it as surely as a corrupted one.
pub fn data_crc(addr: u64, anchor: &Anchor, data: &[u8]) -> u32 {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&addr.to_le_bytes());
    key[8..16].copy_from_slice(&anchor.vdi.to_le_bytes());
    key[16..24].copy_from_slice(&anchor.snap.to_le_bytes());
    key[24..32].copy_from_slice(&anchor.created_ns.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&key), data)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_the_device_and_wastes_little() {
        assert_eq!(Geometry::for_len(BLOCK as u64), None);
        assert_eq!(Geometry::for_len(2 * BLOCK as u64), None);
        for mib in [1u64, 3, 64, 1000, 4096] {
            let len = mib << 20;
            let g = Geometry::for_len(len).unwrap();
            let blocks = len / BLOCK as u64;
            assert!(
                1 + g.index_blocks + g.slots <= blocks,
                "{g:?} overflows {mib} MiB"
            );
            assert!(g.index_blocks * ENTRIES_PER_BLOCK as u64 >= g.slots);
            assert!(
                blocks - (1 + g.index_blocks + g.slots) <= 2,
                "{g:?} wastes blocks"
            );
            assert!(g.slot_offset(g.slots as u32 - 1) + BLOCK as u64 <= len);
        }
    }

    proptest::proptest! {
        /// Any bytes: the decoders answer, never panic, and what they
        /// accept encodes back to the same bytes (so nothing but a sealed
        /// entry or superblock is ever believed).
        #[test]
        fn decoders_take_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), BLOCK)) {
            if let Some(e) = IndexEntry::decode(&bytes) {
                let mut back = [0u8; ENTRY_BYTES];
                e.encode(&mut back);
                proptest::prop_assert_eq!(&back[..36], &bytes[..36]);
                proptest::prop_assert_eq!(&back[60..], &bytes[60..ENTRY_BYTES]);
            }
            if let Some(sb) = Superblock::decode(&bytes) {
                proptest::prop_assert_eq!(Superblock::decode(&sb.encode()), Some(sb));
            }
        }
    }

    #[test]
    fn entries_and_superblocks_round_trip_and_detect_damage() {
        let e = IndexEntry {
            addr: 77,
            anchor: Anchor {
                vdi: 3,
                snap: 9,
                created_ns: 123_456,
            },
            crc: 0xdead_beef,
        };
        let mut b = [0u8; ENTRY_BYTES];
        e.encode(&mut b);
        assert_eq!(IndexEntry::decode(&b), Some(e));
        for byte in 0..ENTRY_BYTES {
            let mut torn = b;
            torn[byte] ^= 0x10;
            assert_eq!(
                IndexEntry::decode(&torn),
                None,
                "byte {byte} flipped went unseen"
            );
        }
        assert_eq!(IndexEntry::decode(&[0u8; ENTRY_BYTES]), None);
        let sb = Superblock {
            store_id: 42,
            geometry: Geometry::for_len(8 << 20).unwrap(),
        };
        let mut enc = sb.encode();
        assert_eq!(Superblock::decode(&enc), Some(sb));
        enc[20] ^= 1;
        assert_eq!(Superblock::decode(&enc), None);
    }
}
