//! Leases and probes end to end: the built binary sweeping and probing with short timings.

mod common;

use std::time::Duration;

use common::{Registry, RegistryBuilder, TestDb, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

async fn fast_registry(db: &TestDb) -> Registry {
    RegistryBuilder::new(Some(&db.url))
        .flag("sweep-interval", "100ms")
        .flag("deregister-after", "1s")
        .flag("read-cache-max-age", "100ms")
        .start()
        .await
}

async fn register(registry: &Registry, body: Value) {
    let response = reqwest::Client::new().post(registry.at("/v1/instances")).json(&body).send().await.expect("POST");
    assert!(response.status().is_success(), "{}", response.text().await.unwrap_or_default());
}

async fn health_of(registry: &Registry, id: &str) -> Option<String> {
    let response = reqwest::get(registry.at(&format!("/v1/instances/{id}"))).await.ok()?;
    if response.status() == StatusCode::NOT_FOUND {
        return Some("gone".into());
    }
    let body: Value = response.json().await.ok()?;
    body["health"].as_str().map(str::to_string)
}

fn instance(id: &str, ttl_s: u64) -> Value {
    json!({"id": id, "service": "web", "address": "10.0.0.1", "port": 8080, "ttl_s": ttl_s})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_turns_critical_then_the_instance_is_removed() {
    let db = TestDb::create().await;
    let registry = fast_registry(&db).await;
    for i in 0..6 {
        register(&registry, instance(&format!("steady-{i}"), 300)).await;
    }
    register(&registry, instance("short", 1)).await;
    eventually("the lapsed instance is critical", Duration::from_secs(10), || async {
        (health_of(&registry, "short").await.as_deref() == Some("critical")).then_some(())
    })
    .await;
    let healthy: Value = reqwest::get(registry.at("/v1/services/web")).await.expect("GET").json().await.expect("json");
    assert_eq!(healthy["instances"].as_array().map(Vec::len), Some(6), "critical instances leave the healthy answer");
    eventually("the lapsed instance is deregistered", Duration::from_secs(10), || async {
        (health_of(&registry, "short").await.as_deref() == Some("gone")).then_some(())
    })
    .await;
    for i in 0..6 {
        assert_eq!(health_of(&registry, &format!("steady-{i}")).await.as_deref(), Some("passing"));
    }
    // The sweeper counts after its transaction commits: a moment after the effect shows.
    for counter in ["signpost_registry_leases_expired_total", "signpost_registry_instances_removed_total"] {
        eventually(counter, Duration::from_secs(10), || async { (registry.metric(counter).await? >= 1.0).then_some(()) }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_holds_the_catalog_when_most_leases_lapse_at_once() {
    let db = TestDb::create().await;
    // With a threshold of 0.3, at most 3 of the 10 can expire before the sweeper holds, however
    // the lapses fall between sweeps.
    let registry = RegistryBuilder::new(Some(&db.url))
        .flag("sweep-interval", "100ms")
        .flag("deregister-after", "1s")
        .flag("read-cache-max-age", "100ms")
        .flag("self-preservation-threshold", "0.3")
        .start()
        .await;
    register(&registry, instance("steady", 300)).await;
    let client = registry.client();
    for i in 0..9 {
        register(&registry, instance(&format!("web-{i}"), 2)).await;
    }
    // Heartbeats stop for nine of ten instances at once, as when the registry is cut off.
    eventually("self-preservation is on", Duration::from_secs(10), || async {
        client.services().await.ok().filter(|page| page.self_preservation).map(|_| ())
    })
    .await;
    assert_eq!(registry.metric("signpost_registry_self_preservation").await, Some(1.0));
    eventually("self-preservation is logged", Duration::from_secs(10), || async {
        registry.log_text().contains("self-preservation").then_some(())
    })
    .await;
    // Well past lease + grace period, the held instances are still there and healthy. At
    // most the first three to lapse (while under the threshold) were expired.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let all: Value = reqwest::get(registry.at("/v1/services/web?health=any")).await.expect("GET").json().await.expect("json");
    let instances = all["instances"].as_array().expect("instances");
    let passing = instances.iter().filter(|i| i["health"] == "passing").count();
    assert!(passing >= 7, "the fleet was held: {passing} passing of {}", instances.len());
    // Heartbeats resume: self-preservation ends, and it expires leases again.
    for i in 0..9 {
        let _ = client.heartbeat(&format!("web-{i}"), &Default::default()).await;
    }
    eventually("self-preservation is off", Duration::from_secs(10), || async {
        client.services().await.ok().filter(|page| !page.self_preservation).map(|_| ())
    })
    .await;
}

/// A tiny HTTP server answering 200 until dropped.
async fn http_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
            });
        }
    });
    (addr.to_string(), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_mark_a_stopped_agentless_instance_critical_then_remove_it() {
    let db = TestDb::create().await;
    let registry = fast_registry(&db).await;
    for i in 0..6 {
        register(&registry, instance(&format!("steady-{i}"), 300)).await;
    }
    let (http_addr, http_task) = http_server().await;
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tcp_addr = tcp.local_addr().expect("addr").to_string();
    register(
        &registry,
        json!({
            "id": "api-1", "service": "api", "address": "127.0.0.1", "port": 1, "ttl_s": 2,
            "check": {"http": format!("http://{http_addr}/health"), "interval": "200ms", "timeout": "200ms"}
        }),
    )
    .await;
    register(
        &registry,
        json!({
            "id": "db-1", "service": "db", "address": "127.0.0.1", "port": 1, "ttl_s": 2,
            "check": {"tcp": tcp_addr, "interval": "200ms", "timeout": "200ms"}
        }),
    )
    .await;
    // Probes keep the leases alive well past their 2 s.
    eventually("the HTTP probe reported", Duration::from_secs(10), || async {
        let body: Value = reqwest::get(registry.at("/v1/instances/api-1")).await.ok()?.json().await.ok()?;
        body["output"].as_str().filter(|o| o.contains("200")).map(|_| ())
    })
    .await;
    eventually("the TCP probe reported", Duration::from_secs(10), || async {
        let body: Value = reqwest::get(registry.at("/v1/instances/db-1")).await.ok()?.json().await.ok()?;
        body["output"].as_str().filter(|o| o.contains("success")).map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(health_of(&registry, "api-1").await.as_deref(), Some("passing"), "probes renewed the lease");
    // The services stop answering.
    http_task.abort();
    drop(tcp);
    eventually("both stopped instances are critical", Duration::from_secs(10), || async {
        let api = health_of(&registry, "api-1").await;
        let db = health_of(&registry, "db-1").await;
        (api.as_deref() == Some("critical") && db.as_deref() == Some("critical")).then_some(())
    })
    .await;
    for id in ["api-1", "db-1"] {
        eventually("the stopped instance is removed", Duration::from_secs(15), || async {
            (health_of(&registry, id).await.as_deref() == Some("gone")).then_some(())
        })
        .await;
    }
    assert!(registry.metric("signpost_registry_probes_total{result=\"critical\"}").await.unwrap_or(0.0) >= 1.0);
}
