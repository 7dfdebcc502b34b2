//! Reading requests: the shared bounded bodies and checked query strings.

pub use signpost_shared::http::request::{Body, HealthFilter, ReadQuery, only_param};
