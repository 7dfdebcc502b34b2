//! The registry's HTTP API end to end: the built binary on a PostgreSQL database of the
//! test's own, called over real HTTP.

mod common;

use std::time::{Duration, Instant};

use common::{Registry, RegistryBuilder, TestDb, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_shared::client::HeldCatalog;

async fn start() -> (TestDb, Registry) {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).start().await;
    (db, registry)
}

fn instance(id: &str, service: &str, port: u16) -> Value {
    json!({"id": id, "service": service, "address": "10.0.0.1", "port": port})
}

async fn post(registry: &Registry, body: &Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new().post(registry.at("/v1/instances")).json(body).send().await.expect("POST");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(registry: &Registry, path: &str) -> (StatusCode, Value) {
    let response = reqwest::get(registry.at(path)).await.expect("GET");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until the registry logged `count` blocking queries in total.
async fn wait_until_blocked(registry: &Registry, count: usize) {
    eventually("the blocking query is waiting", Duration::from_secs(10), || async {
        (registry.log_text().matches("blocking query waiting for a change").count() >= count).then_some(())
    })
    .await;
}

fn ids(answer: &Value) -> Vec<String> {
    answer["instances"].as_array().map(|a| a.iter().filter_map(|i| i["id"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// The original system's four flows: a server activates, fetches its own details, fetches
/// the other servers of its service, deactivates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_four_flows() {
    let (_db, registry) = start().await;
    for (id, port) in [("web-1", 8081), ("web-2", 8082), ("web-3", 8083)] {
        let (status, body) = post(&registry, &instance(id, "web", port)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["id"], id);
        assert_eq!(body["health"], "passing");
    }
    let (status, me) = get(&registry, "/v1/instances/web-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((me["address"].as_str(), me["port"].as_u64()), (Some("10.0.0.1"), Some(8081)));
    let (status, others) = get(&registry, "/v1/services/web").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&others), ["web-1", "web-2", "web-3"]);
    let response = reqwest::Client::new().delete(registry.at("/v1/instances/web-1")).send().await.expect("DELETE");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, body) = get(&registry, "/v1/instances/web-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    assert_eq!(ids(&get(&registry, "/v1/services/web").await.1), ["web-2", "web-3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_filters_and_counts() {
    let (_db, registry) = start().await;
    let client = registry.client();
    let mut a = instance("api-a", "api", 1);
    a["tags"] = json!(["v2", "canary"]);
    a["zone"] = json!("eu-1");
    let mut b = instance("api-b", "api", 2);
    b["tags"] = json!(["v2"]);
    b["zone"] = json!("eu-2");
    let mut c = instance("api-c", "api", 3);
    c["tags"] = json!(["v1"]);
    c["zone"] = json!("eu-1");
    for body in [&a, &b, &c] {
        assert_eq!(post(&registry, body).await.0, StatusCode::CREATED);
    }
    post(&registry, &instance("db-1", "db", 5432)).await;
    // Update by repeated registration: same id, new port; no duplicate.
    a["port"] = json!(11);
    let (status, updated) = post(&registry, &a).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["port"], 11);
    assert_eq!(ids(&get(&registry, "/v1/services/api").await.1), ["api-a", "api-b", "api-c"]);
    // Tags: repeated, all must match. Zone.
    assert_eq!(ids(&get(&registry, "/v1/services/api?tag=v2").await.1), ["api-a", "api-b"]);
    assert_eq!(ids(&get(&registry, "/v1/services/api?tag=v2&tag=canary").await.1), ["api-a"]);
    assert_eq!(ids(&get(&registry, "/v1/services/api?zone=eu-1").await.1), ["api-a", "api-c"]);
    assert_eq!(ids(&get(&registry, "/v1/services/api?zone=eu-1&tag=v1").await.1), ["api-c"]);
    // Health: a critical instance leaves the default (healthy) answer, stays in health=any.
    let critical = signpost_shared::wire::Heartbeat { health: Some(signpost_shared::Health::Critical), output: Some("down".into()) };
    client.heartbeat("api-b", &critical, None).await.expect("heartbeat");
    assert_eq!(ids(&get(&registry, "/v1/services/api").await.1), ["api-a", "api-c"]);
    assert_eq!(ids(&get(&registry, "/v1/services/api?health=any").await.1), ["api-a", "api-b", "api-c"]);
    assert_eq!(ids(&get(&registry, "/v1/services/api?health=critical").await.1), ["api-b"]);
    // Maintenance.
    let on = signpost_shared::wire::Maintenance { enabled: true, reason: Some("upgrade".into()) };
    assert_eq!(client.maintenance("api-c", &on, None).await.expect("maintenance").health, signpost_shared::Health::Maintenance);
    assert_eq!(ids(&get(&registry, "/v1/services/api").await.1), ["api-a"]);
    // Counts per service.
    let page = client.services().await.expect("services");
    assert!(!page.self_preservation);
    let names: Vec<&str> = page.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["api", "db"]);
    let api = &page.services[0];
    assert_eq!((api.instances, api.healthy), (3, 1));
    assert_eq!(api.health[&signpost_shared::Health::Critical], 1);
    assert_eq!(api.health[&signpost_shared::Health::Maintenance], 1);
    // An unknown service is an empty list, not an error.
    let (status, empty) = get(&registry, "/v1/services/nothing-here").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ids(&empty).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_feed_blocks_until_a_change() {
    let (_db, registry) = start().await;
    post(&registry, &instance("web-1", "web", 1)).await;
    let (status, first) = get(&registry, "/v1/catalog").await;
    assert_eq!(status, StatusCode::OK);
    let index = first["index"].as_u64().expect("index");
    assert_eq!(ids(&first), ["web-1"]);

    // Returns on timeout with the same index.
    let started = Instant::now();
    let (_, same) = get(&registry, &format!("/v1/catalog?index={index}&wait=500ms")).await;
    assert!(started.elapsed() >= Duration::from_millis(450), "it waited");
    assert_eq!(same["index"].as_u64(), Some(index));

    // Wakes on a change, well before the wait ends, with a greater index.
    let waiter = {
        let url = registry.at(&format!("/v1/catalog?index={index}&wait=30s"));
        tokio::spawn(async move {
            let started = Instant::now();
            let response = reqwest::get(url).await.expect("GET");
            let header = response.headers().get("x-signpost-index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            (started.elapsed(), header, response.json::<Value>().await.expect("json"))
        })
    };
    wait_until_blocked(&registry, 2).await;
    post(&registry, &instance("web-2", "web", 2)).await;
    let (elapsed, header, woke) = waiter.await.expect("waiter");
    assert!(elapsed < Duration::from_secs(10), "woke on the change, not the timeout ({elapsed:?})");
    let new_index = woke["index"].as_u64().expect("index");
    assert!(new_index > index);
    assert_eq!(header, Some(new_index));
    assert_eq!(ids(&woke), ["web-1", "web-2"]);

    // An index ahead of the registry (it was reset) answers at once.
    let started = Instant::now();
    get(&registry, &format!("/v1/catalog?index={}&wait=30s", new_index + 1000)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_holding_the_catalog_gets_304_instead_of_it_again() {
    let (_db, registry) = start().await;
    post(&registry, &instance("web-1", "web", 1)).await;
    let http = reqwest::Client::new();
    let first = http.get(registry.at("/v1/catalog")).send().await.expect("GET");
    let etag = first.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string).expect("an ETag");
    let page = first.json::<Value>().await.expect("json");
    let (index, epoch) = (page["index"].as_u64().expect("index"), page["epoch"].as_u64().expect("epoch"));
    assert!(etag.starts_with(&format!("\"{epoch:x}-{index}-")), "the tag names the epoch and the index: {etag}");

    // The wait ends with nothing changed: 304, the index, no body.
    let started = Instant::now();
    let same =
        http.get(registry.at(&format!("/v1/catalog?index={index}&wait=500ms"))).header("if-none-match", &etag).send().await.expect("GET");
    assert!(started.elapsed() >= Duration::from_millis(450), "it waited");
    assert_eq!(same.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(same.headers().get("x-signpost-index").and_then(|v| v.to_str().ok()), Some(index.to_string().as_str()));
    assert!(same.bytes().await.expect("body").is_empty(), "no catalog in a 304");

    // An agent built before these tags sends the bare index as its tag: it waits as it always
    // did (it would take an answer at once for "nothing changed" and ask again at once).
    let started = Instant::now();
    let old = http
        .get(registry.at(&format!("/v1/catalog?index={index}&wait=500ms")))
        .header("if-none-match", format!("\"{index}\""))
        .send()
        .await
        .expect("GET");
    assert!(started.elapsed() >= Duration::from_millis(450), "an old agent's query waited");
    assert_eq!(old.status(), StatusCode::OK);

    // Another tag, or none, gets the catalog as before.
    let other = http.get(registry.at("/v1/catalog")).header("if-none-match", "\"999999\", W/\"999998\"").send().await.expect("GET");
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(ids(&other.json::<Value>().await.expect("json")), ["web-1"]);

    // After a change, the old tag no longer matches: the new catalog.
    post(&registry, &instance("web-2", "web", 2)).await;
    let changed =
        http.get(registry.at(&format!("/v1/catalog?index={index}&wait=30s"))).header("if-none-match", &etag).send().await.expect("GET");
    assert_eq!(changed.status(), StatusCode::OK);
    let page = changed.json::<Value>().await.expect("json");
    assert!(page["index"].as_u64() > Some(index));
    assert_eq!(ids(&page), ["web-1", "web-2"]);

    // The registry client an agent uses sends the tag and takes the 304 as "unchanged".
    let client = registry.client();
    let now = client.catalog_changed::<Value>(None, None).await.expect("catalog").expect("a page");
    let held = HeldCatalog { index: now.page["index"].as_u64().expect("index"), etag: now.etag.as_deref() };
    let unchanged = client.catalog_changed::<Value>(Some(held), Some(Duration::from_millis(300))).await.expect("wait ended");
    assert_eq!(unchanged, None);
    // A copy at this index with another tag (of another history) gets the catalog at once.
    let started = Instant::now();
    let other = HeldCatalog { etag: Some("\"0-1-0000000000000000\""), ..held };
    let again = client.catalog_changed::<Value>(Some(other), Some(Duration::from_secs(30))).await.expect("answered");
    assert!(again.is_some() && started.elapsed() < Duration::from_secs(10), "not held for the wait");
    assert!(registry.log_text().contains("\"status\":304"), "the 304 answers are in the request log");
}

/// What is sent, and the status expected: (what, method, path, content type, body, status).
type Case<'a> = (&'a str, reqwest::Method, &'a str, Option<&'a str>, Vec<u8>, StatusCode);

/// Every kind of bad input gets a 4xx with the contract's body, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let (_db, registry) = start().await;
    let mut stored = instance("web-1", "web", 8080);
    stored["tags"] = json!(["keep"]);
    assert_eq!(post(&registry, &stored).await.0, StatusCode::CREATED);
    let before = get(&registry, "/v1/catalog").await.1;
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, content_type: Option<&str>, body: Vec<u8>| {
        let mut request = client.request(method, registry.at(path)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request.send()
    };
    let json_type = Some("application/json");
    let too_many_tags: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    let huge = format!(r#"{{"id":"web-1","service":"web","address":"10.0.0.1","port":1,"tags":["{}"]}}"#, "x".repeat(100_000));
    let cases: Vec<Case<'_>> = vec![
        ("malformed JSON", reqwest::Method::POST, "/v1/instances", json_type, b"{\"id\": ".to_vec(), StatusCode::BAD_REQUEST),
        ("not JSON at all", reqwest::Method::POST, "/v1/instances", json_type, b"hello".to_vec(), StatusCode::BAD_REQUEST),
        (
            "wrong type",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            br#"{"id":"web-1","service":"web","address":"10.0.0.1","port":"80"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing field",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            br#"{"id":"web-1","service":"web","port":80}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown field",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            br#"{"id":"web-1","service":"web","address":"a","port":80,"colour":"red"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "invalid service name",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            instance("web-1", "Web_Service", 80).to_string().into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "invalid id",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            instance("web 1/x", "web", 80).to_string().into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "port 0",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            instance("web-1", "web", 0).to_string().into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "port 70000",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            json!({"id":"web-1","service":"web","address":"10.0.0.1","port":70000}).to_string().into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "too many tags",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            json!({"id":"web-1","service":"web","address":"10.0.0.1","port":1,"tags":too_many_tags}).to_string().into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "bad check",
            reqwest::Method::POST,
            "/v1/instances",
            json_type,
            json!({"id":"web-1","service":"web","address":"10.0.0.1","port":1,"check":{"http":"ftp://x","interval":"soon"}})
                .to_string()
                .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("oversized body", reqwest::Method::POST, "/v1/instances", json_type, huge.into_bytes(), StatusCode::PAYLOAD_TOO_LARGE),
        (
            "wrong content type",
            reqwest::Method::POST,
            "/v1/instances",
            Some("text/plain"),
            instance("web-1", "web", 1).to_string().into_bytes(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "no content type",
            reqwest::Method::POST,
            "/v1/instances",
            None,
            instance("web-1", "web", 1).to_string().into_bytes(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        ("heartbeat of an unknown id", reqwest::Method::PUT, "/v1/instances/nope/heartbeat", None, vec![], StatusCode::NOT_FOUND),
        (
            "heartbeat with a bad health",
            reqwest::Method::PUT,
            "/v1/instances/web-1/heartbeat",
            json_type,
            br#"{"health":"fine"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "heartbeat setting maintenance",
            reqwest::Method::PUT,
            "/v1/instances/web-1/heartbeat",
            json_type,
            br#"{"health":"maintenance"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "maintenance without body",
            reqwest::Method::PUT,
            "/v1/instances/web-1/maintenance",
            None,
            vec![],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "maintenance of an unknown id",
            reqwest::Method::PUT,
            "/v1/instances/nope/maintenance",
            json_type,
            br#"{"enabled":true}"#.to_vec(),
            StatusCode::NOT_FOUND,
        ),
        ("delete of an unknown id", reqwest::Method::DELETE, "/v1/instances/nope", None, vec![], StatusCode::NOT_FOUND),
        ("get of an unknown id", reqwest::Method::GET, "/v1/instances/nope", None, vec![], StatusCode::NOT_FOUND),
        ("get of an invalid id", reqwest::Method::GET, "/v1/instances/a%20b", None, vec![], StatusCode::BAD_REQUEST),
        ("invalid service in a lookup", reqwest::Method::GET, "/v1/services/Not_A_Label", None, vec![], StatusCode::BAD_REQUEST),
        ("unknown query parameter", reqwest::Method::GET, "/v1/services/web?helth=any", None, vec![], StatusCode::BAD_REQUEST),
        ("bad index", reqwest::Method::GET, "/v1/catalog?index=-3", None, vec![], StatusCode::BAD_REQUEST),
        ("bad wait", reqwest::Method::GET, "/v1/catalog?index=1&wait=forever", None, vec![], StatusCode::BAD_REQUEST),
        (
            "agent with bad addresses",
            reqwest::Method::PUT,
            "/v1/agents/node-1",
            json_type,
            br#"{"gossip_addr":"nowhere","http_addr":"10.0.0.1:0"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "agent with a signing key that is not an Ed25519 public key",
            reqwest::Method::PUT,
            "/v1/agents/node-1",
            json_type,
            br#"{"gossip_addr":"10.0.0.1:7302","http_addr":"10.0.0.1:7301","signing_key":"not-a-key"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "agent with a bad node name",
            reqwest::Method::PUT,
            "/v1/agents/no%20de",
            json_type,
            br#"{"gossip_addr":"10.0.0.1:7302","http_addr":"10.0.0.1:7301"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        ("unknown path", reqwest::Method::GET, "/v2/everything", None, vec![], StatusCode::NOT_FOUND),
        ("wrong method", reqwest::Method::PATCH, "/v1/instances/web-1", None, vec![], StatusCode::METHOD_NOT_ALLOWED),
    ];
    for (what, method, path, content_type, body, expected) in cases {
        let response = send(method, path, content_type, body).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_else(|e| panic!("{what}: the error body is not JSON: {e}"));
        assert_eq!(status, expected, "{what}: {body}");
        assert!(body["error"].is_string() && body["message"].is_string(), "{what}: contract body expected, got {body}");
    }
    // The field of a wrongly typed value is named.
    let (_, body) = post(&registry, &json!({"id":"web-1","service":"web","address":"10.0.0.1","port":"80"})).await;
    assert_eq!(body["problems"][0]["field"], "port", "{body}");
    // Every problem is reported, not only the first.
    let (_, body) = post(&registry, &json!({"id":"bad id","service":"Bad","address":"10.0.0.1","port":0})).await;
    let fields: Vec<&str> = body["problems"].as_array().expect("problems").iter().filter_map(|p| p["field"].as_str()).collect();
    assert_eq!(fields, ["id", "service", "port"]);

    let after = get(&registry, "/v1/catalog").await.1;
    assert_eq!(after["index"], before["index"], "no refused request moved the index");
    assert_eq!(after["instances"], before["instances"], "no refused request changed what is stored");
    assert!(!registry.log_text().contains("panicked"), "no task panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_may_do_what_its_role_allows_and_nothing_else() {
    let db = TestDb::create().await;
    let (admin, fleet, reader, node_a) =
        ("admin-0123456789abcdef", "fleet-0123456789abcdef", "reader-0123456789abcdef", "node-a-0123456789abcdef");
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens_file = dir.path().join("agent-tokens");
    std::fs::write(&tokens_file, format!("# node token\nnode-a {node_a}\nnode-b node-b-0123456789abcdef\n")).expect("write");
    let registry = RegistryBuilder::new(Some(&db.url))
        .flag("admin-token", admin)
        .flag("agent-token", fleet)
        .flag("read-token", reader)
        .flag("agent-tokens-file", tokens_file.display().to_string())
        .start()
        .await;
    let client = reqwest::Client::new();
    let send = |request: reqwest::RequestBuilder, token: Option<&str>| {
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        async move { request.send().await.expect("request").status() }
    };
    let owned = |id: &str, node: Option<&str>| {
        let mut body = instance(id, "web", 1);
        if let Some(node) = node {
            body["node"] = json!(node);
        }
        body
    };
    let register = |token: Option<&str>, body: Value| send(client.post(registry.at("/v1/instances")).json(&body), token);

    // No token, a malformed one, an unknown one.
    assert_eq!(register(None, owned("web-1", None)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(client.post(registry.at("/v1/instances")).header("authorization", "Basic x").json(&owned("web-1", None)), None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(register(Some("wrong-token-0123456789"), owned("web-1", None)).await, StatusCode::FORBIDDEN);
    // Reads need a token too once any is configured; every role may read; health and metrics stay open.
    assert_eq!(send(client.get(registry.at("/v1/services")), None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(client.get(registry.at("/v1/catalog")), None).await, StatusCode::UNAUTHORIZED);
    for token in [admin, fleet, reader, node_a] {
        assert_eq!(send(client.get(registry.at("/v1/services")), Some(token)).await, StatusCode::OK);
        assert_eq!(send(client.get(registry.at("/v1/agents")), Some(token)).await, StatusCode::OK);
    }
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(send(client.get(registry.at(open)), None).await, StatusCode::OK, "{open}");
    }

    // The read-only token cannot write anything.
    assert_eq!(register(Some(reader), owned("web-r", Some("node-a"))).await, StatusCode::FORBIDDEN);
    // The admin and the fleet agent may register for any node (or none).
    assert_eq!(register(Some(admin), owned("web-1", None)).await, StatusCode::CREATED);
    assert_eq!(register(Some(fleet), owned("web-b", Some("node-b"))).await, StatusCode::CREATED);
    // node-a's token: its own node's instances only; never one without a node.
    assert_eq!(register(Some(node_a), owned("web-a", Some("node-a"))).await, StatusCode::CREATED);
    assert_eq!(register(Some(node_a), owned("web-a", Some("node-a"))).await, StatusCode::OK);
    assert_eq!(register(Some(node_a), owned("web-x", Some("node-b"))).await, StatusCode::FORBIDDEN);
    assert_eq!(register(Some(node_a), owned("web-y", None)).await, StatusCode::FORBIDDEN);
    // ... and it cannot take over node-b's instance by registering the id under its own name.
    assert_eq!(register(Some(node_a), owned("web-b", Some("node-a"))).await, StatusCode::FORBIDDEN);
    let heartbeat =
        |id: &str, token: &str| send(client.put(registry.at(&format!("/v1/instances/{id}/heartbeat"))).json(&json!({})), Some(token));
    assert_eq!(heartbeat("web-a", node_a).await, StatusCode::OK);
    // node-a has no instance `web-b`: told to register it (which it may not), it renews nothing.
    assert_eq!(heartbeat("web-b", node_a).await, StatusCode::NOT_FOUND);
    assert_eq!(heartbeat("web-b", fleet).await, StatusCode::OK);
    assert_eq!(heartbeat("web-b", reader).await, StatusCode::FORBIDDEN);
    // Maintenance: the admin, a fleet agent, or the agent of the instance's own node (an agent
    // puts its own services into maintenance after every first registration).
    let maintenance = |id: &str, token: &str| {
        send(client.put(registry.at(&format!("/v1/instances/{id}/maintenance"))).json(&json!({"enabled": false})), Some(token))
    };
    assert_eq!(maintenance("web-a", node_a).await, StatusCode::OK);
    assert_eq!(maintenance("web-b", node_a).await, StatusCode::FORBIDDEN, "another node's instance");
    assert_eq!(maintenance("web-1", node_a).await, StatusCode::FORBIDDEN, "an agentless instance");
    assert_eq!(maintenance("web-a", reader).await, StatusCode::FORBIDDEN);
    assert_eq!(maintenance("web-a", fleet).await, StatusCode::OK);
    assert_eq!(maintenance("web-a", admin).await, StatusCode::OK);
    // Agents announce only themselves.
    let announce = |node: &str, token: &str| {
        send(
            client
                .put(registry.at(&format!("/v1/agents/{node}")))
                .json(&json!({"gossip_addr": "10.0.0.5:7302", "http_addr": "10.0.0.5:7301"})),
            Some(token),
        )
    };
    assert_eq!(announce("node-a", node_a).await, StatusCode::OK);
    assert_eq!(announce("node-b", node_a).await, StatusCode::FORBIDDEN);
    // Deregistration: not another node's instance, not naming another node.
    let delete = |path: &str, token: &str| send(client.delete(registry.at(path)), Some(token));
    assert_eq!(delete("/v1/instances/web-b", node_a).await, StatusCode::FORBIDDEN);
    assert_eq!(delete("/v1/instances/web-b?node=node-b", node_a).await, StatusCode::FORBIDDEN);
    assert_eq!(delete("/v1/instances/web-a?node=node-a", node_a).await, StatusCode::NO_CONTENT);

    // What was refused changed nothing: web-b is still node-b's, untouched.
    let page: Value =
        client.get(registry.at("/v1/instances/web-b")).bearer_auth(reader).send().await.expect("GET").json().await.expect("json");
    assert_eq!(page["node"], "node-b");
    let listed: Value =
        client.get(registry.at("/v1/services/web?health=any")).bearer_auth(reader).send().await.expect("GET").json().await.expect("json");
    assert_eq!(ids(&listed), ["web-1", "web-b"]);
    let log = registry.log_text();
    for token in [admin, fleet, reader, node_a] {
        assert!(!log.contains(token), "tokens never reach the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_agent_tokens_file_stops_the_registry_and_names_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("agent-tokens");
    std::fs::write(&file, "node-a node-a-0123456789abcdef\nnode-b tooshort\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_signpost-registry"))
        .args(["--agent-tokens-file", &file.display().to_string(), "--data-dir", &dir.path().display().to_string()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2") && !stderr.contains("tooshort") && !stderr.contains("0123456789abcdef"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_agents_instance_cannot_be_deleted_behind_its_back() {
    let (_db, registry) = start().await;
    let mut owned = instance("web-1", "web", 1);
    owned["node"] = json!("node-a");
    post(&registry, &owned).await;
    let announce = reqwest::Client::new()
        .put(registry.at("/v1/agents/node-a"))
        .json(&json!({"gossip_addr": "10.0.0.5:7302", "http_addr": "10.0.0.5:7301"}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(announce.status(), StatusCode::OK);
    let (_, agents) = get(&registry, "/v1/agents").await;
    assert_eq!(agents["agents"][0]["node"], "node-a");
    assert_eq!(agents["agents"][0]["alive"], true);
    let response = reqwest::Client::new().delete(registry.at("/v1/instances/web-1")).send().await.expect("DELETE");
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.expect("json");
    assert!(body["message"].as_str().expect("message").contains("10.0.0.5:7301"), "{body}");
    assert_eq!(get(&registry, "/v1/instances/web-1").await.0, StatusCode::OK);
    // The owner itself may remove it.
    let response = reqwest::Client::new().delete(registry.at("/v1/instances/web-1?node=node-a")).send().await.expect("DELETE");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_configuration_serves_from_an_sqlite_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = RegistryBuilder::new(None).cwd(dir.path().to_path_buf()).start().await;
    assert_eq!(post(&registry, &instance("web-1", "web", 1)).await.0, StatusCode::CREATED);
    assert_eq!(ids(&get(&registry, "/v1/services/web").await.1), ["web-1"]);
    assert!(dir.path().join("signpost-data/registry.db").exists(), "the database lives in ./signpost-data");
    assert_eq!(get(&registry, "/readyz").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_answer() {
    let (_db, registry) = start().await;
    post(&registry, &instance("web-1", "web", 1)).await;
    assert_eq!(get(&registry, "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(&registry, "/readyz").await.0, StatusCode::OK);
    let needles = [
        "signpost_registry_http_requests_total{route=\"/v1/instances\",method=\"POST\",status=\"201\"} 1",
        "signpost_registry_http_request_duration_seconds_bucket",
        "signpost_registry_instances{health=\"passing\"} 1",
        "signpost_registry_leader 1",
        "signpost_registry_db_pool_connections",
        "signpost_registry_self_preservation 0",
    ];
    // The leader task takes its lock on a connection of its own, maybe after the first scrape.
    let leader_elected = || async {
        let metrics = reqwest::get(registry.at("/metrics")).await.ok()?.text().await.ok()?;
        metrics.contains("signpost_registry_leader 1").then_some(metrics)
    };
    let metrics = eventually("the leader gauge is set", Duration::from_secs(10), leader_elected).await;
    for needle in needles {
        assert!(metrics.contains(needle), "missing `{needle}` in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_blocking_queries_and_exits_cleanly() {
    let (_db, mut registry) = start().await;
    let (_, catalog) = get(&registry, "/v1/catalog").await;
    let index = catalog["index"].as_u64().expect("index");
    let waiter = tokio::spawn(reqwest::get(registry.at(&format!("/v1/catalog?index={index}&wait=60s"))));
    wait_until_blocked(&registry, 1).await;
    let code = registry.terminate(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "exited cleanly within the grace period");
    let answer = waiter.await.expect("join").expect("the blocked query was answered, not cut");
    assert_eq!(answer.status(), StatusCode::OK);
    let log = registry.log_text();
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
}

#[tokio::test]
async fn settings_come_from_the_environment_and_flags_win_over_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |envs: &[(&str, String)], args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_signpost-registry"));
        command.args(args).current_dir(dir.path()).env_remove("RUST_LOG");
        command.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
        command
    };
    // A bad value in the environment is refused, naming the setting.
    let output = run(&[("SIGNPOST_SWEEP_INTERVAL", "soon".into())], &[]).output().expect("run");
    assert_eq!(output.status.code(), Some(64), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).to_lowercase().contains("sweep_interval"));
    // A good one takes effect: the registry listens where SIGNPOST_LISTEN says, logging as
    // SIGNPOST_LOG_FORMAT says.
    let port = common::free_port();
    let envs = [("SIGNPOST_LISTEN", format!("127.0.0.1:{port}")), ("SIGNPOST_LOG_FORMAT", "json".into())];
    let child = run(&envs, &[]).stdin(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().expect("start");
    let ready = common::eventually("the registry answers on SIGNPOST_LISTEN", Duration::from_secs(30), || async {
        reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.ok().filter(|r| r.status().is_success())
    })
    .await;
    assert!(ready.status().is_success());
    common::signal(child.id(), "TERM");
    let output = child.wait_with_output().expect("wait");
    let first = String::from_utf8_lossy(&output.stderr).lines().next().unwrap_or_default().to_string();
    assert!(serde_json::from_str::<Value>(&first).is_ok(), "JSON logs from SIGNPOST_LOG_FORMAT: {first}");
    // A flag wins over the environment: with the bad interval replaced, what is left to refuse
    // is the (too short) token.
    let output =
        run(&[("SIGNPOST_SWEEP_INTERVAL", "soon".into())], &["--sweep-interval", "1s", "--admin-token", "short"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr.contains("admin_token") && !stderr.contains("sweep_interval"), "the flag replaced the environment's value: {stderr}");
}

#[tokio::test]
async fn invalid_configuration_exits_64_with_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("registry.toml");
    std::fs::write(&config, "sweep_interval = \"soon\"\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_signpost-registry"))
        .args(["--config", &config.display().to_string()])
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Invalid configuration") && stderr.contains("sweep_interval"), "{stderr}");
    std::fs::write(&config, "colour = \"red\"\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_signpost-registry"))
        .args(["--config", &config.display().to_string()])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("colour"));
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_signpost-registry")).args(["--admin-token", "short"]).output().expect("run");
    assert_eq!(output.status.code(), Some(64));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_signpost-registry")).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--database-url",
        "--data-dir",
        "--admin-token",
        "--agent-token",
        "--deregister-after",
        "--self-preservation-threshold",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
