//! An instance id belongs to one node at a time: another node's registration of it is refused
//! (409) while the owner's agent is alive, at the registry and at an agent's local API; only the
//! admin moves it, explicitly.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_e2e::{AgentBuilder, Registry, RegistryBuilder, TestDb, eventually};

const ADMIN: &str = "ownership-admin-0123456789";
const FLEET: &str = "ownership-fleet-0123456789";

fn instance(id: &str, node: &str) -> Value {
    json!({"id": id, "service": "web", "address": "10.0.0.7", "port": 8080, "node": node, "ttl_s": 60})
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn owner_at_registry(registry: &Registry, id: &str) -> Value {
    send(registry.http().get(registry.at(&format!("/v1/instances/{id}"))).bearer_auth(ADMIN)).await.1["node"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_cannot_take_over_an_id_whose_owner_is_alive() {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).flag("admin-token", ADMIN).flag("agent-token", FLEET).start().await;
    let http = registry.http();
    let register =
        |body: Value, token: &str, query: &str| http.post(registry.at(&format!("/v1/instances{query}"))).bearer_auth(token).json(&body);
    let announce = json!({"gossip_addr": "10.0.0.7:7302", "http_addr": "10.0.0.7:7301", "ttl_s": 60});
    let (status, _) = send(http.put(registry.at("/v1/agents/nodex")).bearer_auth(FLEET).json(&announce)).await;
    assert_eq!(status, StatusCode::OK);

    assert_eq!(send(register(instance("dup-1", "nodex"), FLEET, "")).await.0, StatusCode::CREATED);
    let before: Value = send(http.get(registry.at("/v1/catalog")).bearer_auth(ADMIN)).await.1;
    let (status, body) = send(register(instance("dup-1", "nodey"), FLEET, "")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "conflict");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("nodex")), "the answer names the owner: {body}");
    assert_eq!(owner_at_registry(&registry, "dup-1").await, "nodex", "the refused registration changed nothing");
    let after: Value = send(http.get(registry.at("/v1/catalog")).bearer_auth(ADMIN)).await.1;
    assert_eq!(after["index"], before["index"], "the refused registration did not move the index");
    // Nor may an agentless registration take the id away from its live owner.
    let mut agentless = instance("dup-1", "nodex");
    agentless.as_object_mut().expect("an object").remove("node");
    assert_eq!(send(register(agentless, FLEET, "")).await.0, StatusCode::CONFLICT);
    // The owner itself updates it as always.
    let mut update = instance("dup-1", "nodex");
    update["port"] = json!(8081);
    assert_eq!(send(register(update, FLEET, "")).await.0, StatusCode::OK);

    // Moving is the admin's, and explicit.
    assert_eq!(send(register(instance("dup-1", "nodey"), FLEET, "?move=true")).await.0, StatusCode::FORBIDDEN);
    assert_eq!(send(register(instance("dup-1", "nodey"), ADMIN, "")).await.0, StatusCode::CONFLICT, "not without ?move=true");
    assert_eq!(send(register(instance("dup-1", "nodey"), ADMIN, "?move=maybe")).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(send(register(instance("dup-1", "nodey"), ADMIN, "?move=true")).await.0, StatusCode::OK);
    assert_eq!(owner_at_registry(&registry, "dup-1").await, "nodey");
    // nodex's agent, still renewing what it held, is told that it holds no such instance now
    // (404: it registers again, and learns of the move); its heartbeat changes nothing, and
    // it may not put nodey's instance in maintenance.
    let beat = http.put(registry.at("/v1/instances/dup-1/heartbeat?node=nodex")).bearer_auth(FLEET).json(&json!({"health": "critical"}));
    let (status, body) = send(beat).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("register it again")), "{body}");
    let maintenance =
        http.put(registry.at("/v1/instances/dup-1/maintenance?node=nodex")).bearer_auth(FLEET).json(&json!({"enabled": true}));
    assert_eq!(send(maintenance).await.0, StatusCode::FORBIDDEN);
    let moved = send(http.get(registry.at("/v1/instances/dup-1")).bearer_auth(ADMIN)).await.1;
    assert_eq!((&moved["node"], &moved["health"]), (&json!("nodey"), &json!("passing")), "{moved}");
    // A token bound to no node names any node; nodey's own heartbeat renews it.
    let beat = http.put(registry.at("/v1/instances/dup-1/heartbeat?node=nodey")).bearer_auth(FLEET).json(&json!({}));
    assert_eq!(send(beat).await.0, StatusCode::OK);
    let bad = http.put(registry.at("/v1/instances/dup-1/heartbeat?node=bad%20node")).bearer_auth(FLEET).json(&json!({}));
    assert_eq!(send(bad).await.0, StatusCode::BAD_REQUEST);

    // An owner that is not alive (never announced, or its announcement lapsed) does not hold the id.
    assert_eq!(send(register(instance("dup-2", "ghost"), FLEET, "")).await.0, StatusCode::CREATED);
    assert_eq!(send(register(instance("dup-2", "nodey"), FLEET, "")).await.0, StatusCode::OK);
    assert_eq!(owner_at_registry(&registry, "dup-2").await, "nodey");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_local_service_with_a_live_peers_id() {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).flag("admin-token", ADMIN).flag("agent-token", FLEET).start().await;
    let owner = AgentBuilder::new("nodex", &[registry.url()]).flag("service", "web:8080").flag("token", FLEET).start().await;
    let other = AgentBuilder::new("nodey", &[registry.url()]).flag("token", FLEET).start().await;
    let id = "nodex-web-8080";
    eventually("nodey knows nodex's instance", Duration::from_secs(20), || async {
        other.lookup("web").await?.iter().any(|(i, h)| i == id && h == "passing").then_some(())
    })
    .await;

    let client = reqwest::Client::new();
    let (status, body) = send(client.post(other.at("/v1/agent/services")).json(&json!({"name": "web", "port": 9090, "id": id}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("nodex")), "{body}");
    let local: Value = send(client.get(other.at("/v1/agent"))).await.1;
    assert_eq!(local["services"], json!([]), "nothing was added locally");
    assert_eq!(owner_at_registry(&registry, id).await, "nodex");
    // Every agent still answers nodex's instance at nodex's port.
    for agent in [&owner, &other] {
        let answer: Value = send(client.get(agent.at("/v1/services/web"))).await.1;
        let ports: Vec<&Value> = answer["instances"].as_array().expect("instances").iter().map(|i| &i["port"]).collect();
        assert_eq!(ports, [&json!(8080)], "{answer}");
    }
}
