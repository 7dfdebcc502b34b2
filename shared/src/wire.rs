//! JSON bodies of the HTTP contract: requests, answers and the error body, plus
//! [`parse_json`], which names the field of a wrongly typed value.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{Health, Instance};
use crate::validate::{self, FieldError, ValidationErrors};

/// Header carrying the catalog's change index on every lookup answer.
pub const INDEX_HEADER: &str = "x-signpost-index";

/// The contract's error body: `{"error": code, "message": text}`, plus the field problems
/// of a refused body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code such as `not_found`.
    pub error: String,
    /// What went wrong and why, for people.
    pub message: String,
    /// Every problem of a refused body, with its field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<FieldError>,
}

/// Why a JSON body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all.
    #[error("the body is not valid JSON: {0}")]
    Malformed(String),
    /// JSON of the wrong shape: a wrong type, a missing or an unknown field.
    #[error("{}", .0)]
    Invalid(ValidationErrors),
}

/// Parses a JSON body, naming the field of a wrongly typed, missing or unknown value.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    match parsed {
        Ok(value) => de.end().map(|()| value).map_err(|e| BodyError::Malformed(e.to_string())),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(BodyError::Malformed(inner.to_string()));
            }
            // The root is "."; an empty key (`{"": 1}`) would make an empty field name.
            let field = if path == "." || path.is_empty() { "body".to_string() } else { path };
            // serde's message ends with " at line 1 column 9"; the field already says where.
            let message = inner.to_string();
            let problem = message.split(" at line ").next().unwrap_or(&message).to_string();
            let mut errors = ValidationErrors::default();
            errors.add(field, problem);
            Err(BodyError::Invalid(errors))
        }
    }
}

/// The optional body of `PUT /v1/instances/{id}/heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The health the owner observed (`passing`, `warning` or `critical`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// The last check's output, at most 4096 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl Heartbeat {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        if self.health == Some(Health::Maintenance) {
            errors.add("health", "maintenance is set with PUT /v1/instances/{id}/maintenance");
        }
        if let Some(output) = &self.output {
            errors.check("output", validate::text(output, validate::MAX_OUTPUT_LEN, true));
        }
        errors.into_result(())
    }
}

/// The body of `PUT /v1/instances/{id}/maintenance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// True takes the instance out of traffic; false puts it back.
    pub enabled: bool,
    /// Why, shown in answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Maintenance {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        if let Some(reason) = &self.reason {
            errors.check("reason", validate::text(reason, validate::MAX_OUTPUT_LEN, true));
        }
        errors.into_result(())
    }
}

/// One service in `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// The service's name.
    pub name: String,
    /// How many instances it has.
    pub instances: u64,
    /// How many are passing or warning.
    pub healthy: u64,
    /// Counts by health (every health is present, zero included).
    pub health: BTreeMap<Health, u64>,
}

/// The answer of `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesPage {
    /// The catalog's change index.
    pub index: u64,
    /// True while the registry holds expiring leases back because too many lapsed at once.
    pub self_preservation: bool,
    /// Every service, by name.
    pub services: Vec<ServiceSummary>,
}

/// The answer of `GET /v1/services/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInstances {
    /// The service's name.
    pub service: String,
    /// The catalog's change index.
    pub index: u64,
    /// The matching instances, by id.
    pub instances: Vec<Instance>,
}

/// An agent as announced with `PUT /v1/agents/{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAnnouncement {
    /// `host:port` where its gossip listens (UDP).
    pub gossip_addr: String,
    /// `host:port` where its HTTP API listens.
    pub http_addr: String,
    /// Its zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// How long the announcement holds unless repeated, in seconds (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<i64>,
    /// The public half of the key its gossip values are signed with (URL-safe base64 of an
    /// Ed25519 key); other agents believe its gossip only with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
}

impl AgentAnnouncement {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        errors.check("gossip_addr", crate::model::host_port(&self.gossip_addr));
        errors.check("http_addr", crate::model::host_port(&self.http_addr));
        if let Some(zone) = &self.zone {
            errors.check("zone", validate::dns_label(zone));
        }
        if let Some(ttl) = self.ttl_s {
            errors.check("ttl_s", validate::in_range(ttl, 1, i64::from(crate::model::MAX_TTL_S)));
        }
        if let Some(key) = &self.signing_key {
            errors.check("signing_key", crate::gossip_sign::check_public_key(key));
        }
        errors.into_result(())
    }
}

/// An agent in `GET /v1/agents` and in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its node name.
    pub node: String,
    /// Gossip address.
    pub gossip_addr: String,
    /// HTTP address.
    pub http_addr: String,
    /// Zone.
    pub zone: Option<String>,
    /// True while its announcement holds.
    pub alive: bool,
    /// When it last announced itself.
    pub updated_at: DateTime<Utc>,
    /// When its announcement runs out.
    pub lease_expires_at: DateTime<Utc>,
    /// When it last renewed its announcement, in the registry's clock: evidence that it
    /// lives, for agents whose gossip does not reach it (see `AgentsPage::now`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<DateTime<Utc>>,
    /// The public key its gossip values are signed with, as it announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
}

/// The answer of `GET /v1/agents` (optionally `?node=A&node=B`: only those agents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentsPage {
    /// The catalog's change index.
    pub index: u64,
    /// Every known agent (or the ones asked for), by node.
    pub agents: Vec<AgentInfo>,
    /// The registry's clock when it answered, so that a reader can tell how long ago each
    /// agent renewed without trusting that the two clocks agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<DateTime<Utc>>,
}

/// How often an agent renews its announcement at the registry: a third of its lease, but at
/// least every [`MAX_ANNOUNCE_PERIOD`], so that a renewal is fresh evidence of life.
pub fn announce_period(lease_ttl_s: u32) -> std::time::Duration {
    (std::time::Duration::from_secs(u64::from(lease_ttl_s)) / 3).clamp(std::time::Duration::from_secs(1), MAX_ANNOUNCE_PERIOD)
}

/// The longest time between two announcements of a live agent.
pub const MAX_ANNOUNCE_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// How recent a renewal must be for an agent that gossip cannot vouch for to be believed
/// alive: three announcement periods (one missed renewal, plus the registry's read cache
/// and the time the answer took).
pub fn renewal_window(lease_ttl_s: u32) -> std::time::Duration {
    announce_period(lease_ttl_s) * 3
}

/// The answer of `GET /v1/catalog`: everything, at one change index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogPage {
    /// The change index this catalog is at.
    pub index: u64,
    /// The database's catalog epoch: random per database, new when the registry sees its
    /// database restored. Indexes of two epochs are of different histories.
    #[serde(default)]
    pub epoch: u64,
    /// True while the registry holds expiring leases back.
    pub self_preservation: bool,
    /// Every instance, by service then id.
    pub instances: Vec<Instance>,
    /// Every known agent, by node.
    pub agents: Vec<AgentInfo>,
}

/// The `ETag` of the catalog at `index` of `epoch`, whose instances and agents digest to
/// `digest`: a restored database that climbs back to an index a client holds, with other
/// content, has another tag.
pub fn catalog_etag(epoch: u64, index: u64, digest: u64) -> String {
    format!("\"{epoch:x}-{index}-{digest:016x}\"")
}

/// Whether an `If-None-Match` header names `etag` (or is `*`); weak tags compare as equal,
/// as RFC 9110 has it for `If-None-Match`.
pub fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match.split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// Whether an `If-None-Match` header names a catalog tag of the `catalog_etag` form (with
/// its history), as opposed to the bare `"index"` tag an agent built before the history tags sends: only a
/// tag of this form tells that the caller holds another history.
pub fn names_catalog_history(if_none_match: &str) -> bool {
    if_none_match.split(',').map(str::trim).any(|tag| tag.strip_prefix("W/").unwrap_or(tag).splitn(3, '-').count() == 3)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_tags_of_the_epoch_form_name_a_history() {
        assert!(names_catalog_history(&catalog_etag(1, 2, 3)));
        assert!(names_catalog_history(&format!("W/{}", catalog_etag(1, 2, 3))));
        for header in ["\"12\"", "*", "", "W/\"3\""] {
            assert!(!names_catalog_history(header), "{header}");
        }
    }

    #[test]
    fn if_none_match_names_the_catalog_version() {
        let etag = catalog_etag(0xab, 12, 7);
        assert_eq!(etag, "\"ab-12-0000000000000007\"");
        for header in [etag.clone(), format!("W/{etag}"), format!("\"3\", {etag}"), "*".into()] {
            assert!(etag_matches(&header, &etag), "{header}");
        }
        for header in ["\"12\"", "ab-12-0000000000000007", "\"ab-12-0000000000000008\"", "", "W/\"1\""] {
            assert!(!etag_matches(header, &etag), "{header}");
        }
    }

    use super::*;
    use crate::model::Registration;

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse_json::<Registration>(br#"{"id":"a","service":"web","address":"x","port":"80"}"#).expect_err("port is a string");
        match err {
            BodyError::Invalid(errors) => assert_eq!(errors.0[0].field, "port"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn missing_and_unknown_fields_are_invalid() {
        let missing = parse_json::<Registration>(br#"{"id":"a","service":"web","address":"x"}"#);
        assert!(matches!(missing, Err(BodyError::Invalid(e)) if e.0[0].problem.contains("port")));
        let unknown = parse_json::<Registration>(br#"{"id":"a","service":"web","address":"x","port":1,"colour":1}"#);
        assert!(matches!(unknown, Err(BodyError::Invalid(e)) if e.0[0].problem.contains("colour")));
    }

    #[test]
    fn an_empty_unknown_key_is_named_as_the_body() {
        // Found by the fuzz target `api_bodies`: the problem's field was "".
        for body in [&br#"{"": 1}"#[..], br#"{"health": "passing", "": null}"#] {
            match parse_json::<Heartbeat>(body) {
                Err(BodyError::Invalid(errors)) => assert_eq!(errors.0[0].field, "body", "{errors:?}"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn syntax_errors_are_malformed() {
        assert!(matches!(parse_json::<Registration>(b"{\"id\":"), Err(BodyError::Malformed(_))));
        assert!(matches!(parse_json::<Registration>(b"{} trailing"), Err(BodyError::Malformed(_)) | Err(BodyError::Invalid(_))));
        assert!(matches!(parse_json::<Heartbeat>(b"{} x"), Err(BodyError::Malformed(_))));
    }
}
