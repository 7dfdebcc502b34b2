//! What both HTTP servers (registry and agent, on warp) share: the contract's errors and
//! the recovery of warp's rejections ([`error`]), bounded JSON bodies and checked query
//! strings ([`request`]).

pub mod error;
pub mod filters;
pub mod request;

pub use error::{ApiError, recover};
pub use filters::{body, json, raw_query, respond, with_state};
pub use request::{Body, HealthFilter, ReadQuery};
