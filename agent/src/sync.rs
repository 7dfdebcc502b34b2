//! Keeps the registry in step with `LocalState` (Consul's anti-entropy shape): renews the
//! agent's announcement every announcement period (at most 5 s: the evidence of life other
//! agents ask the registry for), registers each local service, heartbeats before each lease
//! runs out (at a third of it) or at once when its health changes, registers again at once
//! when the registry answers 404 (it lost the instance, e.g. its database was emptied),
//! deregisters services removed at run time, and on leaving deregisters everything. The
//! calls of one pass run side by side, each under its own deadline, so one that hangs delays
//! no other lease. Calls fail over between registry URLs (the client does).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use signpost_shared::client::{ClientError, RegistryClient};
use signpost_shared::model::{Health, Registration};
use signpost_shared::wire::{AgentAnnouncement, Heartbeat, Maintenance, announce_period};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

impl Syncer {
    /// A syncer for `local`.
    pub fn new(client: RegistryClient, local: Arc<LocalState>, metrics: Arc<Metrics>, config: SyncConfig) -> Self {
        Syncer { client, local, metrics, config, told: BTreeMap::new(), refused: BTreeSet::new() }
    }

    /// Syncs on every local change and every announcement period, until cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> Self {
        let mut changes = self.local.subscribe();
        let period = announce_period(self.config.lease_ttl_s);
        let mut backoff = Duration::from_millis(200);
        let mut failing = false;
        loop {
            // A registry that hangs must not hold the agent's leave back.
            let ok = tokio::select! {
                _ = shutdown.cancelled() => return self,
                ok = self.sync_all() => ok,
            };
            match (ok, failing) {
                (Ok(()), true) => {
                    tracing::info!(url = %self.client.current_url(), "registry reachable again; local services are registered");
                    failing = false;
                }
                (Err(e), false) => {
                    tracing::warn!(error = %e, "cannot sync with the registry; retrying (gossip keeps the fleet informed)");
                    failing = true;
                }
                _ => {}
            }
            let wait = if failing {
                backoff = (backoff * 2).min(period.max(Duration::from_secs(1)));
                backoff
            } else {
                backoff = Duration::from_millis(200);
                period
            };
            tokio::select! {
                _ = shutdown.cancelled() => return self,
                changed = changes.changed() => if changed.is_err() { return self },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass: announce, register or heartbeat what is due of every local service, and
    /// deregister what was removed, all at once, each call under its own deadline.
    async fn sync_all(&mut self) -> Result<(), ClientError> {
        let deadline = self.config.call_deadline();
        let announced = within(deadline, "the announcement", self.client.announce(&self.config.node, &self.config.announcement));
        let services = self.local.services();
        let calls = services.iter().map(|service| {
            let previous = self.told.get(&service.spec.id).cloned();
            let (client, config) = (&self.client, &self.config);
            async move {
                let what = format!("the sync of {}", service.spec.id);
                (service.spec.id.clone(), within(deadline, &what, sync_one(client, config, service, previous)).await)
            }
        });
        let gone: Vec<String> = self.told.keys().filter(|id| !services.iter().any(|s| &s.spec.id == *id)).cloned().collect();
        let (client, node) = (&self.client, self.config.node.as_str());
        let removals = gone.iter().map(|id| async move {
            let what = format!("the deregistration of {id}");
            match within(deadline, &what, client.deregister(id, Some(node))).await {
                Ok(()) => Ok(id),
                Err(e) if e.is_not_found() => Ok(id),
                Err(e) => Err(e),
            }
        });
        let (announced, synced, removed) =
            tokio::join!(announced, futures_util::future::join_all(calls), futures_util::future::join_all(removals));

        let mut first_error = None;
        let mut note = |error: ClientError| {
            self.metrics.registry_error();
            first_error.get_or_insert(error);
        };
        if let Err(e) = announced {
            note(e);
        }
        for (id, result) in synced {
            match result {
                Ok(Some(told)) => {
                    if self.refused.remove(&id) {
                        tracing::info!(instance = %id, "the registry took the instance it refused before");
                    }
                    self.told.insert(id, told);
                }
                Ok(None) => {}
                Err(e) => {
                    if e.status() == Some(warp::http::StatusCode::CONFLICT) {
                        if self.refused.insert(id.clone()) {
                            tracing::error!(instance = %id, error = %e, "the registry refuses this local service: another node owns its id; give it another id");
                        }
                    } else {
                        tracing::debug!(instance = %id, error = %e, "syncing a local service failed");
                    }
                    note(e);
                }
            }
        }
        for result in removed {
            match result {
                Ok(id) => {
                    self.told.remove(id);
                }
                Err(e) => note(e),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Deregisters every local service at once (the agent is leaving), within `deadline`.
    pub async fn leave(&self, deadline: Duration) {
        let calls = self.local.services().into_iter().map(|service| async move {
            let id = service.spec.id;
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
            match client.heartbeat(&spec.id, &heartbeat).await {
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
        client.maintenance(&spec.id, &maintenance).await?;
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
