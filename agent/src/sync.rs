//! Keeps the registry in step with `LocalState` (Consul's anti-entropy shape): announces the
//! agent, registers each local service, heartbeats before each lease runs out carrying the
//! health the checks see, registers again at once when the registry answers 404 (it lost the
//! instance, e.g. its database was emptied), deregisters services removed at run time, and on
//! leaving deregisters everything. Calls fail over between registry URLs (the client does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use signpost_shared::client::{ClientError, RegistryClient};
use signpost_shared::model::{Health, Registration};
use signpost_shared::wire::{AgentAnnouncement, Heartbeat, Maintenance};
use tokio_util::sync::CancellationToken;

use crate::local::{LocalService, LocalState};
use crate::metrics::Metrics;

/// What this agent told the registry about one instance.
#[derive(Debug, Clone, PartialEq)]
struct Told {
    registration: Registration,
    health: Health,
    output: Option<String>,
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

/// Runs until cancelled; then deregisters every local service (bounded by the caller).
pub struct Syncer {
    client: RegistryClient,
    local: Arc<LocalState>,
    metrics: Arc<Metrics>,
    config: SyncConfig,
    told: BTreeMap<String, Told>,
}

impl Syncer {
    /// A syncer for `local`.
    pub fn new(client: RegistryClient, local: Arc<LocalState>, metrics: Arc<Metrics>, config: SyncConfig) -> Self {
        Syncer { client, local, metrics, config, told: BTreeMap::new() }
    }

    /// Syncs on every local change and at a third of the lease, until cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> Self {
        let mut changes = self.local.subscribe();
        let period = Duration::from_secs(u64::from(self.config.lease_ttl_s)) / 3;
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
                backoff = (backoff * 2).min(Duration::from_secs(5));
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

    /// One pass: announce, then register or heartbeat every local service, then deregister
    /// what was removed.
    async fn sync_all(&mut self) -> Result<(), ClientError> {
        let mut first_error = None;
        let mut note = |result: Result<(), ClientError>, metrics: &Metrics| {
            if let Err(e) = result {
                metrics.registry_error();
                first_error.get_or_insert(e);
            }
        };
        let announced = self.client.announce(&self.config.node, &self.config.announcement).await.map(|_| ());
        note(announced, &self.metrics);
        let services = self.local.services();
        for service in &services {
            let result = self.sync_one(service).await;
            note(result, &self.metrics);
        }
        let gone: Vec<String> = self.told.keys().filter(|id| !services.iter().any(|s| &s.spec.id == *id)).cloned().collect();
        for id in gone {
            match self.client.deregister(&id, Some(&self.config.node)).await {
                Ok(()) => {
                    self.told.remove(&id);
                }
                Err(e) if e.is_not_found() => {
                    self.told.remove(&id);
                }
                Err(e) => note(Err(e), &self.metrics),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn sync_one(&mut self, service: &LocalService) -> Result<(), ClientError> {
        let spec = &service.spec;
        let mut registration = Registration::from(spec);
        registration.ttl_s = Some(i64::from(self.config.lease_ttl_s));
        let health = service.health();
        let reported = if health == Health::Maintenance { None } else { Some(health) };
        registration.health = reported.or(Some(Health::Passing));
        let output = service.output();
        let told = Told { registration: registration.clone(), health, output: output.clone() };
        let previous = self.told.get(&spec.id).cloned();
        let registered_as_now = previous
            .as_ref()
            .is_some_and(|p| p.registration.id == told.registration.id && same_description(&p.registration, &told.registration));
        if registered_as_now {
            let heartbeat = Heartbeat { health: reported, output: output.map(|o| clip(&o)) };
            match self.client.heartbeat(&spec.id, &heartbeat).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    tracing::info!(instance = %spec.id, "the registry lost this instance; registering it again");
                    self.client.register(&registration).await?;
                }
                Err(e) => return Err(e),
            }
        } else {
            self.client.register(&registration).await?;
            tracing::info!(instance = %spec.id, service = %spec.service, "registered with the registry");
        }
        let was_in_maintenance = previous.as_ref().is_some_and(|p| p.health == Health::Maintenance);
        if health == Health::Maintenance || was_in_maintenance || !registered_as_now {
            let maintenance = Maintenance { enabled: health == Health::Maintenance, reason: service.maintenance.clone() };
            self.client.maintenance(&spec.id, &maintenance).await?;
        }
        self.told.insert(spec.id.clone(), told);
        Ok(())
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
