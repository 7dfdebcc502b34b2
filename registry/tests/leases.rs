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
        let _ = client.heartbeat(&format!("web-{i}"), &Default::default(), None).await;
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

/// Three agentless instances kept alive by TCP probes (3 s leases), and one without a check
/// that lapsed (critical) before the registry stops for 15 s, longer than every lease and than
/// `deregister_after` (5 s). Restarted, the registry removes nothing it has not seen critical
/// for 5 s: the probed ones come back passing, the lapsed one is removed no sooner than 5 s
/// after the restart.
async fn agentless_instances_survive_a_registry_outage(database_url: Option<&str>) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tcp_addr = tcp.local_addr().expect("addr").to_string();
    let accepting = tokio::spawn(async move { while tcp.accept().await.is_ok() {} });
    let port = common::free_port();
    let mut registry =
        RegistryBuilder::new(database_url).port(port).flag("deregister-after", "5s").flag("read-cache-max-age", "100ms").start().await;
    let probed = ["db-1", "db-2", "db-3"];
    for id in probed {
        register(
            &registry,
            json!({
                "id": id, "service": "db", "address": "127.0.0.1", "port": 5432, "ttl_s": 3,
                "check": {"tcp": tcp_addr, "interval": "1s", "timeout": "500ms"}
            }),
        )
        .await;
    }
    register(&registry, json!({"id": "lapsed", "service": "old", "address": "127.0.0.1", "port": 1, "ttl_s": 3})).await;
    eventually("the lapsed instance is critical and the probed ones passing", Duration::from_secs(15), || async {
        for id in probed {
            if health_of(&registry, id).await.as_deref() != Some("passing") {
                return None;
            }
        }
        (health_of(&registry, "lapsed").await.as_deref() == Some("critical")).then_some(())
    })
    .await;

    registry.kill();
    tokio::time::sleep(Duration::from_secs(15)).await;
    registry.restart().await;
    let restarted = std::time::Instant::now();

    // Every probed instance stays registered and is passing again; the lapsed one is removed,
    // but only after it has been critical for 5 s since the restart.
    let mut lapsed_gone_after = None;
    let mut back = std::collections::BTreeSet::new();
    while lapsed_gone_after.is_none() || back.len() < probed.len() {
        assert!(restarted.elapsed() < common::patience(Duration::from_secs(30)), "timed out; back: {back:?}");
        for id in probed {
            match health_of(&registry, id).await.as_deref() {
                Some("gone") => panic!("{id} was removed after the outage; registry log:\n{}", registry.log_text()),
                Some("passing") => {
                    back.insert(id);
                }
                _ => {}
            }
        }
        if lapsed_gone_after.is_none() && health_of(&registry, "lapsed").await.as_deref() == Some("gone") {
            lapsed_gone_after = Some(restarted.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone_after = lapsed_gone_after.unwrap_or_default();
    assert!(gone_after >= Duration::from_millis(4500), "the lapsed instance was removed {gone_after:?} after the restart");
    assert!(registry.log_text().contains("sweeping resumes after a gap"), "the gap is logged");
    assert!(registry.metric("signpost_registry_sweeps_total{result=\"resumed\"}").await.unwrap_or(0.0) >= 1.0);
    accepting.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentless_instances_survive_an_sqlite_registry_outage_longer_than_their_leases() {
    agentless_instances_survive_a_registry_outage(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentless_instances_survive_a_postgres_registry_outage_longer_than_their_leases() {
    let db = TestDb::create().await;
    agentless_instances_survive_a_registry_outage(Some(&db.url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_covers_a_small_fleet() {
    let db = TestDb::create().await;
    // The defaults, but for quick sweeps.
    let registry = RegistryBuilder::new(Some(&db.url))
        .flag("sweep-interval", "100ms")
        .flag("deregister-after", "1s")
        .flag("read-cache-max-age", "100ms")
        .start()
        .await;
    for i in 0..3 {
        register(&registry, instance(&format!("web-{i}"), 1)).await;
    }
    // All three stop renewing at once.
    eventually("self-preservation is on", Duration::from_secs(10), || async {
        (registry.metric("signpost_registry_self_preservation").await? == 1.0).then_some(())
    })
    .await;
    // Well past lease + grace period: the first of the three to lapse may have expired (one of
    // three is under the threshold), the other two are held, passing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all: Value = reqwest::get(registry.at("/v1/services/web?health=any")).await.expect("GET").json().await.expect("json");
    let passing = all["instances"].as_array().expect("instances").iter().filter(|i| i["health"] == "passing").count();
    assert!(passing >= 2, "a fleet of three was held: {all}");
}
