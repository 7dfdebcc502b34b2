//! `service` and `name`: the registry's API calls an instance's service `service`, the agent's
//! local API and configuration files called it `name`. Both take either spelling, and both
//! together when they agree; a body where they disagree is refused with a 422 naming the field;
//! answers always say `service`. Real binaries: a registry on SQLite and an agent.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_e2e::{AgentBuilder, Registry, RegistryBuilder, eventually};

async fn post(url: &str, body: Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new().post(url).json(&body).send().await.expect("POST");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The fields the problems of an error body name.
fn problem_fields(body: &Value) -> Vec<String> {
    body["problems"].as_array().into_iter().flatten().filter_map(|p| p["field"].as_str().map(str::to_string)).collect()
}

/// Asserts a 422 whose problems name `field` and whose message mentions both spellings.
fn assert_refused(what: &str, status: StatusCode, body: &Value, field: &str) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
    assert!(problem_fields(body).iter().any(|f| f == field), "{what}: no problem names `{field}`: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(field), "{what}: the message does not name `{field}`: {body}");
}

/// Asserts an answer that names the service `service` (and says nothing of `name`).
fn assert_canonical(what: &str, body: &Value, service: &str) {
    assert_eq!(body["service"], service, "{what}: {body}");
    assert!(body.get("name").is_none(), "{what}: the answer carries `name`: {body}");
}

async fn service_at(registry: &Registry, id: &str) -> Option<String> {
    let response = reqwest::get(registry.at(&format!("/v1/instances/{id}"))).await.ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["service"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_and_the_agent_take_service_or_name_and_answer_service() {
    let registry = RegistryBuilder::new(None).start().await;
    let instances = registry.at("/v1/instances");
    let at = |id: &str, port: u16| json!({"id": id, "address": "10.0.0.1", "port": port});
    let with = |mut body: Value, fields: Value| {
        for (k, v) in fields.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };

    // --- the registry ---
    let (status, body) = post(&instances, with(at("r-service", 8001), json!({"service": "web"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_canonical("registry, `service`", &body, "web");
    let (status, body) = post(&instances, with(at("r-name", 8002), json!({"name": "web"}))).await;
    assert_eq!(status, StatusCode::CREATED, "registry, `name`: {body}");
    assert_canonical("registry, `name`", &body, "web");
    let (status, body) = post(&instances, with(at("r-both", 8003), json!({"service": "web", "name": "web"}))).await;
    assert_eq!(status, StatusCode::CREATED, "registry, both equal: {body}");
    assert_canonical("registry, both equal", &body, "web");
    let (status, body) = post(&instances, with(at("r-clash", 8004), json!({"service": "web", "name": "api"}))).await;
    assert_refused("registry, both disagreeing", status, &body, "name");
    let (status, body) = post(&instances, at("r-none", 8005)).await;
    assert_refused("registry, neither", status, &body, "service");
    // An invalid value is refused as any invalid service is, under the body's own field.
    let (status, body) = post(&instances, with(at("r-bad", 8006), json!({"name": "Web_1"}))).await;
    assert_refused("registry, an invalid `name`", status, &body, "service");
    for id in ["r-service", "r-name", "r-both"] {
        assert_eq!(service_at(&registry, id).await.as_deref(), Some("web"), "{id}");
    }
    for id in ["r-clash", "r-none", "r-bad"] {
        assert_eq!(service_at(&registry, id).await, None, "{id} was refused, yet stored");
    }

    // --- the agent's local API ---
    let agent = AgentBuilder::new("node-1", &[registry.url()]).start().await;
    let local = agent.at("/v1/agent/services");
    let (status, body) = post(&local, json!({"name": "api", "port": 9100})).await;
    assert_eq!(status, StatusCode::CREATED, "agent, `name`: {body}");
    assert_canonical("agent, `name`", &body, "api");
    let (status, body) = post(&local, json!({"service": "api", "port": 9101})).await;
    assert_eq!(status, StatusCode::CREATED, "agent, `service`: {body}");
    assert_canonical("agent, `service`", &body, "api");
    let (status, body) = post(&local, json!({"service": "api", "name": "api", "port": 9102})).await;
    assert_eq!(status, StatusCode::CREATED, "agent, both equal: {body}");
    assert_canonical("agent, both equal", &body, "api");
    let (status, body) = post(&local, json!({"service": "web", "name": "api", "port": 9103})).await;
    assert_refused("agent, both disagreeing", status, &body, "service.name");
    let (status, body) = post(&local, json!({"port": 9104})).await;
    assert_refused("agent, neither", status, &body, "service.name");
    let (status, body) = post(&local, json!({"service": "Api_1", "port": 9105})).await;
    assert_refused("agent, an invalid `service`", status, &body, "service.name");
    let ids: Vec<String> = (9100..=9102).map(|port| format!("node-1-api-{port}")).collect();
    for id in &ids {
        eventually(&format!("the registry has {id} as a service `api`"), Duration::from_secs(20), || async {
            (service_at(&registry, id).await.as_deref() == Some("api")).then_some(())
        })
        .await;
    }
    let listed: Value = reqwest::get(agent.at("/v1/agent")).await.expect("GET").json().await.expect("json");
    let mut services: Vec<String> =
        listed["services"].as_array().expect("services").iter().filter_map(|s| s.as_str().map(str::to_string)).collect();
    services.sort();
    assert_eq!(services, ids, "only the accepted services were added");
    assert!(!agent.log_text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_file_takes_service_or_name_and_refuses_them_disagreeing() {
    let registry = RegistryBuilder::new(None).start().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[[services]]\nservice = \"db\"\nport = 5432\n\n[[services]]\nname = \"cache\"\nservice = \"cache\"\nport = 6379\n",
    )
    .expect("write the config");
    let agent = AgentBuilder::new("node-2", &[registry.url()]).flag("config", config.display().to_string()).start().await;
    for (id, service) in [("node-2-db-5432", "db"), ("node-2-cache-6379", "cache")] {
        eventually(&format!("the registry has {id} as a service `{service}`"), Duration::from_secs(20), || async {
            (service_at(&registry, id).await.as_deref() == Some(service)).then_some(())
        })
        .await;
    }
    drop(agent);

    let clash = dir.path().join("clash.toml");
    std::fs::write(&clash, "[[services]]\nname = \"db\"\nservice = \"web\"\nport = 5432\n").expect("write the config");
    let output = std::process::Command::new(signpost_e2e::binary("signpost-agent"))
        .args(["--node", "node-3", "--config"])
        .arg(&clash)
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("Invalid configuration") && stderr.contains("services[0].name"), "{stderr}");
}
