//! Active probes: while this replica leads, it checks every instance that has no owning
//! agent and declares a check (`http` URL or `tcp` address). A passing probe renews the
//! lease like a heartbeat; failing probes make the instance critical and let the lease run
//! out, after which the sweeper deregisters it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use signpost_shared::model::{CheckSpec, Health};
use signpost_shared::wire::Heartbeat;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{ProbeTarget, Store};

/// How often the list of targets is read again and due probes are started.
const TICK: Duration = Duration::from_millis(250);

/// Prober settings.
#[derive(Debug, Clone)]
pub struct ProberConfig {
    /// Most probes in flight.
    pub concurrency: usize,
    /// Consecutive failures that make an instance critical.
    pub failures_before_critical: u32,
}

struct Scheduled {
    check: CheckSpec,
    next_due: Instant,
    failures: u32,
    in_flight: bool,
}

/// Probes while `leader` is true, until cancelled.
pub async fn run(store: Store, config: ProberConfig, leader: watch::Receiver<bool>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let http = match reqwest::Client::builder().pool_max_idle_per_host(0).redirect(reqwest::redirect::Policy::none()).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the probe HTTP client; probes are off");
            shutdown.cancelled().await;
            return;
        }
    };
    let mut schedule: HashMap<String, Scheduled> = HashMap::new();
    let mut running: JoinSet<(String, Health, String)> = JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = running.join_next() => {
                if let Ok((id, health, output)) = done {
                    record(&store, &config, &metrics, &mut schedule, id, health, output).await;
                }
                continue;
            }
            _ = ticker.tick() => {}
        }
        if !*leader.borrow() {
            schedule.clear();
            continue;
        }
        match store.probe_targets().await {
            Ok(targets) => reconcile(&mut schedule, targets),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read probe targets");
                continue;
            }
        }
        let now = Instant::now();
        for (id, entry) in schedule.iter_mut() {
            if entry.in_flight || entry.next_due > now || running.len() >= config.concurrency {
                continue;
            }
            entry.in_flight = true;
            entry.next_due = now + entry.check.interval;
            let (id, check, http) = (id.clone(), entry.check.clone(), http.clone());
            running.spawn(async move {
                let (health, output) = probe(&http, &check).await;
                (id, health, output)
            });
        }
    }
    running.abort_all();
}

/// Adds new targets (first probe at a random point of their interval, so a restart does not
/// probe everything at once), forgets removed ones and picks up changed checks.
fn reconcile(schedule: &mut HashMap<String, Scheduled>, targets: Vec<ProbeTarget>) {
    let mut seen = HashMap::with_capacity(targets.len());
    for target in targets {
        seen.insert(target.id.clone(), ());
        match schedule.get_mut(&target.id) {
            Some(entry) if entry.check == target.check => {}
            Some(entry) => {
                entry.check = target.check;
                entry.next_due = Instant::now();
            }
            None => {
                let interval_ms = u64::try_from(target.check.interval.as_millis()).unwrap_or(u64::MAX).max(1);
                let stagger = Duration::from_millis(rand::rng().random_range(0..interval_ms.min(1000)));
                schedule.insert(
                    target.id,
                    Scheduled { check: target.check, next_due: Instant::now() + stagger, failures: 0, in_flight: false },
                );
            }
        }
    }
    schedule.retain(|id, _| seen.contains_key(id));
}

async fn record(
    store: &Store,
    config: &ProberConfig,
    metrics: &Metrics,
    schedule: &mut HashMap<String, Scheduled>,
    id: String,
    health: Health,
    output: String,
) {
    metrics.probe(health);
    let Some(entry) = schedule.get_mut(&id) else {
        return;
    };
    entry.in_flight = false;
    let now_ms = store.now_ms();
    let result = if health == Health::Critical {
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures < config.failures_before_critical {
            // Not critical yet: the lease must not run out before the threshold is reached.
            if let Err(e) = store.heartbeat(&id, &Heartbeat::default(), now_ms, None).await {
                tracing::warn!(instance = %id, error = %e, "cannot renew a lease after a probe failure below the threshold");
            }
            return;
        }
        tracing::debug!(instance = %id, output = %output, "probe failed");
        store.record_probe_failure(&id, &output, now_ms).await.map(|_| ())
    } else {
        entry.failures = 0;
        let heartbeat = Heartbeat { health: Some(health), output: Some(output) };
        store.heartbeat(&id, &heartbeat, now_ms, None).await.map(|_| ())
    };
    if let Err(e) = result {
        tracing::warn!(instance = %id, error = %e, "cannot record a probe result");
    }
}

/// Runs one check of an agentless instance.
async fn probe(http: &reqwest::Client, check: &CheckSpec) -> (Health, String) {
    match (&check.http, &check.tcp) {
        (Some(url), _) => signpost_shared::probe::http(http, url, check.timeout).await,
        (None, Some(addr)) => signpost_shared::probe::tcp(addr, check.timeout).await,
        (None, None) => (Health::Critical, "the check names neither http nor tcp".to_string()),
    }
}
