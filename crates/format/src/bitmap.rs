//! Extent allocation bitmaps.
//!
//! Each extent starts with two bitmap slots (A at the extent's first block,
//! B at the next); data blocks follow. A bitmap slot:
//!
//! ```text
//! offset size field
//!      0   64 common header (kind 2, owner = host id holding the extent,
//!             0 = unowned; generation = slot generation)
//!     64    8 extent_index
//!     72    8 data_blocks   number of meaningful bits
//!     80   48 reserved      0
//!    128 3968 bits          bit i (byte i/8, bit i%8) set = data block i allocated
//! ```
//!
//! Slots are written alternately like the superblock: an update goes to the
//! slot with the lower generation (or an invalid slot); opening takes the
//! valid slot with the higher generation. A never-written (all-zero) extent
//! has no valid slot and means "unowned, all free".

use crate::bytes::*;
use crate::{zeroed_block, Block, FormatError, Kind, MetaHeader};

const BITS_OFF: usize = 128;
/// Bits in one bitmap slot: the most data blocks an extent can have.
pub const BITMAP_BITS: usize = (crate::BLOCK_SIZE - BITS_OFF) * 8;

/// A decoded bitmap slot.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BitmapBlock {
    pub owner: u64,
    pub generation: u64,
    pub extent_index: u64,
    pub data_blocks: u64,
    /// `BITMAP_BITS / 8` bytes.
    pub bits: Vec<u8>,
}

impl BitmapBlock {
    /// An all-free bitmap.
    pub fn empty(extent_index: u64, data_blocks: u64) -> Self {
        BitmapBlock {
            owner: 0,
            generation: 0,
            extent_index,
            data_blocks,
            bits: vec![0; BITMAP_BITS / 8],
        }
    }

    pub fn get(&self, i: u64) -> bool {
        self.bits
            .get((i / 8) as usize)
            .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
    }

    pub fn set(&mut self, i: u64, on: bool) {
        if let Some(byte) = self.bits.get_mut((i / 8) as usize) {
            if on {
                *byte |= 1 << (i % 8);
            } else {
                *byte &= !(1 << (i % 8));
            }
        }
    }

    /// The first index in `from..to` of `n` (≥ 1) consecutive clear bits,
    /// if any. Aligned 64-bit words are taken at once where they are full or
    /// empty, or, for runs longer than a word, where only their ends can
    /// matter; so a scan costs about a step per word, not per bit.
    pub fn find_clear_run(&self, from: u64, to: u64, n: u64) -> Option<u64> {
        debug_assert!(n >= 1);
        let to = to.min(self.bits.len() as u64 * 8);
        let mut run = 0u64;
        let mut i = from;
        while i < to {
            if i.is_multiple_of(64) && i + 64 <= to {
                let at = (i / 8) as usize;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.bits[at..at + 8]);
                let word = u64::from_le_bytes(bytes);
                // Bit k of `word` is bit i + k of the bitmap.
                if word == u64::MAX {
                    run = 0;
                    i += 64;
                    continue;
                }
                if word == 0 {
                    run += 64;
                    i += 64;
                    if run >= n {
                        return Some(i - run);
                    }
                    continue;
                }
                let leading_clear = u64::from(word.trailing_zeros());
                if run + leading_clear >= n {
                    return Some(i - run);
                }
                if n > 64 {
                    // A run inside the word is too short: only its last
                    // clear bits can start the next run.
                    run = u64::from(word.leading_zeros());
                    i += 64;
                    continue;
                }
            }
            if self.get(i) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(i + 1 - n);
                }
            }
            i += 1;
        }
        None
    }

    /// Number of allocated blocks.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| b.count_ones() as u64).sum()
    }

    pub fn encode(&self, store_id: u64, addr: u64) -> (Box<Block>, u32) {
        let mut b = zeroed_block();
        put_u64(&mut b[..], 64, self.extent_index);
        put_u64(&mut b[..], 72, self.data_blocks);
        let n = self.bits.len().min(BITMAP_BITS / 8);
        b[BITS_OFF..BITS_OFF + n].copy_from_slice(&self.bits[..n]);
        let crc = MetaHeader {
            kind: Kind::Bitmap,
            level: 0,
            store_id,
            self_addr: addr,
            owner: self.owner,
            generation: self.generation,
        }
        .seal(&mut b);
        (b, crc)
    }

    pub fn decode(block: &[u8], addr: u64, store_id: Option<u64>) -> Result<Self, FormatError> {
        let (h, _) = MetaHeader::open(block, Kind::Bitmap, addr, store_id)?;
        let data_blocks = get_u64(block, 72);
        if data_blocks > BITMAP_BITS as u64 {
            return Err(FormatError::field(addr, "bitmap data_blocks too large"));
        }
        let bm = BitmapBlock {
            owner: h.owner,
            generation: h.generation,
            extent_index: get_u64(block, 64),
            data_blocks,
            bits: block[BITS_OFF..].to_vec(),
        };
        if (data_blocks..BITMAP_BITS as u64).any(|i| bm.get(i)) {
            return Err(FormatError::field(
                addr,
                "bitmap has bits set past data_blocks",
            ));
        }
        Ok(bm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-skipping scan finds what a bit-by-bit scan finds, on
    /// bitmaps mixing full, empty and partial words, for any range.
    #[test]
    fn find_clear_run_matches_a_bit_by_bit_scan() {
        use proptest::prelude::*;
        let naive = |b: &BitmapBlock, from: u64, to: u64, n: u64| {
            let mut run = 0;
            for i in from..to {
                if b.get(i) {
                    run = 0;
                } else {
                    run += 1;
                    if run == n {
                        return Some(i + 1 - n);
                    }
                }
            }
            None
        };
        // Words that are empty, full, random, or random with their low or
        // high bits clear (so that long runs straddle partial words).
        let word = prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            any::<u64>(),
            (any::<u64>(), 1u32..64).prop_map(|(w, k)| w << k),
            (any::<u64>(), 1u32..64).prop_map(|(w, k)| w >> k),
        ];
        proptest!(|(words in proptest::collection::vec(word, 1..16),
                    from in 0u64..1100, len in 0u64..1100, n in 1u64..200)| {
            let mut b = BitmapBlock::empty(0, BITMAP_BITS as u64);
            for (k, w) in words.iter().enumerate() {
                b.bits[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            // Only the first words vary: keep the range where they are.
            let bits = words.len() as u64 * 64;
            let from = from % (bits + 1);
            let to = (from + len).min(bits + 70);
            prop_assert_eq!(b.find_clear_run(from, to, n), naive(&b, from, to, n));
        });
    }

    #[test]
    fn round_trip() {
        let mut bm = BitmapBlock::empty(4, 100);
        bm.owner = 1;
        bm.generation = 2;
        bm.set(0, true);
        bm.set(99, true);
        bm.set(50, true);
        bm.set(50, false);
        assert_eq!(bm.count(), 2);
        let (b, _) = bm.encode(9, 1000);
        let back = BitmapBlock::decode(&b[..], 1000, Some(9)).unwrap();
        assert_eq!(back, bm);
        let mut bad = bm.clone();
        bad.set(100, true);
        let (b, _) = bad.encode(9, 1000);
        assert!(BitmapBlock::decode(&b[..], 1000, Some(9)).is_err());
    }
}
