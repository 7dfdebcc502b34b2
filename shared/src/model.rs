//! The model: an [`Instance`] of a service, its [`Health`] and its optional [`CheckSpec`].
//! A client sends a [`Registration`]; [`Registration::validate`] turns it into an
//! [`InstanceSpec`] or reports every problem with its field's name.

pub use crate::meta::Meta;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::validate::{self, ValidationErrors};

/// Default weight of an instance when a registration names none.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Highest weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Default lease of an instance, in seconds.
pub const DEFAULT_TTL_S: u32 = 30;
/// Longest lease, in seconds (one day).
pub const MAX_TTL_S: u32 = 86_400;

/// The health of an instance. "Healthy" means `passing` or `warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Answers its checks.
    Passing,
    /// Answers, but asks for less traffic (HTTP 429 from its check).
    Warning,
    /// Does not answer, or its lease ran out.
    Critical,
    /// Taken out of traffic on purpose.
    Maintenance,
}

impl Health {
    /// Every value, in the order answers list them.
    pub const ALL: [Health; 4] = [Health::Passing, Health::Warning, Health::Critical, Health::Maintenance];

    /// True for `passing` and `warning`.
    pub fn is_healthy(self) -> bool {
        matches!(self, Health::Passing | Health::Warning)
    }

    /// The value's name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
            Health::Maintenance => "maintenance",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Health {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Health::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| format!("`{}` is not a health: passing, warning, critical or maintenance", validate::clip(s)))
    }
}

/// How the registry (for an instance without an agent) or an agent checks an instance.
/// Exactly one of `http` and `tcp` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// An `http://` or `https://` URL: 2xx is passing, 429 warning, anything else critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// A `host:port` that must accept a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Time between two probes (default 10s, 100ms-1h).
    #[serde(default = "CheckSpec::default_interval", with = "crate::duration")]
    pub interval: Duration,
    /// Time a probe may take before it counts as failed (default 2s, at most the interval).
    #[serde(default = "CheckSpec::default_timeout", with = "crate::duration")]
    pub timeout: Duration,
}

impl CheckSpec {
    fn default_interval() -> Duration {
        Duration::from_secs(10)
    }

    fn default_timeout() -> Duration {
        Duration::from_secs(2)
    }

    /// Records every problem of this check under `field`.
    pub fn validate_into(&self, field: &str, errors: &mut ValidationErrors) {
        match (&self.http, &self.tcp) {
            (Some(_), Some(_)) | (None, None) => {
                errors.add(field, "exactly one of `http` and `tcp` must be set");
            }
            (Some(url), None) => errors.check(format!("{field}.http"), http_url(url)),
            (None, Some(addr)) => errors.check(format!("{field}.tcp"), host_port(addr)),
        }
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(3600) {
            errors.add(format!("{field}.interval"), "must be between 100ms and 1h");
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            errors.add(format!("{field}.timeout"), "must be more than 0 and at most the interval");
        }
    }
}

fn http_url(value: &str) -> Result<(), String> {
    let url = url::Url::parse(value).map_err(|e| format!("`{}` is not a URL: {e}", validate::clip(value)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("`{}` must be an http:// or https:// URL with a host", validate::clip(value)));
    }
    Ok(())
}

/// Checks a `host:port` pair (an IPv6 host in brackets).
pub fn host_port(value: &str) -> Result<(), String> {
    let bad = || format!("`{}` is not host:port", validate::clip(value));
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    validate::address(host)?;
    let port: i64 = port.parse().map_err(|_| bad())?;
    validate::port(port).map(|_| ())
}

/// The body of `POST /v1/instances`: what a client may say about an instance.
/// Numbers are read wide so that an out-of-range value gets a range error, not a type error.
/// The service may be given as `service` or as `name` (the agent's local API and configuration
/// files say `name`), or as both when they agree; answers always say `service`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RegistrationBody")]
pub struct Registration {
    /// Unique id, 1-128 characters of `[A-Za-z0-9._:-]`.
    pub id: String,
    /// The service, a DNS label (read from `name` when the body says only that).
    pub service: String,
    /// The service as the body gave it under `name`, if it did; it must agree with `service`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// IP address or host name the instance is reached at.
    pub address: String,
    /// Port, 1-65535.
    pub port: i64,
    /// At most 32 tags.
    pub tags: Vec<String>,
    /// At most 32 string pairs.
    pub meta: Meta,
    /// Relative share of traffic, 1-10000 (default 100).
    pub weight: Option<i64>,
    /// Zone, a DNS label.
    pub zone: Option<String>,
    /// Initial health (default passing); `maintenance` has its own endpoint.
    pub health: Option<Health>,
    /// The owning agent's node name, when an agent registers it.
    pub node: Option<String>,
    /// A check the registry runs itself when no agent owns the instance.
    pub check: Option<CheckSpec>,
    /// Lease in seconds (default 30, 1-86400).
    pub ttl_s: Option<i64>,
}

/// A registration as read from JSON: `service` and `name` both optional, reconciled by
/// [`Registration::validate`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistrationBody {
    id: String,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    name: Option<String>,
    address: String,
    port: i64,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: Meta,
    #[serde(default)]
    weight: Option<i64>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    health: Option<Health>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    check: Option<CheckSpec>,
    #[serde(default)]
    ttl_s: Option<i64>,
}

impl From<RegistrationBody> for Registration {
    fn from(body: RegistrationBody) -> Self {
        Registration {
            id: body.id,
            service: body.service.or_else(|| body.name.clone()).unwrap_or_default(),
            name: body.name,
            address: body.address,
            port: body.port,
            tags: body.tags,
            meta: body.meta,
            weight: body.weight,
            zone: body.zone,
            health: body.health,
            node: body.node,
            check: body.check,
            ttl_s: body.ttl_s,
        }
    }
}

/// What a body that names no service is told (the field is `service`, or `name`).
pub const SERVICE_MISSING: &str = "missing: the service's name, as `service` (or `name`)";

/// Checks that a service given both as `service` and as `name` is given the same: the two
/// are spellings of one field.
pub fn same_service(service: &str, name: &str) -> Result<(), String> {
    if service == name {
        return Ok(());
    }
    Err(format!(
        "`{}` disagrees with `service` `{}`: `name` and `service` are two spellings of the service's name; give one, or both the same",
        validate::clip(name),
        validate::clip(service)
    ))
}

/// A registration that passed validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Unique id.
    pub id: String,
    /// The service.
    pub service: String,
    /// Where it is reached.
    pub address: String,
    /// Its port.
    pub port: u16,
    /// Tags, in the order given.
    pub tags: Vec<String>,
    /// Meta pairs.
    pub meta: Meta,
    /// Weight, 1-10000.
    pub weight: u32,
    /// Zone.
    pub zone: Option<String>,
    /// Reported health (passing, warning or critical); `None` keeps what is stored (passing
    /// for a new instance), so that re-registering does not undo a failed check.
    pub health: Option<Health>,
    /// Owning agent.
    pub node: Option<String>,
    /// Registry-run check.
    pub check: Option<CheckSpec>,
    /// Lease, in seconds.
    pub ttl_s: u32,
}

impl Registration {
    /// Checks every field; returns the validated spec or every problem found.
    pub fn validate(self) -> Result<InstanceSpec, ValidationErrors> {
        let mut errors = ValidationErrors::default();
        errors.check("id", validate::instance_id(&self.id));
        if self.service.is_empty() && self.name.is_none() {
            errors.add("service", SERVICE_MISSING);
        } else {
            errors.check("service", validate::dns_label(&self.service));
        }
        if let Some(name) = &self.name {
            errors.check("name", same_service(&self.service, name));
        }
        errors.check("address", validate::address(&self.address));
        let port = validate::port(self.port).map_err(|p| errors.add("port", p)).unwrap_or(0);
        if self.tags.len() > validate::MAX_TAGS {
            errors.add("tags", format!("{} tags given; at most {} are allowed", self.tags.len(), validate::MAX_TAGS));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            errors.check(format!("tags[{i}]"), validate::text(tag, validate::MAX_TAG_LEN, false));
        }
        if self.meta.len() > validate::MAX_META {
            errors.add("meta", format!("{} pairs given; at most {} are allowed", self.meta.len(), validate::MAX_META));
        }
        for (key, value) in &self.meta {
            errors.check(format!("meta.{}", validate::clip(key)), validate::meta_key(key));
            errors.check(format!("meta.{}", validate::clip(key)), validate::text(value, validate::MAX_META_VALUE_LEN, true));
        }
        let weight = self.weight.unwrap_or(i64::from(DEFAULT_WEIGHT));
        errors.check("weight", validate::in_range(weight, 1, i64::from(MAX_WEIGHT)));
        if let Some(zone) = &self.zone {
            errors.check("zone", validate::dns_label(zone));
        }
        let health = self.health;
        if health == Some(Health::Maintenance) {
            errors.add("health", "maintenance is set with PUT /v1/instances/{id}/maintenance, not at registration");
        }
        if let Some(node) = &self.node {
            errors.check("node", validate::node_name(node));
        }
        if let Some(check) = &self.check {
            check.validate_into("check", &mut errors);
        }
        let ttl_s = self.ttl_s.unwrap_or(i64::from(DEFAULT_TTL_S));
        errors.check("ttl_s", validate::in_range(ttl_s, 1, i64::from(MAX_TTL_S)));
        // Without an agent, the registry's probe renews the lease: it must outlast two probes.
        if let (None, Some(check)) = (&self.node, &self.check)
            && (ttl_s as f64) < 2.0 * check.interval.as_secs_f64()
        {
            errors.add(
                "ttl_s",
                format!(
                    "must be at least twice the check interval ({}) for an instance without an agent",
                    crate::duration::format(check.interval)
                ),
            );
        }
        let spec = InstanceSpec {
            id: self.id,
            service: self.service,
            address: self.address,
            port,
            tags: self.tags,
            meta: self.meta,
            weight: u32::try_from(weight).unwrap_or(DEFAULT_WEIGHT),
            zone: self.zone,
            health,
            node: self.node,
            check: self.check,
            ttl_s: u32::try_from(ttl_s).unwrap_or(DEFAULT_TTL_S),
        };
        errors.into_result(spec)
    }
}

impl From<&InstanceSpec> for Registration {
    fn from(spec: &InstanceSpec) -> Self {
        Registration {
            id: spec.id.clone(),
            service: spec.service.clone(),
            name: None,
            address: spec.address.clone(),
            port: i64::from(spec.port),
            tags: spec.tags.clone(),
            meta: spec.meta.clone(),
            weight: Some(i64::from(spec.weight)),
            zone: spec.zone.clone(),
            health: spec.health,
            node: spec.node.clone(),
            check: spec.check.clone(),
            ttl_s: Some(i64::from(spec.ttl_s)),
        }
    }
}

/// An instance as the registry and the agents answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique id.
    pub id: String,
    /// The service.
    pub service: String,
    /// Where it is reached.
    pub address: String,
    /// Its port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Meta pairs.
    pub meta: Meta,
    /// Weight.
    pub weight: u32,
    /// Zone.
    pub zone: Option<String>,
    /// Effective health: `critical` when the lease ran out, `maintenance` when set so.
    pub health: Health,
    /// The last check output or heartbeat note.
    pub output: Option<String>,
    /// Why it is in maintenance, when it is.
    pub maintenance_reason: Option<String>,
    /// Owning agent.
    pub node: Option<String>,
    /// Registry-run check.
    pub check: Option<CheckSpec>,
    /// Lease, in seconds.
    pub ttl_s: u32,
    /// The change index of its last change.
    pub index: u64,
    /// When it was first registered.
    pub registered_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When its lease runs out unless renewed.
    pub lease_expires_at: DateTime<Utc>,
}

impl Instance {
    /// True for `passing` and `warning`.
    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    /// True when the instance carries every one of `tags`.
    pub fn has_tags(&self, tags: &[String]) -> bool {
        tags.iter().all(|t| self.tags.contains(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> Registration {
        serde_json::from_value(serde_json::json!({
            "id": "web-1", "service": "web", "address": "10.0.0.1", "port": 8080
        }))
        .expect("a minimal registration parses")
    }

    #[test]
    fn minimal_registration_gets_defaults() {
        let spec = registration().validate().expect("valid");
        assert_eq!(spec.weight, DEFAULT_WEIGHT);
        assert_eq!(spec.ttl_s, DEFAULT_TTL_S);
        assert_eq!(spec.health, None);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut r = registration();
        r.service = "Web_1".into();
        r.port = 70_000;
        r.tags = vec!["x".into(); 33];
        r.weight = Some(0);
        r.check =
            Some(CheckSpec { http: Some("ftp://x".into()), tcp: None, interval: Duration::from_secs(1), timeout: Duration::from_secs(5) });
        let errors = r.validate().expect_err("invalid");
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["service", "port", "tags", "weight", "check.http", "check.timeout"]);
    }

    #[test]
    fn the_service_is_taken_as_service_or_name_and_both_must_agree() {
        let parse = |body: serde_json::Value| crate::wire::parse_json::<Registration>(body.to_string().as_bytes());
        let base = || serde_json::json!({"id": "web-1", "address": "10.0.0.1", "port": 8080});
        let with = |fields: serde_json::Value| {
            let mut body = base();
            for (k, v) in fields.as_object().expect("object") {
                body[k] = v.clone();
            }
            body
        };
        for fields in [
            serde_json::json!({"service": "web"}),
            serde_json::json!({"name": "web"}),
            serde_json::json!({"service": "web", "name": "web"}),
        ] {
            let registration = parse(with(fields.clone())).expect("parses");
            let spec = registration.clone().validate().unwrap_or_else(|e| panic!("{fields}: {e}"));
            assert_eq!(spec.service, "web", "{fields}");
            // What is sent on, and answered, says `service` only.
            let again = serde_json::to_value(Registration::from(&spec)).expect("serializes");
            assert_eq!(again["service"], "web");
            assert!(again.get("name").is_none(), "{again}");
            // A registration read from a body serializes back to the same registration.
            let round = parse(serde_json::to_value(&registration).expect("serializes")).expect("parses back");
            assert_eq!(round, registration);
        }
        let fields = |body: serde_json::Value| -> Vec<String> {
            let errors = parse(body).expect("parses").validate().expect_err("refused");
            errors.0.into_iter().map(|e| format!("{}: {}", e.field, e.problem)).collect()
        };
        let clash = fields(with(serde_json::json!({"service": "web", "name": "api"})));
        assert_eq!(clash.len(), 1, "{clash:?}");
        assert!(clash[0].starts_with("name: `api` disagrees with `service` `web`"), "{clash:?}");
        // An empty `service` is a value of its own: it disagrees with `name` too.
        let empty = fields(with(serde_json::json!({"service": "", "name": "web"})));
        assert_eq!(empty.iter().map(|e| e.split(':').next().unwrap_or_default()).collect::<Vec<_>>(), ["service", "name"], "{empty:?}");
        assert_eq!(fields(base()), [format!("service: {SERVICE_MISSING}")]);
        assert!(fields(with(serde_json::json!({"name": "Web_1"})))[0].starts_with("service: "));
        // Still a closed set of fields, and a wrong type is named.
        let unknown = crate::wire::parse_json::<Registration>(br#"{"id":"a","name":"web","address":"x","port":1,"colour":1}"#);
        assert!(matches!(unknown, Err(crate::wire::BodyError::Invalid(e)) if e.0[0].field == "colour"));
        let typed = crate::wire::parse_json::<Registration>(br#"{"id":"a","name":7,"address":"x","port":1}"#);
        assert!(matches!(typed, Err(crate::wire::BodyError::Invalid(e)) if e.0[0].field == "name"));
    }

    #[test]
    fn check_needs_exactly_one_target() {
        let mut errors = ValidationErrors::default();
        let spec = CheckSpec { http: None, tcp: None, interval: Duration::from_secs(10), timeout: Duration::from_secs(1) };
        spec.validate_into("check", &mut errors);
        assert_eq!(errors.0.len(), 1);
        assert!(host_port("127.0.0.1:80").is_ok());
        assert!(host_port("[::1]:80").is_ok());
        assert!(host_port("db:0").is_err());
        assert!(host_port("db").is_err());
    }

    #[test]
    fn health_names_round_trip() {
        for h in Health::ALL {
            assert_eq!(h.as_str().parse::<Health>(), Ok(h));
        }
        assert!("ok".parse::<Health>().is_err());
    }
}
