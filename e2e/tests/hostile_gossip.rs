//! A hostile peer that sends hand-made chitchat datagrams over UDP to real agents, keyless
//! and keyed (the attacker then holds the cluster key, as a compromised host would), cannot
//! crash an agent or blow up its memory: a SynAck whose delta sets a key above its own max
//! version (a remote assert in chitchat), a digest listing 2,800 invented nodes (the next
//! digest outgrew the datagram: `assert!(mtu >= 100)`), and datagrams of zstd blocks that
//! each expand to 64 KiB (about 130 MB per datagram). Each time the agent goes on answering
//! and its peers go on seeing its instance passing. Nor can it speak for another node:
//! a newer generation of the node from its own address, values forged under the node's own
//! chitchat id (signed with another key, or not at all), a deletion of the node's keys, and
//! heartbeats forged for the node once it died all leave what other agents answer for the node
//! as it was (or, after the death, critical). docs/security.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::ChitchatId;
use chitchat::transport::{Transport, UdpTransport};
use serde_json::{Value, json};
use signpost_agent::gossip_key::{Keyring, SharedKeyring};
use signpost_agent::gossip_seal::{Opener, Sealer, now_ms};
use signpost_agent::gossip_transport::GossipTransport;
use signpost_agent::metrics::Metrics;
use signpost_e2e::gossip_craft::{self, DigestEntry, NodeId, Op};
use signpost_e2e::raw_peer::{RawPeer, raw_config};
use signpost_e2e::{Agent, AgentBuilder, Registry, RegistryBuilder, eventually};
use tokio::net::UdpSocket;

const CLUSTER: &str = "signpost";
const DROPPED: &str = "signpost_agent_gossip_dropped_total";

/// The attacker: a UDP socket of its own and, on a keyed cluster, the key.
struct Mallory {
    socket: UdpSocket,
    keyring: Option<Keyring>,
}

impl Mallory {
    async fn new(key: Option<&str>) -> Mallory {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        Mallory { socket, keyring: key.map(|k| Keyring::parse(&[k]).expect("a key")) }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("bound")
    }

    /// Its node identity, as it claims it in gossip.
    fn id(&self) -> NodeId {
        NodeId { name: "mallory".into(), generation: 1, addr: self.addr() }
    }

    async fn send(&self, to: SocketAddr, plain: &[u8]) {
        let datagram = match &self.keyring {
            None => plain.to_vec(),
            Some(keyring) => {
                let mut sealed = Vec::new();
                Sealer::new(CLUSTER).seal(keyring, to, plain, now_ms(), &mut sealed);
                sealed
            }
        };
        self.socket.send_to(&datagram, to).await.expect("send");
    }

    /// Waits for a Syn from `from`, opening sealed datagrams with the key.
    async fn wait_for_syn(&self, from: SocketAddr, within: Duration) {
        self.wait_for(from, within, gossip_craft::is_syn).await;
    }

    /// Learns `node`'s chitchat id as any member can: names itself to `peer` in a Syn and
    /// reads the digest of the SynAck that answers it.
    async fn learn_id(&self, peer: SocketAddr, node: &str) -> NodeId {
        let me = DigestEntry { node: self.id(), heartbeat: 1, last_gc_version: 0, max_version: 0 };
        loop {
            self.send(peer, &gossip_craft::syn(CLUSTER, std::slice::from_ref(&me))).await;
            let answer = self.wait_for(peer, Duration::from_secs(10), |d| gossip_craft::digest_nodes(d).is_some()).await;
            let nodes = gossip_craft::digest_nodes(&answer).unwrap_or_default();
            if let Some(id) = nodes.into_iter().find(|n| n.name == node) {
                return id;
            }
        }
    }

    /// Waits for a datagram from `from` that `wanted` accepts (opened with the key) and
    /// returns it.
    async fn wait_for(&self, from: SocketAddr, within: Duration, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut opener = Opener::new(CLUSTER, &[self.addr()]);
        let deadline = Instant::now() + signpost_e2e::patience(within);
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no Syn from {from} within {within:?}");
            let Ok(Ok((len, sender))) = tokio::time::timeout(left, self.socket.recv_from(&mut buf)).await else { continue };
            let plain: Vec<u8> = match &self.keyring {
                None => buf[..len].to_vec(),
                Some(keyring) => match opener.open(keyring, &mut buf[..len], now_ms()) {
                    Ok(plain) => plain.to_vec(),
                    Err(_) => continue,
                },
            };
            if sender == from && wanted(&plain) {
                return plain;
            }
        }
    }
}

fn gossip_addr(agent: &Agent) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], agent.gossip_port))
}

/// A registry (SQLite: it publishes the agents' keys), the victim (one service) and an
/// observer seeded with it, both keyed with `key` if any; returns them once the observer
/// sees the victim alive in gossip with its instance passing.
async fn victim_and_observer(key: Option<&str>) -> (Registry, Agent, Agent) {
    let registry = RegistryBuilder::new(None).start().await;
    let keyed = |builder: AgentBuilder| match key {
        Some(key) => builder.flag("gossip-key", key),
        None => builder,
    };
    let urls = [registry.url()];
    let victim = keyed(AgentBuilder::new("node-v", &urls).flag("service", "web:8080")).start().await;
    let observer = keyed(AgentBuilder::new("node-o", &urls).flag("seed", gossip_addr(&victim).to_string())).start().await;
    assert_passing_at(&observer, "the observer sees the victim's instance").await;
    (registry, victim, observer)
}

/// The observer's gossip member `node-v`: its state and how many instances it gossips.
async fn victim_member(observer: &Agent) -> Option<(String, u64)> {
    let body: Value = reqwest::get(observer.at("/v1/agent/members")).await.ok()?.json().await.ok()?;
    let member = body["members"].as_array()?.iter().find(|m| m["node"] == "node-v")?.clone();
    Some((member["state"].as_str()?.to_string(), member["instances"].as_u64()?))
}

/// Waits until `observer` has node-v alive in gossip, gossiping one instance, and answers
/// that instance passing.
async fn assert_passing_at(observer: &Agent, what: &str) {
    eventually(what, Duration::from_secs(20), || async {
        let passing = observer.lookup("web").await?.iter().any(|(id, health)| id == "node-v-web-8080" && health == "passing");
        (passing && victim_member(observer).await? == ("alive".to_string(), 1)).then_some(())
    })
    .await;
}

/// The victim is still running, answers, and its peer still sees its instance passing.
async fn assert_unharmed(victim: &mut Agent, observer: &Agent) {
    assert!(victim.is_running(), "the victim died; its log:\n{}", victim.log_text());
    let health = reqwest::get(victim.at("/healthz")).await.expect("the victim answers").status();
    assert!(health.is_success(), "{health}");
    assert_passing_at(observer, "the observer still sees the victim's instance passing").await;
    assert!(!victim.log_text().contains("panicked"), "a task of the victim panicked:\n{}", victim.log_text());
}

async fn dropped(agent: &Agent, reason: &str) -> f64 {
    agent.metric(&format!("{DROPPED}{{reason=\"{reason}\"}}")).await.unwrap_or(0.0)
}

/// A key from `signpost-agent keygen`.
fn keygen() -> String {
    let out = std::process::Command::new(signpost_e2e::binary("signpost-agent")).arg("keygen").output().expect("run keygen");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

/// Peak memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("a size in kB") * 1024
}

async fn a_synack_below_its_own_versions(key: Option<&str>) {
    let (_registry, mut victim, observer) = victim_and_observer(key).await;
    let mallory = Mallory::new(key).await;
    let me = DigestEntry { node: mallory.id(), heartbeat: 1, last_gc_version: 0, max_version: 0 };
    let poisoned = gossip_craft::syn_ack(
        &[DigestEntry { heartbeat: 2, max_version: 5, ..me.clone() }],
        &gossip_craft::delta(&[
            Op::Node { node: mallory.id(), last_gc_version: 0, from_version: 0 },
            Op::KeyValue { key: "inst:x".into(), value: "{}".into(), version: 5, deleted: false },
            Op::SetMaxVersion(1),
        ]),
    );
    // Sent unasked, it answers nothing the victim sent: dropped before chitchat. (Sent again
    // on each check: a datagram may be lost on a busy machine.)
    eventually("the unasked SynAck is dropped", Duration::from_secs(10), || async {
        mallory.send(gossip_addr(&victim), &poisoned).await;
        (dropped(&victim, "unsolicited").await >= 1.0).then_some(())
    })
    .await;
    // Mallory makes itself known (a Syn naming itself), waits to be asked, and answers; again
    // after the next Syn if the answer was lost.
    let deadline = Instant::now() + signpost_e2e::patience(Duration::from_secs(60));
    loop {
        assert!(Instant::now() < deadline, "the poisoned SynAck was never dropped as malformed");
        mallory.send(gossip_addr(&victim), &gossip_craft::syn(CLUSTER, std::slice::from_ref(&me))).await;
        mallory.wait_for_syn(gossip_addr(&victim), Duration::from_secs(30)).await;
        mallory.send(gossip_addr(&victim), &poisoned).await;
        let counted = tokio::time::timeout(Duration::from_secs(2), async {
            while dropped(&victim, "malformed").await < 1.0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        if counted.await.is_ok() {
            break;
        }
    }
    assert_unharmed(&mut victim, &observer).await;
}

async fn thousands_of_invented_nodes(key: Option<&str>) {
    let (_registry, mut victim, observer) = victim_and_observer(key).await;
    let mallory = Mallory::new(key).await;
    // Three datagrams of 1,200 invented nodes each (about 58 KB each).
    for round in 0..3u32 {
        let digest: Vec<DigestEntry> = (0..1_200u32)
            .map(|i| DigestEntry {
                node: NodeId {
                    name: format!("g{round}-{i:04}"),
                    generation: 1,
                    addr: SocketAddr::from(([10, 77, (i / 200) as u8, (i % 200) as u8], 7302)),
                },
                heartbeat: 1,
                last_gc_version: 0,
                max_version: 0,
            })
            .collect();
        mallory.send(gossip_addr(&victim), &gossip_craft::syn(CLUSTER, &digest)).await;
    }
    // Several rounds of gossip later (each builds a digest of every node known)...
    let members = || async {
        let body: serde_json::Value = reqwest::get(victim.at("/v1/agent/members")).await.ok()?.json().await.ok()?;
        Some(body["members"].as_array()?.len())
    };
    eventually("the victim knows some of the invented nodes", Duration::from_secs(10), || async { (members().await? > 2).then_some(()) })
        .await;
    // Rounds of gossip with the ghosts known: each one builds a digest of every node known
    // (the one that outgrew the datagram and panicked before).
    let sent = || async { victim.metric("signpost_agent_gossip_datagrams_sent_total").await.unwrap_or(0.0) };
    let before = sent().await;
    eventually("the victim gossiped 30 datagrams since", Duration::from_secs(30), || async {
        (sent().await >= before + 30.0).then_some(())
    })
    .await;
    let known = members().await.expect("members");
    assert!(known <= 2 + 3 * 256, "the victim took {known} members from three datagrams");
    // What it did not take is counted.
    eventually("the refused nodes are counted", Duration::from_secs(10), || async {
        let refused = victim.metric("signpost_agent_gossip_refused_total{reason=\"nodes\"}").await?;
        (refused >= 3.0 * (1_200.0 - 256.0)).then_some(())
    })
    .await;
    assert_unharmed(&mut victim, &observer).await;
}

async fn datagrams_of_zstd_bombs(key: Option<&str>) {
    let (_registry, mut victim, observer) = victim_and_observer(key).await;
    let mallory = Mallory::new(key).await;
    // One block: 65,535 zero bytes in a few dozen compressed bytes.
    let block = zstd::bulk::compress(&vec![0u8; 65_535], 19).expect("compress");
    let room = if key.is_some() { 65_000 } else { 65_300 };
    let count = (room - 8) / (block.len() + 3);
    let blocks: Vec<(bool, Vec<u8>)> = (0..count).map(|_| (true, block.clone())).collect();
    let bomb = gossip_craft::ack(&gossip_craft::delta_stream(&blocks));
    assert!(count * 65_535 > 100_000_000, "{count} blocks expand to {} bytes", count * 65_535);
    let before = peak_rss(victim.pid());
    for _ in 0..10 {
        mallory.send(gossip_addr(&victim), &bomb).await;
    }
    eventually("the ten bombs are dropped", Duration::from_secs(20), || async {
        (dropped(&victim, "malformed").await >= 10.0).then_some(())
    })
    .await;
    let after = peak_rss(victim.pid());
    assert!(after < before + (64 << 20), "peak memory went from {} MiB to {} MiB", before >> 20, after >> 20);
    assert_unharmed(&mut victim, &observer).await;
}

/// What `observer` answers for node-v's instance: address, port, health.
async fn victims_instance(observer: &Agent) -> Option<(String, u64, String)> {
    let body: Value = reqwest::get(observer.at("/v1/services/web?health=any")).await.ok()?.json().await.ok()?;
    let instance = body["instances"].as_array()?.iter().find(|i| i["id"] == "node-v-web-8080")?.clone();
    Some((instance["address"].as_str()?.to_string(), instance["port"].as_u64()?, instance["health"].as_str()?.to_string()))
}

/// The transport of a raw peer listening on `listen`: plain UDP, or sealed with the cluster
/// key.
fn raw_transport(key: Option<&str>, listen: SocketAddr) -> Box<dyn Transport> {
    match key {
        None => Box::new(UdpTransport),
        Some(key) => Box::new(GossipTransport {
            keyring: Some(Arc::new(SharedKeyring::new(Keyring::parse(&[key]).expect("a key")))),
            cluster_id: CLUSTER.into(),
            advertise: listen,
            recv_buffer: 1 << 20,
            metrics: Arc::new(Metrics::new()),
        }),
    }
}

/// Node deltas `agent` refused for `reason` (signpost_agent_gossip_refused_total).
async fn refused(agent: &Agent, reason: &str) -> f64 {
    agent.metric(&format!("signpost_agent_gossip_refused_total{{reason=\"{reason}\"}}")).await.unwrap_or(0.0)
}

/// Waits until `agent` refused `more` node deltas for `reason` beyond `before`, checking
/// all along that the observer answers node-v's instance as `genuine`.
async fn refused_while_unchanged(observer: &Agent, reason: &str, before: f64, more: f64, genuine: &(String, u64, String)) {
    eventually(&format!("{more} deltas refused as {reason}"), Duration::from_secs(20), || async {
        assert_eq!(victims_instance(observer).await.as_ref(), Some(genuine), "what the observer answers for node-v changed");
        assert_eq!(victim_member(observer).await, Some(("alive".to_string(), 1)), "node-v's gossip state changed");
        (refused(observer, reason).await >= before + more).then_some(())
    })
    .await;
}

async fn impersonators(key: Option<&str>) {
    let (_registry, mut victim, observer) = victim_and_observer(key).await;
    let genuine = victims_instance(&observer).await.expect("the observer answers node-v's instance");
    assert_eq!((genuine.1, genuine.2.as_str()), (8080, "passing"));
    let to = gossip_addr(&observer);
    let agent_value = json!({"v": 1, "http": "127.0.0.1:1"}).to_string();
    let stolen = json!({"v": 1, "service": "web", "address": "6.6.6.6", "port": 80, "weight": 10000, "health": "passing"}).to_string();

    // node-v at the highest generation, from the attacker's own address: once with node-v's
    // instance sent to 6.6.6.6 (signed, with a key that is not node-v's), once with no
    // instance at all (its agent value unsigned). The highest generation of a node used to win.
    let bad_signature = refused(&observer, "bad_signature").await;
    let config = raw_config("node-v", u64::MAX, CLUSTER, to);
    let listen = config.listen_addr;
    let redirect = RawPeer::start(config, &*raw_transport(key, listen)).await;
    redirect.set("agent", &agent_value).await;
    redirect.set("inst:node-v-web-8080", &stolen).await;
    let config = raw_config("node-v", u64::MAX - 1, CLUSTER, to);
    let listen = config.listen_addr;
    let vanish = RawPeer::start(config, &*raw_transport(key, listen)).await;
    vanish.set_unsigned("agent", &agent_value).await;
    refused_while_unchanged(&observer, "bad_signature", bad_signature, 20.0, &genuine).await;

    // node-v's own chitchat id (learnt from a digest, as any member can), claimed by a raw
    // chitchat elsewhere: values at versions above node-v's, signed with another key, then a
    // deletion of node-v's instance.
    let node_v = Mallory::new(key).await.learn_id(to, "node-v").await;
    let mut config = raw_config("node-v", node_v.generation, CLUSTER, to);
    config.chitchat_id = ChitchatId::new("node-v".to_string(), node_v.generation, node_v.addr);
    let listen = config.listen_addr;
    let forger = RawPeer::start(config, &*raw_transport(key, listen)).await;
    for round in 0..500 {
        forger.set("filler", &round.to_string()).await;
    }
    let bad_signature = refused(&observer, "bad_signature").await;
    forger.set("inst:node-v-web-8080", &stolen).await;
    refused_while_unchanged(&observer, "bad_signature", bad_signature, 20.0, &genuine).await;
    let deletion = refused(&observer, "deletion").await;
    forger.delete("inst:node-v-web-8080").await;
    refused_while_unchanged(&observer, "deletion", deletion, 20.0, &genuine).await;
    for peer in [redirect, vanish, forger] {
        peer.stop().await;
    }
    assert!(!observer.log_text().contains("panicked"));

    // node-v dies; the attacker goes on sending heartbeats for it (anyone can: a heartbeat is
    // not signed). Its instance goes critical anyway once its signed `alive` stamp stops moving.
    victim.kill();
    let mallory = Mallory::new(key).await;
    let heartbeats = async {
        for beat in 0u64.. {
            let entry = DigestEntry { node: node_v.clone(), heartbeat: 1_000_000 + beat, last_gc_version: 0, max_version: 0 };
            mallory.send(to, &gossip_craft::syn(CLUSTER, &[entry])).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let critical = eventually("the dead node-v's instance is critical at the observer", Duration::from_secs(40), || async {
        let (address, port, health) = victims_instance(&observer).await?;
        assert_eq!((address.as_str(), port), (genuine.0.as_str(), genuine.1));
        (health == "critical").then_some(())
    });
    tokio::select! {
        () = critical => {}
        () = heartbeats => unreachable!("the heartbeats go on until the instance is critical"),
    }
    assert_eq!(victim_member(&observer).await.map(|(state, _)| state).as_deref(), Some("dead"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonators_change_nothing_keyless() {
    impersonators(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonators_change_nothing_keyed() {
    impersonators(Some(&keygen())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synack_below_its_own_versions_is_refused_keyless() {
    a_synack_below_its_own_versions(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synack_below_its_own_versions_is_refused_keyed() {
    a_synack_below_its_own_versions(Some(&keygen())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_invented_nodes_are_bounded_keyless() {
    thousands_of_invented_nodes(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_invented_nodes_are_bounded_keyed() {
    thousands_of_invented_nodes(Some(&keygen())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bombs_are_refused_keyless() {
    datagrams_of_zstd_bombs(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bombs_are_refused_keyed() {
    datagrams_of_zstd_bombs(Some(&keygen())).await;
}
