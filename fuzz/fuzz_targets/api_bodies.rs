//! Fuzz target `api_bodies`: the body is `signpost_fuzz::api_bodies` (src/lib.rs), which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| signpost_fuzz::api_bodies(data));
