//! The agent's catalog cache: what the registry's feed says, merged with live gossip by the
//! merge rule (`../shared/DESIGN.md`), kept as one immutable snapshot that lookups read
//! without waiting. Every change of the merged catalog moves the agent's own index, on
//! which blocking lookups wait. Instances are shared (`Arc`) between the registry's view
//! and the snapshots, so the catalog is held once, however many snapshots are alive.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use chrono::{DateTime, Utc};
use signpost_shared::model::{DEFAULT_TTL_S, Health, Instance};
use signpost_shared::wire::{AgentInfo, AgentsPage, CatalogPage};
use tokio::sync::watch;

use crate::evidence::{Evidence, Verdict};
use crate::gossip::{GossipView, Member};
use crate::gossip_identity::PeerKeys;

/// What the registry last said.
#[derive(Debug, Clone, Default)]
pub struct RegistryView {
    /// The registry's change index (0: nothing fetched since start).
    pub index: u64,
    /// The registry's catalog epoch (0: unknown): indexes of another epoch are of another
    /// history.
    pub epoch: u64,
    /// Whether the registry holds expiry back.
    pub self_preservation: bool,
    /// Every instance (shared with the snapshots that show it unchanged).
    pub instances: Vec<Arc<Instance>>,
    /// Every agent.
    pub agents: Vec<AgentInfo>,
    /// When the registry last confirmed it (also across restarts, from the saved cache).
    pub confirmed_at: Option<DateTime<Utc>>,
}

impl From<CatalogPage> for RegistryView {
    fn from(page: CatalogPage) -> Self {
        RegistryView {
            index: page.index,
            epoch: page.epoch,
            self_preservation: page.self_preservation,
            instances: page.instances.into_iter().map(Arc::new).collect(),
            agents: page.agents,
            confirmed_at: Some(Utc::now()),
        }
    }
}

/// The merged catalog: instances by service, each list by id.
pub type Services = BTreeMap<String, Vec<Arc<Instance>>>;

/// The merged catalog at one agent index.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The agent's own change index.
    pub index: u64,
    /// Instances by service, each list by id (shared with later snapshots while it does not
    /// change).
    pub services: Arc<Services>,
    /// Whether the registry holds expiry back.
    pub self_preservation: bool,
    /// When the registry last confirmed the catalog.
    pub confirmed_at: Option<DateTime<Utc>>,
    /// Gossip members.
    pub members: Vec<Member>,
    /// True while the registry's feed answers.
    pub feed_live: bool,
    /// Per service, the body of its default lookup (healthy instances, no filter), built on
    /// first use and shared by every later lookup at this index.
    default_answers: Arc<HashMap<String, OnceLock<Bytes>>>,
}

impl Snapshot {
    /// The instances of one service.
    pub fn service(&self, name: &str) -> &[Arc<Instance>] {
        self.services.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    /// The serialized answer of a default lookup of `name` (healthy instances, no filter):
    /// the hot path serializes once per index, not once per request.
    pub fn default_answer(&self, name: &str) -> Option<Bytes> {
        let cell = self.default_answers.get(name)?;
        Some(
            cell.get_or_init(|| {
                let answer = ServiceInstancesRef {
                    service: name,
                    index: self.index,
                    instances: self.service(name).iter().map(|i| &**i).filter(|i| i.is_healthy()).collect(),
                };
                Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
            })
            .clone(),
        )
    }

    /// Every instance.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.services.values().flatten().map(|i| &**i)
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
pub struct ServiceInstancesRef<'a> {
    /// The service.
    pub service: &'a str,
    /// The agent's index.
    pub index: u64,
    /// The instances answered.
    pub instances: Vec<&'a Instance>,
}

#[derive(Debug, Default)]
struct Sources {
    registry: Arc<RegistryView>,
    feed_live: bool,
    gossip: GossipView,
    /// The instances the last merge made (from gossip, or marked critical for a dead owner),
    /// by id: the next merge reuses each one it makes again unchanged, and takes the first
    /// time an instance known only from gossip was seen from it, so its timestamps are stable.
    made: HashMap<String, Arc<Instance>>,
    /// Evidence that owners which gossip does not show alive live.
    evidence: Evidence,
    /// The registry view the peers' signing keys were last taken from.
    keys_from: Option<Arc<RegistryView>>,
}

/// Owners of registered instances that gossip does not show alive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Doubted {
    /// Their nodes.
    pub nodes: BTreeSet<String>,
    /// The shortest lease among their instances, in seconds.
    pub shortest_ttl_s: Option<u32>,
    /// Whether the agent is still settling into gossip (the registry is believed meanwhile).
    pub settling: bool,
}

/// Whether a change of the sources needs the catalog merged again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// What the registry or gossip says changed: merge.
    Catalog,
    /// Only the feed's state (live, confirmed) changed: the merged catalog stays.
    Status,
}

/// The cache; readers take [`Cache::snapshot`], writers replace one source and re-merge.
#[derive(Debug)]
pub struct Cache {
    sources: std::sync::Mutex<Sources>,
    /// Peers' gossip signing keys, from the registry's agent list.
    peer_keys: Arc<PeerKeys>,
    current: RwLock<Arc<Snapshot>>,
    index: watch::Sender<u64>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::new(Duration::ZERO)
    }
}

impl Cache {
    /// An empty cache of an agent starting now, which believes the registry about owners that
    /// gossip has not found for `settle` (the time gossip needs to find the live ones).
    pub fn new(settle: Duration) -> Self {
        let sources = Sources { evidence: Evidence::new(Utc::now(), settle), ..Sources::default() };
        Cache {
            sources: std::sync::Mutex::new(sources),
            peer_keys: Arc::default(),
            current: RwLock::new(Arc::new(Snapshot::default())),
            index: watch::channel(0).0,
        }
    }

    /// Peers' gossip signing keys, as the registry view held lists them.
    pub fn peer_keys(&self) -> Arc<PeerKeys> {
        self.peer_keys.clone()
    }

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

    /// The registry view, for persistence and seeds (shared, not copied).
    pub fn registry(&self) -> Arc<RegistryView> {
        self.with_sources(|s| s.registry.clone())
    }

    /// Replaces what the registry says (a saved view at start; the feed's pages after).
    pub fn set_registry(&self, view: RegistryView) {
        self.update(Change::Catalog, |s| s.registry = Arc::new(view));
    }

    /// Records a page of the registry's feed: the feed is live.
    pub fn set_registry_page(&self, view: RegistryView) {
        self.update(Change::Catalog, |s| {
            s.registry = Arc::new(view);
            s.feed_live = true;
        });
    }

    /// Records that the registry's feed answered with the catalog still at the index the
    /// cache holds (a blocking query whose wait ended): the feed is live and the catalog
    /// confirmed now; nothing is merged again and the agent's index stays.
    pub fn confirm_registry(&self) {
        self.update(Change::Status, |s| {
            Arc::make_mut(&mut s.registry).confirmed_at = Some(Utc::now());
            s.feed_live = true;
        });
    }

    /// Records whether the registry's feed answers.
    pub fn set_feed_live(&self, live: bool) {
        self.update(Change::Status, |s| s.feed_live = live);
    }

    /// Replaces what gossip says; a node that left the live set, or is found dead, is
    /// remembered dead from now on until it is alive again.
    pub fn set_gossip(&self, view: GossipView) {
        self.update(Change::Catalog, |s| {
            s.evidence.observe_gossip(s.gossip.live.keys(), &view.live, &view.dead, Utc::now());
            s.gossip = view;
        });
    }

    /// Records when the agents the registry listed last renewed (the answer of
    /// `GET /v1/agents?node=…` for the owners gossip does not show alive).
    pub fn set_renewals(&self, pages: &[AgentsPage]) {
        self.update(Change::Catalog, |s| s.evidence.set_renewals(pages, Utc::now()));
    }

    /// Merges again with the same sources: evidence ages, and the settling window ends.
    pub fn recheck(&self) {
        self.update(Change::Catalog, |_| {});
    }

    /// The owners of registered instances that gossip does not show alive, with the
    /// shortest lease among their instances, and whether this agent is still settling.
    pub fn doubted_owners(&self) -> Doubted {
        self.with_sources(|s| {
            let mut doubted = Doubted { settling: s.evidence.settling(Utc::now()), ..Doubted::default() };
            for instance in &s.registry.instances {
                if let Some(node) = instance.node.as_deref()
                    && !s.gossip.live.contains_key(node)
                {
                    doubted.nodes.insert(node.to_string());
                    doubted.shortest_ttl_s = Some(doubted.shortest_ttl_s.map_or(instance.ttl_s, |t| t.min(instance.ttl_s)));
                }
            }
            doubted
        })
    }

    fn with_sources<T>(&self, f: impl FnOnce(&mut Sources) -> T) -> T {
        match self.sources.lock() {
            Ok(mut sources) => f(&mut sources),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn update(&self, kind: Change, change: impl FnOnce(&mut Sources)) {
        self.with_sources(|sources| {
            change(sources);
            if sources.keys_from.as_ref().is_none_or(|from| !Arc::ptr_eq(from, &sources.registry)) {
                self.peer_keys.update(&sources.registry.agents);
                sources.keys_from = Some(sources.registry.clone());
            }
            let previous = self.snapshot();
            let self_preservation = sources.registry.self_preservation;
            let merged = match kind {
                Change::Catalog => Some(merge(&sources.registry, &sources.gossip, &mut sources.evidence, Utc::now(), &mut sources.made)),
                Change::Status => None,
            };
            // Shared instances compare by pointer first, so an unchanged catalog costs a
            // walk, not a deep comparison.
            let moved = merged.as_ref().is_some_and(|m| *previous.services != *m) || previous.self_preservation != self_preservation;
            let (index, services, default_answers) = match merged {
                Some(merged) if moved => {
                    let answers = merged.keys().map(|k| (k.clone(), OnceLock::new())).collect();
                    (previous.index + 1, Arc::new(merged), Arc::new(answers))
                }
                _ if moved => {
                    // Only self-preservation moved: the answers carry the index, so new ones.
                    let answers = previous.services.keys().map(|k| (k.clone(), OnceLock::new())).collect();
                    (previous.index + 1, previous.services.clone(), Arc::new(answers))
                }
                _ => (previous.index, previous.services.clone(), previous.default_answers.clone()),
            };
            let snapshot = Arc::new(Snapshot {
                index,
                services,
                self_preservation,
                confirmed_at: sources.registry.confirmed_at,
                members: sources.gossip.members.clone(),
                feed_live: sources.feed_live,
                default_answers,
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

/// The instance `built` as `made` last held it when it is the same, so that an unchanged
/// instance stays one allocation, shared by every snapshot.
fn reuse(previous: &HashMap<String, Arc<Instance>>, built: Instance) -> Arc<Instance> {
    match previous.get(&built.id) {
        Some(made) if **made == built => made.clone(),
        _ => Arc::new(built),
    }
}

/// The merge rule:
/// - an instance with an owner node that is alive in gossip is described by that node's
///   gossip (fresher than the registry); if that node no longer publishes it, it is gone;
/// - an instance whose owner gossip saw die is critical, whatever the registry says, also
///   after gossip forgets the dead node, until there is evidence of life newer than the
///   death: the owner alive in gossip again, or a fresh renewal at the registry after it;
/// - an instance whose owner gossip never saw alive is the registry's only while that owner
///   renewed recently (or while this agent is still settling into gossip), critical otherwise;
/// - an instance with no owner is the registry's;
/// - a node may only describe its own instances: a gossip claim on an instance the registry
///   gives to another node is ignored.
///
/// `made` holds the instances the previous merge made (not taken as they are from the
/// registry) and is replaced by this merge's.
pub fn merge(
    registry: &RegistryView,
    gossip: &GossipView,
    evidence: &mut Evidence,
    now: DateTime<Utc>,
    made: &mut HashMap<String, Arc<Instance>>,
) -> Services {
    let mut merged: BTreeMap<&str, Arc<Instance>> = BTreeMap::new();
    let mut made_now: HashMap<String, Arc<Instance>> = HashMap::new();
    let known: HashMap<&str, &Instance> = registry.instances.iter().map(|i| (i.id.as_str(), &**i)).collect();
    let owners: BTreeSet<&str> = registry.instances.iter().filter_map(|i| i.node.as_deref()).collect();
    evidence.forget_unowned(&owners, &gossip.dead);
    for instance in &registry.instances {
        let doubt = match instance.node.as_deref() {
            Some(node) if gossip.live.contains_key(node) => continue, // its owner's gossip decides below
            Some(node) => match evidence.verdict(node, instance.ttl_s, now) {
                Verdict::Believe => None,
                Verdict::Dead(at) => Some(format!(
                    "agent `{node}` was found dead in gossip at {}; no evidence of life since",
                    at.format("%Y-%m-%dT%H:%M:%SZ")
                )),
                Verdict::Unconfirmed => {
                    Some(format!("agent `{node}` is not in this agent's gossip and has not renewed at the registry recently"))
                }
            },
            None => None,
        };
        match doubt {
            None => {
                merged.insert(instance.id.as_str(), instance.clone());
            }
            Some(why) => {
                let mut doubted = Instance::clone(instance);
                doubted.health = Health::Critical;
                doubted.output = Some(why);
                let doubted = reuse(made, doubted);
                made_now.insert(instance.id.clone(), doubted.clone());
                merged.insert(instance.id.as_str(), doubted);
            }
        }
    }
    for (node, peer) in &gossip.live {
        for (id, published) in &peer.instances {
            let registered = known.get(id.as_str()).copied();
            if registered.is_some_and(|r| r.node.as_deref() != Some(node.as_str())) {
                continue; // another node's instance
            }
            let since = registered.map(|r| r.registered_at).unwrap_or_else(|| made.get(id).map_or(now, |m| m.registered_at));
            let built = Instance {
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
            };
            let instance = reuse(made, built);
            made_now.insert(id.clone(), instance.clone());
            merged.insert(id.as_str(), instance);
        }
    }
    *made = made_now;
    let mut services = Services::new();
    for instance in merged.into_values() {
        match services.get_mut(&instance.service) {
            Some(list) => list.push(instance),
            None => {
                services.insert(instance.service.clone(), vec![instance]);
            }
        }
    }
    services
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use signpost_shared::gossip::GossipInstance;

    use super::*;
    use crate::gossip::Peer;

    fn registered(id: &str, node: Option<&str>) -> Arc<Instance> {
        Arc::new(Instance {
            id: id.into(),
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: Default::default(),
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
        })
    }

    fn published(health: Health) -> GossipInstance {
        crate::gossip::test_instance("10.0.0.2", 81, health)
    }

    fn peer(instances: &[(&str, GossipInstance)]) -> Peer {
        Peer {
            http: "127.0.0.1:7301".into(),
            zone: None,
            instances: instances.iter().map(|(id, i)| (id.to_string(), Arc::new(i.clone()))).collect(),
        }
    }

    /// The merge by an agent that started now and settles into gossip for `settle`.
    fn merged(registry: &RegistryView, gossip: &GossipView, settle: Duration) -> Services {
        let now = Utc::now();
        let mut evidence = Evidence::new(now, settle);
        evidence.observe_gossip(std::iter::empty(), &gossip.live, &gossip.dead, now);
        merge(registry, gossip, &mut evidence, now, &mut HashMap::new())
    }

    fn health_of(services: &Services, id: &str) -> Option<Health> {
        services.values().flatten().find(|i| i.id == id).map(|i| i.health)
    }

    #[test]
    fn gossip_is_fresher_for_a_live_owner() {
        let registry = RegistryView { instances: vec![registered("a", Some("n1"))], ..Default::default() };
        let gossip = GossipView { live: [("n1".to_string(), peer(&[("a", published(Health::Critical))]))].into(), ..Default::default() };
        let merged = merged(&registry, &gossip, Duration::ZERO);
        assert_eq!(health_of(&merged, "a"), Some(Health::Critical));
        assert_eq!(merged["web"][0].port, 81);
    }

    #[test]
    fn a_dead_owner_makes_its_instances_critical() {
        let registry = RegistryView { instances: vec![registered("a", Some("n1")), registered("b", None)], ..Default::default() };
        let gossip = GossipView { dead: BTreeSet::from(["n1".to_string()]), ..Default::default() };
        let merged = merged(&registry, &gossip, Duration::ZERO);
        assert_eq!(health_of(&merged, "a"), Some(Health::Critical));
        assert_eq!(health_of(&merged, "b"), Some(Health::Passing), "agentless instances are the registry's");
    }

    #[test]
    fn unknown_owners_and_gossip_only_instances() {
        let registry = RegistryView { instances: vec![registered("a", Some("far-away"))], ..Default::default() };
        let gossip = GossipView { live: [("n2".to_string(), peer(&[("new", published(Health::Passing))]))].into(), ..Default::default() };
        let settling = merged(&registry, &gossip, Duration::from_secs(10));
        assert_eq!(health_of(&settling, "a"), Some(Health::Passing), "gossip may not have found its owner yet: the registry's word");
        let settled = merged(&registry, &gossip, Duration::ZERO);
        assert_eq!(health_of(&settled, "a"), Some(Health::Critical), "gossip never saw its owner and nothing vouches for it");
        assert_eq!(health_of(&settled, "new"), Some(Health::Passing), "not registered yet, but live in gossip");
    }

    #[test]
    fn a_live_owner_that_stopped_publishing_removed_it() {
        let registry = RegistryView { instances: vec![registered("a", Some("n1"))], ..Default::default() };
        let gossip = GossipView { live: [("n1".to_string(), peer(&[]))].into(), ..Default::default() };
        assert!(merged(&registry, &gossip, Duration::ZERO).is_empty());
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
        let merged = merged(&registry, &gossip, Duration::ZERO);
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

    #[test]
    fn a_timed_out_feed_page_keeps_the_snapshot_and_the_index() {
        let cache = Cache::default();
        cache.set_registry_page(RegistryView { index: 7, instances: vec![registered("a", None)], ..Default::default() });
        let before = cache.snapshot();
        let answer = before.default_answer("web").expect("web is known");
        cache.set_feed_live(false);
        assert_eq!(cache.snapshot().index, before.index, "the feed's state is not a catalog change");
        cache.confirm_registry();
        let after = cache.snapshot();
        assert_eq!(after.index, before.index, "the agent's index stays");
        assert!(Arc::ptr_eq(&after.services, &before.services), "the catalog is not merged again");
        assert_eq!(after.default_answer("web"), Some(answer), "the serialized answers are kept");
        assert_eq!(after.stale_seconds(), Some(0), "confirmed: the feed is live");
        assert!(after.confirmed_at >= before.confirmed_at);
        assert_eq!(cache.registry().index, 7);
    }

    #[test]
    fn instances_are_held_once() {
        let cache = Cache::default();
        let gossip = |members: usize| GossipView {
            live: [("n1".to_string(), peer(&[("g", published(Health::Passing))]))].into(),
            members: (0..members)
                .map(|i| Member {
                    node: format!("n{i}"),
                    gossip_addr: "127.0.0.1:7302".into(),
                    state: "alive",
                    http_addr: None,
                    zone: None,
                    instances: 1,
                })
                .collect(),
            ..Default::default()
        };
        cache.set_registry_page(RegistryView { index: 1, instances: vec![registered("a", None)], ..Default::default() });
        cache.set_gossip(gossip(1));
        let first = cache.snapshot();
        let from_registry = cache.registry().instances[0].clone();
        let shown = first.instances().find(|i| i.id == "a").expect("a");
        assert!(std::ptr::eq(shown, &*from_registry), "the snapshot shares the registry's instance");
        cache.set_gossip(gossip(2));
        let second = cache.snapshot();
        assert_eq!(second.index, first.index, "gossip said nothing new about instances");
        assert!(Arc::ptr_eq(&first.services, &second.services));
        // A registry page with another index re-merges; unchanged instances stay shared.
        cache.set_registry_page(RegistryView {
            index: 2,
            instances: vec![from_registry.clone(), registered("b", None)],
            ..Default::default()
        });
        let third = cache.snapshot();
        assert_eq!(third.index, first.index + 1);
        let g = |s: &Snapshot| s.service("web").iter().find(|i| i.id == "g").cloned().expect("g");
        assert!(Arc::ptr_eq(&g(&first), &g(&third)), "an instance made from gossip is made once while it does not change");
    }
}
