//! Limits on how much one writer may register: instances per node and in all at the
//! registry, local services at an agent. Past a limit the answer is 403 `quota_exceeded`
//! naming the limit, and nothing changes.

use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_e2e::{AgentBuilder, Registry, RegistryBuilder, TestDb};

const FLEET: &str = "quota-fleet-token-0123456789";

async fn post(registry: &Registry, body: Value) -> (StatusCode, Value) {
    let response = registry.http().post(registry.at("/v1/instances")).bearer_auth(FLEET).json(&body).send().await.expect("POST");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn instance(id: &str, node: Option<&str>) -> Value {
    let mut body = json!({"id": id, "service": "web", "address": "10.0.0.7", "port": 8080});
    if let Some(node) = node {
        body["node"] = json!(node);
    }
    body
}

async fn index(registry: &Registry) -> Value {
    let page: Value =
        registry.http().get(registry.at("/v1/catalog")).bearer_auth(FLEET).send().await.expect("GET").json().await.expect("json");
    page["index"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_refuses_instances_past_its_limits() {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url))
        .flag("agent-token", FLEET)
        .flag("max-instances-per-node", "2")
        .flag("max-instances", "4")
        .start()
        .await;
    for id in ["x-1", "x-2"] {
        assert_eq!(post(&registry, instance(id, Some("node-x"))).await.0, StatusCode::CREATED);
    }
    let before = index(&registry).await;
    let (status, body) = post(&registry, instance("x-3", Some("node-x"))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("quota_exceeded")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("node-x") && m.contains("max_instances_per_node")), "{body}");
    assert_eq!(index(&registry).await, before, "a refused registration changes nothing");
    assert_eq!(post(&registry, instance("x-1", Some("node-x"))).await.0, StatusCode::OK, "renewing one it owns");

    for id in ["free-1", "free-2"] {
        assert_eq!(post(&registry, instance(id, None)).await.0, StatusCode::CREATED);
    }
    let (status, body) = post(&registry, instance("free-3", None)).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("quota_exceeded")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("max_instances")), "{body}");
    let removed = registry.http().delete(registry.at("/v1/instances/free-1")).bearer_auth(FLEET).send().await.expect("DELETE");
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    assert_eq!(post(&registry, instance("free-3", None)).await.0, StatusCode::CREATED, "room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_local_services_past_its_limit() {
    let agent = AgentBuilder::new("capped", &[]).flag("service", "web:8080").flag("max-local-services", "2").start().await;
    let client = reqwest::Client::new();
    let add = |name: &str, port: u16| client.post(agent.at("/v1/agent/services")).json(&json!({"name": name, "port": port})).send();
    assert_eq!(add("api", 8081).await.expect("POST").status(), StatusCode::CREATED);
    let refused = add("db", 8082).await.expect("POST");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("max_local_services")), "{body}");
    let local: Value = client.get(agent.at("/v1/agent")).send().await.expect("GET").json().await.expect("json");
    assert_eq!(local["services"].as_array().map(Vec::len), Some(2), "{local}");
    // Replacing a service it runs is no new one.
    assert_eq!(add("api", 8081).await.expect("POST").status(), StatusCode::CREATED);

    // More services configured than the limit: the agent does not start.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "max_local_services = 1\n[[services]]\nname = \"a\"\nport = 1\n[[services]]\nname = \"b\"\nport = 2\n")
        .expect("write");
    let out = std::process::Command::new(signpost_e2e::binary("signpost-agent"))
        .args(["--config", &config.display().to_string(), "--data-dir", &dir.path().display().to_string()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_local_services"));
}
