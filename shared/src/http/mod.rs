//! What both HTTP servers (registry and agent, on warp) share: the contract's errors and
//! the recovery of warp's rejections ([`error`]), bounded JSON bodies and checked query
//! strings ([`request`]); the accept loop under both, with request limits and optional TLS
//! ([`serve`], [`tls`]).

pub mod error;
pub mod filters;
pub mod request;
pub mod serve;
pub mod tls;

pub use error::{ApiError, recover};
pub use filters::{body, json, raw_query, respond, with_state};
pub use request::{Body, HealthFilter, ReadQuery};
pub use serve::{Limits, PeerAddr, ServeStats, peer_addr, serve};
pub use tls::ServerTls;
