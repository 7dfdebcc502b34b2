//! Fuzz target `gossip_value`: the body is `signpost_fuzz::gossip_value` (src/lib.rs), which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| signpost_fuzz::gossip_value(data));
