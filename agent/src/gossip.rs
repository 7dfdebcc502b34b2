//! The chitchat adapter. Each agent publishes its own instances in its node state
//! (`inst:{id}` → JSON, plus `agent` and an `alive` stamp), every value signed with its node
//! key ([`crate::gossip_identity`]: peers refuse what does not verify before chitchat applies
//! it), reads every live peer's instances into a [`GossipView`] whenever the live set or a
//! live node's state changes, and learns peers from the registry's agent list. A peer's value
//! that fails to decode or validate is logged once and skipped; it never reaches the cache.
//! A peer whose `alive` stamp has not moved for [`stale_after`] counts as dead, whatever its
//! heartbeats say (anyone can repeat a node's heartbeat; only the node can sign a stamp).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, spawn_chitchat};
use serde::Serialize;
use signpost_shared::gossip::{self, AGENT_KEY, AgentValue, FORMAT_VERSION, GossipInstance, INSTANCE_PREFIX};
use signpost_shared::gossip_sign::{self, NodeSigningKey, Signer};
use signpost_shared::model::Health;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::gossip_identity::{self, PeerKeys};
use crate::gossip_key::SharedKeyring;
use crate::gossip_transport::GossipTransport;
use crate::local::LocalState;
use crate::metrics::Metrics;

/// Gossip settings.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// This node's name.
    pub node: String,
    /// Cluster id.
    pub cluster_id: String,
    /// UDP bind address.
    pub listen: SocketAddr,
    /// Address peers use.
    pub advertise: SocketAddr,
    /// Seeds from the configuration.
    pub seeds: Vec<String>,
    /// Round interval.
    pub interval: Duration,
    /// Failure detector threshold.
    pub phi_threshold: f64,
    /// How long dead peers are remembered.
    pub dead_node_grace: Duration,
    /// This agent's HTTP address, published under `agent`.
    pub http_addr: String,
    /// This agent's zone.
    pub zone: Option<String>,
    /// The cluster's keys; `None` gossips in the clear.
    pub keyring: Option<Arc<SharedKeyring>>,
    /// Receive buffer of the gossip socket, in bytes.
    pub recv_buffer: usize,
    /// This node's signing key.
    pub signing: Arc<NodeSigningKey>,
    /// Peers' public keys, as the registry lists them.
    pub peer_keys: Arc<PeerKeys>,
}

/// Key of the stamp a node signs again every [`alive_every`], so that its peers can tell it
/// lives.
pub const ALIVE_KEY: &str = "alive";

/// How often a node signs its `alive` stamp again: every ten gossip rounds, at least 2 s apart.
pub fn alive_every(interval: Duration) -> Duration {
    (interval * 10).max(Duration::from_secs(2))
}

/// How long a peer's `alive` stamp may stay still before the peer counts as dead: five stamps.
pub fn stale_after(interval: Duration) -> Duration {
    alive_every(interval) * 5
}

/// One live peer (or this agent) as gossip describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its HTTP address.
    pub http: String,
    /// Its zone.
    pub zone: Option<String>,
    /// Its instances, by id (each decoded once per version and shared by later views).
    pub instances: BTreeMap<String, Arc<GossipInstance>>,
}

/// A member as `GET /v1/agent/members` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Node name.
    pub node: String,
    /// Gossip address.
    pub gossip_addr: String,
    /// `alive` or `dead`.
    pub state: &'static str,
    /// Its HTTP address, when known.
    pub http_addr: Option<String>,
    /// Its zone.
    pub zone: Option<String>,
    /// Instances it publishes.
    pub instances: usize,
}

/// What gossip says: live nodes with their instances, and nodes found dead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GossipView {
    /// Live nodes (this agent included), by node name.
    pub live: BTreeMap<String, Peer>,
    /// Nodes the failure detector found dead and that have no live generation.
    pub dead: BTreeSet<String>,
    /// Every member, for the API.
    pub members: Vec<Member>,
}

/// The running gossip: the chitchat handle and what it needs.
pub struct Gossip {
    handle: ChitchatHandle,
    config: GossipConfig,
    /// The last `alive` stamp.
    stamp: AtomicU64,
}

impl Gossip {
    /// Binds the UDP socket and starts chitchat.
    pub async fn start(config: GossipConfig, local: &LocalState, metrics: Arc<Metrics>) -> anyhow::Result<Gossip> {
        let generation = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(config.node.clone(), generation, config.advertise),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.interval,
            listen_addr: config.listen,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                initial_interval: config.interval,
                dead_node_grace_period: config.dead_node_grace,
            },
            marked_for_deletion_grace_period: config.dead_node_grace,
            catchup_callback: None,
            // A peer counts as live only once it has said who it is.
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| state.get(AGENT_KEY).is_some())),
            protocol_version: chitchat::ProtocolVersion::V0,
            node_delta_gate: Some(gossip_identity::gate(config.cluster_id.clone(), config.peer_keys.clone(), metrics.clone())),
        };
        let transport = GossipTransport {
            keyring: config.keyring.clone(),
            cluster_id: config.cluster_id.clone(),
            advertise: config.advertise,
            recv_buffer: config.recv_buffer,
            metrics,
        };
        // Values are signed over the version chitchat gives them, so they are set once it runs.
        let handle = spawn_chitchat(chitchat_config, Vec::new(), &transport).await?;
        let gossip = Gossip { handle, config, stamp: AtomicU64::new(0) };
        gossip.publish(local, None).await;
        gossip.stamp_alive().await;
        Ok(gossip)
    }

    /// Publishes `local` in this node's state: sets what changed, and an empty value for an
    /// instance that left (a deletion could not be signed, so peers refuse deletions).
    pub async fn publish(&self, local: &LocalState, force_health: Option<Health>) {
        let wanted: BTreeMap<String, String> = own_key_values(&self.config, local, force_health).into_iter().collect();
        let cluster_id = self.config.cluster_id.clone();
        let signing = self.config.signing.clone();
        self.handle
            .with_chitchat(move |chitchat| {
                let id = chitchat.self_chitchat_id().clone();
                let state = chitchat.self_node_state();
                let gone: Vec<String> = state
                    .key_values()
                    .filter(|(k, v)| k.starts_with(INSTANCE_PREFIX) && !wanted.contains_key(*k) && gossip_sign::payload(v) != Some(""))
                    .map(|(k, _)| k.to_string())
                    .collect();
                for key in &gone {
                    set_signed(state, &signing, &cluster_id, &id, key, "");
                }
                for (key, value) in &wanted {
                    if state.get(key).and_then(gossip_sign::payload) != Some(value.as_str()) {
                        set_signed(state, &signing, &cluster_id, &id, key, value);
                    }
                }
            })
            .await;
    }

    /// Signs the `alive` stamp again (a counter), so that peers see this node live.
    pub async fn stamp_alive(&self) {
        let stamp = self.stamp.fetch_add(1, Ordering::Relaxed) + 1;
        let (cluster_id, signing) = (self.config.cluster_id.clone(), self.config.signing.clone());
        self.handle
            .with_chitchat(move |chitchat| {
                let id = chitchat.self_chitchat_id().clone();
                set_signed(chitchat.self_node_state(), &signing, &cluster_id, &id, ALIVE_KEY, &stamp.to_string());
            })
            .await;
    }

    /// What chitchat refused from peers since start: nodes, key-values.
    pub async fn refusals(&self) -> (u64, u64) {
        self.handle.with_chitchat(|chitchat| (chitchat.refused_nodes(), chitchat.refused_key_values())).await
    }

    /// The nodes the failure detector found dead (a short read under the chitchat lock).
    pub async fn dead_nodes(&self) -> Vec<ChitchatId> {
        self.handle.with_chitchat(|chitchat| chitchat.dead_nodes().cloned().collect()).await
    }

    /// Waits for the live set or a live node's state to change.
    pub async fn watcher(&self) -> tokio::sync::watch::Receiver<BTreeMap<ChitchatId, NodeState>> {
        self.handle.with_chitchat(|c| c.live_nodes_watcher()).await
    }

    /// Asks chitchat to gossip with `addr` (a peer learned after start).
    pub fn introduce(&self, addr: SocketAddr) {
        if addr != self.config.advertise {
            let _ = self.handle.gossip(addr);
        }
    }

    /// Completes if the gossip loop stopped on its own.
    pub fn termination(&self) -> impl std::future::Future<Output = anyhow::Result<()>> + use<> {
        self.handle.termination_watcher()
    }

    /// Stops the gossip loop.
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            tracing::warn!(error = %e, "gossip did not stop cleanly");
        }
    }

    /// The gossip settings.
    pub fn config(&self) -> &GossipConfig {
        &self.config
    }
}

/// Sets `key` in this node's state to `payload`, signed over the version it gets.
fn set_signed(state: &mut NodeState, signing: &NodeSigningKey, cluster_id: &str, id: &ChitchatId, key: &str, payload: &str) {
    let addr = id.gossip_advertise_addr.to_string();
    let signer = Signer { cluster_id, node: &id.node_id, generation: id.generation_id, gossip_addr: &addr };
    state.set_with_own_version(key, |version| signing.sign_value(&signer, key, version, payload));
}

/// This node's keys: `agent` and one `inst:{id}` per local service; a value too large to
/// gossip is left out (and logged), so that it cannot stall the rest.
fn own_key_values(config: &GossipConfig, local: &LocalState, force_health: Option<Health>) -> Vec<(String, String)> {
    let agent = AgentValue { v: FORMAT_VERSION, http: config.http_addr.clone(), zone: config.zone.clone() };
    let mut out = Vec::new();
    let mut total = 0;
    if let Ok(value) = gossip::encode(&agent) {
        total += value.len();
        out.push((AGENT_KEY.to_string(), value));
    }
    for service in local.services() {
        let spec = &service.spec;
        let instance = GossipInstance {
            v: FORMAT_VERSION,
            service: spec.service.clone(),
            address: spec.address.clone(),
            port: spec.port,
            tags: spec.tags.clone(),
            meta: spec.meta.clone(),
            weight: spec.weight,
            zone: spec.zone.clone(),
            health: force_health.unwrap_or_else(|| service.health()),
            output: service.output().map(|o| GossipInstance::clip_output(&o)),
        };
        match gossip::encode(&instance) {
            Ok(value) if total + value.len() <= gossip::MAX_NODE_STATE_BYTES => {
                total += value.len();
                out.push((gossip::instance_key(&spec.id), value));
            }
            Ok(_) => {
                tracing::error!(instance = %spec.id, "this agent's gossip state is full; the instance is not gossiped (the registry still has it)")
            }
            Err(e) => tracing::error!(instance = %spec.id, error = %e, "the instance is too large to gossip"),
        }
    }
    out
}

/// This agent as its peers will see it once the next round carries it: what it publishes,
/// read straight from `LocalState`, so its own lookups show a local change at once.
fn own_peer(config: &GossipConfig, local: &LocalState) -> Peer {
    let mut instances = BTreeMap::new();
    for (key, value) in own_key_values(config, local, None) {
        if let Some(id) = key.strip_prefix(INSTANCE_PREFIX)
            && let Ok(instance) = GossipInstance::decode(id, &value)
        {
            instances.insert(id.to_string(), Arc::new(instance));
        }
    }
    Peer { http: config.http_addr.clone(), zone: config.zone.clone(), instances }
}

fn read_peer(id: &ChitchatId, state: &NodeState, metrics: &Metrics, values: &mut Values) -> Option<Peer> {
    let reported = &mut values.reported;
    let mut refuse = |key: &str, error: &dyn std::fmt::Display| {
        let version = state.get_versioned(key).map(|v| v.version).unwrap_or_default();
        let seen = (id.node_id.to_string(), key.to_string());
        // Logged and counted once per value: a bad value read again on every change is the
        // same bad value.
        if reported.get(&seen) != Some(&version) {
            metrics.bad_gossip_value();
            tracing::warn!(node = %id.node_id, key, error = %error, "skipping a malformed gossip value");
            reported.insert(seen, version);
        }
    };
    let agent = peer_agent(&id.node_id, state.get(AGENT_KEY).and_then(stored_payload), &mut refuse)?;
    // What the previous view decoded of this node: a value whose version did not move is
    // taken from there, not decoded again.
    let node = (id.node_id.to_string(), id.generation_id);
    let mut before = values.previous.remove(&node).unwrap_or_default();
    let mut now = HashMap::new();
    let mut instances = BTreeMap::new();
    for (key, value) in state.iter_prefix(INSTANCE_PREFIX) {
        let instance_id = &key[INSTANCE_PREFIX.len()..];
        let Some(payload) = stored_payload(&value.value) else { continue };
        let decoded = match before.remove_entry(instance_id) {
            Some((owned_id, (version, instance))) if version == value.version => Ok((owned_id, instance)),
            _ => GossipInstance::decode(instance_id, payload).map(|i| (instance_id.to_string(), Arc::new(i))),
        };
        match decoded {
            Ok((owned_id, instance)) => {
                instances.insert(owned_id.clone(), instance.clone());
                now.insert(owned_id, (value.version, instance));
            }
            Err(e) => refuse(key, &e),
        }
    }
    values.current.insert(node, now);
    Some(Peer { http: agent.http, zone: agent.zone, instances })
}

/// The payload of a value as it sits in a peer's node state (its signature was verified on
/// its way in, and is dropped here); `None` for an empty payload, an instance that left.
pub fn stored_payload(value: &str) -> Option<&str> {
    let payload = gossip_sign::payload(value).unwrap_or(value);
    (!payload.is_empty()).then_some(payload)
}

/// A peer's node id and `agent` value, checked: `None` when the id is refused or there is no
/// valid `agent` value (yet). A refusal goes to `refuse` with its key (`node id` for the id).
fn peer_agent(node_id: &str, agent: Option<&str>, refuse: &mut impl FnMut(&str, &dyn std::fmt::Display)) -> Option<AgentValue> {
    if let Err(problem) = signpost_shared::validate::node_name(node_id) {
        refuse("node id", &problem);
        return None;
    }
    match AgentValue::decode(agent?) {
        Ok(agent) => Some(agent),
        Err(e) => {
            refuse(AGENT_KEY, &e);
            None
        }
    }
}

/// Reads one peer from its node id, its `agent` value and its `inst:{id}` keys with their
/// values as they sit in its node state ([`stored_payload`]), as [`read_peer`] does without its
/// decode cache: `None` when the node id is refused or it has no `agent` value yet; an instance
/// that left is skipped; a refused value goes to `refuse` with its key and is skipped. Pure, without chitchat's types, so that the fuzz target `gossip_value` runs it.
pub fn peer_from_values<'a>(
    node_id: &str,
    agent: Option<&str>,
    instances: impl IntoIterator<Item = (&'a str, &'a str)>,
    mut refuse: impl FnMut(&str, &dyn std::fmt::Display),
) -> Option<Peer> {
    let agent = peer_agent(node_id, agent.and_then(stored_payload), &mut refuse)?;
    let mut peer = Peer { http: agent.http, zone: agent.zone, instances: BTreeMap::new() };
    for (key, value) in instances {
        let Some(instance_id) = key.strip_prefix(INSTANCE_PREFIX) else { continue };
        let Some(payload) = stored_payload(value) else { continue };
        match GossipInstance::decode(instance_id, payload) {
            Ok(instance) => {
                peer.instances.insert(instance_id.to_string(), Arc::new(instance));
            }
            Err(e) => refuse(key, &e),
        }
    }
    Some(peer)
}

fn member(id: &ChitchatId, state: &'static str, peer: Option<&Peer>) -> Member {
    Member {
        node: id.node_id.to_string(),
        gossip_addr: id.gossip_advertise_addr.to_string(),
        state,
        http_addr: peer.map(|p| p.http.clone()),
        zone: peer.and_then(|p| p.zone.clone()),
        instances: peer.map(|p| p.instances.len()).unwrap_or(0),
    }
}

/// Bad values already reported: (node, key) → the version reported.
type Reported = HashMap<(String, String), u64>;

/// One node generation's decoded instances: id → (the value's version, the instance).
type NodeValues = HashMap<String, (u64, Arc<GossipInstance>)>;

/// What reading peers remembers from one view to the next: the values decoded, by node
/// generation, so that a gossip change costs a decode of what changed, not of every value
/// of every peer; and the bad values already reported.
#[derive(Debug, Default)]
struct Values {
    /// Decoded by the view being built.
    current: HashMap<(String, u64), NodeValues>,
    /// Decoded by the previous view; what this one does not take is dropped with it.
    previous: HashMap<(String, u64), NodeValues>,
    reported: Reported,
    /// Each node generation's `alive` stamp (its version) and when this agent saw it move.
    stamps: HashMap<(String, u64), (u64, Instant)>,
    /// When the next live node's stamp goes stale, if nothing moves before.
    next_stale: Option<Instant>,
}

/// Builds the view from the live nodes' states (a copy the watcher hands out, so no chitchat
/// lock is held while values are decoded) and the dead nodes. Of two live generations of one
/// node (a restart, for a round or two), the newer one counts; a node whose `alive` stamp has
/// not moved for `stale_after` (as of `now`) is dead.
fn build_view(
    live: &BTreeMap<ChitchatId, NodeState>,
    dead: &[ChitchatId],
    metrics: &Metrics,
    values: &mut Values,
    now: Instant,
    stale_after: Duration,
) -> GossipView {
    let mut newest: BTreeMap<&str, &ChitchatId> = BTreeMap::new();
    for id in live.keys() {
        let entry = newest.entry(id.node_id.as_ref()).or_insert(id);
        if id.generation_id > entry.generation_id {
            *entry = id;
        }
    }
    let mut view = GossipView::default();
    let mut stamps = HashMap::with_capacity(newest.len());
    values.next_stale = None;
    for id in newest.values() {
        let Some(state) = live.get(*id) else { continue };
        let node = (id.node_id.to_string(), id.generation_id);
        let stamp = state.get_versioned(ALIVE_KEY).map_or(0, |v| v.version);
        let moved_at = match values.stamps.get(&node) {
            Some((known, at)) if *known == stamp => *at,
            _ => now,
        };
        stamps.insert(node, (stamp, moved_at));
        let stale_at = moved_at + stale_after;
        if now >= stale_at {
            if view.dead.insert(id.node_id.to_string()) {
                view.members.push(member(id, "dead", None));
            }
            continue;
        }
        values.next_stale = Some(values.next_stale.map_or(stale_at, |next| next.min(stale_at)));
        if let Some(peer) = read_peer(id, state, metrics, values) {
            view.members.push(member(id, "alive", Some(&peer)));
            view.live.insert(id.node_id.to_string(), peer);
        }
    }
    values.stamps = stamps;
    for id in dead {
        if !view.live.contains_key(id.node_id.as_ref()) && view.dead.insert(id.node_id.to_string()) {
            view.members.push(member(id, "dead", None));
        }
    }
    // Forget what was decoded of nodes and values that are gone, and reports of bad values
    // that are gone, so the memory follows the cluster.
    values.previous = std::mem::take(&mut values.current);
    values.reported.retain(|(node, key), _| {
        live.iter().any(|(id, state)| id.node_id.as_ref() == node && (key == "node id" || state.get(key).is_some()))
    });
    view
}

/// Publishes local changes and reads peers' changes into the cache, until cancelled.
pub async fn run(gossip: Arc<Gossip>, local: Arc<LocalState>, cache: Arc<Cache>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut local_changes = local.subscribe();
    let mut peers = gossip.watcher().await;
    // A check may have reported before this task subscribed.
    gossip.publish(&local, None).await;
    let mut values = Values::default();
    // The dead set does not change a live node's state: read it every few rounds.
    let mut ticker = tokio::time::interval(gossip.config().interval * 2);
    let mut stamper = tokio::time::interval(alive_every(gossip.config().interval));
    let stale_after = stale_after(gossip.config().interval);
    let mut dead: Vec<ChitchatId> = Vec::new();
    let mut last: Option<GossipView> = None;
    let mut stale = true;
    // The local version the next view shows: read before publishing and building from it.
    let mut local_version = *local_changes.borrow_and_update();
    loop {
        if stale {
            let mut view = {
                let live = peers.borrow_and_update();
                build_view(&live, &dead, &metrics, &mut values, Instant::now(), stale_after)
            };
            let own = own_peer(gossip.config(), &local);
            view.live.insert(gossip.config().node.clone(), own);
            metrics.members(view.live.len(), view.dead.len());
            // Merging costs a pass over the catalog: only when gossip said something new.
            if last.as_ref() != Some(&view) {
                cache.set_gossip(view.clone());
                last = Some(view);
            }
            local.answered(local_version);
            stale = false;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = local_changes.changed() => {
                if changed.is_err() { return }
                local_version = *local_changes.borrow_and_update();
                gossip.publish(&local, None).await;
                stale = true;
            }
            changed = peers.changed() => {
                if changed.is_err() { return }
                // A node that left the live set is dead from the same round on: read the dead
                // set now, so that no view shows it neither live nor dead.
                dead = gossip.dead_nodes().await;
                stale = true;
            }
            _ = stamper.tick() => gossip.stamp_alive().await,
            _ = ticker.tick() => {
                let (nodes, key_values) = gossip.refusals().await;
                metrics.gossip_refused(nodes, key_values);
                let now_dead = gossip.dead_nodes().await;
                if now_dead != dead {
                    dead = now_dead;
                    stale = true;
                }
                // A peer whose stamp went stale leaves the live set of the next view.
                if values.next_stale.is_some_and(|at| Instant::now() >= at) {
                    stale = true;
                }
            }
        }
    }
}

/// An instance of service `web` as a node publishes it, for tests.
#[cfg(test)]
pub(crate) fn test_instance(address: &str, port: u16, health: Health) -> GossipInstance {
    GossipInstance {
        v: FORMAT_VERSION,
        service: "web".into(),
        address: address.into(),
        port,
        tags: vec![],
        meta: Default::default(),
        weight: 100,
        zone: None,
        health,
        output: None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    /// A value as it sits in chitchat's state once the gate verified it.
    fn signed(payload: &str) -> String {
        format!("{}.{payload}", "A".repeat(86))
    }

    fn instance(port: u16) -> String {
        signed(&gossip::encode(&test_instance("10.0.0.1", port, Health::Passing)).expect("encodes"))
    }

    const STALE: Duration = Duration::from_secs(10);

    fn node(name: &str, generation: u64, values: &[(&str, String)]) -> (ChitchatId, NodeState) {
        let id = ChitchatId::new(name.to_string(), generation, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7302));
        let mut state = NodeState::for_test();
        let agent = AgentValue { v: FORMAT_VERSION, http: "127.0.0.1:7301".into(), zone: None };
        state.set(AGENT_KEY, signed(&gossip::encode(&agent).expect("encodes")));
        for (key, value) in values {
            state.set(*key, value);
        }
        (id, state)
    }

    fn web(view: &GossipView, node: &str, id: &str) -> Arc<GossipInstance> {
        view.live[node].instances.get(id).cloned().expect("the instance is in the view")
    }

    #[test]
    fn test_a_value_is_decoded_once_per_version() {
        let metrics = Metrics::new();
        let mut values = Values::default();
        let (id, mut state) = node("n1", 1, &[("inst:a", instance(80)), ("inst:b", instance(81))]);
        let mut live = BTreeMap::from([(id.clone(), state.clone())]);
        let first = build_view(&live, &[], &metrics, &mut values, Instant::now(), STALE);
        assert_eq!(web(&first, "n1", "a").port, 80);

        state.set("inst:b", instance(82));
        live.insert(id.clone(), state.clone());
        let second = build_view(&live, &[], &metrics, &mut values, Instant::now(), STALE);
        assert!(Arc::ptr_eq(&web(&first, "n1", "a"), &web(&second, "n1", "a")), "an unchanged value is not decoded again");
        assert_eq!(web(&second, "n1", "b").port, 82, "a new version is");

        // A restart (a new generation) may reuse version numbers: nothing is taken over.
        let (restarted, state) = node("n1", 2, &[("inst:a", instance(90))]);
        let third = build_view(&BTreeMap::from([(restarted, state)]), &[], &metrics, &mut values, Instant::now(), STALE);
        assert_eq!(web(&third, "n1", "a").port, 90);
        assert_eq!(values.previous.len(), 1, "what gone nodes decoded is forgotten");
    }

    #[test]
    fn test_a_node_whose_stamp_stays_still_is_dead_and_a_gone_instance_is_left_out() {
        let metrics = Metrics::new();
        let mut values = Values::default();
        let (id, mut state) = node("n1", 1, &[("inst:a", instance(80)), ("inst:b", signed(""))]);
        state.set(ALIVE_KEY, signed("1"));
        let start = Instant::now();
        let live = BTreeMap::from([(id.clone(), state.clone())]);
        let view = build_view(&live, &[], &metrics, &mut values, start, STALE);
        assert_eq!(view.live["n1"].instances.keys().collect::<Vec<_>>(), ["a"], "an empty value is an instance that left");
        assert_eq!(values.next_stale, Some(start + STALE));

        // Heartbeats alone (the same state) do not keep it live past the stale time.
        let view = build_view(&live, &[], &metrics, &mut values, start + STALE, STALE);
        assert!(view.live.is_empty() && view.dead.contains("n1"), "{view:?}");

        // A new stamp does.
        state.set(ALIVE_KEY, signed("2"));
        let live = BTreeMap::from([(id, state)]);
        let view = build_view(&live, &[], &metrics, &mut values, start + STALE * 2, STALE);
        assert!(view.live.contains_key("n1") && view.dead.is_empty(), "{view:?}");
    }
}
