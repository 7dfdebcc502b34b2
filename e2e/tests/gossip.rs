//! What gossip may not bring into an agent's cache: a foreign cluster, a malformed value,
//! and a node claiming another node's instance. The intruder is a raw chitchat node run by
//! the test over real UDP.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use serde_json::{Value, json};
use signpost_e2e::{AgentBuilder, RegistryBuilder, TestDb, eventually};

fn intruder_config(node: &str, cluster: &str, seed: SocketAddr) -> ChitchatConfig {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = udp.local_addr().expect("addr");
    drop(udp);
    ChitchatConfig {
        chitchat_id: ChitchatId::new(node.to_string(), 1, addr),
        cluster_id: cluster.to_string(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: addr,
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: FailureDetectorConfig { initial_interval: Duration::from_millis(100), ..Default::default() },
        marked_for_deletion_grace_period: Duration::from_secs(600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
        node_delta_gate: None,
    }
}

async fn members(url: &str) -> Vec<Value> {
    let body: Value = reqwest::get(url).await.expect("GET").json().await.expect("json");
    body["members"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_foreign_clusters_and_false_claims_stay_out() {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).start().await;
    let agent = AgentBuilder::new("node-a", &[registry.url()]).flag("service", "web:8080").start().await;
    let seed = SocketAddr::from(([127, 0, 0, 1], agent.gossip_port));
    eventually("the agent answers its own instance", Duration::from_secs(10), || async {
        agent.lookup("web").await.filter(|f| f.len() == 1).map(|_| ())
    })
    .await;

    // A node of the same cluster with one good value, one malformed value, and a claim on
    // node-a's instance.
    let agent_value = json!({"v": 1, "http": "127.0.0.1:1"}).to_string();
    let good = json!({"v": 1, "service": "cache", "address": "10.9.9.9", "port": 6379, "weight": 100, "health": "passing"}).to_string();
    let stolen = json!({"v": 1, "service": "web", "address": "6.6.6.6", "port": 80, "weight": 10000, "health": "passing"}).to_string();
    let intruder = spawn_chitchat(
        intruder_config("mallory", "signpost", seed),
        vec![
            ("agent".into(), agent_value.clone()),
            ("inst:cache-1".into(), good),
            ("inst:broken".into(), "{ not json".into()),
            (
                "inst:bad-port".into(),
                json!({"v": 1, "service": "x", "address": "1.2.3.4", "port": 0, "weight": 1, "health": "passing"}).to_string(),
            ),
            ("inst:node-a-web-8080".into(), stolen),
        ],
        &UdpTransport,
    )
    .await
    .expect("intruder");
    // A node of another cluster.
    let foreign = spawn_chitchat(intruder_config("stranger", "other-cluster", seed), vec![("agent".into(), agent_value)], &UdpTransport)
        .await
        .expect("foreign");

    eventually("the good value arrives", Duration::from_secs(10), || async {
        agent.lookup("cache").await.filter(|f| f.len() == 1).map(|_| ())
    })
    .await;
    let metrics = reqwest::get(agent.at("/metrics")).await.expect("GET").text().await.expect("text");
    let bad: f64 = metrics.lines().find_map(|l| l.strip_prefix("signpost_agent_gossip_bad_values_total ")?.parse().ok()).unwrap_or(0.0);
    assert!(bad >= 2.0, "the two malformed values were counted: {bad}");
    assert!(agent.log_text().contains("skipping a malformed gossip value"));
    // The claim on node-a's instance changed nothing.
    let web: Value = reqwest::get(agent.at("/v1/services/web")).await.expect("GET").json().await.expect("json");
    let instances = web["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0]["node"], "node-a");
    assert_eq!(instances[0]["address"], agent_address(&agent).await);
    // The foreign node never became a member.
    let names: Vec<String> =
        members(&agent.at("/v1/agent/members")).await.iter().filter_map(|m| m["node"].as_str().map(str::to_string)).collect();
    assert!(names.contains(&"mallory".to_string()) && !names.contains(&"stranger".to_string()), "{names:?}");
    assert!(!agent.log_text().contains("panicked"));
    drop(intruder);
    drop(foreign);
}

async fn agent_address(agent: &signpost_e2e::Agent) -> Value {
    let me: Value = reqwest::get(agent.at("/v1/agent")).await.expect("GET").json().await.expect("json");
    me["address"].clone()
}
