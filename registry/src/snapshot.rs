//! The catalog snapshot that answers reads. It is rebuilt from the database (one rebuild at
//! a time) when the change index moved past it (a write here, or a notification from another
//! replica) or when it is older than `read_cache_max_age`, so leases shown stay fresh.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use signpost_shared::model::{Health, Instance};
use signpost_shared::wire::{AgentInfo, ServiceSummary};

use crate::store::{CatalogData, Store, StoreError};

/// The whole catalog at one change index.
#[derive(Debug)]
pub struct Snapshot {
    /// The change index.
    pub index: u64,
    /// Whether the sweeper holds expiry back.
    pub self_preservation: bool,
    /// The database's catalog epoch.
    pub epoch: u64,
    /// A digest of what identifies this catalog's contents: each instance's id and change
    /// index, each agent's node and addresses.
    digest: u64,
    /// Every instance, by service then id.
    instances: Vec<Instance>,
    /// Where each service's instances are in `instances`.
    by_service: HashMap<String, Range<usize>>,
    /// Every agent.
    pub agents: Vec<AgentInfo>,
    loaded_at: Instant,
    catalog_json: OnceLock<Bytes>,
}

#[derive(Serialize)]
struct CatalogRef<'a> {
    index: u64,
    epoch: u64,
    self_preservation: bool,
    instances: &'a [Instance],
    agents: &'a [AgentInfo],
}

impl Snapshot {
    fn new(data: CatalogData) -> Self {
        let mut by_service: HashMap<String, Range<usize>> = HashMap::new();
        for (i, instance) in data.instances.iter().enumerate() {
            by_service.entry(instance.service.clone()).and_modify(|r| r.end = i + 1).or_insert(i..i + 1);
        }
        Snapshot {
            index: data.index,
            self_preservation: data.self_preservation,
            epoch: data.epoch,
            digest: digest(&data.instances, &data.agents),
            instances: data.instances,
            by_service,
            agents: data.agents,
            loaded_at: Instant::now(),
            catalog_json: OnceLock::new(),
        }
    }

    /// The catalog's `ETag`: its epoch, index and digest.
    pub fn etag(&self) -> String {
        signpost_shared::wire::catalog_etag(self.epoch, self.index, self.digest)
    }

    /// The instances of one service, by id.
    pub fn service(&self, name: &str) -> &[Instance] {
        self.by_service.get(name).and_then(|r| self.instances.get(r.clone())).unwrap_or_default()
    }

    /// Every instance.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// The `GET /v1/catalog` body, serialized once per snapshot.
    pub fn catalog_json(&self) -> Bytes {
        self.catalog_json
            .get_or_init(|| {
                let page = CatalogRef {
                    index: self.index,
                    epoch: self.epoch,
                    self_preservation: self.self_preservation,
                    instances: &self.instances,
                    agents: &self.agents,
                };
                Bytes::from(serde_json::to_vec(&page).unwrap_or_default())
            })
            .clone()
    }

    /// Every service with its counts by health, by name.
    pub fn summaries(&self) -> Vec<ServiceSummary> {
        let mut names: Vec<&String> = self.by_service.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let instances = self.service(name);
                let mut health: std::collections::BTreeMap<Health, u64> = Health::ALL.iter().map(|h| (*h, 0)).collect();
                for instance in instances {
                    *health.entry(instance.health).or_default() += 1;
                }
                ServiceSummary {
                    name: name.clone(),
                    instances: instances.len() as u64,
                    healthy: instances.iter().filter(|i| i.is_healthy()).count() as u64,
                    health,
                }
            })
            .collect()
    }

    /// Instances by health over the whole catalog.
    pub fn health_counts(&self) -> Vec<(Health, u64)> {
        Health::ALL.iter().map(|h| (*h, self.instances.iter().filter(|i| i.health == *h).count() as u64)).collect()
    }

    fn is_fresh(&self, wanted_index: u64, max_age: Duration) -> bool {
        self.index >= wanted_index && self.loaded_at.elapsed() < max_age
    }
}

/// The digest of a catalog's contents: instances by id and change index (an index names one
/// change in one history), agents by node and addresses. Stable across builds (SHA-256), so
/// that replicas of different versions agree.
fn digest(instances: &[Instance], agents: &[AgentInfo]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for instance in instances {
        hasher.update(instance.id.as_bytes());
        hasher.update(instance.index.to_le_bytes());
    }
    hasher.update([0xff]);
    for agent in agents {
        for part in [&agent.node, &agent.gossip_addr, &agent.http_addr] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
    }
    let sum = hasher.finalize();
    u64::from_le_bytes(sum[..8].try_into().unwrap_or_default())
}

/// Hands out the current snapshot, rebuilding it when it is behind or old.
#[derive(Debug)]
pub struct CatalogCache {
    store: Store,
    max_age: Duration,
    current: RwLock<Option<Arc<Snapshot>>>,
    rebuild: tokio::sync::Mutex<()>,
    /// When the last rebuild failed: requests queued behind it fail at once instead of each
    /// waiting for the database in turn.
    failed_at: std::sync::Mutex<Option<Instant>>,
}

/// How long after a failed rebuild requests fail without trying again.
const FAILURE_HOLD: Duration = Duration::from_secs(1);

impl CatalogCache {
    /// A cache over `store`; `max_age` of zero reads the database for every request.
    pub fn new(store: Store, max_age: Duration) -> Self {
        CatalogCache {
            store,
            max_age,
            current: RwLock::new(None),
            rebuild: tokio::sync::Mutex::new(()),
            failed_at: std::sync::Mutex::new(None),
        }
    }

    fn fresh(&self, wanted_index: u64) -> Option<Arc<Snapshot>> {
        let current = self.current.read().ok()?;
        current.as_ref().filter(|s| s.is_fresh(wanted_index, self.max_age)).cloned()
    }

    /// A snapshot at least as new as every change this replica knows of.
    pub async fn get(&self) -> Result<Arc<Snapshot>, StoreError> {
        let wanted = self.store.known_index();
        if let Some(snapshot) = self.fresh(wanted) {
            return Ok(snapshot);
        }
        // Only the age ran out (no change is known): while another request rebuilds, answer
        // from the current snapshot instead of queueing behind the rebuild.
        // With a max age of zero every read goes to the database, as configured; after a failed
        // rebuild (the database is down) reads wait for the next one, so that they answer 503
        // rather than data older than the max age.
        let last_failed = self.failed_at.lock().ok().and_then(|f| *f).is_some();
        let current_by_index = if self.max_age.is_zero() || last_failed {
            None
        } else {
            self.current.read().ok().and_then(|c| c.as_ref().filter(|s| s.index >= wanted).cloned())
        };
        let _one_at_a_time = match (self.rebuild.try_lock(), current_by_index) {
            (Ok(guard), _) => guard,
            (Err(_), Some(snapshot)) => return Ok(snapshot),
            (Err(_), None) => self.rebuild.lock().await,
        };
        // Another request may have rebuilt it while this one waited.
        if let Some(snapshot) = self.fresh(wanted) {
            return Ok(snapshot);
        }
        let failed_recently = self.failed_at.lock().ok().and_then(|f| *f).is_some_and(|at| at.elapsed() < FAILURE_HOLD);
        if failed_recently {
            return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        }
        let now_ms = self.store.now_ms();
        let loaded = self.store.load_catalog(now_ms).await;
        if let Ok(mut failed_at) = self.failed_at.lock() {
            *failed_at = if loaded.is_err() { Some(Instant::now()) } else { None };
        }
        let snapshot = Arc::new(Snapshot::new(loaded?));
        if let Ok(mut current) = self.current.write() {
            *current = Some(snapshot.clone());
        }
        Ok(snapshot)
    }
}
