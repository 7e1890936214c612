//! Arbitrary bytes, raw or resealed with a valid checksum, fed to every
//! decoder: each returns a value or an error, never panics. (The same
//! property is fuzzed with coverage guidance in `fuzz/`.)

use parallax_format::*;
use proptest::prelude::*;

fn decode_all(block: &[u8], addr: u64) {
    let _ = Superblock::decode(block, addr);
    let _ = BitmapBlock::decode(block, addr, None);
    let _ = RegistryBlock::decode(block, addr, None);
    let _ = VdiHeader::decode(block, addr, None);
    let _ = LogBlock::decode(block, addr, None);
    let _ = JournalBlock::decode(block, addr, None);
    for level in 0..4 {
        let _ = NodeBlock::decode(block, addr, None, level);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_blocks(bytes in proptest::collection::vec(any::<u8>(), 0..5000), addr in 0u64..4) {
        decode_all(&bytes, addr);
    }

    #[test]
    fn resealed_blocks_with_valid_header(kind in 1u8..8, level in 0u8..4, version in 1u8..3, body in proptest::collection::vec(any::<u8>(), BLOCK_SIZE - 64)) {
        let mut block = vec![0u8; BLOCK_SIZE];
        block[0..4].copy_from_slice(&MAGIC);
        block[4] = kind;
        block[5] = level;
        block[6] = version;
        block[64..].copy_from_slice(&body);
        let crc = block_crc_for_fuzzing(&block);
        block[8..12].copy_from_slice(&crc.to_le_bytes());
        decode_all(&block, 0);
    }
}
