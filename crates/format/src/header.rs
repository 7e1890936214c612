//! The 64-byte header at the start of every metadata block.
//!
//! ```text
//! offset size field
//!      0    4 magic       "PRLX"
//!      4    1 kind        see `Kind`
//!      5    1 level       tree nodes: 0 (points at data) .. 3 (root); else 0
//!      6    2 version     format version that wrote the block (1; 2 for
//!                         journal blocks and a journaled store's superblock)
//!      8    4 crc32c      of the whole block with these 4 bytes zeroed
//!     12    4 reserved    0
//!     16    8 store_id    random id chosen by `init`
//!     24    8 self_addr   block number this block was written to
//!     32    8 owner       VDI id (nodes, VDI headers, logs), host id (bitmaps), 0 otherwise
//!     40    8 generation  commit generation of the owner when written
//!     48   16 reserved    0
//! ```

use crate::bytes::*;
use crate::{Block, FormatError, BLOCK_SIZE, FORMAT_VERSION};

/// The version every block is written with unless it needs a newer one.
pub const BASE_FORMAT_VERSION: u16 = 1;
use std::fmt;

/// The magic bytes opening every metadata block.
pub const MAGIC: [u8; 4] = *b"PRLX";
/// Size of the common header.
pub const HEADER_LEN: usize = 64;
const CRC_OFF: usize = 8;

/// Kinds of metadata blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Superblock = 1,
    Bitmap = 2,
    Registry = 3,
    VdiHeader = 4,
    Node = 5,
    SnapshotLog = 6,
    Journal = 7,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Kind::Superblock => "superblock",
            Kind::Bitmap => "bitmap",
            Kind::Registry => "registry",
            Kind::VdiHeader => "VDI header",
            Kind::Node => "tree node",
            Kind::SnapshotLog => "snapshot log",
            Kind::Journal => "entry journal",
        };
        f.write_str(name)
    }
}

/// The decoded common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaHeader {
    pub kind: Kind,
    pub level: u8,
    pub store_id: u64,
    pub self_addr: u64,
    pub owner: u64,
    pub generation: u64,
}

/// The format version a block's header says wrote it (bytes 6..8); 0 for
/// a buffer too short to hold one. Meaningful once the block was opened.
pub fn block_version(block: &[u8]) -> u16 {
    if block.len() < 8 {
        return 0;
    }
    get_u16(block, 6)
}

/// crc32c of a block with its crc field taken as zero.
pub fn block_crc(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..CRC_OFF]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[CRC_OFF + 4..])
}

impl MetaHeader {
    /// Writes the header into `block` and seals it: computes the crc over
    /// the whole block. Call last, after the body is filled in. Returns the crc.
    pub fn seal(&self, block: &mut Block) -> u32 {
        self.seal_as(block, BASE_FORMAT_VERSION)
    }

    /// [`MetaHeader::seal`] with format version `version` (at most
    /// [`FORMAT_VERSION`]).
    pub fn seal_as(&self, block: &mut Block, version: u16) -> u32 {
        debug_assert!((1..=FORMAT_VERSION).contains(&version));
        block[0..4].copy_from_slice(&MAGIC);
        block[4] = self.kind as u8;
        block[5] = self.level;
        put_u16(block, 6, version);
        put_u32(block, CRC_OFF, 0);
        put_u32(block, 12, 0);
        put_u64(block, 16, self.store_id);
        put_u64(block, 24, self.self_addr);
        put_u64(block, 32, self.owner);
        put_u64(block, 40, self.generation);
        block[48..HEADER_LEN].fill(0);
        let crc = block_crc(block);
        put_u32(block, CRC_OFF, crc);
        crc
    }

    /// Decodes and verifies the header of a block read from `addr`:
    /// magic, version, crc, kind, address and (unless `store_id` is `None`)
    /// the store id. Returns the header and the block's crc.
    pub fn open(
        block: &[u8],
        kind: Kind,
        addr: u64,
        store_id: Option<u64>,
    ) -> Result<(MetaHeader, u32), FormatError> {
        if block.len() != BLOCK_SIZE {
            return Err(FormatError::WrongLength { len: block.len() });
        }
        if block[0..4] != MAGIC {
            return Err(FormatError::BadMagic { addr });
        }
        let version = get_u16(block, 6);
        if version > FORMAT_VERSION {
            return Err(FormatError::NewerVersion {
                addr,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let stored = get_u32(block, CRC_OFF);
        let computed = block_crc(block);
        if stored != computed {
            return Err(FormatError::BadChecksum {
                addr,
                stored,
                computed,
            });
        }
        if version == 0 {
            return Err(FormatError::field(addr, "format version 0"));
        }
        if block[4] != kind as u8 {
            return Err(FormatError::WrongKind {
                addr,
                expected: kind,
                found: block[4],
            });
        }
        let self_addr = get_u64(block, 24);
        if self_addr != addr {
            return Err(FormatError::Misdirected {
                addr,
                found: self_addr,
            });
        }
        let found_store = get_u64(block, 16);
        if let Some(expected) = store_id {
            if found_store != expected {
                return Err(FormatError::ForeignStore {
                    addr,
                    found: found_store,
                    expected,
                });
            }
        }
        Ok((
            MetaHeader {
                kind,
                level: block[5],
                store_id: found_store,
                self_addr,
                owner: get_u64(block, 32),
                generation: get_u64(block, 40),
            },
            stored,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zeroed_block;

    fn header() -> MetaHeader {
        MetaHeader {
            kind: Kind::Node,
            level: 2,
            store_id: 0xabc,
            self_addr: 77,
            owner: 5,
            generation: 9,
        }
    }

    #[test]
    fn seal_then_open() {
        let mut b = zeroed_block();
        b[100] = 42;
        let crc = header().seal(&mut b);
        let (h, c) = MetaHeader::open(&b[..], Kind::Node, 77, Some(0xabc)).unwrap();
        assert_eq!(h, header());
        assert_eq!(c, crc);
    }

    #[test]
    fn every_corruption_is_detected() {
        let mut b = zeroed_block();
        header().seal(&mut b);
        let mut torn = b.clone();
        torn[3000] ^= 1;
        assert!(matches!(
            MetaHeader::open(&torn[..], Kind::Node, 77, None),
            Err(FormatError::BadChecksum { .. })
        ));
        assert!(matches!(
            MetaHeader::open(&b[..], Kind::Node, 78, None),
            Err(FormatError::Misdirected { .. })
        ));
        assert!(matches!(
            MetaHeader::open(&b[..], Kind::Registry, 77, None),
            Err(FormatError::WrongKind { .. })
        ));
        assert!(matches!(
            MetaHeader::open(&b[..], Kind::Node, 77, Some(1)),
            Err(FormatError::ForeignStore { .. })
        ));
        assert!(matches!(
            MetaHeader::open(&b[..100], Kind::Node, 77, None),
            Err(FormatError::WrongLength { .. })
        ));
        let zero = zeroed_block();
        assert!(matches!(
            MetaHeader::open(&zero[..], Kind::Node, 77, None),
            Err(FormatError::BadMagic { .. })
        ));
        let mut newer = b.clone();
        newer[6] = 3;
        assert!(matches!(
            MetaHeader::open(&newer[..], Kind::Node, 77, None),
            Err(FormatError::NewerVersion { found: 3, .. })
        ));
    }
}
