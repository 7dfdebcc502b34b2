//! Prometheus metrics of one registry process, rendered as text by `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use signpost_shared::http::ServeStats;
use signpost_shared::model::Health;

/// Labels of an HTTP request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

/// Labels naming a route.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// Labels naming an outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Labels naming a health.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    health: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Every metric of the registry.
#[derive(Debug)]
pub struct Metrics {
    /// What the HTTP server's limits did (connections, timeouts).
    http: Arc<ServeStats>,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    instances: Family<HealthLabels, Gauge>,
    sweeps: Family<ResultLabels, Counter>,
    leases_expired: Counter,
    instances_removed: Counter,
    self_preservation: Gauge,
    probes: Family<ResultLabels, Counter>,
    leader: Gauge,
    pool_size: Gauge,
    pool_idle: Gauge,
    catalog_index: Gauge,
    readiness_checks: Counter,
    blocking_waiting: Gauge,
    blocking_refused: Counter,
}

/// Counts a blocking query as waiting until dropped.
#[derive(Debug)]
pub struct WaitingGuard(Gauge);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
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

    /// Creates and registers every metric under the `signpost_registry` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("signpost_registry");
        let http = Arc::new(ServeStats::default());
        http.register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by route, method and status", requests.clone());
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register("http_request_duration_seconds", "HTTP request latency by route", latency.clone());
        let instances = Family::<HealthLabels, Gauge>::default();
        registry.register("instances", "Registered instances by health, as of the last catalog snapshot", instances.clone());
        let sweeps = Family::<ResultLabels, Counter>::default();
        registry.register("sweeps", "Lease sweeps by result (ok, self_preservation, resumed after a gap, error)", sweeps.clone());
        let leases_expired = Counter::default();
        registry.register("leases_expired", "Instances marked critical because their lease ran out", leases_expired.clone());
        let instances_removed = Counter::default();
        registry.register("instances_removed", "Instances deregistered by the sweeper after the grace period", instances_removed.clone());
        let self_preservation = Gauge::default();
        registry.register("self_preservation", "1 while the sweeper holds expiry back", self_preservation.clone());
        let probes = Family::<ResultLabels, Counter>::default();
        registry.register("probes", "Registry-run probes by result", probes.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica runs the sweeper and the prober", leader.clone());
        let pool_size = Gauge::default();
        registry.register("db_pool_connections", "Open database connections", pool_size.clone());
        let pool_idle = Gauge::default();
        registry.register("db_pool_idle_connections", "Idle database connections", pool_idle.clone());
        let catalog_index = Gauge::default();
        registry.register("catalog_index", "The catalog's change index as this replica knows it", catalog_index.clone());
        let readiness_checks = Counter::default();
        registry.register(
            "readiness_checks",
            "Database checks run for /readyz (its answer is cached for a second, so probes share one)",
            readiness_checks.clone(),
        );
        let blocking_waiting = Gauge::default();
        registry.register("blocking_queries_waiting", "Blocking queries waiting for a change now", blocking_waiting.clone());
        let blocking_refused = Counter::default();
        registry.register(
            "blocking_queries_refused",
            "Blocking queries answered 503 because max_blocking_queries were already waiting",
            blocking_refused.clone(),
        );
        Metrics {
            http,
            registry,
            requests,
            latency,
            instances,
            sweeps,
            leases_expired,
            instances_removed,
            self_preservation,
            probes,
            leader,
            pool_size,
            pool_idle,
            catalog_index,
            readiness_checks,
            blocking_waiting,
            blocking_refused,
        }
    }

    /// Counts one database check for `/readyz`.
    pub fn readiness_check(&self) {
        self.readiness_checks.inc();
    }

    /// Counts a blocking query as waiting until the guard is dropped.
    pub fn blocking_query_waiting(&self) -> WaitingGuard {
        self.blocking_waiting.inc();
        WaitingGuard(self.blocking_waiting.clone())
    }

    /// Counts a blocking query refused at the cap.
    pub fn blocking_query_refused(&self) {
        self.blocking_refused.inc();
    }

    /// Counts one answered request.
    pub fn request(&self, route: &'static str, method: &'static str, status: u16, elapsed: Duration) {
        self.requests.get_or_create(&RequestLabels { route, method, status }).inc();
        self.latency.get_or_create(&RouteLabels { route }).observe(elapsed.as_secs_f64());
    }

    /// Records one sweep.
    pub fn sweep(&self, result: &'static str, expired: usize, removed: usize, self_preservation: bool) {
        self.sweeps.get_or_create(&ResultLabels { result }).inc();
        self.leases_expired.inc_by(expired as u64);
        self.instances_removed.inc_by(removed as u64);
        self.self_preservation.set(i64::from(self_preservation));
    }

    /// Records one probe.
    pub fn probe(&self, result: Health) {
        self.probes.get_or_create(&ResultLabels { result: result.as_str() }).inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records the counts by health of the current catalog.
    pub fn set_instances(&self, counts: &[(Health, u64)], self_preservation: bool, index: u64) {
        for (health, count) in counts {
            self.instances.get_or_create(&HealthLabels { health: health.as_str() }).set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        self.self_preservation.set(i64::from(self_preservation));
        self.catalog_index.set(i64::try_from(index).unwrap_or(i64::MAX));
    }

    /// Records the database pool's state.
    pub fn set_pool(&self, size: u32, idle: usize) {
        self.pool_size.set(i64::from(size));
        self.pool_idle.set(i64::try_from(idle).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::warn!("cannot encode metrics");
        }
        out
    }
}
