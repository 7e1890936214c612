//! The superblock, kept in two copies at blocks 0 and 1.
//!
//! ```text
//! offset size field
//!      0   64 common header (kind 1, owner 0, generation = superblock generation;
//!              version 2 once a disk of the store has an entry journal)
//!     64    8 total_blocks        size of the store in 4 KiB blocks
//!     72    8 extent_data_blocks  data blocks per extent (D, at most 31744)
//!     80    8 extent_count        number of extents
//!     88    8 first_extent        block number of extent 0 (2)
//!     96    8 next_vdi_id         next VDI id to hand out (ids start at 1)
//!    104    8 created_ns          creation time, ns since the Unix epoch
//!    112    8 write_log_id        non-zero: newer writes of this store may be
//!                                 in the local write-back log with this id
//!                                 (set before the log takes a record, cleared
//!                                 after it was drained); a version that does
//!                                 not have that log must not open the store
//!    120    8 write_log_locator   where that log is (the cache's size in
//!                                 bytes), for messages; 0 with no log
//!    128 3968 registry[496]       Ptr to registry blocks (null = unused slot)
//! ```
//!
//! The superblock has no room left for feature flags: a store one of whose
//! disks may have an entry journal (format 2) says so by the version of its
//! superblock copies, which a version-1 binary refuses, so that it never
//! opens a disk while ignoring its journal.
//!
//! The two copies are written alternately (ping-pong): an update goes to the
//! copy with the lower generation, after the other copy is durable. Opening
//! picks the valid copy with the highest generation.

use crate::bytes::*;
use crate::header::{block_version, BASE_FORMAT_VERSION};
use crate::{
    zeroed_block, Block, FormatError, Kind, MetaHeader, Ptr, BITMAP_BITS, JOURNAL_FORMAT_VERSION,
};

/// Where the two superblock copies live.
pub const SUPERBLOCK_ADDRS: [u64; 2] = [0, 1];
/// Registry block pointers held by the superblock.
pub const SUPERBLOCK_REGISTRY_SLOTS: usize = 496;
const REGISTRY_OFF: usize = 128;

/// The decoded superblock.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Superblock {
    pub store_id: u64,
    pub generation: u64,
    pub total_blocks: u64,
    pub extent_data_blocks: u64,
    pub extent_count: u64,
    pub first_extent: u64,
    pub next_vdi_id: u64,
    pub created_ns: u64,
    /// See the layout above: 0, or the write-back log the store needs.
    pub write_log_id: u64,
    pub write_log_locator: u64,
    pub registry: Vec<Ptr>,
    /// Disks of the store may have entry journals: the copy is written as
    /// format version 2 (see the module documentation).
    pub journaled: bool,
}

impl Superblock {
    /// Blocks taken by one extent: two bitmap slots and the data blocks.
    pub fn extent_blocks(&self) -> u64 {
        self.extent_data_blocks + 2
    }

    /// Encodes and seals this superblock for copy `addr` (0 or 1).
    pub fn encode(&self, addr: u64) -> (Box<Block>, u32) {
        let mut b = zeroed_block();
        put_u64(&mut b[..], 64, self.total_blocks);
        put_u64(&mut b[..], 72, self.extent_data_blocks);
        put_u64(&mut b[..], 80, self.extent_count);
        put_u64(&mut b[..], 88, self.first_extent);
        put_u64(&mut b[..], 96, self.next_vdi_id);
        put_u64(&mut b[..], 104, self.created_ns);
        put_u64(&mut b[..], 112, self.write_log_id);
        put_u64(&mut b[..], 120, self.write_log_locator);
        for (i, p) in self
            .registry
            .iter()
            .take(SUPERBLOCK_REGISTRY_SLOTS)
            .enumerate()
        {
            put_u64(&mut b[..], REGISTRY_OFF + 8 * i, p.0);
        }
        let crc = MetaHeader {
            kind: Kind::Superblock,
            level: 0,
            store_id: self.store_id,
            self_addr: addr,
            owner: 0,
            generation: self.generation,
        }
        .seal_as(
            &mut b,
            if self.journaled {
                JOURNAL_FORMAT_VERSION
            } else {
                BASE_FORMAT_VERSION
            },
        );
        (b, crc)
    }

    /// Decodes and validates a superblock copy read from `addr`.
    pub fn decode(block: &[u8], addr: u64) -> Result<Self, FormatError> {
        let (h, _) = MetaHeader::open(block, Kind::Superblock, addr, None)?;
        let sb = Superblock {
            store_id: h.store_id,
            generation: h.generation,
            total_blocks: get_u64(block, 64),
            extent_data_blocks: get_u64(block, 72),
            extent_count: get_u64(block, 80),
            first_extent: get_u64(block, 88),
            next_vdi_id: get_u64(block, 96),
            created_ns: get_u64(block, 104),
            write_log_id: get_u64(block, 112),
            write_log_locator: get_u64(block, 120),
            registry: (0..SUPERBLOCK_REGISTRY_SLOTS)
                .map(|i| Ptr(get_u64(block, REGISTRY_OFF + 8 * i)))
                .collect(),
            journaled: block_version(block) >= JOURNAL_FORMAT_VERSION,
        };
        sb.validate(addr)?;
        Ok(sb)
    }

    fn validate(&self, addr: u64) -> Result<(), FormatError> {
        let bad = |what: &str| Err(FormatError::field(addr, what.to_string()));
        if self.extent_data_blocks == 0 || self.extent_data_blocks > BITMAP_BITS as u64 {
            return bad("extent_data_blocks out of range");
        }
        if self.first_extent != 2 {
            return bad("first_extent is not 2");
        }
        if self.total_blocks > crate::MAX_BLOCK_ADDR || self.extent_count == 0 {
            return bad("total_blocks or extent_count out of range");
        }
        let end = (self.extent_count - 1)
            .checked_mul(self.extent_blocks())
            .and_then(|v| v.checked_add(self.first_extent + 3));
        match end {
            Some(end) if end <= self.total_blocks => {}
            _ => return bad("extents do not fit in total_blocks"),
        }
        if self.next_vdi_id == 0 {
            return bad("next_vdi_id is 0");
        }
        for p in &self.registry {
            if !p.is_valid() || (!p.is_null() && p.addr() >= self.total_blocks) {
                return bad("registry pointer outside the store");
            }
        }
        Ok(())
    }

    /// Data blocks in extent `index` (the last extent may be shorter).
    pub fn extent_len(&self, index: u64) -> u64 {
        let start = self.first_extent + index * self.extent_blocks() + 2;
        self.extent_data_blocks
            .min(self.total_blocks.saturating_sub(start))
    }

    /// First block (bitmap slot A) of extent `index`.
    pub fn extent_start(&self, index: u64) -> u64 {
        self.first_extent + index * self.extent_blocks()
    }

    /// The extent holding data block `addr`, and its index within the
    /// extent, or `None` if `addr` is not a data block.
    pub fn locate(&self, addr: u64) -> Option<(u64, u64)> {
        let rel = addr.checked_sub(self.first_extent)?;
        let extent = rel / self.extent_blocks();
        let within = rel % self.extent_blocks();
        if extent >= self.extent_count || within < 2 {
            return None;
        }
        let index = within - 2;
        (index < self.extent_len(extent)).then_some((extent, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Superblock {
        Superblock {
            store_id: 0x1234,
            generation: 3,
            total_blocks: 2 + 3 * 258 - 100,
            extent_data_blocks: 256,
            extent_count: 3,
            first_extent: 2,
            next_vdi_id: 1,
            created_ns: 5,
            write_log_id: 0,
            write_log_locator: 0,
            registry: vec![Ptr::NULL; SUPERBLOCK_REGISTRY_SLOTS],
            journaled: false,
        }
    }

    /// A journaled store's superblock is written as version 2 and read
    /// back as journaled; an unjournaled one stays version 1.
    #[test]
    fn journaled_is_the_version() {
        let mut sb = sample();
        let (b, _) = sb.encode(0);
        assert_eq!(block_version(&b[..]), 1);
        sb.journaled = true;
        let (b, _) = sb.encode(0);
        assert_eq!(block_version(&b[..]), 2);
        assert_eq!(Superblock::decode(&b[..], 0).unwrap(), sb);
    }

    #[test]
    fn round_trip_and_geometry() {
        let sb = sample();
        let (b, _) = sb.encode(1);
        assert_eq!(Superblock::decode(&b[..], 1).unwrap(), sb);
        assert!(Superblock::decode(&b[..], 0).is_err());
        assert_eq!(sb.locate(1), None);
        assert_eq!(sb.locate(2), None);
        assert_eq!(sb.locate(4), Some((0, 0)));
        assert_eq!(sb.locate(2 + 258 + 2), Some((1, 0)));
        assert_eq!(sb.extent_len(2), 256 - 100);
        assert_eq!(sb.locate(2 + 2 * 258 + 2 + 155), Some((2, 155)));
        assert_eq!(sb.locate(2 + 2 * 258 + 2 + 156), None);
    }

    #[test]
    fn rejects_inconsistent_geometry() {
        let mut sb = sample();
        sb.extent_count = 10;
        let (b, _) = sb.encode(0);
        assert!(Superblock::decode(&b[..], 0).is_err());
    }
}
