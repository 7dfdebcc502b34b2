//! The agent's settings: [`AgentConfig`] (defaults, TOML file, `SIGNPOST_…` environment,
//! flags) with the local services it runs, and the command line that feeds it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use signpost_shared::config::{self, ConfigError, LogFormat, Secret};
use signpost_shared::http::Limits as HttpLimits;
use signpost_shared::model::{DEFAULT_TTL_S, DEFAULT_WEIGHT, Registration, host_port, same_service};
use signpost_shared::validate::{self, ValidationErrors};
use url::Url;

use crate::gossip_key::{KeyError, Keyring};

/// Every setting of the agent. Durations are written `500ms`, `2s`, `1m`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's node name, unique in the cluster (default: the host name).
    pub node: Option<String>,
    /// This agent's zone; lookups' `pick` prefers instances of the same zone.
    pub zone: Option<String>,
    /// Address other hosts reach this host's services at (default: the gossip address's IP).
    pub address: Option<String>,
    /// Address of the local HTTP API (loopback by default; any other address needs
    /// `allow_remote_api` and `api_token`).
    pub listen: SocketAddr,
    /// Bearer token every call of this agent's API but `/healthz` must present.
    pub api_token: Option<Secret>,
    /// File holding the API token.
    pub api_token_file: Option<PathBuf>,
    /// Lets the API listen on an address other hosts can reach (it then needs `api_token`).
    pub allow_remote_api: bool,
    /// UDP address gossip listens on.
    pub gossip_listen: SocketAddr,
    /// Address peers gossip to (default: `gossip_listen`, with a routable IP if it is 0.0.0.0).
    pub gossip_advertise: Option<SocketAddr>,
    /// Gossip peers to start from, `host:port` (the registry's agent list is used too).
    pub seeds: Vec<String>,
    /// Agents of another cluster id are not let in.
    pub cluster_id: String,
    /// Registry URLs, tried in order.
    pub registry: Vec<Url>,
    /// Bearer token for the registry.
    pub token: Option<Secret>,
    /// File holding the token.
    pub token_file: Option<PathBuf>,
    /// Folder of the persisted catalog cache and the node key (`node.key`).
    pub data_dir: PathBuf,
    /// The local services this agent registers and checks.
    pub services: Vec<ServiceConfig>,
    /// Per service name, the least healthy share below which lookups answer every instance
    /// (the panic threshold); e.g. `{ web = 0.5 }`.
    pub protection_thresholds: BTreeMap<String, f64>,
    /// Keys that encrypt and authenticate gossip, base64 (`signpost-agent keygen`): the first
    /// seals what this agent sends, every one opens what it receives.
    pub gossip_keys: Vec<Secret>,
    /// File with the gossip keys, one per line, the first one sealing; read again when it
    /// changes, so keys rotate without a restart.
    pub gossip_key_file: Option<PathBuf>,
    /// Gossip in the clear on an address other hosts can reach: anyone who can send UDP there
    /// joins the cluster and publishes instances. Without a key, gossip on a non-loopback
    /// address needs this set, explicitly, and then warns at start.
    pub insecure_gossip: bool,
    /// Receive buffer of the gossip socket, in bytes (forced past `net.core.rmem_max` when the
    /// process has CAP_NET_ADMIN).
    pub gossip_recv_buffer: usize,
    /// Time between two gossip rounds.
    #[serde(with = "signpost_shared::duration")]
    pub gossip_interval: Duration,
    /// Failure detector: phi above which a peer is dead.
    pub phi_threshold: f64,
    /// How long a dead peer is remembered before it is forgotten.
    #[serde(with = "signpost_shared::duration")]
    pub dead_node_grace: Duration,
    /// Lease of each registration; heartbeats go out at a third of it.
    pub lease_ttl_s: u32,
    /// Most local services this agent runs (configured plus added at run time); one more
    /// is refused (403 `quota_exceeded`).
    pub max_local_services: usize,
    /// How long one blocking catalog query waits at the registry.
    #[serde(with = "signpost_shared::duration")]
    pub catalog_wait: Duration,
    /// Log format: `human` or `json`.
    pub log_format: LogFormat,
    /// Log filter, `RUST_LOG` syntax.
    pub log_level: String,
    /// Longest time to leave cleanly on SIGTERM/SIGINT.
    #[serde(with = "signpost_shared::duration")]
    pub shutdown_grace: Duration,
    // --- Registry TLS and request limits (HTTP server) ---
    /// PEM bundle of CA certificates trusted for `https://` registries, besides the
    /// platform's roots (a private CA).
    pub registry_ca_file: Option<PathBuf>,
    /// Most HTTP connections open at once; past the cap a few more are accepted, answering
    /// `/healthz` and 503 to anything else.
    pub max_connections: usize,
    /// Largest request line plus headers, in bytes (more: 431).
    pub max_header_bytes: usize,
    /// Longest time for a request's headers to arrive (a new connection's included).
    #[serde(with = "signpost_shared::duration")]
    pub header_read_timeout: Duration,
    /// Longest time for a request's body to arrive once its headers are in.
    #[serde(with = "signpost_shared::duration")]
    pub body_read_timeout: Duration,
    /// Longest time a keep-alive connection stays open with nothing to do.
    #[serde(with = "signpost_shared::duration")]
    pub idle_timeout: Duration,
}

/// A local service as configured. Its name may be given as `name` or as `service` (the
/// registry's spelling), or as both when they agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "ServiceConfigBody")]
pub struct ServiceConfig {
    /// The service's name (a DNS label), read from `service` when only that is given.
    pub name: String,
    /// The name as given under `service`, if it was; it must agree with `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Its port.
    pub port: u16,
    /// Instance id (default: `{node}-{name}-{port}`, stable across restarts).
    pub id: Option<String>,
    /// Address (default: the agent's).
    pub address: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Meta pairs.
    pub meta: signpost_shared::model::Meta,
    /// Weight (default 100).
    pub weight: Option<u32>,
    /// Zone (default: the agent's).
    pub zone: Option<String>,
    /// Its checks; none means it is passing while the agent runs.
    pub checks: Vec<CheckConfig>,
}

/// A local service as read (a config file, `POST /v1/agent/services`): `name` and `service`
/// both optional, reconciled by [`ServiceConfig::validate_into`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceConfigBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    service: Option<String>,
    port: u16,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: signpost_shared::model::Meta,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    checks: Vec<CheckConfig>,
}

impl From<ServiceConfigBody> for ServiceConfig {
    fn from(body: ServiceConfigBody) -> Self {
        ServiceConfig {
            name: body.name.or_else(|| body.service.clone()).unwrap_or_default(),
            service: body.service,
            port: body.port,
            id: body.id,
            address: body.address,
            tags: body.tags,
            meta: body.meta,
            weight: body.weight,
            zone: body.zone,
            checks: body.checks,
        }
    }
}

/// One check of a local service: exactly one of `http`, `tcp` and `ttl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Check id (default: `{instance id}:{n}`), used by `PUT /v1/agent/checks/{id}/…`.
    #[serde(default)]
    pub id: Option<String>,
    /// URL: 2xx passing, 429 warning, anything else or a timeout critical.
    #[serde(default)]
    pub http: Option<String>,
    /// `host:port` that must accept a connection.
    #[serde(default)]
    pub tcp: Option<String>,
    /// The application reports through the agent's API at least this often.
    #[serde(default, with = "signpost_shared::duration::option")]
    pub ttl: Option<Duration>,
    /// Time between two probes (default 10s).
    #[serde(default = "default_interval", with = "signpost_shared::duration")]
    pub interval: Duration,
    /// Longest probe (default 2s).
    #[serde(default = "default_timeout", with = "signpost_shared::duration")]
    pub timeout: Duration,
    /// Successes in a row that make it passing (default 1).
    #[serde(default = "one")]
    pub successes_before_passing: u32,
    /// Failures in a row that make it critical (default 1).
    #[serde(default = "one")]
    pub failures_before_critical: u32,
}

/// Default receive buffer of the gossip socket: 8 MiB.
pub const DEFAULT_GOSSIP_RECV_BUFFER: usize = 8 << 20;

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

fn one() -> u32 {
    1
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node: None,
            zone: None,
            address: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7301)),
            api_token: None,
            api_token_file: None,
            allow_remote_api: false,
            gossip_listen: SocketAddr::from(([0, 0, 0, 0], 7302)),
            gossip_advertise: None,
            seeds: vec![],
            cluster_id: "signpost".into(),
            registry: vec![Url::parse("http://127.0.0.1:7300").unwrap_or_else(|_| unreachable!("a valid literal URL"))],
            token: None,
            token_file: None,
            data_dir: PathBuf::from("./signpost-data"),
            services: vec![],
            protection_thresholds: BTreeMap::new(),
            gossip_keys: vec![],
            gossip_key_file: None,
            insecure_gossip: false,
            gossip_recv_buffer: DEFAULT_GOSSIP_RECV_BUFFER,
            gossip_interval: Duration::from_millis(100),
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(15 * 60),
            lease_ttl_s: DEFAULT_TTL_S,
            max_local_services: 100,
            catalog_wait: Duration::from_secs(30),
            log_format: LogFormat::Human,
            log_level: "info,chitchat=warn".into(),
            shutdown_grace: Duration::from_secs(5),
            registry_ca_file: None,
            max_connections: HttpLimits::agent_defaults().max_connections,
            max_header_bytes: HttpLimits::agent_defaults().max_header_bytes,
            header_read_timeout: HttpLimits::agent_defaults().header_read_timeout,
            body_read_timeout: HttpLimits::agent_defaults().body_read_timeout,
            idle_timeout: HttpLimits::agent_defaults().idle_timeout,
        }
    }
}

impl CheckConfig {
    /// Records every problem of this check under `field`.
    pub fn validate_into(&self, field: &str, errors: &mut ValidationErrors) {
        let targets = [self.http.is_some(), self.tcp.is_some(), self.ttl.is_some()].iter().filter(|t| **t).count();
        if targets != 1 {
            errors.add(field, "exactly one of `http`, `tcp` and `ttl` must be set");
        }
        if let Some(url) = &self.http {
            let ok = Url::parse(url).ok().is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                errors.add(format!("{field}.http"), format!("`{}` must be an http:// or https:// URL", validate::clip(url)));
            }
        }
        if let Some(addr) = &self.tcp {
            errors.check(format!("{field}.tcp"), host_port(addr));
        }
        if let Some(ttl) = self.ttl
            && (ttl < Duration::from_millis(100) || ttl > Duration::from_secs(86_400))
        {
            errors.add(format!("{field}.ttl"), "must be between 100ms and 24h");
        }
        if let Some(id) = &self.id {
            errors.check(format!("{field}.id"), validate::instance_id(id));
        }
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(3600) {
            errors.add(format!("{field}.interval"), "must be between 100ms and 1h");
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            errors.add(format!("{field}.timeout"), "must be more than 0 and at most the interval");
        }
        for (name, value) in
            [("successes_before_passing", self.successes_before_passing), ("failures_before_critical", self.failures_before_critical)]
        {
            if !(1..=100).contains(&value) {
                errors.add(format!("{field}.{name}"), "must be 1-100");
            }
        }
    }
}

impl ServiceConfig {
    /// The instance id: configured, or `{node}-{name}-{port}`.
    pub fn instance_id(&self, node: &str) -> String {
        self.id.clone().unwrap_or_else(|| format!("{node}-{}-{}", self.name, self.port))
    }

    /// Checks the service and its checks; `field` names it in errors. A problem of the
    /// service's name, or `name` and `service` disagreeing, is reported under `{field}.name`.
    pub fn validate_into(&self, field: &str, node: &str, address: &str, errors: &mut ValidationErrors) {
        let registration = self.registration(node, address, None);
        if let Err(problems) = registration.validate() {
            for problem in problems.0 {
                let name = if problem.field == "service" { "name".to_string() } else { problem.field };
                errors.add(format!("{field}.{name}"), problem.problem);
            }
        }
        if let Some(service) = &self.service {
            errors.check(format!("{field}.name"), same_service(service, &self.name));
        }
        for (i, check) in self.checks.iter().enumerate() {
            check.validate_into(&format!("{field}.checks[{i}]"), errors);
        }
    }

    /// The registration this service sends to the registry.
    pub fn registration(&self, node: &str, address: &str, zone: Option<&str>) -> Registration {
        Registration {
            id: self.instance_id(node),
            service: self.name.clone(),
            name: None,
            address: self.address.clone().unwrap_or_else(|| address.to_string()),
            port: i64::from(self.port),
            tags: self.tags.clone(),
            meta: self.meta.clone(),
            weight: Some(i64::from(self.weight.unwrap_or(DEFAULT_WEIGHT))),
            zone: self.zone.clone().or_else(|| zone.map(str::to_string)),
            health: None,
            node: Some(node.to_string()),
            check: None,
            ttl_s: None,
        }
    }
}

impl AgentConfig {
    /// The node name: configured, or the host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// The gossip keys, from the settings or the key file; `None` when gossip is in the clear.
    pub fn gossip_keyring(&self) -> Result<Option<Keyring>, KeyError> {
        match (&self.gossip_key_file, self.gossip_keys.as_slice()) {
            (Some(path), _) => Keyring::read_file(path).map(Some),
            (None, []) => Ok(None),
            (None, keys) => Keyring::parse(&keys.iter().map(Secret::expose).collect::<Vec<_>>()).map(Some),
        }
    }

    /// Resolves the token file and checks every rule serde cannot express.
    pub fn finish(mut self) -> Result<Self, ConfigError> {
        if let Some(path) = self.token_file.take() {
            self.token = Some(Secret::from_file(&path)?);
        }
        if let Some(path) = self.api_token_file.take() {
            self.api_token = Some(Secret::from_file(&path)?);
        }
        let node = self.node_name();
        let mut errors = ValidationErrors::default();
        errors.check("node", validate::node_name(&node));
        if let Some(zone) = &self.zone {
            errors.check("zone", validate::dns_label(zone));
        }
        if let Some(address) = &self.address {
            errors.check("address", validate::address(address));
        }
        errors.check("cluster_id", validate::node_name(&self.cluster_id));
        if let Some(token) = &self.api_token
            && token.expose().len() < 16
        {
            errors.add("api_token", "must be at least 16 characters long");
        }
        let remote_allowed = self.allow_remote_api && self.api_token.is_some();
        if !(self.listen.ip().is_loopback() || remote_allowed) {
            errors.add(
                "listen",
                format!(
                    "{} is not a loopback address: serving the agent API to other hosts needs allow_remote_api = true and an api_token",
                    self.listen
                ),
            );
        }
        if self.registry.is_empty() {
            errors.add("registry", "at least one registry URL is needed");
        }
        for (i, url) in self.registry.iter().enumerate() {
            if !matches!(url.scheme(), "http" | "https") {
                errors.add(format!("registry[{i}]"), "must be an http:// or https:// URL");
            }
        }
        for (i, seed) in self.seeds.iter().enumerate() {
            errors.check(format!("seeds[{i}]"), host_port(seed));
        }
        for (name, share) in &self.protection_thresholds {
            errors.check(format!("protection_thresholds.{}", validate::clip(name)), validate::dns_label(name));
            if !(0.0..=1.0).contains(share) {
                errors.add(format!("protection_thresholds.{}", validate::clip(name)), "must be between 0.0 and 1.0");
            }
        }
        let keyless = self.gossip_keys.is_empty() && self.gossip_key_file.is_none();
        if keyless && !self.insecure_gossip && !self.gossip_listen.ip().is_loopback() {
            errors.add(
                "gossip_keys",
                format!(
                    "gossip on {} needs a key: set gossip_keys or gossip_key_file (signpost-agent keygen), or insecure_gossip = true to gossip in the clear, which lets anyone who can send UDP there publish instances",
                    self.gossip_listen
                ),
            );
        }
        if !self.gossip_keys.is_empty() && self.gossip_key_file.is_some() {
            errors.add("gossip_keys", "set either gossip_keys or gossip_key_file, not both");
        } else if let Err(e) = self.gossip_keyring() {
            errors.add(if self.gossip_keys.is_empty() { "gossip_key_file" } else { "gossip_keys" }, e.to_string());
        }
        if !(64 << 10..=1 << 30).contains(&self.gossip_recv_buffer) {
            errors.add("gossip_recv_buffer", "must be between 65536 and 1073741824 bytes");
        }
        if self.gossip_interval < Duration::from_millis(10) || self.gossip_interval > Duration::from_secs(10) {
            errors.add("gossip_interval", "must be between 10ms and 10s");
        }
        // Forgetting a dead node does not hand its instances back to the registry's word (the
        // merge rule remembers the death), so this only has to outlast a few gossip rounds.
        if self.dead_node_grace < Duration::from_secs(2) || self.dead_node_grace < self.gossip_interval * 20 {
            errors.add("dead_node_grace", "must be at least 2s and at least 20 gossip intervals");
        }
        if !(1.0..=100.0).contains(&self.phi_threshold) {
            errors.add("phi_threshold", "must be between 1 and 100");
        }
        errors.check("lease_ttl_s", validate::in_range(i64::from(self.lease_ttl_s), 3, 86_400));
        if self.max_local_services == 0 {
            errors.add("max_local_services", "must be at least 1");
        } else if self.services.len() > self.max_local_services {
            errors.add(
                "services",
                format!("{} services configured, more than max_local_services ({})", self.services.len(), self.max_local_services),
            );
        }
        if self.catalog_wait < Duration::from_secs(1) || self.catalog_wait > Duration::from_secs(600) {
            errors.add("catalog_wait", "must be between 1s and 10m");
        }
        let address = self.address.clone().unwrap_or_else(|| "127.0.0.1".into());
        let mut ids = std::collections::BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            service.validate_into(&format!("services[{i}]"), &node, &address, &mut errors);
            if !ids.insert(service.instance_id(&node)) {
                errors.add(format!("services[{i}]"), format!("instance id `{}` is used twice", service.instance_id(&node)));
            }
        }
        errors.into_result(self).map_err(|e| ConfigError::Rule(e.to_string()))
    }
}

/// signpost-agent: the Signpost sidecar. It registers and health-checks the local services,
/// gossips with the other agents, keeps the whole catalog in memory and answers lookups on
/// localhost.
///
/// Every setting can also come from the TOML file given with --config or from an environment
/// variable SIGNPOST_<NAME>; flags win over the environment, which wins over the file.
/// Durations are written 500ms, 2s, 1m. Two settings live only in the file: several
/// services with their checks ([[services]]: name (or service), port, id, address, tags, meta, weight,
/// zone, checks = [{ id, http | tcp | ttl, interval, timeout, successes_before_passing,
/// failures_before_critical }]) and per-service protection thresholds
/// ([protection_thresholds] web = 0.5).
#[derive(Debug, Parser)]
#[command(name = "signpost-agent", version, about, long_about)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The settings.
    #[command(flatten)]
    pub flags: Flags,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    Run,
    /// Print a new random gossip key (base64) and exit.
    Keygen,
}

/// Flags; each overrides the setting of the same name.
#[derive(Debug, Default, clap::Args, Serialize)]
pub struct Flags {
    /// TOML file with settings (services in [[services]] tables).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Folder of the persisted catalog cache and the node key (node.key) [default: ./signpost-data].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Registry URL; repeat for fail-over in order [default: http://127.0.0.1:7300].
    #[arg(long = "registry", value_name = "URL")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub registry: Vec<String>,
    /// A local service as NAME:PORT (more in the config file).
    #[arg(long, value_name = "NAME:PORT")]
    #[serde(skip)]
    pub service: Option<String>,
    /// HTTP check URL of --service.
    #[arg(long, value_name = "URL", requires = "service")]
    #[serde(skip)]
    pub check_http: Option<String>,
    /// TCP check address of --service.
    #[arg(long, value_name = "ADDR", requires = "service", conflicts_with = "check_http")]
    #[serde(skip)]
    pub check_tcp: Option<String>,
    /// Interval of the --service check [default: 10s].
    #[arg(long, value_name = "DURATION", requires = "service")]
    #[serde(skip)]
    pub check_interval: Option<String>,
    /// This agent's node name [default: the host name].
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// This agent's zone [default: none].
    #[arg(long, value_name = "ZONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Address others reach the local services at [default: the gossip address's IP].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Address of the local HTTP API; a non-loopback one needs --allow-remote-api and
    /// --api-token [default: 127.0.0.1:7301].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Bearer token every call of the agent API but /healthz must present [default: none].
    #[arg(long, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    /// File holding the API token.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// Let the API listen on a non-loopback --listen address (needs --api-token).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_remote_api: bool,
    /// UDP address gossip listens on [default: 0.0.0.0:7302].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_listen: Option<String>,
    /// Address peers gossip to [default: the listen address].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_advertise: Option<String>,
    /// A gossip peer host:port; repeatable [default: the registry's agent list].
    #[arg(long = "seed", value_name = "ADDR")]
    #[serde(rename = "seeds", skip_serializing_if = "Vec::is_empty")]
    pub seed: Vec<String>,
    /// Cluster id; agents of another id are not let in [default: signpost].
    #[arg(long, value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Bearer token for the registry [default: none].
    #[arg(long, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the token.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A gossip key (base64, from `signpost-agent keygen`); repeatable: the first seals, every
    /// one opens [default: none, gossip in the clear].
    #[arg(long = "gossip-key", value_name = "KEY")]
    #[serde(rename = "gossip_keys", skip_serializing_if = "Vec::is_empty")]
    pub gossip_key: Vec<String>,
    /// File with the gossip keys, one per line, the first one sealing; reloaded on change.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_key_file: Option<PathBuf>,
    /// Gossip in the clear on a non-loopback address (without a key, needed there; warns).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_gossip: bool,
    /// Receive buffer of the gossip socket in bytes [default: 8388608].
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_recv_buffer: Option<usize>,
    /// Time between two gossip rounds [default: 100ms].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_interval: Option<String>,
    /// Failure detector threshold [default: 8].
    #[arg(long, value_name = "PHI")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phi_threshold: Option<f64>,
    /// How long a dead peer is remembered [default: 15m].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_node_grace: Option<String>,
    /// Lease of each registration in seconds [default: 30].
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl_s: Option<u32>,
    /// Most local services this agent runs; one more is refused [default: 100].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_local_services: Option<usize>,
    /// Wait of one blocking catalog query [default: 30s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog_wait: Option<String>,
    /// Log format: human or json [default: human].
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Log filter in RUST_LOG syntax [default: info,chitchat=warn].
    #[arg(long, value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Longest time to leave cleanly [default: 5s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<String>,
    // --- Registry TLS and request limits (HTTP server) ---
    /// PEM bundle of CA certificates trusted for https:// registries, besides the platform's
    /// roots [default: none, the platform's roots only].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_ca_file: Option<PathBuf>,
    /// Most HTTP connections open at once; past it /healthz is still answered and anything
    /// else gets 503 [default: 256].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Largest request line plus headers in bytes; more gets 431 [default: 16384].
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<usize>,
    /// Longest time for a request's headers to arrive, also on a new connection [default: 10s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<String>,
    /// Longest time for a request's body to arrive after its headers [default: 10s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_read_timeout: Option<String>,
    /// Longest time an idle keep-alive connection stays open [default: 75s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// Loads the configuration from the layers, with `flags` on top; `--service` adds one
/// service to those of the file.
pub fn load(flags: &Flags) -> Result<AgentConfig, ConfigError> {
    let figment = config::figment(&AgentConfig::default(), flags.config.as_deref(), flags)?;
    let mut agent: AgentConfig = config::extract(&figment)?;
    if let Some(service) = &flags.service {
        agent.services.push(service_flag(service, flags)?);
    }
    agent.finish()?.finish_http()
}

fn service_flag(text: &str, flags: &Flags) -> Result<ServiceConfig, ConfigError> {
    let bad = || ConfigError::Rule(format!("--service `{}` must be NAME:PORT", validate::clip(text)));
    let (name, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let interval = match &flags.check_interval {
        Some(text) => signpost_shared::duration::parse(text).map_err(|e| ConfigError::Rule(format!("--check-interval: {e}")))?,
        None => default_interval(),
    };
    let check = |http: Option<String>, tcp: Option<String>| CheckConfig {
        id: None,
        http,
        tcp,
        ttl: None,
        interval,
        timeout: default_timeout().min(interval),
        successes_before_passing: 1,
        failures_before_critical: 1,
    };
    let checks = match (&flags.check_http, &flags.check_tcp) {
        (Some(url), _) => vec![check(Some(url.clone()), None)],
        (None, Some(addr)) => vec![check(None, Some(addr.clone()))],
        (None, None) => vec![],
    };
    Ok(ServiceConfig {
        name: name.to_string(),
        service: None,
        port,
        id: None,
        address: None,
        tags: vec![],
        meta: Default::default(),
        weight: None,
        zone: None,
        checks,
    })
}

// === Registry TLS and request limits ===

impl AgentConfig {
    /// The HTTP server's request limits.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            idle_timeout: self.idle_timeout,
        }
    }

    /// Checks the limits and that the registry CA file holds certificates.
    pub fn finish_http(self) -> Result<Self, ConfigError> {
        if let Some((name, problem)) = self.http_limits().problems().first() {
            return Err(ConfigError::Rule(format!("{name} {problem}")));
        }
        if let Some(path) = &self.registry_ca_file {
            signpost_shared::client::read_ca_file(path).map_err(|e| ConfigError::Rule(format!("registry_ca_file: {e}")))?;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags of an agent with one service; gossip on loopback (keyless is fine there).
    fn flags(service: &str) -> Flags {
        Flags {
            service: Some(service.into()),
            node: Some("node-a".into()),
            gossip_listen: Some("127.0.0.1:7302".into()),
            ..Flags::default()
        }
    }

    #[test]
    fn keyless_gossip_beyond_loopback_is_an_explicit_choice() {
        let mut f = flags("web:8080");
        f.gossip_listen = Some("0.0.0.0:7302".into());
        let error = load(&f).expect_err("keyless on every address").to_string();
        assert!(error.contains("gossip_keys") && error.contains("insecure_gossip"), "{error}");
        f.insecure_gossip = true;
        assert!(load(&f).expect("explicitly insecure").insecure_gossip);
        f.insecure_gossip = false;
        f.gossip_key = vec!["MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".into()];
        assert!(load(&f).is_ok(), "with a key");
        assert!(load(&flags("web:8080")).is_ok(), "keyless on loopback");
    }

    #[test]
    fn one_flag_is_enough_for_one_service() {
        let config = load(&flags("web:8080")).expect("valid");
        assert_eq!(config.services.len(), 1);
        assert_eq!(config.services[0].instance_id("node-a"), "node-a-web-8080");
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 7301)));
    }

    #[test]
    fn the_api_stays_on_loopback_unless_allowed_with_a_token() {
        let mut f = flags("web:8080");
        f.listen = Some("0.0.0.0:7301".into());
        let error = load(&f).expect_err("wide without permission").to_string();
        assert!(error.contains("allow_remote_api"), "{error}");
        f.allow_remote_api = true;
        assert!(load(&f).is_err(), "allowed but without a token");
        f.api_token = Some("short".into());
        assert!(load(&f).expect_err("short token").to_string().contains("api_token"));
        f.api_token = Some("a-long-enough-api-token".into());
        assert!(load(&f).is_ok());
        let mut local = flags("web:8080");
        local.listen = Some("127.0.0.9:7301".into());
        assert!(load(&local).is_ok(), "any loopback address is fine");
    }

    #[test]
    fn a_service_is_named_by_name_or_service_and_both_must_agree() {
        use figment::providers::Format as _;
        let check = |toml: &str| -> Result<ServiceConfig, String> {
            let service: ServiceConfig =
                figment::Figment::from(figment::providers::Toml::string(toml)).extract().map_err(|e| e.to_string())?;
            let mut errors = ValidationErrors::default();
            service.validate_into("services[0]", "node-a", "10.0.0.1", &mut errors);
            errors.into_result(service).map_err(|e| e.to_string())
        };
        for toml in ["name = \"db\"\nport = 5432", "service = \"db\"\nport = 5432", "name = \"db\"\nservice = \"db\"\nport = 5432"] {
            let service = check(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
            assert_eq!(service.instance_id("node-a"), "node-a-db-5432", "{toml}");
            let registration = service.registration("node-a", "10.0.0.1", None);
            assert_eq!((registration.service.as_str(), registration.name.as_deref()), ("db", None), "{toml}");
        }
        let clash = check("name = \"db\"\nservice = \"web\"\nport = 5432").expect_err("disagreeing");
        assert!(clash.contains("services[0].name: `db` disagrees with `service` `web`"), "{clash}");
        let missing = check("port = 5432").expect_err("no name");
        assert!(missing.contains("services[0].name: missing"), "{missing}");
        let bad = check("service = \"Db_1\"\nport = 5432").expect_err("invalid");
        assert!(bad.contains("services[0].name"), "{bad}");
        // The local API's body: the same rules, and what it answers says `service`.
        let body: ServiceConfig = signpost_shared::wire::parse_json(br#"{"service":"api","port":9100}"#).expect("parses");
        assert_eq!(body.name, "api");
        let unknown = signpost_shared::wire::parse_json::<ServiceConfig>(br#"{"service":"api","port":9100,"colour":1}"#);
        assert!(unknown.is_err());
    }

    #[test]
    fn service_flag_errors_are_clear() {
        assert!(load(&flags("web")).expect_err("no port").to_string().contains("NAME:PORT"));
        assert!(load(&flags("Web_1:80")).expect_err("bad name").to_string().contains("services[0].name"));
        let mut f = flags("web:80");
        f.check_http = Some("ftp://x".into());
        assert!(load(&f).expect_err("bad check").to_string().contains("checks[0].http"));
    }
}
