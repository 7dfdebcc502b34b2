//! The shared end-to-end harness (the `signpost-e2e` crate).

#![allow(unused_imports)]

pub use signpost_e2e::*;
