//! Signpost's shared core: the model and its validation, the JSON wire formats, configuration
//! loading and the registry's HTTP client. Linked into the registry, the agent and the tests.
//!
//! # Layout
//! - [`model`]: `Instance`, `Health`, `CheckSpec` and the registration body.
//! - [`validate`]: the rules for every field; every problem is reported with its field name.
//! - [`duration`]: `500ms` / `2s` / `1m` durations in JSON and config.
//! - [`wire`]: request and answer bodies, the contract's error body.
//! - [`config`]: the figment chain (defaults → TOML file → `SIGNPOST_` environment → flags).
//! - [`client`]: `RegistryClient`, with fail-over between URLs, timeouts and retries.

pub mod client;
pub mod config;
pub mod duration;
pub mod gossip;
pub mod gossip_sign;
pub mod http;
pub mod meta;
pub mod model;
pub mod probe;
pub mod process;
pub mod validate;
pub mod wire;

pub use model::{CheckSpec, Health, Instance, InstanceSpec, Registration};
pub use validate::{FieldError, ValidationErrors};
