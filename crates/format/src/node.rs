//! Radix-tree nodes.
//!
//! A node is a metadata block (kind `Node`, `level` 0..=3) whose body is
//! [`FAN_OUT`] little-endian [`Ptr`]s starting at byte 64. Level-0 entries
//! point at data blocks; level-k entries (k > 0) at level k-1 nodes. Every
//! tree has [`TREE_HEIGHT`] levels, so a virtual block number `v` is split
//! into four base-504 digits, most significant first:
//!
//! ```text
//! index at level 3 = v / 504^3 % 504   (the root)
//! index at level 2 = v / 504^2 % 504
//! index at level 1 = v / 504   % 504
//! index at level 0 = v         % 504   (entry points at the data block)
//! ```
//!
//! Capacity: 504^4 blocks of 4 KiB = 240 TiB per VDI.

use crate::bytes::*;
use crate::header::HEADER_LEN;
use crate::{zeroed_block, Block, FormatError, Kind, MetaHeader, Ptr};

/// Pointers per node.
pub const FAN_OUT: usize = 504;
/// Levels in every tree (root at level `TREE_HEIGHT - 1`).
pub const TREE_HEIGHT: usize = 4;

/// A decoded tree node.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NodeBlock {
    pub level: u8,
    pub entries: Vec<Ptr>,
}

impl NodeBlock {
    /// An empty node (every entry unmapped).
    pub fn empty(level: u8) -> Self {
        NodeBlock {
            level,
            entries: vec![Ptr::NULL; FAN_OUT],
        }
    }

    /// Encodes and seals the node for address `addr`. Returns the block and its crc.
    pub fn encode(
        &self,
        store_id: u64,
        addr: u64,
        owner: u64,
        generation: u64,
    ) -> (Box<Block>, u32) {
        let mut b = zeroed_block();
        for (i, p) in self.entries.iter().take(FAN_OUT).enumerate() {
            put_u64(&mut b[..], HEADER_LEN + 8 * i, p.0);
        }
        let crc = MetaHeader {
            kind: Kind::Node,
            level: self.level,
            store_id,
            self_addr: addr,
            owner,
            generation,
        }
        .seal(&mut b);
        (b, crc)
    }

    /// Decodes a node read from `addr`, expected at `level`.
    pub fn decode(
        block: &[u8],
        addr: u64,
        store_id: Option<u64>,
        level: u8,
    ) -> Result<(Self, MetaHeader, u32), FormatError> {
        let (header, crc) = MetaHeader::open(block, Kind::Node, addr, store_id)?;
        if header.level != level {
            return Err(FormatError::field(
                addr,
                format!(
                    "tree node at level {} where level {level} was expected",
                    header.level
                ),
            ));
        }
        let mut entries = Vec::with_capacity(FAN_OUT);
        for i in 0..FAN_OUT {
            let p = Ptr(get_u64(block, HEADER_LEN + 8 * i));
            if !p.is_valid() {
                return Err(FormatError::field(
                    addr,
                    format!("entry {i} has flags but no address"),
                ));
            }
            if level == 0 && p.check() != 0 {
                return Err(FormatError::field(
                    addr,
                    format!("data pointer {i} carries a check value"),
                ));
            }
            entries.push(p);
        }
        Ok((NodeBlock { level, entries }, header, crc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_level_check() {
        let mut n = NodeBlock::empty(1);
        n.entries[0] = Ptr::meta(10, 0x1234, true);
        n.entries[503] = Ptr::meta(11, 0x99, false);
        let (b, crc) = n.encode(7, 100, 3, 4);
        let (m, h, c) = NodeBlock::decode(&b[..], 100, Some(7), 1).unwrap();
        assert_eq!(m, n);
        assert_eq!((h.owner, h.generation, c), (3, 4, crc));
        assert!(NodeBlock::decode(&b[..], 100, Some(7), 0).is_err());
    }
}
