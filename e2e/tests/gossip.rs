//! What gossip may not bring into an agent's cache: a foreign cluster, a malformed value,
//! a node claiming another node's instance, and a node whose key the registry does not list.
//! The intruders are raw chitchat nodes run by the test over real UDP; one is announced to
//! the registry with its key (as a compromised host would be), one is not.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use serde_json::{Value, json};
use signpost_e2e::raw_peer::{RawPeer, raw_config};
use signpost_e2e::{AgentBuilder, RegistryBuilder, TestDb, eventually};

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

    // A node of the same cluster, announced to the registry with its key, with one good
    // value, two malformed values, and a claim on node-a's instance.
    let agent_value = json!({"v": 1, "http": "127.0.0.1:1"}).to_string();
    let good = json!({"v": 1, "service": "cache", "address": "10.9.9.9", "port": 6379, "weight": 100, "health": "passing"}).to_string();
    let stolen = json!({"v": 1, "service": "web", "address": "6.6.6.6", "port": 80, "weight": 10000, "health": "passing"}).to_string();
    let bad_port = json!({"v": 1, "service": "x", "address": "1.2.3.4", "port": 0, "weight": 1, "health": "passing"}).to_string();
    let intruder = RawPeer::start(raw_config("mallory", 1, "signpost", seed), &UdpTransport).await;
    intruder.announce(&registry.client()).await;
    for (key, value) in [
        ("agent", &agent_value),
        ("inst:cache-1", &good),
        ("inst:broken", &"{ not json".to_string()),
        ("inst:bad-port", &bad_port),
        ("inst:node-a-web-8080", &stolen),
    ] {
        intruder.set(key, value).await;
    }
    // A node the registry has no key for, with a well-formed instance signed by its own key.
    let stranger = RawPeer::start(raw_config("eve", 1, "signpost", seed), &UdpTransport).await;
    stranger.set("agent", &agent_value).await;
    stranger
        .set(
            "inst:queue-1",
            &json!({"v": 1, "service": "queue", "address": "10.9.9.8", "port": 5672, "weight": 100, "health": "passing"}).to_string(),
        )
        .await;
    // A node of another cluster.
    let foreign = RawPeer::start(raw_config("outsider", 1, "other-cluster", seed), &UdpTransport).await;
    foreign.announce(&registry.client()).await;
    foreign.set("agent", &agent_value).await;

    eventually("the good value arrives", Duration::from_secs(10), || async {
        agent.lookup("cache").await.filter(|f| f.len() == 1).map(|_| ())
    })
    .await;
    eventually("the unknown node's gossip is refused", Duration::from_secs(10), || async {
        (agent.metric("signpost_agent_gossip_refused_total{reason=\"unknown_node_key\"}").await? >= 3.0).then_some(())
    })
    .await;
    assert_eq!(agent.lookup("queue").await.unwrap_or_default(), vec![], "the unknown node's instance reached the cache");
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
    assert!(names.contains(&"mallory".to_string()), "{names:?}");
    assert!(!names.contains(&"outsider".to_string()) && !names.contains(&"eve".to_string()), "{names:?}");
    assert!(!agent.log_text().contains("panicked"));
    for peer in [intruder, stranger, foreign] {
        peer.stop().await;
    }
}

async fn agent_address(agent: &signpost_e2e::Agent) -> Value {
    let me: Value = reqwest::get(agent.at("/v1/agent")).await.expect("GET").json().await.expect("json");
    me["address"].clone()
}
