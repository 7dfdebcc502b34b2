//! Fuzz target `persisted_cache`: the body is `signpost_fuzz::persisted_cache` (src/lib.rs), which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| signpost_fuzz::persisted_cache(data));
