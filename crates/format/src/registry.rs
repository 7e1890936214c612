//! Registry blocks: the catalogue of VDIs by name.
//!
//! The superblock points at up to 496 registry blocks; each holds 31 slots:
//!
//! ```text
//! block: 0 common header (kind 3, owner 0, generation = superblock generation)
//!        64 reserved (64 bytes)   128 slots[31] of 128 bytes
//! slot:  offset size field
//!             0    8 vdi_id     0 = free slot
//!             8    8 header_a   block of VDI header copy A
//!            16    8 header_b   block of VDI header copy B
//!            24    2 name_len
//!            26    6 reserved
//!            32   96 name       UTF-8, zero padded
//! ```

use crate::bytes::*;
use crate::{zeroed_block, Block, FormatError, Kind, MetaHeader, MAX_NAME_LEN};

/// Slots per registry block.
pub const REGISTRY_ENTRIES_PER_BLOCK: usize = 31;
const SLOTS_OFF: usize = 128;
const SLOT_LEN: usize = 128;

/// One VDI in the registry.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RegistryEntry {
    pub vdi_id: u64,
    pub header_a: u64,
    pub header_b: u64,
    pub name: String,
}

/// A decoded registry block (only the used slots).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct RegistryBlock {
    pub entries: Vec<RegistryEntry>,
}

impl RegistryBlock {
    pub fn encode(&self, store_id: u64, addr: u64, generation: u64) -> (Box<Block>, u32) {
        let mut b = zeroed_block();
        for (i, e) in self
            .entries
            .iter()
            .take(REGISTRY_ENTRIES_PER_BLOCK)
            .enumerate()
        {
            let o = SLOTS_OFF + i * SLOT_LEN;
            put_u64(&mut b[..], o, e.vdi_id);
            put_u64(&mut b[..], o + 8, e.header_a);
            put_u64(&mut b[..], o + 16, e.header_b);
            put_name(&mut b[..], o + 24, o + 32, MAX_NAME_LEN, &e.name);
        }
        let crc = MetaHeader {
            kind: Kind::Registry,
            level: 0,
            store_id,
            self_addr: addr,
            owner: 0,
            generation,
        }
        .seal(&mut b);
        (b, crc)
    }

    pub fn decode(
        block: &[u8],
        addr: u64,
        store_id: Option<u64>,
    ) -> Result<(Self, u32), FormatError> {
        let (_, crc) = MetaHeader::open(block, Kind::Registry, addr, store_id)?;
        let mut entries = Vec::new();
        for i in 0..REGISTRY_ENTRIES_PER_BLOCK {
            let o = SLOTS_OFF + i * SLOT_LEN;
            let vdi_id = get_u64(block, o);
            if vdi_id == 0 {
                continue;
            }
            let e = RegistryEntry {
                vdi_id,
                header_a: get_u64(block, o + 8),
                header_b: get_u64(block, o + 16),
                name: get_name(block, o + 24, o + 32, MAX_NAME_LEN, addr)?,
            };
            if e.header_a == 0 || e.header_b == 0 || e.header_a == e.header_b || e.name.is_empty() {
                return Err(FormatError::field(
                    addr,
                    format!("registry slot {i} is malformed"),
                ));
            }
            entries.push(e);
        }
        Ok((RegistryBlock { entries }, crc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = RegistryBlock {
            entries: vec![
                RegistryEntry {
                    vdi_id: 1,
                    header_a: 10,
                    header_b: 11,
                    name: "disk-α".into(),
                },
                RegistryEntry {
                    vdi_id: 9,
                    header_a: 20,
                    header_b: 30,
                    name: "x".repeat(96),
                },
            ],
        };
        let (b, crc) = r.encode(5, 77, 2);
        assert_eq!(
            RegistryBlock::decode(&b[..], 77, Some(5)).unwrap(),
            (r, crc)
        );
    }
}
