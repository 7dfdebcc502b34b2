//! The registry's settings: [`RegistryConfig`] (every field documented; defaults, TOML file,
//! `SIGNPOST_…` environment, flags) and the command line that feeds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use signpost_shared::config::{self, ConfigError, LogFormat, Secret};
use signpost_shared::http::Limits as HttpLimits;
use signpost_shared::http::tls;

use crate::store::SessionLimits;

/// Every setting of the registry. Durations are written `500ms`, `2s`, `1m`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Folder for the embedded SQLite database when no `database_url` is given.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; none means an SQLite file in `data_dir`.
    pub database_url: Option<String>,
    /// Bearer token for the admin API (every write).
    pub admin_token: Option<Secret>,
    /// File holding the admin token.
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token for agents (instance and agent writes).
    pub agent_token: Option<Secret>,
    /// File holding the agent token.
    pub agent_token_file: Option<PathBuf>,
    /// File of per-node agent tokens, one `NODE TOKEN` pair per line: each may write only the
    /// instances of its own node.
    pub agent_tokens_file: Option<PathBuf>,
    /// Bearer token that may only read.
    pub read_token: Option<Secret>,
    /// File holding the read-only token.
    pub read_token_file: Option<PathBuf>,
    /// Per-node agent tokens read from `agent_tokens_file` (not a setting).
    #[serde(skip)]
    pub node_tokens: Vec<(String, Secret)>,
    /// Log format: `human` or `json`.
    pub log_format: LogFormat,
    /// Log filter, in `RUST_LOG` syntax (`RUST_LOG` wins when set).
    pub log_level: String,
    /// Time between two sweeps of the leases.
    #[serde(with = "signpost_shared::duration")]
    pub sweep_interval: Duration,
    /// How long an instance whose lease ran out stays (critical) before it is deregistered.
    #[serde(with = "signpost_shared::duration")]
    pub deregister_after: Duration,
    /// Self-preservation: when more than this share of all leases has lapsed, the sweeper
    /// expires none (the registry, not the fleet, is probably cut off). 1.0 turns it off.
    pub self_preservation_threshold: f64,
    /// Self-preservation only applies when at least this many instances are registered (2: a
    /// fleet of one still expires, two that lapse together are held).
    pub self_preservation_min_instances: u64,
    /// Longest time self-preservation holds; after it, the lapsed leases are taken as real.
    #[serde(with = "signpost_shared::duration")]
    pub self_preservation_max_hold: Duration,
    /// Most registry-run probes in flight at once.
    pub probe_concurrency: usize,
    /// Consecutive failed probes that make an agentless instance critical.
    pub probe_failures_before_critical: u32,
    /// How often a replica that is not the leader tries to take the leader lock, and how
    /// often the leader checks that it still holds it.
    #[serde(with = "signpost_shared::duration")]
    pub leader_check_interval: Duration,
    /// How often the catalog's change index is read from the database, as a safety net
    /// under LISTEN/NOTIFY.
    #[serde(with = "signpost_shared::duration")]
    pub index_poll_interval: Duration,
    /// Longest age of the in-memory catalog snapshot that answers reads (0s: always read
    /// the database). A change made through this replica or notified by another one
    /// always invalidates it at once.
    #[serde(with = "signpost_shared::duration")]
    pub read_cache_max_age: Duration,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Most instances the registry holds; a registration of a new id beyond it is refused
    /// (403 `quota_exceeded`). Checked inside the write, exactly.
    pub max_instances: u64,
    /// Most instances one node (agent) may own; checked inside the write, exactly.
    pub max_instances_per_node: u64,
    /// Longest `wait` a blocking query may ask for; the default wait is 5m (or this, if less).
    #[serde(with = "signpost_shared::duration")]
    pub max_wait: Duration,
    /// Most database connections.
    pub db_max_connections: u32,
    /// Longest wait for a database connection before a request answers 503.
    #[serde(with = "signpost_shared::duration")]
    pub db_acquire_timeout: Duration,
    /// PostgreSQL `lock_timeout` of every session: longest wait of a write for the change
    /// index row (held by another write to its commit) before it answers 503 (0s: none).
    #[serde(with = "signpost_shared::duration")]
    pub db_lock_timeout: Duration,
    /// PostgreSQL `idle_in_transaction_session_timeout` of every session: a replica that
    /// stops inside a transaction (frozen, cut off) has its session ended and its locks
    /// released after this long (0s: never). Must be more than `db_lock_timeout`.
    #[serde(with = "signpost_shared::duration")]
    pub db_idle_in_transaction_timeout: Duration,
    /// PostgreSQL `statement_timeout` of every session but the migrations' (0s: none).
    #[serde(with = "signpost_shared::duration")]
    pub db_statement_timeout: Duration,
    /// Most blocking queries (`index` and `wait`) waiting at once; past it one answers 503
    /// with `Retry-After`. None: half of `max_connections`. Below `max_connections`, so that
    /// waiters never hold every connection.
    pub max_blocking_queries: Option<usize>,
    /// Longest time to finish requests in flight and release the leader lock on shutdown.
    #[serde(with = "signpost_shared::duration")]
    pub shutdown_grace: Duration,
    // --- TLS and request limits (HTTP server) ---
    /// PEM certificate chain (leaf first) to serve HTTPS with; needs `tls_key_file`. Read
    /// again when it changes (or on SIGHUP).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<PathBuf>,
    /// Serve plain HTTP on an address that is not loopback (TLS is terminated in front of
    /// the registry, or the network is trusted). Without TLS and without this, the registry
    /// only listens on loopback.
    pub allow_plain_http: bool,
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

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7300)),
            data_dir: PathBuf::from("./signpost-data"),
            database_url: None,
            admin_token: None,
            admin_token_file: None,
            agent_token: None,
            agent_token_file: None,
            agent_tokens_file: None,
            read_token: None,
            read_token_file: None,
            node_tokens: vec![],
            log_format: LogFormat::Human,
            log_level: "info,sqlx=warn".into(),
            sweep_interval: Duration::from_secs(1),
            deregister_after: Duration::from_secs(60),
            self_preservation_threshold: 0.5,
            self_preservation_min_instances: 2,
            self_preservation_max_hold: Duration::from_secs(15 * 60),
            probe_concurrency: 64,
            probe_failures_before_critical: 1,
            leader_check_interval: Duration::from_secs(1),
            index_poll_interval: Duration::from_secs(1),
            read_cache_max_age: Duration::from_secs(1),
            max_body_bytes: 64 * 1024,
            max_instances: 250_000,
            max_instances_per_node: 1_000,
            max_wait: Duration::from_secs(600),
            db_max_connections: 16,
            db_acquire_timeout: Duration::from_secs(3),
            db_lock_timeout: SessionLimits::default().lock_timeout,
            db_idle_in_transaction_timeout: SessionLimits::default().idle_in_transaction_timeout,
            db_statement_timeout: SessionLimits::default().statement_timeout,
            max_blocking_queries: None,
            shutdown_grace: Duration::from_secs(10),
            tls_cert_file: None,
            tls_key_file: None,
            allow_plain_http: false,
            max_connections: HttpLimits::registry_defaults().max_connections,
            max_header_bytes: HttpLimits::registry_defaults().max_header_bytes,
            header_read_timeout: HttpLimits::registry_defaults().header_read_timeout,
            body_read_timeout: HttpLimits::registry_defaults().body_read_timeout,
            idle_timeout: HttpLimits::registry_defaults().idle_timeout,
        }
    }
}

impl RegistryConfig {
    /// The database URL, defaulting to `registry.db` in the data folder.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join("registry.db").display()),
        }
    }

    /// Resolves token files into tokens and checks the rules serde cannot express.
    pub fn finish(mut self) -> Result<Self, ConfigError> {
        if let Some(path) = self.admin_token_file.take() {
            self.admin_token = Some(Secret::from_file(&path)?);
        }
        if let Some(path) = self.agent_token_file.take() {
            self.agent_token = Some(Secret::from_file(&path)?);
        }
        if let Some(path) = self.read_token_file.take() {
            self.read_token = Some(Secret::from_file(&path)?);
        }
        if let Some(path) = &self.agent_tokens_file {
            self.node_tokens = crate::api::auth::read_agent_tokens(path)?;
        }
        for (name, token) in [("admin_token", &self.admin_token), ("agent_token", &self.agent_token), ("read_token", &self.read_token)] {
            if token.as_ref().is_some_and(|t| t.expose().len() < crate::api::auth::MIN_TOKEN_LEN) {
                return Err(ConfigError::Rule(format!("{name} must be at least 16 characters long")));
            }
        }
        if !(0.0..=1.0).contains(&self.self_preservation_threshold) {
            return Err(ConfigError::Rule("self_preservation_threshold must be between 0.0 and 1.0".into()));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://") || url.starts_with("sqlite:"))
        {
            return Err(ConfigError::Rule("database_url must start with postgres://, postgresql:// or sqlite:".into()));
        }
        let positive = [
            ("sweep_interval", self.sweep_interval),
            ("leader_check_interval", self.leader_check_interval),
            ("index_poll_interval", self.index_poll_interval),
            ("db_acquire_timeout", self.db_acquire_timeout),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::Rule(format!("{name} must be more than 0")));
        }
        if self.probe_concurrency == 0 || self.max_body_bytes == 0 || self.max_instances == 0 || self.max_instances_per_node == 0 {
            return Err(ConfigError::Rule(
                "probe_concurrency, max_body_bytes, max_instances and max_instances_per_node must be more than 0".into(),
            ));
        }
        if self.db_max_connections < 2 {
            return Err(ConfigError::Rule("db_max_connections must be at least 2 (the change listener keeps one)".into()));
        }
        if !self.db_idle_in_transaction_timeout.is_zero()
            && (self.db_lock_timeout.is_zero() || self.db_lock_timeout >= self.db_idle_in_transaction_timeout)
        {
            return Err(ConfigError::Rule(
                "db_lock_timeout must be more than 0s and less than db_idle_in_transaction_timeout: the waiting writes of a \
                 frozen replica must give up before its lock holder's session is ended, or they take the lock in turn"
                    .into(),
            ));
        }
        if let Some(n) = self.max_blocking_queries
            && (n == 0 || n >= self.max_connections)
        {
            return Err(ConfigError::Rule(format!(
                "max_blocking_queries must be at least 1 and less than max_connections ({})",
                self.max_connections
            )));
        }
        Ok(self)
    }

    /// The database session limits.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            lock_timeout: self.db_lock_timeout,
            idle_in_transaction_timeout: self.db_idle_in_transaction_timeout,
            statement_timeout: self.db_statement_timeout,
        }
    }

    /// Most blocking queries waiting at once: `max_blocking_queries`, or half of
    /// `max_connections` (at least 1).
    pub fn blocking_query_cap(&self) -> usize {
        self.max_blocking_queries.unwrap_or(self.max_connections / 2).max(1)
    }
}

/// signpost-registry: the central registry of Signpost service discovery.
///
/// Every setting can also come from the TOML file given with --config or from an environment
/// variable `SIGNPOST_<NAME>` (e.g. SIGNPOST_DATABASE_URL); flags win over the environment,
/// which wins over the file. Durations are written 500ms, 2s, 1m.
#[derive(Debug, Parser)]
#[command(name = "signpost-registry", version, about, long_about)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The settings.
    #[command(flatten)]
    pub flags: Flags,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
}

/// Flags; each one overrides the setting of the same name.
#[derive(Debug, Default, clap::Args, Serialize)]
pub struct Flags {
    /// TOML file with settings (keys as the flags, with '_' for '-').
    #[arg(long, global = true, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Folder for the embedded SQLite database [default: ./signpost-data].
    #[arg(long, global = true, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Address the HTTP API listens on [default: 127.0.0.1:7300].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// postgres://user@host/db or sqlite://file [default: sqlite file in the data folder].
    #[arg(long, global = true, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Bearer token for the admin API (at least 16 characters) [default: none; with no token at
    /// all, the API is open].
    #[arg(long, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// File holding the admin token.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token for agents (at least 16 characters) [default: none].
    #[arg(long, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_token: Option<String>,
    /// File holding the agent token.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_token_file: Option<PathBuf>,
    /// File of per-node agent tokens, `NODE TOKEN` per line; each writes only its node's
    /// instances [default: none].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_tokens_file: Option<PathBuf>,
    /// Bearer token that may only read (at least 16 characters) [default: none].
    #[arg(long, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_token: Option<String>,
    /// File holding the read-only token.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_token_file: Option<PathBuf>,
    /// Log format: human or json [default: human].
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Log filter in RUST_LOG syntax [default: info,sqlx=warn].
    #[arg(long, value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Time between two lease sweeps [default: 1s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep_interval: Option<String>,
    /// How long an expired instance stays critical before it is deregistered [default: 60s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deregister_after: Option<String>,
    /// Share of lapsed leases above which the sweeper expires none [default: 0.5; 1.0 = off].
    #[arg(long, value_name = "SHARE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_preservation_threshold: Option<f64>,
    /// Fewest registered instances for self-preservation to apply [default: 2].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_preservation_min_instances: Option<u64>,
    /// Longest time self-preservation holds [default: 15m].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_preservation_max_hold: Option<String>,
    /// Most registry-run probes in flight [default: 64].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_concurrency: Option<usize>,
    /// Consecutive failed probes before an agentless instance is critical [default: 1].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_failures_before_critical: Option<u32>,
    /// How often followers try the leader lock and the leader checks it [default: 1s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_check_interval: Option<String>,
    /// How often the change index is polled under LISTEN/NOTIFY [default: 1s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_poll_interval: Option<String>,
    /// Longest age of the in-memory catalog snapshot answering reads [default: 1s; 0s = off].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_cache_max_age: Option<String>,
    /// Largest request body in bytes [default: 65536].
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Most instances the registry holds; new ones beyond it are refused [default: 250000].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u64>,
    /// Most instances one node may own; new ones beyond it are refused [default: 1000].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_instances_per_node: Option<u64>,
    /// Longest wait of a blocking query [default: 10m].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<String>,
    /// Most database connections [default: 16].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_max_connections: Option<u32>,
    /// Longest wait for a database connection before answering 503 [default: 3s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_acquire_timeout: Option<String>,
    /// PostgreSQL lock_timeout: longest wait of a write for the change index row before it
    /// answers 503 [default: 2s; 0s = none].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_lock_timeout: Option<String>,
    /// PostgreSQL idle_in_transaction_session_timeout: a replica stopped inside a transaction
    /// (frozen, cut off) loses its session and locks after this long; more than
    /// --db-lock-timeout [default: 5s; 0s = never].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_idle_in_transaction_timeout: Option<String>,
    /// PostgreSQL statement_timeout of every statement but the migrations' [default: 30s; 0s = none].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_statement_timeout: Option<String>,
    /// Most blocking queries (index and wait) waiting at once; past it they answer 503 with
    /// Retry-After. Less than --max-connections [default: half of --max-connections].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_blocking_queries: Option<usize>,
    /// Longest time to drain on shutdown [default: 10s].
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<String>,
    // --- TLS and request limits (HTTP server) ---
    /// PEM certificate chain to serve HTTPS with (needs --tls-key-file); reloaded when the
    /// file changes or on SIGHUP [default: none, plain HTTP].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback --listen address (TLS terminated in front, or a
    /// trusted network); without TLS and without this, only loopback addresses are allowed.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_plain_http: bool,
    /// Most HTTP connections open at once; past it /healthz is still answered and anything
    /// else gets 503 [default: 1024].
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

/// Loads the configuration from the layers, with `flags` on top.
pub fn load(flags: &Flags) -> Result<RegistryConfig, ConfigError> {
    let figment = config::figment(&RegistryConfig::default(), flags.config.as_deref(), flags)?;
    config::extract::<RegistryConfig>(&figment)?.finish()?.finish_http()
}

/// The folder that holds the SQLite file, created if needed.
pub fn ensure_data_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

// === TLS and request limits ===

impl RegistryConfig {
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

    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        self.tls_cert_file.as_deref().zip(self.tls_key_file.as_deref())
    }

    /// Checks the TLS and limit settings: both TLS files or neither, a pair that loads, and
    /// plain HTTP beyond loopback only when `allow_plain_http` says so.
    pub fn finish_http(self) -> Result<Self, ConfigError> {
        if let Some((name, problem)) = self.http_limits().problems().first() {
            return Err(ConfigError::Rule(format!("{name} {problem}")));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                tls::load_pair(cert, key).map_err(|e| ConfigError::Rule(format!("tls_cert_file/tls_key_file: {e}")))?;
            }
            (None, None) => {
                if !self.listen.ip().is_loopback() && !self.allow_plain_http {
                    return Err(ConfigError::Rule(format!(
                        "listen {} is not a loopback address and TLS is off: set tls_cert_file and tls_key_file \
                         (--tls-cert-file, --tls-key-file), or allow_plain_http = true (--allow-plain-http) when TLS \
                         is terminated in front of the registry",
                        self.listen
                    )));
                }
            }
            _ => return Err(ConfigError::Rule("set both tls_cert_file and tls_key_file, or neither".into())),
        }
        Ok(self)
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;

    #[test]
    fn plain_http_beyond_loopback_needs_saying_so() {
        let wide = RegistryConfig { listen: SocketAddr::from(([0, 0, 0, 0], 7300)), ..RegistryConfig::default() };
        let err = wide.clone().finish_http().expect_err("0.0.0.0 without TLS");
        assert!(err.to_string().contains("allow_plain_http"), "{err}");
        assert!(RegistryConfig { allow_plain_http: true, ..wide }.finish_http().is_ok());
        assert!(RegistryConfig::default().finish_http().is_ok(), "loopback is fine for development");
    }

    #[test]
    fn tls_needs_both_files_and_good_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "garbage").expect("write");
        let half = RegistryConfig { tls_cert_file: Some(cert.clone()), ..RegistryConfig::default() };
        assert!(half.finish_http().expect_err("no key").to_string().contains("both"));
        let bad = RegistryConfig { tls_cert_file: Some(cert.clone()), tls_key_file: Some(cert), ..RegistryConfig::default() };
        assert!(bad.finish_http().expect_err("garbage").to_string().contains("no PEM certificate"));
    }
}

#[cfg(test)]
mod db_tests {
    use super::*;

    #[test]
    fn a_frozen_replicas_waiters_give_up_before_its_lock_holder_is_ended() {
        assert!(RegistryConfig::default().finish().is_ok());
        let equal = RegistryConfig { db_lock_timeout: Duration::from_secs(5), ..RegistryConfig::default() };
        assert!(equal.finish().expect_err("lock_timeout = idle timeout").to_string().contains("db_lock_timeout"));
        let none = RegistryConfig { db_lock_timeout: Duration::ZERO, ..RegistryConfig::default() };
        assert!(none.finish().is_err(), "waiting for ever while sessions are ended");
        let off =
            RegistryConfig { db_lock_timeout: Duration::ZERO, db_idle_in_transaction_timeout: Duration::ZERO, ..RegistryConfig::default() };
        assert!(off.finish().is_ok(), "both off is the operator's choice");
    }

    #[test]
    fn blocking_queries_stay_below_the_connection_cap() {
        assert_eq!(RegistryConfig::default().blocking_query_cap(), 512);
        let small = RegistryConfig { max_connections: 8, ..RegistryConfig::default() };
        assert_eq!(small.blocking_query_cap(), 4);
        let at_cap = RegistryConfig { max_connections: 8, max_blocking_queries: Some(8), ..RegistryConfig::default() };
        assert!(at_cap.finish().expect_err("at the cap").to_string().contains("max_blocking_queries"));
        let fine = RegistryConfig { max_connections: 8, max_blocking_queries: Some(7), ..RegistryConfig::default() };
        assert_eq!(fine.finish().expect("below the cap").blocking_query_cap(), 7);
    }
}
