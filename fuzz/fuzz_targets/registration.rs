//! Fuzz target `registration`: the body is `signpost_fuzz::registration` (src/lib.rs), which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| signpost_fuzz::registration(data));
