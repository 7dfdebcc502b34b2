//! One agent's own API end to end: local services, checks, maintenance, pick, the
//! protection threshold, bad input, its configuration file, and what gossip may not bring in.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_e2e::{Agent, AgentBuilder, Registry, RegistryBuilder, TestDb, eventually};

async fn registry() -> (TestDb, Registry) {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).flag("read-cache-max-age", "200ms").start().await;
    (db, registry)
}

fn write_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.display().to_string();
    (dir, path)
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.expect("GET").json().await.expect("json")
}

async fn put(url: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new().put(url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("PUT");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn health_at(agent: &Agent, service: &str, id: &str) -> Option<String> {
    agent.lookup(service).await?.into_iter().find(|(i, _)| i == id).map(|(_, h)| h)
}

async fn register_at(registry: &Registry, body: Value) {
    let response = reqwest::Client::new().post(registry.at("/v1/instances")).json(&body).send().await.expect("POST");
    assert!(response.status().is_success(), "{}", response.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_checks_maintenance_and_the_agents_own_endpoints() {
    let (_db, registry) = registry().await;
    let (_dir, config) = write_config(
        r#"
zone = "z1"

[[services]]
name = "web"
port = 8080
id = "web-main"
tags = ["v2"]
checks = [{ id = "web-ttl", ttl = "3s" }]

[[services]]
name = "api"
port = 9090
"#,
    );
    let agent = AgentBuilder::new("node-a", &[registry.url()]).flag("config", config).start().await;
    let me = get_json(&agent.at("/v1/agent")).await;
    assert_eq!(me["node"], "node-a");
    assert_eq!(me["zone"], "z1");
    assert_eq!(me["services"], json!(["node-a-api-9090", "web-main"]));

    // A TTL check is critical until the application reports.
    eventually("web is known, critical until reported", Duration::from_secs(10), || async {
        (health_at(&agent, "web", "web-main").await.as_deref() == Some("critical")).then_some(())
    })
    .await;
    let (status, body) = put(&agent.at("/v1/agent/checks/web-ttl/pass"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(health_at(&agent, "web", "web-main").await.as_deref(), Some("passing"));
    // Silence past the TTL is critical again.
    eventually("the TTL expired", Duration::from_secs(15), || async {
        (health_at(&agent, "web", "web-main").await.as_deref() == Some("critical")).then_some(())
    })
    .await;
    let (status, _) = put(&agent.at("/v1/agent/checks/web-ttl/warn"), Some(json!({"output": "slow disk"}))).await;
    assert_eq!(status, StatusCode::OK);
    let checks = get_json(&agent.at("/v1/agent/checks")).await;
    let ttl = checks["checks"].as_array().expect("checks").iter().find(|c| c["id"] == "web-ttl").expect("the TTL check").clone();
    assert_eq!((ttl["status"].as_str(), ttl["output"].as_str()), (Some("warning"), Some("slow disk")));
    // The registry hears the application's word with a later sync. The application keeps
    // reporting, as one does, so the warning outlives a slow sync.
    eventually("the registry has the warning", Duration::from_secs(15), || async {
        put(&agent.at("/v1/agent/checks/web-ttl/warn"), Some(json!({"output": "slow disk"}))).await;
        let body = get_json(&registry.at("/v1/instances/web-main")).await;
        (body["health"] == "warning").then_some(())
    })
    .await;

    // Maintenance, per service, reaches the answers and the registry.
    let (status, _) =
        put(&agent.at("/v1/agent/services/node-a-api-9090/maintenance"), Some(json!({"enabled": true, "reason": "deploy"}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health_at(&agent, "api", "node-a-api-9090").await.as_deref(), Some("maintenance"));
    eventually("the registry shows maintenance", Duration::from_secs(10), || async {
        let body = get_json(&registry.at("/v1/instances/node-a-api-9090")).await;
        (body["health"] == "maintenance" && body["maintenance_reason"] == "deploy").then_some(())
    })
    .await;
    let (status, _) = put(&agent.at("/v1/agent/services/node-a-api-9090/maintenance"), Some(json!({"enabled": false}))).await;
    assert_eq!(status, StatusCode::OK);
    eventually("maintenance ended at the registry", Duration::from_secs(10), || async {
        let body = get_json(&registry.at("/v1/instances/node-a-api-9090")).await;
        (body["health"] == "passing").then_some(())
    })
    .await;

    let needles = [
        "signpost_agent_lookups_total",
        "signpost_agent_cache_instances 2",
        "signpost_agent_gossip_members{state=\"alive\"} 1",
        "signpost_agent_registry_sync_age_seconds 0",
    ];
    // The gauges are sampled by the agent's own tasks: wait a little for a scrape that has them all.
    eventually(&format!("the agent's metrics show {needles:?}"), Duration::from_secs(10), || async {
        let metrics = reqwest::get(agent.at("/metrics")).await.ok()?.text().await.ok()?;
        needles.iter().all(|n| metrics.contains(n)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_prefers_the_agents_zone_and_the_protection_threshold_holds_every_instance() {
    let (_db, registry) = registry().await;
    for (id, zone, weight) in [("api-1", "z1", 1), ("api-2", "z1", 1000), ("api-3", "z2", 100), ("api-4", "z2", 100)] {
        register_at(&registry, json!({"id": id, "service": "api", "address": "10.0.0.1", "port": 80, "zone": zone, "weight": weight}))
            .await;
    }
    let (_dir, config) = write_config("zone = \"z1\"\n[protection_thresholds]\napi = 0.5\n");
    let agent = AgentBuilder::new("node-a", &[registry.url()]).flag("config", config).start().await;
    eventually("the agent knows the four instances", Duration::from_secs(10), || async {
        agent.lookup("api").await.filter(|f| f.len() == 4).map(|_| ())
    })
    .await;
    let mut heavy = 0;
    for _ in 0..50 {
        let picked = get_json(&agent.at("/v1/services/api/pick")).await;
        assert_eq!(picked["zone"], "z1", "the agent's own zone first");
        if picked["id"] == "api-2" {
            heavy += 1;
        }
    }
    assert!(heavy >= 40, "weights count: api-2 has 1000 of 1001 ({heavy} of 50)");
    // Both z1 instances fail: pick goes to the other zone.
    let client = registry.client();
    let critical = signpost_shared::wire::Heartbeat { health: Some(signpost_shared::Health::Critical), output: None };
    for id in ["api-1", "api-2"] {
        client.heartbeat(id, &critical, None).await.expect("heartbeat");
    }
    eventually("pick falls back to z2", Duration::from_secs(10), || async {
        let picked = get_json(&agent.at("/v1/services/api/pick")).await;
        (picked["zone"] == "z2").then_some(())
    })
    .await;
    // Three of four fail: under the 0.5 threshold, a healthy lookup holds all four and says so.
    client.heartbeat("api-3", &critical, None).await.expect("heartbeat");
    eventually("protection is on", Duration::from_secs(10), || async {
        let response = reqwest::get(agent.at("/v1/services/api")).await.ok()?;
        let protected = response.headers().get("x-signpost-protection").is_some();
        let body: Value = response.json().await.ok()?;
        (protected && body["instances"].as_array()?.len() == 4).then_some(())
    })
    .await;
    // Nothing healthy at all in a service without a threshold: pick answers 404.
    register_at(&registry, json!({"id": "db-1", "service": "db", "address": "10.0.0.1", "port": 5432, "health": "critical"})).await;
    eventually("pick has nothing to offer", Duration::from_secs(10), || async {
        let response = reqwest::get(agent.at("/v1/services/db/pick")).await.ok()?;
        (response.status() == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
}

/// (what, method, path, content type, body, expected status).
type Case<'a> = (&'a str, reqwest::Method, &'a str, Option<&'a str>, Vec<u8>, StatusCode);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_agent_endpoint_is_refused_and_changes_nothing() {
    let (_db, registry) = registry().await;
    let agent = AgentBuilder::new("node-a", &[registry.url()]).flag("service", "web:8080").start().await;
    let before = get_json(&agent.at("/v1/agent")).await;
    let client = reqwest::Client::new();
    let json_type = Some("application/json");
    let cases: Vec<Case<'_>> = vec![
        ("malformed JSON", reqwest::Method::POST, "/v1/agent/services", json_type, b"{\"name\":".to_vec(), StatusCode::BAD_REQUEST),
        (
            "bad service name",
            reqwest::Method::POST,
            "/v1/agent/services",
            json_type,
            br#"{"name":"Web!","port":80}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "port 0",
            reqwest::Method::POST,
            "/v1/agent/services",
            json_type,
            br#"{"name":"web","port":0}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "port 70000",
            reqwest::Method::POST,
            "/v1/agent/services",
            json_type,
            br#"{"name":"web","port":70000}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "bad check",
            reqwest::Method::POST,
            "/v1/agent/services",
            json_type,
            br#"{"name":"web","port":81,"checks":[{"http":"ftp://x"}]}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown field",
            reqwest::Method::POST,
            "/v1/agent/services",
            json_type,
            br#"{"name":"web","port":81,"colour":1}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "wrong content type",
            reqwest::Method::POST,
            "/v1/agent/services",
            Some("text/plain"),
            br#"{"name":"web","port":81}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        ("oversized body", reqwest::Method::POST, "/v1/agent/services", json_type, vec![b' '; 100_000], StatusCode::PAYLOAD_TOO_LARGE),
        ("remove an unknown service", reqwest::Method::DELETE, "/v1/agent/services/nope", None, vec![], StatusCode::NOT_FOUND),
        ("remove an invalid id", reqwest::Method::DELETE, "/v1/agent/services/a%20b", None, vec![], StatusCode::BAD_REQUEST),
        ("report an unknown check", reqwest::Method::PUT, "/v1/agent/checks/nope/pass", None, vec![], StatusCode::NOT_FOUND),
        ("report a bad word", reqwest::Method::PUT, "/v1/agent/checks/nope/great", None, vec![], StatusCode::NOT_FOUND),
        (
            "maintenance of an unknown service",
            reqwest::Method::PUT,
            "/v1/agent/services/nope/maintenance",
            json_type,
            br#"{"enabled":true}"#.to_vec(),
            StatusCode::NOT_FOUND,
        ),
        ("lookup of an invalid name", reqwest::Method::GET, "/v1/services/Not_Valid", None, vec![], StatusCode::BAD_REQUEST),
        ("unknown query parameter", reqwest::Method::GET, "/v1/services/web?helth=any", None, vec![], StatusCode::BAD_REQUEST),
        ("bad wait", reqwest::Method::GET, "/v1/services/web?index=1&wait=soon", None, vec![], StatusCode::BAD_REQUEST),
        ("unknown path", reqwest::Method::GET, "/v1/nothing", None, vec![], StatusCode::NOT_FOUND),
        ("wrong method", reqwest::Method::POST, "/v1/services/web", None, vec![], StatusCode::METHOD_NOT_ALLOWED),
    ];
    for (what, method, path, content_type, body, expected) in cases {
        let mut request = client.request(method, agent.at(path)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_else(|e| panic!("{what}: error body is not JSON: {e}"));
        assert_eq!(status, expected, "{what}: {body}");
        assert!(body["error"].is_string() && body["message"].is_string(), "{what}: {body}");
    }
    let after = get_json(&agent.at("/v1/agent")).await;
    assert_eq!(after["services"], before["services"], "nothing changed");
    assert!(!agent.log_text().contains("panicked"));
}

#[test]
fn an_invalid_configuration_exits_64_naming_the_field() {
    let cases = [
        ("port = 8080\n", "port"),
        ("[[services]]\nname = \"Web\"\nport = 80\n", "services[0].name"),
        ("[[services]]\nname = \"web\"\nport = 80\nchecks = [{ http = \"http://x/\", tcp = \"x:1\" }]\n", "services[0].checks[0]"),
        ("gossip_interval = \"often\"\n", "gossip_interval"),
        ("[protection_thresholds]\nweb = 2.0\n", "protection_thresholds.web"),
        ("registry = [\"ftp://x\"]\n", "registry[0]"),
    ];
    for (text, field) in cases {
        let (_dir, path) = write_config(text);
        let output = std::process::Command::new(signpost_e2e::binary("signpost-agent")).args(["--config", &path]).output().expect("run");
        assert_eq!(output.status.code(), Some(64), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("Invalid configuration") && stderr.contains(field), "{text}: {stderr}");
    }
    let help = std::process::Command::new(signpost_e2e::binary("signpost-agent")).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--registry",
        "--service",
        "--check-http",
        "--check-tcp",
        "--check-interval",
        "--node",
        "--zone",
        "--address",
        "--listen",
        "--gossip-listen",
        "--gossip-advertise",
        "--seed",
        "--cluster-id",
        "--token",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fails_over_between_registries() {
    let (_db, registry) = registry().await;
    let dead = format!("http://127.0.0.1:{}", signpost_e2e::free_port());
    let agent = AgentBuilder::new("node-a", &[dead, registry.url()]).flag("service", "web:8080").start().await;
    eventually("registered through the second registry", Duration::from_secs(20), || async {
        let body = get_json(&registry.at("/v1/instances/node-a-web-8080")).await;
        (body["node"] == "node-a").then_some(())
    })
    .await;
    eventually("the feed follows the second registry", Duration::from_secs(20), || async {
        let body = get_json(&agent.at("/v1/agent")).await;
        (body["stale_seconds"] == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_lookup_at_the_agent_wakes_on_a_change() {
    let (_db, registry) = registry().await;
    let agent = AgentBuilder::new("node-a", &[registry.url()]).flag("service", "web:8080").start().await;
    eventually("the agent knows its own instance", Duration::from_secs(10), || async {
        agent.lookup("web").await.filter(|f| f.len() == 1)
    })
    .await;
    // Once the catalog is quiet, a lookup waits out its wait and answers the same index.
    let index: u64 = eventually("a quiet blocking lookup waits", Duration::from_secs(15), || async {
        let first = reqwest::get(agent.at("/v1/services/web")).await.ok()?;
        let index: u64 = first.headers().get("x-signpost-index")?.to_str().ok()?.parse().ok()?;
        let started = std::time::Instant::now();
        let same = reqwest::get(agent.at(&format!("/v1/services/web?index={index}&wait=300ms"))).await.ok()?;
        let after: u64 = same.headers().get("x-signpost-index")?.to_str().ok()?.parse().ok()?;
        (started.elapsed() >= Duration::from_millis(250) && after == index).then_some(index)
    })
    .await;
    // A registration at the registry wakes it well before its wait ends.
    let url = agent.at(&format!("/v1/services/web?index={index}&wait=30s"));
    let waiter = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let body: Value = reqwest::get(url).await.expect("GET").json().await.expect("json");
        (started.elapsed(), body)
    });
    register_at(&registry, json!({"id": "web-remote", "service": "web", "address": "10.0.0.9", "port": 80})).await;
    let (elapsed, body) = waiter.await.expect("waiter");
    assert!(elapsed < Duration::from_secs(10), "woke on the change ({elapsed:?})");
    assert!(body["index"].as_u64().expect("index") > index);
    eventually("both instances are answered", Duration::from_secs(10), || async {
        agent.lookup("web").await.filter(|f| f.len() == 2).map(|_| ())
    })
    .await;
}

/// A web page in a browser on the agent's host that reaches the loopback API through a name of
/// its own (DNS rebinding) sends that name as `Host`: refused, and nothing changes; the names
/// and addresses a local client uses pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_name_is_refused() {
    let agent = AgentBuilder::new("node-h", &[]).start().await;
    let port = agent.addr.port();
    let client = reqwest::Client::new();
    let add = |host: String, port: u16| {
        client.post(agent.at("/v1/agent/services")).header("host", host).json(&json!({"name": "web", "port": port})).send()
    };
    let refused = add(format!("evil.example:{port}"), 9001).await.expect("answered");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await.expect("the contract's error body");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("evil.example")), "{body}");
    let lookup = client.get(agent.at("/v1/services/web")).header("host", "evil.example").send().await.expect("answered");
    assert_eq!(lookup.status(), StatusCode::FORBIDDEN, "reads too: the catalog is not for other sites");
    let local: Value = get_json(&agent.at("/v1/agent")).await;
    assert_eq!(local["services"], json!([]), "nothing was added");

    for (host, service_port) in [(format!("localhost:{port}"), 9002), (format!("127.0.0.1:{port}"), 9003)] {
        assert_eq!(add(host.clone(), service_port).await.expect("answered").status(), StatusCode::CREATED, "{host}");
    }
    let healthz = client.get(agent.at("/healthz")).header("host", "evil.example").send().await.expect("answered");
    assert_eq!(healthz.status(), StatusCode::OK, "liveness is answered whatever the name");
}
