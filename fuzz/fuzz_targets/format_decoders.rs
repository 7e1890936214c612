//! Every on-disk decoder of the format gets the same arbitrary block: each
//! must return an error or a value, never panic. Inputs shorter than a block
//! are padded, so that the fuzzer reaches past the length check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallax_format::*;

fuzz_target!(|data: &[u8]| {
    let mut block = vec![0u8; BLOCK_SIZE];
    let n = data.len().min(BLOCK_SIZE);
    block[..n].copy_from_slice(&data[..n]);
    // Reseal so that the crc matches and decoding goes past it: the fuzzer
    // then explores the field checks, not only the checksum.
    if data.len() > BLOCK_SIZE && data[BLOCK_SIZE] & 1 == 1 {
        let crc = parallax_format::block_crc_for_fuzzing(&block);
        block[8..12].copy_from_slice(&crc.to_le_bytes());
    }
    let addr = if data.len() > BLOCK_SIZE + 1 { data[BLOCK_SIZE + 1] as u64 } else { 0 };
    let _ = Superblock::decode(&block, addr);
    let _ = BitmapBlock::decode(&block, addr, None);
    let _ = RegistryBlock::decode(&block, addr, None);
    let _ = VdiHeader::decode(&block, addr, None);
    let _ = LogBlock::decode(&block, addr, None);
    let _ = JournalBlock::decode(&block, addr, None);
    for level in 0..4 {
        let _ = NodeBlock::decode(&block, addr, None, level);
    }
    let _ = MetaHeader::open(data, Kind::Node, addr, None);
});
