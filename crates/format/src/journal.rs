//! Entry journal blocks: a disk's level-0 changes since its last checkpoint.
//!
//! Between two checkpoints, a disk's changes to level-0 tree entries are not
//! folded into copied leaves: they are appended as 16-byte records to the
//! disk's *entry journal*, a chain of blocks from newest to oldest (`prev`),
//! headed by the VDI header's `journal_head`. A chain starts at a checkpoint
//! (its oldest block's `prev` is null), and a version of the disk is its
//! base tree plus the records of its chain, applied oldest first (a later
//! record for the same virtual block wins). Appending copies the head block
//! to a new location with the new records (or starts a new head when it is
//! full), so a block that a durable header or snapshot names never changes:
//! a snapshot taken between checkpoints names its head, and that chain holds
//! exactly the records made before it.
//!
//! ```text
//! block:  0 common header (kind 7, version 2, owner = vdi_id,
//!           generation = VDI commit generation)
//!        64 8 prev     Ptr to the previous (older) journal block, or null
//!        72 8 first    index of this block's first record in its chain
//!                      (the oldest block's is 0)
//!        80 4 count    records used (0..=248)
//!        84 44 reserved
//!       128 records[248] of 16 bytes
//! record: offset size field
//!              0    8 vblock   virtual block number (< 504^4); upper bits 0
//!              8    8 ptr      Ptr to the data block (no check bits), or
//!                              null: the block is unmapped (discarded)
//! ```

use crate::bytes::*;
use crate::{zeroed_block, Block, FormatError, Kind, MetaHeader, Ptr, FAN_OUT, TREE_HEIGHT};

/// Records per journal block.
pub const JOURNAL_RECORDS_PER_BLOCK: usize = 248;
const RECORDS_OFF: usize = 128;
const RECORD_LEN: usize = 16;
/// Format version journal blocks are written with (and that a store's
/// superblock carries once any of its disks has a journal).
pub const JOURNAL_FORMAT_VERSION: u16 = 2;

/// One journal record: level-0 entry `vblock` became `ptr`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct JournalRecord {
    pub vblock: u64,
    pub ptr: Ptr,
}

/// A decoded journal block.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct JournalBlock {
    pub prev: Ptr,
    /// Index of `records[0]` in the chain.
    pub first: u64,
    pub records: Vec<JournalRecord>,
}

/// Virtual blocks one tree addresses: 504^4.
fn max_vblocks() -> u64 {
    (FAN_OUT as u64).pow(TREE_HEIGHT as u32)
}

impl JournalBlock {
    /// Records in the chain up to and including this block.
    pub fn chain_len(&self) -> u64 {
        self.first + self.records.len() as u64
    }

    /// Whether another record fits.
    pub fn is_full(&self) -> bool {
        self.records.len() >= JOURNAL_RECORDS_PER_BLOCK
    }

    /// Encodes and seals the block for address `addr`. Returns the block and its crc.
    pub fn encode(
        &self,
        store_id: u64,
        addr: u64,
        owner: u64,
        generation: u64,
    ) -> (Box<Block>, u32) {
        let mut b = zeroed_block();
        put_u64(&mut b[..], 64, self.prev.0);
        put_u64(&mut b[..], 72, self.first);
        let n = self.records.len().min(JOURNAL_RECORDS_PER_BLOCK);
        put_u32(&mut b[..], 80, n as u32);
        for (i, r) in self.records.iter().take(n).enumerate() {
            let o = RECORDS_OFF + i * RECORD_LEN;
            put_u64(&mut b[..], o, r.vblock);
            put_u64(&mut b[..], o + 8, r.ptr.0);
        }
        let crc = MetaHeader {
            kind: Kind::Journal,
            level: 0,
            store_id,
            self_addr: addr,
            owner,
            generation,
        }
        .seal_as(&mut b, JOURNAL_FORMAT_VERSION);
        (b, crc)
    }

    /// Decodes and validates a journal block read from `addr`.
    pub fn decode(
        block: &[u8],
        addr: u64,
        store_id: Option<u64>,
    ) -> Result<(Self, MetaHeader, u32), FormatError> {
        let (h, crc) = MetaHeader::open(block, Kind::Journal, addr, store_id)?;
        let prev = Ptr(get_u64(block, 64));
        let first = get_u64(block, 72);
        let count = get_u32(block, 80) as usize;
        if count > JOURNAL_RECORDS_PER_BLOCK || !prev.is_valid() || h.level != 0 {
            return Err(FormatError::field(
                addr,
                "journal count, level or prev pointer malformed",
            ));
        }
        if prev.is_null() != (first == 0) {
            return Err(FormatError::field(
                addr,
                "journal block: only a chain's oldest block starts at record 0",
            ));
        }
        let mut records = Vec::with_capacity(count);
        for i in 0..count {
            let o = RECORDS_OFF + i * RECORD_LEN;
            let r = JournalRecord {
                vblock: get_u64(block, o),
                ptr: Ptr(get_u64(block, o + 8)),
            };
            if r.vblock >= max_vblocks() || !r.ptr.is_valid() || r.ptr.check() != 0 {
                return Err(FormatError::field(
                    addr,
                    format!("journal record {i} is malformed"),
                ));
            }
            records.push(r);
        }
        Ok((
            JournalBlock {
                prev,
                first,
                records,
            },
            h,
            crc,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JournalBlock {
        JournalBlock {
            prev: Ptr::meta(5, 77, false),
            first: 248,
            records: vec![
                JournalRecord {
                    vblock: 0,
                    ptr: Ptr::data(900, true),
                },
                JournalRecord {
                    vblock: max_vblocks() - 1,
                    ptr: Ptr::NULL,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_version() {
        let j = sample();
        let (b, crc) = j.encode(1, 40, 2, 3);
        assert_eq!(crate::header::block_version(&b[..]), JOURNAL_FORMAT_VERSION);
        let (back, h, c) = JournalBlock::decode(&b[..], 40, Some(1)).unwrap();
        assert_eq!(back, j);
        assert_eq!(back.chain_len(), 250);
        assert_eq!((h.owner, h.generation, c), (2, 3, crc));
        let full = JournalBlock {
            prev: Ptr::NULL,
            first: 0,
            records: vec![j.records[0]; JOURNAL_RECORDS_PER_BLOCK],
        };
        assert!(full.is_full());
        let (b, _) = full.encode(1, 41, 2, 3);
        assert_eq!(JournalBlock::decode(&b[..], 41, Some(1)).unwrap().0, full);
    }

    /// Every malformed field is refused, never returned as records.
    #[test]
    fn malformed_blocks_are_refused() {
        let reseal = |edit: &dyn Fn(&mut Block)| {
            let (mut b, _) = sample().encode(1, 40, 2, 3);
            edit(&mut b);
            MetaHeader {
                kind: Kind::Journal,
                level: 0,
                store_id: 1,
                self_addr: 40,
                owner: 2,
                generation: 3,
            }
            .seal_as(&mut b, JOURNAL_FORMAT_VERSION);
            JournalBlock::decode(&b[..], 40, Some(1))
        };
        type Edit<'a> = &'a dyn Fn(&mut Block);
        let cases: [(&str, Edit); 5] = [
            ("count", &|b| put_u32(&mut b[..], 80, 249)),
            ("vblock", &|b| {
                put_u64(&mut b[..], RECORDS_OFF, max_vblocks())
            }),
            ("check bits on a data pointer", &|b| {
                put_u64(&mut b[..], RECORDS_OFF + 8, Ptr::meta(9, 5, true).0)
            }),
            ("first with no prev", &|b| put_u64(&mut b[..], 64, 0)),
            ("prev with first 0", &|b| put_u64(&mut b[..], 72, 0)),
        ];
        for (what, edit) in cases {
            assert!(reseal(edit).is_err(), "{what} was accepted");
        }
        let (b, _) = sample().encode(1, 40, 2, 3);
        assert!(matches!(
            crate::LogBlock::decode(&b[..], 40, Some(1)),
            Err(FormatError::WrongKind { .. })
        ));
    }
}
