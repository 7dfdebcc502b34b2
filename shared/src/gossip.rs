//! What agents put in gossip (chitchat key-values, strings only), and how a value read from
//! a peer is checked before anything uses it.
//!
//! Keys of a node: `agent` → [`AgentValue`]; `inst:{id}` → [`GossipInstance`]. Every value is
//! JSON with a format version `v`, at most [`MAX_VALUE_BYTES`] long (chitchat silently stalls
//! a node whose value cannot fit a datagram), and validated by the model's rules when read.

use crate::meta::Meta;

use serde::{Deserialize, Serialize};

use crate::model::{Health, Registration};
use crate::validate::{self, ValidationErrors};

/// Key of the agent's own description.
pub const AGENT_KEY: &str = "agent";
/// Prefix of an instance key; the instance id follows.
pub const INSTANCE_PREFIX: &str = "inst:";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest value an agent sets or accepts.
pub const MAX_VALUE_BYTES: usize = 8 * 1024;
/// Largest total of one node's values.
pub const MAX_NODE_STATE_BYTES: usize = 32 * 1024;
/// Longest check output carried in gossip (the rest is cut).
pub const MAX_GOSSIP_OUTPUT: usize = 256;

/// Why a gossip value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    /// Larger than [`MAX_VALUE_BYTES`].
    #[error("value of {0} bytes is over the {MAX_VALUE_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not the JSON expected.
    #[error("value is not readable: {0}")]
    Unreadable(String),
    /// Written by a format this agent does not read.
    #[error("format version {0} is not supported (this agent reads {FORMAT_VERSION})")]
    Version(u32),
    /// Readable, but breaks the model's rules.
    #[error("value is invalid: {0}")]
    Invalid(ValidationErrors),
}

/// An agent's description of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentValue {
    /// Format version.
    pub v: u32,
    /// Its HTTP API, `host:port`.
    pub http: String,
    /// Its zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// An instance as its owning agent publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipInstance {
    /// Format version.
    pub v: u32,
    /// The service.
    pub service: String,
    /// Where it is reached.
    pub address: String,
    /// Its port.
    pub port: u16,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Meta pairs.
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
    /// Weight.
    pub weight: u32,
    /// Zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Health as the owner's checks see it (maintenance included).
    pub health: Health,
    /// The last check output, cut to [`MAX_GOSSIP_OUTPUT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// Encodes a value, refusing one too large to gossip.
pub fn encode<T: Serialize>(value: &T) -> Result<String, GossipError> {
    let text = serde_json::to_string(value).map_err(|e| GossipError::Unreadable(e.to_string()))?;
    if text.len() > MAX_VALUE_BYTES {
        return Err(GossipError::TooLarge(text.len()));
    }
    Ok(text)
}

fn decode<T: serde::de::DeserializeOwned>(text: &str, version: impl Fn(&T) -> u32) -> Result<T, GossipError> {
    if text.len() > MAX_VALUE_BYTES {
        return Err(GossipError::TooLarge(text.len()));
    }
    let value: T = serde_json::from_str(text).map_err(|e| GossipError::Unreadable(e.to_string()))?;
    match version(&value) {
        FORMAT_VERSION => Ok(value),
        other => Err(GossipError::Version(other)),
    }
}

impl AgentValue {
    /// Reads and checks a peer's `agent` value.
    pub fn decode(text: &str) -> Result<AgentValue, GossipError> {
        let value: AgentValue = decode(text, |v: &AgentValue| v.v)?;
        let mut errors = ValidationErrors::default();
        errors.check("http", crate::model::host_port(&value.http));
        if let Some(zone) = &value.zone {
            errors.check("zone", validate::dns_label(zone));
        }
        errors.into_result(value).map_err(GossipError::Invalid)
    }
}

impl GossipInstance {
    /// Reads and checks a peer's `inst:{id}` value; `id` comes from the key.
    pub fn decode(id: &str, text: &str) -> Result<GossipInstance, GossipError> {
        let value: GossipInstance = decode(text, |v: &GossipInstance| v.v)?;
        let registration = Registration {
            id: id.to_string(),
            service: value.service.clone(),
            name: None,
            address: value.address.clone(),
            port: i64::from(value.port),
            tags: value.tags.clone(),
            meta: value.meta.clone(),
            weight: Some(i64::from(value.weight)),
            zone: value.zone.clone(),
            health: None,
            node: None,
            check: None,
            ttl_s: None,
        };
        let mut errors = registration.validate().err().unwrap_or_default();
        if let Some(output) = &value.output {
            errors.check("output", validate::text(output, MAX_GOSSIP_OUTPUT, true));
        }
        errors.into_result(value).map_err(GossipError::Invalid)
    }

    /// Cuts an output to what gossip carries.
    pub fn clip_output(output: &str) -> String {
        let mut end = output.len().min(MAX_GOSSIP_OUTPUT);
        while !output.is_char_boundary(end) {
            end -= 1;
        }
        output[..end].chars().filter(|c| !c.is_control() || *c == '\n' || *c == '\t').collect()
    }
}

/// The key of an instance.
pub fn instance_key(id: &str) -> String {
    format!("{INSTANCE_PREFIX}{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> GossipInstance {
        GossipInstance {
            v: FORMAT_VERSION,
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            tags: vec!["a".into()],
            meta: Meta::default(),
            weight: 100,
            zone: None,
            health: Health::Passing,
            output: None,
        }
    }

    #[test]
    fn round_trips() {
        let text = encode(&instance()).expect("encode");
        assert_eq!(GossipInstance::decode("web-1", &text), Ok(instance()));
        let agent = AgentValue { v: FORMAT_VERSION, http: "127.0.0.1:7301".into(), zone: Some("eu-1".into()) };
        assert_eq!(AgentValue::decode(&encode(&agent).expect("encode")), Ok(agent));
    }

    #[test]
    fn refuses_bad_values() {
        assert!(matches!(GossipInstance::decode("web-1", "{not json"), Err(GossipError::Unreadable(_))));
        let mut bad = instance();
        bad.service = "Not A Label".into();
        assert!(matches!(GossipInstance::decode("web-1", &encode(&bad).expect("encode")), Err(GossipError::Invalid(_))));
        assert!(matches!(GossipInstance::decode("bad id!", &encode(&instance()).expect("encode")), Err(GossipError::Invalid(_))));
        let mut future = instance();
        future.v = 2;
        assert!(matches!(GossipInstance::decode("web-1", &encode(&future).expect("encode")), Err(GossipError::Version(2))));
        assert!(matches!(GossipInstance::decode("web-1", &"x".repeat(MAX_VALUE_BYTES + 1)), Err(GossipError::TooLarge(_))));
        let mut huge = instance();
        huge.meta = (0..32).map(|i| (format!("k{i}"), "v".repeat(500))).collect();
        assert!(matches!(encode(&huge), Err(GossipError::TooLarge(_))));
    }

    #[test]
    fn clips_output_on_a_char_boundary() {
        let clipped = GossipInstance::clip_output(&"é".repeat(300));
        assert!(clipped.len() <= MAX_GOSSIP_OUTPUT);
    }
}
