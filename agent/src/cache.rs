//! The agent's catalog cache: what the registry's feed says, merged with live gossip by the
//! merge rule (`../shared/DESIGN.md`), kept as one immutable snapshot that lookups read
//! without waiting. Every change of the merged catalog moves the agent's own index, on
//! which blocking lookups wait.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use serde::Serialize;

use chrono::{DateTime, Utc};
use signpost_shared::model::{DEFAULT_TTL_S, Health, Instance};
use signpost_shared::wire::{AgentInfo, CatalogPage};
use tokio::sync::watch;

use crate::gossip::{GossipView, Member};

/// What the registry last said.
#[derive(Debug, Clone, Default)]
pub struct RegistryView {
    /// The registry's change index (0: nothing fetched since start).
    pub index: u64,
    /// Whether the registry holds expiry back.
    pub self_preservation: bool,
    /// Every instance.
    pub instances: Vec<Instance>,
    /// Every agent.
    pub agents: Vec<AgentInfo>,
    /// When the registry last confirmed it (also across restarts, from the saved cache).
    pub confirmed_at: Option<DateTime<Utc>>,
}

impl From<CatalogPage> for RegistryView {
    fn from(page: CatalogPage) -> Self {
        RegistryView {
            index: page.index,
            self_preservation: page.self_preservation,
            instances: page.instances,
            agents: page.agents,
            confirmed_at: Some(Utc::now()),
        }
    }
}

/// The merged catalog at one agent index.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The agent's own change index.
    pub index: u64,
    /// Instances by service, each list by id.
    pub services: BTreeMap<String, Vec<Instance>>,
    /// Whether the registry holds expiry back.
    pub self_preservation: bool,
    /// When the registry last confirmed the catalog.
    pub confirmed_at: Option<DateTime<Utc>>,
    /// Gossip members.
    pub members: Vec<Member>,
    /// True while the registry's feed answers.
    pub feed_live: bool,
    /// Per service, the body of its default lookup (healthy instances, no filter), built on
    /// first use and shared by every later lookup of this snapshot.
    default_answers: HashMap<String, OnceLock<Bytes>>,
}

impl Snapshot {
    /// The instances of one service.
    pub fn service(&self, name: &str) -> &[Instance] {
        self.services.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    /// The serialized answer of a default lookup of `name` (healthy instances, no filter):
    /// the hot path serializes once per snapshot, not once per request.
    pub fn default_answer(&self, name: &str) -> Option<Bytes> {
        let cell = self.default_answers.get(name)?;
        Some(
            cell.get_or_init(|| {
                let answer = ServiceInstancesRef {
                    service: name,
                    index: self.index,
                    instances: self.service(name).iter().filter(|i| i.is_healthy()).collect(),
                };
                Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
            })
            .clone(),
        )
    }

    /// Every instance.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.services.values().flatten()
    }

    /// Seconds since the registry last confirmed the catalog: 0 while the feed is live (a
    /// blocking query that has not returned means nothing changed), else the time since the
    /// last answer; `None` when the registry never answered.
    pub fn stale_seconds(&self) -> Option<i64> {
        if self.feed_live {
            return Some(0);
        }
        self.confirmed_at.map(|at| (Utc::now() - at).num_seconds().max(0))
    }
}

/// `ServiceInstances` borrowing from the snapshot.
#[derive(Serialize)]
struct ServiceInstancesRef<'a> {
    service: &'a str,
    index: u64,
    instances: Vec<&'a Instance>,
}

#[derive(Debug, Default)]
struct Sources {
    registry: RegistryView,
    feed_live: bool,
    gossip: GossipView,
    /// When an instance known only from gossip was first seen, so its timestamps are stable.
    first_seen: HashMap<String, DateTime<Utc>>,
}

/// The cache; readers take [`Cache::snapshot`], writers replace one source and re-merge.
#[derive(Debug)]
pub struct Cache {
    sources: std::sync::Mutex<Sources>,
    current: RwLock<Arc<Snapshot>>,
    index: watch::Sender<u64>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            sources: std::sync::Mutex::new(Sources::default()),
            current: RwLock::new(Arc::new(Snapshot::default())),
            index: watch::channel(0).0,
        }
    }
}

impl Cache {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Waits on this for a change of the merged catalog.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.index.subscribe()
    }

    /// The registry view, for persistence and seeds.
    pub fn registry(&self) -> RegistryView {
        self.with_sources(|s| s.registry.clone())
    }

    /// Replaces what the registry says (a saved view at start; the feed's pages after).
    pub fn set_registry(&self, view: RegistryView) {
        self.update(|s| s.registry = view);
    }

    /// Records a page of the registry's feed: the feed is live.
    pub fn set_registry_page(&self, view: RegistryView) {
        self.update(|s| {
            s.registry = view;
            s.feed_live = true;
        });
    }

    /// Records whether the registry's feed answers.
    pub fn set_feed_live(&self, live: bool) {
        self.update(|s| s.feed_live = live);
    }

    /// Replaces what gossip says.
    pub fn set_gossip(&self, view: GossipView) {
        self.update(|s| s.gossip = view);
    }

    fn with_sources<T>(&self, f: impl FnOnce(&mut Sources) -> T) -> T {
        match self.sources.lock() {
            Ok(mut sources) => f(&mut sources),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Sources)) {
        self.with_sources(|sources| {
            change(sources);
            let merged = merge(&sources.registry, &sources.gossip, &mut sources.first_seen);
            let previous = self.snapshot();
            let moved = previous.services != merged || previous.self_preservation != sources.registry.self_preservation;
            let index = if moved { previous.index + 1 } else { previous.index };
            let snapshot = Arc::new(Snapshot {
                index,
                self_preservation: sources.registry.self_preservation,
                confirmed_at: sources.registry.confirmed_at,
                members: sources.gossip.members.clone(),
                feed_live: sources.feed_live,
                default_answers: merged.keys().map(|k| (k.clone(), OnceLock::new())).collect(),
                services: merged,
            });
            match self.current.write() {
                Ok(mut current) => *current = snapshot,
                Err(poisoned) => *poisoned.into_inner() = snapshot,
            }
            if moved {
                self.index.send_replace(index);
            }
        });
    }
}

/// The merge rule:
/// - an instance with an owner node that is alive in gossip is described by that node's
///   gossip (fresher than the registry); if that node no longer publishes it, it is gone;
/// - an instance whose owner is dead in gossip is critical, whatever the registry says;
/// - an instance whose owner gossip does not know, or with no owner, is the registry's;
/// - a node may only describe its own instances: a gossip claim on an instance the registry
///   gives to another node is ignored.
pub fn merge(
    registry: &RegistryView,
    gossip: &GossipView,
    first_seen: &mut HashMap<String, DateTime<Utc>>,
) -> BTreeMap<String, Vec<Instance>> {
    let mut merged: BTreeMap<String, Instance> = BTreeMap::new();
    let known: HashMap<&str, &Instance> = registry.instances.iter().map(|i| (i.id.as_str(), i)).collect();
    for instance in &registry.instances {
        match instance.node.as_deref() {
            Some(node) if gossip.live.contains_key(node) => {} // its owner's gossip decides below
            Some(node) if gossip.dead.contains(node) => {
                let mut dead = instance.clone();
                dead.health = Health::Critical;
                dead.output = Some(format!("agent `{node}` is dead in gossip"));
                merged.insert(dead.id.clone(), dead);
            }
            _ => {
                merged.insert(instance.id.clone(), instance.clone());
            }
        }
    }
    let now = Utc::now();
    let mut seen_now = HashMap::new();
    for (node, peer) in &gossip.live {
        for (id, published) in &peer.instances {
            let registered = known.get(id.as_str()).copied();
            if registered.is_some_and(|r| r.node.as_deref() != Some(node.as_str())) {
                continue; // another node's instance
            }
            let since = registered.map(|r| r.registered_at).unwrap_or_else(|| *first_seen.get(id).unwrap_or(&now));
            seen_now.insert(id.clone(), since);
            merged.insert(
                id.clone(),
                Instance {
                    id: id.clone(),
                    service: published.service.clone(),
                    address: published.address.clone(),
                    port: published.port,
                    tags: published.tags.clone(),
                    meta: published.meta.clone(),
                    weight: published.weight,
                    zone: published.zone.clone(),
                    health: published.health,
                    output: published.output.clone(),
                    maintenance_reason: if published.health == Health::Maintenance { published.output.clone() } else { None },
                    node: Some(node.clone()),
                    check: registered.and_then(|r| r.check.clone()),
                    ttl_s: registered.map(|r| r.ttl_s).unwrap_or(DEFAULT_TTL_S),
                    index: registered.map(|r| r.index).unwrap_or_default(),
                    registered_at: since,
                    updated_at: registered.map(|r| r.updated_at).unwrap_or(since),
                    lease_expires_at: registered.map(|r| r.lease_expires_at).unwrap_or(since),
                },
            );
        }
    }
    *first_seen = seen_now;
    let mut services: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
    for instance in merged.into_values() {
        services.entry(instance.service.clone()).or_default().push(instance);
    }
    services
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use signpost_shared::gossip::{FORMAT_VERSION, GossipInstance};

    use super::*;
    use crate::gossip::Peer;

    fn registered(id: &str, node: Option<&str>) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            weight: 100,
            zone: None,
            health: Health::Passing,
            output: None,
            maintenance_reason: None,
            node: node.map(str::to_string),
            check: None,
            ttl_s: 30,
            index: 1,
            registered_at: DateTime::from_timestamp_millis(0).unwrap_or_default(),
            updated_at: DateTime::from_timestamp_millis(0).unwrap_or_default(),
            lease_expires_at: DateTime::from_timestamp_millis(0).unwrap_or_default(),
        }
    }

    fn published(health: Health) -> GossipInstance {
        GossipInstance {
            v: FORMAT_VERSION,
            service: "web".into(),
            address: "10.0.0.2".into(),
            port: 81,
            tags: vec![],
            meta: BTreeMap::new(),
            weight: 100,
            zone: None,
            health,
            output: None,
        }
    }

    fn peer(instances: &[(&str, GossipInstance)]) -> Peer {
        Peer { http: "127.0.0.1:7301".into(), zone: None, instances: instances.iter().map(|(id, i)| (id.to_string(), i.clone())).collect() }
    }

    fn health_of(services: &BTreeMap<String, Vec<Instance>>, id: &str) -> Option<Health> {
        services.values().flatten().find(|i| i.id == id).map(|i| i.health)
    }

    #[test]
    fn gossip_is_fresher_for_a_live_owner() {
        let registry = RegistryView { instances: vec![registered("a", Some("n1"))], ..Default::default() };
        let gossip = GossipView { live: [("n1".to_string(), peer(&[("a", published(Health::Critical))]))].into(), ..Default::default() };
        let merged = merge(&registry, &gossip, &mut HashMap::new());
        assert_eq!(health_of(&merged, "a"), Some(Health::Critical));
        assert_eq!(merged["web"][0].port, 81);
    }

    #[test]
    fn a_dead_owner_makes_its_instances_critical() {
        let registry = RegistryView { instances: vec![registered("a", Some("n1")), registered("b", None)], ..Default::default() };
        let gossip = GossipView { dead: BTreeSet::from(["n1".to_string()]), ..Default::default() };
        let merged = merge(&registry, &gossip, &mut HashMap::new());
        assert_eq!(health_of(&merged, "a"), Some(Health::Critical));
        assert_eq!(health_of(&merged, "b"), Some(Health::Passing), "agentless instances are the registry's");
    }

    #[test]
    fn unknown_owners_and_gossip_only_instances() {
        let registry = RegistryView { instances: vec![registered("a", Some("far-away"))], ..Default::default() };
        let gossip = GossipView { live: [("n2".to_string(), peer(&[("new", published(Health::Passing))]))].into(), ..Default::default() };
        let merged = merge(&registry, &gossip, &mut HashMap::new());
        assert_eq!(health_of(&merged, "a"), Some(Health::Passing), "gossip does not know its owner: the registry's word");
        assert_eq!(health_of(&merged, "new"), Some(Health::Passing), "not registered yet, but live in gossip");
    }

    #[test]
    fn a_live_owner_that_stopped_publishing_removed_it() {
        let registry = RegistryView { instances: vec![registered("a", Some("n1"))], ..Default::default() };
        let gossip = GossipView { live: [("n1".to_string(), peer(&[]))].into(), ..Default::default() };
        assert!(merge(&registry, &gossip, &mut HashMap::new()).is_empty());
    }

    #[test]
    fn a_node_cannot_claim_another_nodes_instance() {
        let registry = RegistryView { instances: vec![registered("a", Some("n1"))], ..Default::default() };
        let gossip = GossipView {
            live: [
                ("n1".to_string(), peer(&[("a", published(Health::Passing))])),
                ("evil".to_string(), peer(&[("a", published(Health::Critical))])),
            ]
            .into(),
            ..Default::default()
        };
        let merged = merge(&registry, &gossip, &mut HashMap::new());
        assert_eq!(health_of(&merged, "a"), Some(Health::Passing));
        assert_eq!(merged["web"][0].node.as_deref(), Some("n1"));
    }

    #[test]
    fn the_index_moves_only_on_a_change() {
        let cache = Cache::default();
        let view = RegistryView { instances: vec![registered("a", None)], ..Default::default() };
        cache.set_registry(view.clone());
        let first = cache.snapshot().index;
        cache.set_registry(view);
        assert_eq!(cache.snapshot().index, first);
        cache.set_registry(RegistryView::default());
        assert_eq!(cache.snapshot().index, first + 1);
    }
}
