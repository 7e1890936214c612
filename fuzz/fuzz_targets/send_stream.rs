//! The send stream reader (`parallax receive`'s input) on arbitrary bytes:
//! each record is an error or a value, never a panic, and nothing is
//! accepted past an error. Inputs start with the stream's magic half the
//! time, so that the fuzzer reaches the records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallax_format::stream::{StreamReader, StreamRecord, STREAM_MAGIC};

fuzz_target!(|data: &[u8]| {
    let mut input = Vec::with_capacity(data.len() + 8);
    if data.first().is_some_and(|b| b & 1 == 1) {
        input.extend_from_slice(STREAM_MAGIC);
        input.extend_from_slice(&data[1..]);
    } else {
        input.extend_from_slice(data);
    }
    let Ok((mut reader, _header)) = StreamReader::new(&input[..]) else {
        return;
    };
    // At most one record per input byte: the stream cannot hold more.
    for _ in 0..=input.len() {
        match reader.next_record() {
            Ok(StreamRecord::End) | Err(_) => return,
            Ok(_) => {}
        }
    }
    panic!("more records than bytes");
});
