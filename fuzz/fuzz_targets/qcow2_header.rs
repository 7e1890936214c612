//! Fuzzes the pure qcow2 header parser: it must never panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parallax_image::parse_qcow2_header(data);
});
