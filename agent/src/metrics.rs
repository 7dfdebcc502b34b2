//! Prometheus metrics of one agent, rendered as text by `GET /metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use signpost_shared::http::ServeStats;
use signpost_shared::model::Health;

use crate::gossip_seal::Refusal;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every metric of the agent.
#[derive(Debug)]
pub struct Metrics {
    /// What the HTTP server's limits did (connections, timeouts).
    http: Arc<ServeStats>,
    registry: Registry,
    lookups: Family<RouteLabels, Counter>,
    service_lookups: Counter,
    cache_instances: Gauge,
    members: Family<StateLabels, Gauge>,
    checks: Family<ResultLabels, Counter>,
    sync_age: Gauge,
    registry_errors: Counter,
    bad_gossip: Counter,
    gossip_dropped: Family<ReasonLabels, Counter>,
    gossip_refused: Family<ReasonLabels, Counter>,
    gossip_datagrams_sent: Counter,
    gossip_bytes_sent: Counter,
    gossip_datagrams_received: Counter,
    gossip_bytes_received: Counter,
    gossip_recv_buffer: Gauge,
    cache_save_failures: Counter,
    cache_save_failing: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The HTTP server's counters, to hand to `signpost_shared::http::serve`.
    pub fn http_stats(&self) -> Arc<ServeStats> {
        self.http.clone()
    }

    /// Creates and registers every metric under the `signpost_agent` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("signpost_agent");
        let http = Arc::new(ServeStats::default());
        http.register(&mut registry);
        let lookups = Family::<RouteLabels, Counter>::default();
        registry.register("lookups", "Lookups answered, by route", lookups.clone());
        let service_lookups = lookups.get_or_create_owned(&RouteLabels { route: "/v1/services/{name}" });
        let cache_instances = Gauge::default();
        registry.register("cache_instances", "Instances in the merged catalog cache", cache_instances.clone());
        let members = Family::<StateLabels, Gauge>::default();
        registry.register("gossip_members", "Gossip members by state (this agent included)", members.clone());
        let checks = Family::<ResultLabels, Counter>::default();
        registry.register("check_results", "Local check results by health", checks.clone());
        let sync_age = Gauge::default();
        registry.register(
            "registry_sync_age_seconds",
            "Seconds since the registry last confirmed the catalog (-1: never)",
            sync_age.clone(),
        );
        let registry_errors = Counter::default();
        registry.register("registry_errors", "Failed calls to the registry", registry_errors.clone());
        let bad_gossip = Counter::default();
        registry.register("gossip_bad_values", "Peer gossip values skipped because they failed to decode or validate", bad_gossip.clone());
        let gossip_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "gossip_refused",
            "What peers' gossip named that was not taken, by what (nodes: past 256 new ones in a message or 10,000 in all; key_values: past a peer's 32,768 keys or 1 MiB; a node's whole delta for unknown_node_key, bad_signature, deletion, version)",
            gossip_refused.clone(),
        );
        let gossip_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "gossip_dropped",
            "Gossip datagrams dropped before chitchat, by reason (truncated, oversized, unauthenticated, misaddressed, stale, replayed, malformed, unsolicited)",
            gossip_dropped.clone(),
        );
        for refusal in Refusal::ALL {
            // Every reason shows from the start, at 0.
            let _ = gossip_dropped.get_or_create(&ReasonLabels { reason: refusal.label() });
        }
        let gossip_datagrams_sent = Counter::default();
        registry.register("gossip_datagrams_sent", "Gossip datagrams sent", gossip_datagrams_sent.clone());
        let gossip_bytes_sent = Counter::default();
        registry.register("gossip_sent_bytes", "Bytes of gossip datagrams sent", gossip_bytes_sent.clone());
        let gossip_datagrams_received = Counter::default();
        registry.register(
            "gossip_datagrams_received",
            "Gossip datagrams received, dropped ones included",
            gossip_datagrams_received.clone(),
        );
        let gossip_bytes_received = Counter::default();
        registry.register("gossip_received_bytes", "Bytes of gossip datagrams received", gossip_bytes_received.clone());
        let gossip_recv_buffer = Gauge::default();
        registry.register("gossip_recv_buffer_bytes", "Receive buffer the kernel granted the gossip socket", gossip_recv_buffer.clone());
        let cache_save_failures = Counter::default();
        registry.register(
            "cache_save_failures",
            "Failed saves of the catalog cache to data_dir (a full or read-only disk); the file saved before is kept",
            cache_save_failures.clone(),
        );
        let cache_save_failing = Gauge::default();
        registry.register(
            "cache_save_failing",
            "1 while the last try to save the catalog cache failed, 0 once a save works",
            cache_save_failing.clone(),
        );
        Metrics {
            http,
            registry,
            lookups,
            service_lookups,
            cache_instances,
            members,
            checks,
            sync_age,
            registry_errors,
            bad_gossip,
            gossip_dropped,
            gossip_refused,
            gossip_datagrams_sent,
            gossip_bytes_sent,
            gossip_datagrams_received,
            gossip_bytes_received,
            gossip_recv_buffer,
            cache_save_failures,
            cache_save_failing,
        }
    }

    /// Counts a failed save of the catalog cache.
    pub fn cache_save_failed(&self) {
        self.cache_save_failures.inc();
        self.cache_save_failing.set(1);
    }

    /// Records a save of the catalog cache that worked.
    pub fn cache_saved(&self) {
        self.cache_save_failing.set(0);
    }

    /// Brings the counts of what chitchat refused from peers (nodes, key-values) up to
    /// `nodes` and `key_values`, chitchat's totals since start.
    pub fn gossip_refused(&self, nodes: u64, key_values: u64) {
        for (reason, total) in [("nodes", nodes), ("key_values", key_values)] {
            let counter = self.gossip_refused.get_or_create(&ReasonLabels { reason });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Counts a peer's node delta refused by the identity gate (`reason`: why).
    pub fn gossip_identity_refused(&self, reason: &'static str) {
        self.gossip_refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a gossip datagram dropped before chitchat.
    pub fn gossip_dropped(&self, refusal: Refusal) {
        self.gossip_dropped.get_or_create(&ReasonLabels { reason: refusal.label() }).inc();
    }

    /// Counts a gossip datagram sent.
    pub fn gossip_sent(&self, bytes: usize) {
        self.gossip_datagrams_sent.inc();
        self.gossip_bytes_sent.inc_by(bytes as u64);
    }

    /// Counts a gossip datagram received.
    pub fn gossip_received(&self, bytes: usize) {
        self.gossip_datagrams_received.inc();
        self.gossip_bytes_received.inc_by(bytes as u64);
    }

    /// Records the receive buffer the kernel granted.
    pub fn gossip_recv_buffer(&self, bytes: usize) {
        self.gossip_recv_buffer.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts one lookup.
    pub fn lookup(&self, route: &'static str) {
        match route {
            // The hot route keeps its counter's handle: no label lookup per request.
            "/v1/services/{name}" => self.service_lookups.inc(),
            _ => self.lookups.get_or_create(&RouteLabels { route }).inc(),
        };
    }

    /// Records one local check result.
    pub fn check(&self, health: Health) {
        self.checks.get_or_create(&ResultLabels { result: health.as_str() }).inc();
    }

    /// Records the gossip membership.
    pub fn members(&self, alive: usize, dead: usize) {
        self.members.get_or_create(&StateLabels { state: "alive" }).set(alive as i64);
        self.members.get_or_create(&StateLabels { state: "dead" }).set(dead as i64);
    }

    /// Counts a failed registry call.
    pub fn registry_error(&self) {
        self.registry_errors.inc();
    }

    /// Counts a skipped gossip value.
    pub fn bad_gossip_value(&self) {
        self.bad_gossip.inc();
    }

    /// The Prometheus text, with the cache gauges as of now.
    pub fn render(&self, cache_instances: usize, sync_age_seconds: Option<i64>) -> String {
        self.cache_instances.set(cache_instances as i64);
        self.sync_age.set(sync_age_seconds.unwrap_or(-1));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::warn!("cannot encode metrics");
        }
        out
    }
}
