//! Runs the local services' checks: one task per HTTP or TCP check (first probe at a random
//! point of a short stagger, then every interval), and one loop that turns overdue TTL checks
//! critical. The set of tasks follows `LocalState` as services are added and removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use signpost_shared::model::Health;
use signpost_shared::probe;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::local::{CheckKind, CheckState, LocalState};
use crate::metrics::Metrics;

/// What identifies a running probe task: restarting it when any of this changes.
type TaskKey = (String, String, String, Duration, Duration);

fn key(check: &CheckState) -> Option<TaskKey> {
    let target = match &check.kind {
        CheckKind::Http(url) => format!("http {url}"),
        CheckKind::Tcp(addr) => format!("tcp {addr}"),
        CheckKind::Ttl(_) => return None,
    };
    Some((check.instance.clone(), check.id.clone(), target, check.interval, check.timeout))
}

/// Runs until cancelled.
pub async fn run(local: Arc<LocalState>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let http = match probe::http_client() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the check HTTP client; HTTP checks are off");
            return;
        }
    };
    let mut changes = local.subscribe();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<TaskKey, tokio::task::AbortHandle> = HashMap::new();
    loop {
        let wanted: HashMap<TaskKey, CheckState> = local.checks().into_iter().filter_map(|c| key(&c).map(|k| (k, c))).collect();
        running.retain(|k, handle| {
            let keep = wanted.contains_key(k);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (k, check) in wanted {
            if running.contains_key(&k) {
                continue;
            }
            let handle = tasks.spawn(probe_loop(local.clone(), metrics.clone(), http.clone(), check, shutdown.clone()));
            running.insert(k, handle);
        }
        let next_ttl = local.expire_ttls(Instant::now()).unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(next_ttl) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
}

async fn probe_loop(local: Arc<LocalState>, metrics: Arc<Metrics>, http: reqwest::Client, check: CheckState, shutdown: CancellationToken) {
    let stagger_ms = u64::try_from(check.interval.min(Duration::from_millis(500)).as_millis()).unwrap_or(500).max(1);
    let mut next = Instant::now() + Duration::from_millis(rand::rng().random_range(0..stagger_ms));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next += check.interval;
        let (health, output) = match &check.kind {
            CheckKind::Http(url) => probe::http(&http, url, check.timeout).await,
            CheckKind::Tcp(addr) => probe::tcp(addr, check.timeout).await,
            CheckKind::Ttl(_) => return,
        };
        metrics.check(health);
        match local.record(&check.instance, &check.id, health, output.clone()) {
            Ok(true) => tracing::info!(instance = %check.instance, check = %check.id, health = %health, output = %output, "check changed"),
            Ok(false) => {}
            Err(_) => return, // the service was removed
        }
        if next < Instant::now() {
            next = Instant::now();
        }
    }
}

/// A report's health from the path word of `PUT /v1/agent/checks/{id}/{pass,warn,fail}`.
pub fn report_health(word: &str) -> Option<Health> {
    match word {
        "pass" => Some(Health::Passing),
        "warn" => Some(Health::Warning),
        "fail" => Some(Health::Critical),
        _ => None,
    }
}
