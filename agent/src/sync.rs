//! Keeps the registry in step with `LocalState` (Consul's anti-entropy shape): renews the
//! agent's announcement every announcement period (at most 5 s: the evidence of life other
//! agents ask the registry for), registers each local service, heartbeats before each lease
//! runs out (at a third of it) or at once when its health changes, registers again at once
//! when the registry answers 404 (it lost the instance, e.g. its database was emptied),
//! deregisters services removed at run time, and on leaving deregisters everything. The
//! calls of one pass run side by side, each under its own deadline, so one that hangs delays
//! no other lease. Calls fail over between registry URLs (the client does).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use signpost_shared::client::{ClientError, RegistryClient};
use signpost_shared::model::{Health, Registration};
use signpost_shared::wire::{AgentAnnouncement, Heartbeat, Maintenance, announce_period};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;

use crate::local::{LocalService, LocalState};
use crate::metrics::Metrics;

/// What this agent told the registry about one instance, and when the registry last
/// renewed its lease.
#[derive(Debug, Clone, PartialEq)]
struct Told {
    registration: Registration,
    health: Health,
    output: Option<String>,
    renewed_at: Instant,
}

/// How long calls in flight may take to end when the syncer stops, before they are dropped.
const DRAIN: Duration = Duration::from_secs(1);

/// The syncer's settings.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// This node.
    pub node: String,
    /// How this agent announces itself.
    pub announcement: AgentAnnouncement,
    /// Lease of each registration, in seconds.
    pub lease_ttl_s: u32,
}

impl SyncConfig {
    /// Time between two heartbeats of an instance whose health did not change.
    fn heartbeat_every(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_ttl_s)) / 3
    }

    /// The longest one call may take: a heartbeat later than this is of no use to its lease.
    fn call_deadline(&self) -> Duration {
        self.heartbeat_every().max(Duration::from_secs(2))
    }
}

/// Runs until cancelled; then deregisters every local service (bounded by the caller).
pub struct Syncer {
    client: RegistryClient,
    local: Arc<LocalState>,
    metrics: Arc<Metrics>,
    config: SyncConfig,
    told: BTreeMap<String, Told>,
    /// Instances the registry refused to register (409: a live node owns the id), reported
    /// once each until they register.
    refused: BTreeSet<String>,
}

/// One call to the registry that a pass starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// Renew the agent's announcement.
    Announce,
    /// Register or heartbeat a local service.
    Sync(String),
    /// Deregister a service removed at run time.
    Deregister(String),
}

/// What a call came back with: for a sync, what the registry was told (`None`: nothing due).
type Outcome = (Call, Result<Option<Told>, ClientError>);

/// The calls in flight, by their task.
type Running = HashMap<tokio::task::Id, Call>;

impl Syncer {
    /// A syncer for `local`.
    pub fn new(client: RegistryClient, local: Arc<LocalState>, metrics: Arc<Metrics>, config: SyncConfig) -> Self {
        Syncer { client, local, metrics, config, told: BTreeMap::new(), refused: BTreeSet::new() }
    }

    /// Starts a pass on every local change and every announcement period (sooner, backing
    /// off, while calls fail), until cancelled. Each call runs on its own under a deadline; a
    /// call still running when the next pass comes is not started again, and holds no other.
    pub async fn run(mut self, shutdown: CancellationToken) -> Self {
        let mut changes = self.local.subscribe();
        let period = announce_period(self.config.lease_ttl_s);
        let mut calls: JoinSet<Outcome> = JoinSet::new();
        let mut running: Running = HashMap::new();
        let mut backoff = Duration::from_millis(200);
        let mut failing = false;
        let mut first_error: Option<ClientError> = None;
        let mut next_pass = Instant::now();
        // A local change came while calls ran, which the pass it started skipped: the pass
        // after each of them ends takes it (a health change is not left for a period).
        let mut changed_during_calls = false;
        // A call came back with an answer of the registry since the last pass.
        let mut answered = false;
        loop {
            if Instant::now() >= next_pass {
                // How the calls since the last pass went decides the pace of the next ones.
                let answered_since = std::mem::take(&mut answered);
                match (first_error.take(), failing) {
                    // Calls still running say nothing yet: reachable again once one answered.
                    (None, true) if answered_since => {
                        tracing::info!(url = %self.client.current_url(), "registry reachable again; local services are registered");
                        failing = false;
                    }
                    (Some(e), false) => {
                        tracing::warn!(error = %e, "cannot sync with the registry; retrying (gossip keeps the fleet informed)");
                        failing = true;
                    }
                    _ => {}
                }
                let wait = if failing {
                    backoff = (backoff * 2).min(period);
                    backoff
                } else {
                    backoff = Duration::from_millis(200);
                    period
                };
                self.start_pass(&mut calls, &mut running);
                next_pass = Instant::now() + wait;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = changes.changed() => {
                    if changed.is_err() { break }
                    next_pass = Instant::now();
                    changed_during_calls |= !running.is_empty();
                }
                Some(done) = calls.join_next_with_id(), if !calls.is_empty() => {
                    match done {
                        Ok((id, (call, result))) => {
                            running.remove(&id);
                            match self.apply(call, result) {
                                Ok(()) => answered = true,
                                Err(e) => {
                                    first_error.get_or_insert(e);
                                }
                            }
                        }
                        Err(e) => {
                            // A defect: the next pass starts the call again.
                            let call = running.remove(&e.id());
                            tracing::error!(call = ?call, error = %e, "a registry call failed unexpectedly");
                        }
                    }
                    if changed_during_calls {
                        next_pass = Instant::now();
                        changed_during_calls = !running.is_empty();
                    }
                }
                _ = tokio::time::sleep_until(next_pass) => {}
            }
        }
        // Calls in flight end first (for at most DRAIN, a small part of the shutdown grace),
        // so that none reaches the registry after the agent has left.
        let drain = tokio::time::timeout(DRAIN, async {
            while let Some(done) = calls.join_next().await {
                if let Ok((call, result)) = done {
                    let _ = self.apply(call, result);
                }
            }
        });
        if drain.await.is_err() {
            calls.abort_all();
        }
        self
    }

    /// Starts the calls due now that are not still running: the announcement, a sync of every
    /// local service, a deregistration of every service removed.
    fn start_pass(&self, calls: &mut JoinSet<Outcome>, running: &mut Running) {
        let deadline = self.config.call_deadline();
        let mut start = |call: Call, task: BoxFuture<'static, Result<Option<Told>, ClientError>>| {
            if !running.values().any(|c| *c == call) {
                let key = call.clone();
                let id = calls.spawn(async move { (call, task.await) }).id();
                running.insert(id, key);
            }
        };
        let (client, node, announcement) = (self.client.clone(), self.config.node.clone(), self.config.announcement.clone());
        start(
            Call::Announce,
            Box::pin(async move { within(deadline, "the announcement", client.announce(&node, &announcement)).await.map(|_| None) }),
        );
        let services = self.local.services();
        for id in self.told.keys().filter(|id| !services.iter().any(|s| &s.spec.id == *id)) {
            let (client, node, id) = (self.client.clone(), self.config.node.clone(), id.clone());
            start(
                Call::Deregister(id.clone()),
                Box::pin(async move {
                    let what = format!("the deregistration of {id}");
                    match within(deadline, &what, client.deregister(&id, Some(&node))).await {
                        Ok(()) => Ok(None),
                        Err(e) if e.is_not_found() => Ok(None),
                        Err(e) => Err(e),
                    }
                }),
            );
        }
        for service in services {
            let (client, config, previous) = (self.client.clone(), self.config.clone(), self.told.get(&service.spec.id).cloned());
            start(
                Call::Sync(service.spec.id.clone()),
                Box::pin(async move {
                    let what = format!("the sync of {}", service.spec.id);
                    within(deadline, &what, sync_one(&client, &config, &service, previous)).await
                }),
            );
        }
    }

    /// Records what a call came back with; an error is counted and handed back.
    fn apply(&mut self, call: Call, result: Result<Option<Told>, ClientError>) -> Result<(), ClientError> {
        match (call, result) {
            (Call::Sync(id), Ok(Some(told))) => {
                if self.refused.remove(&id) {
                    tracing::info!(instance = %id, "the registry took the instance it refused before");
                }
                // A service removed while its call ran is deregistered by the next pass.
                self.told.insert(id, told);
            }
            (Call::Deregister(id), Ok(_)) => {
                self.told.remove(&id);
            }
            (_, Ok(_)) => {}
            // Refused for what the service is (another node owns its id: 409; over a quota or
            // not this node's to write: 403): the registry answers, so this is no failure to
            // reach it. Logged once; the next pass asks again.
            (Call::Sync(id), Err(e)) if matches!(e.status(), Some(StatusCode::CONFLICT | StatusCode::FORBIDDEN)) => {
                if self.refused.insert(id.clone()) {
                    let hint = if e.status() == Some(StatusCode::CONFLICT) {
                        "another node owns its id; give it another id"
                    } else {
                        "see the error"
                    };
                    tracing::error!(instance = %id, error = %e, hint, "the registry refuses this local service");
                }
            }
            (call, Err(e)) => {
                self.metrics.registry_error();
                tracing::debug!(call = ?call, error = %e, "a registry call failed");
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deregisters every local service, and every instance the registry was told of, at
    /// once (the agent is leaving), within `deadline`.
    pub async fn leave(&self, deadline: Duration) {
        let mut ids: BTreeSet<String> = self.told.keys().cloned().collect();
        ids.extend(self.local.services().into_iter().map(|service| service.spec.id));
        let calls = ids.into_iter().map(|id| async move {
            match tokio::time::timeout(deadline, self.client.deregister(&id, Some(&self.config.node))).await {
                Ok(Ok(())) => tracing::info!(instance = %id, "deregistered"),
                Ok(Err(e)) if e.is_not_found() => {}
                Ok(Err(e)) => tracing::warn!(instance = %id, error = %e, "cannot deregister; its lease will expire"),
                Err(_) => tracing::warn!(instance = %id, "deregistering timed out; its lease will expire"),
            }
        });
        futures_util::future::join_all(calls).await;
    }
}

/// Runs `call`, failing with [`ClientError::Deadline`] when it takes longer than `deadline`.
async fn within<T>(deadline: Duration, what: &str, call: impl Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::time::timeout(deadline, call).await.unwrap_or_else(|_| Err(ClientError::Deadline { call: what.to_string(), after: deadline }))
}

/// Brings the registry's record of one local service up to date: registers it when the
/// registry has not been told of it as it is now, heartbeats it when its health changed or
/// its lease is due for renewal, and sets its maintenance when that changed. `None` when
/// nothing was due.
async fn sync_one(
    client: &RegistryClient,
    config: &SyncConfig,
    service: &LocalService,
    previous: Option<Told>,
) -> Result<Option<Told>, ClientError> {
    let spec = &service.spec;
    let mut registration = Registration::from(spec);
    registration.ttl_s = Some(i64::from(config.lease_ttl_s));
    let health = service.health();
    let reported = if health == Health::Maintenance { None } else { Some(health) };
    registration.health = reported.or(Some(Health::Passing));
    let output = service.output();
    let registered_as_now =
        previous.as_ref().filter(|p| p.registration.id == registration.id && same_description(&p.registration, &registration));
    match registered_as_now {
        Some(told) => {
            // Renew a little early: the next pass comes a period later.
            let due = told.renewed_at.elapsed() + announce_period(config.lease_ttl_s) / 2 >= config.heartbeat_every();
            let maintenance_same = health != Health::Maintenance || told.output == output;
            if told.health == health && maintenance_same && !due {
                return Ok(None);
            }
            let heartbeat = Heartbeat { health: reported, output: output.as_deref().map(clip) };
            match client.heartbeat(&spec.id, &heartbeat, Some(&config.node)).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    tracing::info!(instance = %spec.id, "the registry lost this instance; registering it again");
                    client.register(&registration).await?;
                }
                Err(e) => return Err(e),
            }
        }
        None => {
            client.register(&registration).await?;
            tracing::info!(instance = %spec.id, service = %spec.service, "registered with the registry");
        }
    }
    let was_in_maintenance = previous.as_ref().is_some_and(|p| p.health == Health::Maintenance);
    if health == Health::Maintenance || was_in_maintenance || registered_as_now.is_none() {
        let maintenance = Maintenance { enabled: health == Health::Maintenance, reason: service.maintenance.clone() };
        client.maintenance(&spec.id, &maintenance, Some(&config.node)).await?;
    }
    Ok(Some(Told { registration, health, output, renewed_at: Instant::now() }))
}

/// True when two registrations describe the same instance (health aside: heartbeats carry it).
fn same_description(a: &Registration, b: &Registration) -> bool {
    let mut a = a.clone();
    a.health = b.health;
    a == *b
}

fn clip(output: &str) -> String {
    let max = signpost_shared::validate::MAX_OUTPUT_LEN;
    let mut end = output.len().min(max);
    while !output.is_char_boundary(end) {
        end -= 1;
    }
    output[..end].to_string()
}
