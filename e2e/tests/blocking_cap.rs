//! Blocking queries cannot take every connection of the registry, and liveness does not depend
//! on a free one: waiters are capped (`max_blocking_queries`, by default half of
//! `max_connections`) and one past the cap is answered 503 with `Retry-After` at once, while
//! other reads go on; with every connection taken, `/healthz` is still answered (and anything
//! else gets 503 instead of waiting). docs/operations.md, "Timings and bounds".

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use signpost_e2e::{AgentBuilder, Registry, RegistryBuilder, eventually, signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn instance(id: &str) -> Value {
    json!({"id": id, "service": "web", "address": "10.0.0.1", "port": 8080, "ttl_s": 600})
}

/// A client that opens a connection per request and keeps none open afterwards, so that the
/// test knows which connections the registry holds.
fn one_shot(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).timeout(timeout).build().expect("client")
}

async fn register(registry: &Registry, id: &str) -> u16 {
    let response = one_shot(Duration::from_secs(10)).post(registry.at("/v1/instances")).json(&instance(id)).send().await;
    response.expect("register").status().as_u16()
}

async fn catalog_index(registry: &Registry) -> u64 {
    let page: Value =
        one_shot(Duration::from_secs(10)).get(registry.at("/v1/catalog")).send().await.expect("GET").json().await.expect("json");
    page["index"].as_u64().expect("an index")
}

/// Starts `count` blocking catalog queries at `index` (each on a connection of its own) and
/// waits until the registry holds their connections.
async fn block_on(registry: &Registry, index: u64, count: usize) -> Vec<tokio::task::JoinHandle<Option<u16>>> {
    let open_before = registry.metric("signpost_registry_http_connections_open").await.unwrap_or(0.0);
    let mut waiters = Vec::new();
    for _ in 0..count {
        let url = registry.at(&format!("/v1/catalog?index={index}&wait=120s"));
        waiters.push(tokio::spawn(async move {
            let response = one_shot(Duration::from_secs(150)).get(url).send().await.ok()?;
            Some(response.status().as_u16())
        }));
    }
    eventually(&format!("the registry holds {count} blocking queries"), Duration::from_secs(20), || async {
        let open = registry.metric("signpost_registry_http_connections_open").await?;
        (open >= open_before + count as f64).then_some(())
    })
    .await;
    waiters
}

/// Sends `GET path` on a new connection and reads the answer's head and body, or None when
/// nothing came within `within` or the connection closed first.
async fn raw_get(addr: SocketAddr, path: &str, within: Duration) -> Option<(u16, String, String)> {
    tokio::time::timeout(within, async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: signpost\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        // The server closes these connections after the answer: read to the end.
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer).to_string();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, head.to_ascii_lowercase(), body.to_string()))
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_past_the_cap_gets_503_at_once_while_other_reads_go_on() {
    // 8 connections: by default at most 4 of them wait in blocking queries.
    let registry = RegistryBuilder::new(None).flag("max-connections", "8").start().await;
    assert_eq!(register(&registry, "web-1").await, 201);
    let index = catalog_index(&registry).await;
    let waiters = block_on(&registry, index, 4).await;

    // One more blocking query is told at once to come back later, instead of holding a slot.
    let refused = one_shot(Duration::from_secs(20))
        .get(registry.at(&format!("/v1/catalog?index={index}&wait=120s")))
        .send()
        .await
        .expect("the blocking query past the cap is answered, not left waiting");
    assert_eq!(refused.status(), 503);
    let retry_after = refused.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After: {retry_after:?}");
    let body: Value = refused.json().await.expect("the contract's error body");
    assert_eq!(body["error"], "busy", "{body}");
    // The same for a blocking lookup of one service.
    let lookup = one_shot(Duration::from_secs(20)).get(registry.at(&format!("/v1/services/web?index={index}&wait=120s"))).send().await;
    assert_eq!(lookup.expect("answered").status(), 503);

    // Reads that do not wait go on: the catalog, lookups, and a blocking query whose index is
    // already behind (it answers at once).
    let reader = one_shot(Duration::from_secs(10));
    for path in
        ["/v1/catalog".to_string(), "/v1/services/web".into(), "/v1/services".into(), format!("/v1/catalog?index={}&wait=120s", index - 1)]
    {
        let response = reader.get(registry.at(&path)).send().await.expect("a read");
        assert_eq!(response.status(), 200, "{path}");
    }
    assert!(registry.metric("signpost_registry_blocking_queries_refused_total").await.unwrap_or(0.0) >= 2.0);
    assert_eq!(registry.metric("signpost_registry_blocking_queries_waiting").await, Some(4.0));

    // A change answers the waiters, which frees their places: a blocking query waits again.
    assert_eq!(register(&registry, "web-2").await, 201);
    for waiter in waiters {
        assert_eq!(waiter.await.expect("a waiter"), Some(200));
    }
    let index = catalog_index(&registry).await;
    let again = block_on(&registry, index, 1).await;
    assert_eq!(register(&registry, "web-3").await, 201);
    for waiter in again {
        assert_eq!(waiter.await.expect("a waiter"), Some(200), "a blocking query waits again once places are free");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_answered_with_every_connection_taken() {
    // 6 connections: 3 taken by blocking queries (the default cap, half), 3 by clients that
    // say nothing (within the header timeout).
    let registry = RegistryBuilder::new(None).flag("max-connections", "6").flag("header-read-timeout", "60s").start().await;
    assert_eq!(register(&registry, "web-1").await, 201);
    let index = catalog_index(&registry).await;
    let waiters = block_on(&registry, index, 3).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(registry.addr).await.expect("connect"));
    }

    // Liveness is answered all the same: a busy registry is not a dead one.
    let (status, _, body) = raw_get(registry.addr, "/healthz", Duration::from_secs(10)).await.expect("/healthz answered at the cap");
    assert_eq!(status, 200, "{body}");
    // Anything else is told to come back (or go to another replica) instead of waiting. (A
    // connection the test used a moment ago may close late and free a slot: take it too.)
    let (head, body) = loop {
        match raw_get(registry.addr, "/v1/services", Duration::from_secs(10)).await {
            Some((503, head, body)) => break (head, body),
            Some((200, _, _)) if silent.len() < 10 => silent.push(TcpStream::connect(registry.addr).await.expect("connect")),
            other => panic!("a lookup with every connection taken: {other:?}"),
        }
    };
    assert!(head.contains("retry-after:"), "{head}");
    let error: Value = serde_json::from_str(&body).expect("the contract's error body");
    assert_eq!(error["error"], "busy");
    // Every connection is surely taken now: liveness is still answered.
    let (status, _, body) = raw_get(registry.addr, "/healthz", Duration::from_secs(10)).await.expect("/healthz answered at the cap");
    assert_eq!(status, 200, "{body}");

    // Freed, the registry serves everything again.
    drop(silent);
    eventually("lookups are answered again", Duration::from_secs(20), || async {
        let response = one_shot(Duration::from_secs(2)).get(registry.at("/v1/services")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(registry.metric("signpost_registry_http_over_cap_connections_total").await.unwrap_or(0.0) >= 2.0);
    assert_eq!(register(&registry, "web-2").await, 201);
    for waiter in waiters {
        assert_eq!(waiter.await.expect("a waiter"), Some(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_at_the_cap_waits_as_long_as_it_is_told() {
    // Connections to spare: the agent meets the cap of blocking queries, not of connections.
    let registry = RegistryBuilder::new(None).flag("max-connections", "64").flag("max-blocking-queries", "4").start().await;
    assert_eq!(register(&registry, "web-1").await, 201);
    let metric = |name: &'static str| async { registry.metric(name).await.unwrap_or(0.0) };
    let agent = AgentBuilder::new("node-a", &[registry.url()]).flag("catalog-wait", "5s").start().await;
    // The agent has announced itself (the last change it makes: a later one would answer the
    // test's waiters) and follows the catalog.
    eventually("the agent is announced", Duration::from_secs(20), || async {
        let page: Value = one_shot(Duration::from_secs(10)).get(registry.at("/v1/agents")).send().await.ok()?.json().await.ok()?;
        page["agents"].as_array()?.iter().any(|a| a["node"] == "node-a").then_some(())
    })
    .await;
    eventually("the agent waits in a blocking query", Duration::from_secs(20), || async {
        (metric("signpost_registry_blocking_queries_waiting").await == 1.0).then_some(())
    })
    .await;
    // Frozen, it lets its wait run out; the test's waiters take every place meanwhile.
    signal(agent.pid(), "STOP");
    eventually("the frozen agent's wait ended", Duration::from_secs(20), || async {
        (metric("signpost_registry_blocking_queries_waiting").await == 0.0).then_some(())
    })
    .await;
    let _waiters = block_on(&registry, catalog_index(&registry).await, 4).await;
    signal(agent.pid(), "CONT");
    eventually("the agent's blocking query is refused", Duration::from_secs(20), || async {
        (metric("signpost_registry_blocking_queries_refused_total").await >= 1.0).then_some(())
    })
    .await;
    // Told `Retry-After: 5`, it asks again at most every 5 s (in 12 s: 3 times at most), not
    // with its own back-off from 100 ms (which made about 25 tries in the same time).
    let before = metric("signpost_registry_blocking_queries_refused_total").await;
    let window = Duration::from_secs(12);
    tokio::time::sleep(window).await;
    let tries = metric("signpost_registry_blocking_queries_refused_total").await - before;
    assert!(tries <= 3.0, "{tries} blocking queries refused in {window:?}");
    assert!(tries >= 1.0, "the agent stopped asking: {tries} in {window:?}; its log:\n{}", agent.log_text());
    assert_eq!(metric("signpost_registry_blocking_queries_waiting").await, 4.0, "the test's waiters still hold every place");
}
