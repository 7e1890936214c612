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
