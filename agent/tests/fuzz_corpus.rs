//! The fuzz targets on stable: every seed of `fuzz/corpus/<target>/` goes through the same
//! function libFuzzer runs (`fuzz/src/lib.rs`), so a seed that breaks a target fails
//! `cargo test` even where nightly or cargo-fuzz cannot be had. The seeds that are not
//! hand-written JSON come from `write_fuzz_seeds` (ignored; run it to make them again).

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpTransport};
use chitchat::{ChitchatConfig, ChitchatEnvelope, ChitchatId, ChitchatMessage, FailureDetectorConfig, ProtocolVersion, spawn_chitchat};
use chrono::{DateTime, Utc};
use signpost_agent::cache::RegistryView;
use signpost_agent::gossip_seal::Sealer;
use signpost_agent::persist;
use signpost_shared::gossip::{self, AgentValue, FORMAT_VERSION, GossipInstance};
use signpost_shared::gossip_sign::{NodeSigningKey, Signer};
use signpost_shared::model::{Health, Instance};
use signpost_shared::wire::AgentInfo;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_seed_passes_its_fuzz_target() {
    for (name, target) in targets::TARGETS {
        let dir = corpus().join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds in {}", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("a seed reads");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("fuzz target `{name}` fails on {}", file.display());
            }
        }
    }
}

// === seeds ===

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn sample_view() -> RegistryView {
    let web: Instance = serde_json::from_value(serde_json::json!({
        "id": "web-1", "service": "web", "address": "10.0.0.1", "port": 8080, "tags": ["blue", "v2"],
        "meta": {"version": "2.1.0", "team/owner": "payments"}, "weight": 100, "zone": "eu-1", "health": "passing",
        "output": "HTTP 200 OK", "maintenance_reason": null, "node": "node-1", "check": null, "ttl_s": 30, "index": 41,
        "registered_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:10Z", "lease_expires_at": "2026-01-01T00:00:40Z"
    }))
    .expect("an instance");
    let db: Instance = serde_json::from_value(serde_json::json!({
        "id": "db-1:5432", "service": "db", "address": "db.internal", "port": 5432, "tags": [], "meta": {},
        "weight": 10, "zone": null, "health": "maintenance", "output": null, "maintenance_reason": "upgrade",
        "node": null, "check": {"tcp": "db.internal:5432", "interval": "10s", "timeout": "1s 500ms"}, "ttl_s": 60,
        "index": 42, "registered_at": "2025-12-31T23:00:00Z", "updated_at": "2026-01-01T00:00:05Z",
        "lease_expires_at": "2026-01-01T00:01:05Z"
    }))
    .expect("an instance");
    RegistryView {
        index: 42,
        epoch: 0,
        self_preservation: false,
        instances: vec![web.into(), db.into()],
        agents: vec![AgentInfo {
            node: "node-1".into(),
            gossip_addr: "10.0.0.1:7946".into(),
            http_addr: "127.0.0.1:7301".into(),
            zone: Some("eu-1".into()),
            alive: true,
            updated_at: at(1_767_225_590_000),
            lease_expires_at: at(1_767_225_620_000),
            renewed_at: None,
            signing_key: Some("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into()),
        }],
        confirmed_at: Some(at(1_767_225_599_000)),
    }
}

/// Records every envelope a chitchat node sends, then sends it over UDP.
struct Recording(Arc<Mutex<Vec<Vec<u8>>>>);

struct RecordingSocket {
    inner: Box<dyn Socket>,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[async_trait]
impl Transport for Recording {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(RecordingSocket { inner: UdpTransport.open(listen_addr).await?, log: self.0.clone() }))
    }
}

#[async_trait]
impl Socket for RecordingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let mut bytes = Vec::new();
        envelope.serialize(&mut bytes);
        self.log.lock().expect("the log").push(bytes);
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.inner.recv().await
    }
}

fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("binds");
    socket.local_addr().expect("bound")
}

/// The values an agent publishes, as `node-N` would.
fn agent_values(n: usize) -> Vec<(String, String)> {
    let agent = AgentValue { v: FORMAT_VERSION, http: format!("127.0.0.1:730{n}"), zone: Some("eu-1".into()) };
    let instance = GossipInstance {
        v: FORMAT_VERSION,
        service: "web".into(),
        address: format!("10.0.0.{n}"),
        port: 8080,
        tags: vec!["blue".into()],
        meta: [("version".to_string(), "2.1.0".to_string())].into(),
        weight: 100,
        zone: Some("eu-1".into()),
        health: Health::Passing,
        output: Some("HTTP 200 OK".into()),
    };
    vec![
        (gossip::AGENT_KEY.to_string(), gossip::encode(&agent).expect("encodes")),
        (gossip::instance_key(&format!("web-{n}")), gossip::encode(&instance).expect("encodes")),
    ]
}

/// Real envelopes of two chitchat nodes gossiping with the agent's values, one of each
/// message type (the largest seen).
async fn captured_envelopes(version: ProtocolVersion) -> Vec<Vec<u8>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let addrs = [free_udp_addr(), free_udp_addr()];
    let mut handles = Vec::new();
    for (n, addr) in addrs.iter().enumerate() {
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(format!("node-{}", n + 1), 1, *addr),
            cluster_id: targets::CLUSTER.into(),
            gossip_interval: Duration::from_millis(50),
            listen_addr: *addr,
            seed_nodes: addrs.iter().filter(|a| *a != addr).map(ToString::to_string).collect(),
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: Duration::from_secs(60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: version,
            node_delta_gate: None,
        };
        handles.push(spawn_chitchat(config, agent_values(n + 1), &Recording(log.clone())).await.expect("chitchat starts"));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    for handle in handles {
        handle.shutdown().await.expect("chitchat stops");
    }
    let log = log.lock().expect("the log").clone();
    let mut largest: Vec<Vec<u8>> = Vec::new();
    for kind in 0..=2u8 {
        if let Some(envelope) = log.iter().filter(|e| e.get(3) == Some(&kind)).max_by_key(|e| e.len()) {
            largest.push(envelope.clone());
        }
    }
    assert_eq!(largest.len(), 3, "a syn, a syn-ack and an ack were sent");
    largest
}

/// Writes the generated seeds into `fuzz/corpus/`.
#[tokio::test]
#[ignore = "writes fuzz/corpus: cargo test -p signpost-agent --test fuzz_corpus -- --ignored"]
async fn write_fuzz_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus().join(target);
        std::fs::create_dir_all(&dir).expect("the corpus folder");
        std::fs::write(dir.join(name), bytes).expect("a seed writes");
    };
    let saved = persist::encode(&sample_view(), at(targets::NOW_MS as i64)).expect("encodes");
    write("persisted_cache", "catalog.bin", &saved);
    write("persisted_cache", "catalog-body.bin", &saved[20..]);
    write("persisted_cache", "empty.bin", &persist::encode(&RegistryView::default(), at(0)).expect("encodes"));

    for (version, label) in [(ProtocolVersion::V0, "v0"), (ProtocolVersion::V1, "v1")] {
        let envelopes = captured_envelopes(version).await;
        for (envelope, kind) in envelopes.iter().zip(["syn", "synack", "ack"]) {
            write("gossip_datagram", &format!("{kind}-{label}.bin"), envelope);
        }
        let mut sealed = Vec::new();
        Sealer::new(targets::CLUSTER).seal(targets::keyring(), targets::RECIPIENT, &envelopes[1], targets::NOW_MS - 1_000, &mut sealed);
        write("gossip_datagram", &format!("synack-{label}-sealed.bin"), &sealed);
    }
    let mut bad_cluster = Vec::new();
    ChitchatEnvelope { version: ProtocolVersion::V0, message: ChitchatMessage::BadCluster }.serialize(&mut bad_cluster);
    write("gossip_datagram", "badcluster.bin", &bad_cluster);

    let [(_, agent), (key, instance)] = <[(String, String); 2]>::try_from(agent_values(1)).expect("two values");
    write("gossip_value", "published.txt", format!("node-1\n{agent}\n{key}\n{instance}\n").as_bytes());
    // As the values sit in a peer's state: signed, with an instance that left (empty payload).
    let signing = NodeSigningKey::generate();
    let signer = Signer { cluster_id: targets::CLUSTER, node: "node-1", generation: 7, gossip_addr: "127.0.0.1:7302" };
    let [agent, instance, gone] = [("agent", agent.as_str(), 1), (key.as_str(), instance.as_str(), 2), ("inst:web-9", "", 3)]
        .map(|(k, v, version)| signing.sign_value(&signer, k, version, v));
    write("gossip_value", "published-signed.txt", format!("node-1\n{agent}\n{key}\n{instance}\ninst:web-9\n{gone}\n").as_bytes());
}
