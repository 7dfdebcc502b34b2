//! Several registry processes on one PostgreSQL, and PostgreSQL stopping under a registry.

mod common;

use std::time::{Duration, Instant};

use common::{Registry, RegistryBuilder, TestDb, ThrowawayPostgres, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn replica(db: &TestDb) -> RegistryBuilder {
    RegistryBuilder::new(Some(&db.url))
        .flag("sweep-interval", "100ms")
        .flag("deregister-after", "30s")
        .flag("leader-check-interval", "200ms")
}

async fn leader_flags(replicas: &[&Registry]) -> Vec<bool> {
    let mut flags = Vec::new();
    for r in replicas {
        flags.push(r.metric("signpost_registry_leader").await == Some(1.0));
    }
    flags
}

fn instance(id: &str, ttl_s: u64) -> Value {
    json!({"id": id, "service": "web", "address": "10.0.0.1", "port": 8080, "ttl_s": ttl_s})
}

async fn register(registry: &Registry, body: &Value) -> StatusCode {
    reqwest::Client::new().post(registry.at("/v1/instances")).json(body).send().await.map(|r| r.status()).unwrap_or(StatusCode::BAD_GATEWAY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_writes_feeds_and_the_sweeper() {
    let db = TestDb::create().await;
    let a = replica(&db).start().await;
    let b = replica(&db).start().await;

    // A write through one is seen through the other.
    assert_eq!(register(&a, &instance("web-1", 300)).await, StatusCode::CREATED);
    let seen: Value = reqwest::get(b.at("/v1/instances/web-1")).await.expect("GET").json().await.expect("json");
    assert_eq!(seen["id"], "web-1");
    eventually("B's lookup shows A's write", Duration::from_secs(5), || async {
        let page: Value = reqwest::get(b.at("/v1/services/web")).await.ok()?.json().await.ok()?;
        (page["instances"].as_array()?.len() == 1).then_some(())
    })
    .await;

    // A blocked catalog query on B wakes on a write through A.
    let catalog: Value = reqwest::get(b.at("/v1/catalog")).await.expect("GET").json().await.expect("json");
    let index = catalog["index"].as_u64().expect("index");
    let waiter = {
        let url = b.at(&format!("/v1/catalog?index={index}&wait=30s"));
        tokio::spawn(async move {
            let started = Instant::now();
            let page: Value = reqwest::get(url).await.expect("GET").json().await.expect("json");
            (started.elapsed(), page)
        })
    };
    eventually("B's query is blocked", Duration::from_secs(10), || async {
        b.log_text().contains("blocking query waiting for a change").then_some(())
    })
    .await;
    assert_eq!(register(&a, &instance("web-2", 300)).await, StatusCode::CREATED);
    let (elapsed, page) = waiter.await.expect("waiter");
    assert!(elapsed < Duration::from_secs(10), "woke by A's write through NOTIFY, not by the timeout ({elapsed:?})");
    assert!(page["index"].as_u64().expect("index") > index);
    assert_eq!(page["instances"].as_array().map(Vec::len), Some(2));

    // Exactly one leader; killing it hands the sweeper to the other.
    let flags = eventually("one replica leads", Duration::from_secs(10), || async {
        let flags = leader_flags(&[&a, &b]).await;
        (flags.iter().filter(|f| **f).count() == 1).then_some(flags)
    })
    .await;
    let (mut leader, follower) = if flags[0] { (a, b) } else { (b, a) };
    leader.kill();
    eventually("the other replica takes over", Duration::from_secs(10), || async {
        (follower.metric("signpost_registry_leader").await == Some(1.0)).then_some(())
    })
    .await;
    for i in 0..5 {
        register(&follower, &instance(&format!("steady-{i}"), 300)).await;
    }
    assert_eq!(register(&follower, &instance("short", 1)).await, StatusCode::CREATED);
    eventually("the new leader's sweeper expires a lapsed lease", Duration::from_secs(10), || async {
        let body: Value = reqwest::get(follower.at("/v1/instances/short")).await.ok()?.json().await.ok()?;
        (body["health"] == "critical").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stops_and_comes_back() {
    let postgres = tokio::task::spawn_blocking(ThrowawayPostgres::start).await.expect("start PostgreSQL");
    let db = TestDb::create_on(&postgres.url()).await;
    let registry = RegistryBuilder::new(Some(&db.url)).flag("db-acquire-timeout", "1s").flag("read-cache-max-age", "200ms").start().await;
    assert_eq!(register(&registry, &instance("web-1", 300)).await, StatusCode::CREATED);
    let page: Value = reqwest::get(registry.at("/v1/catalog")).await.expect("GET").json().await.expect("json");
    let index = page["index"].as_u64().expect("an index");
    // A client blocked on the catalog when the database goes away is told at once (503)
    // rather than left waiting for a change this replica can no longer see.
    let blocked = tokio::spawn(reqwest::get(registry.at(&format!("/v1/catalog?index={index}&wait=5m"))));

    let control = postgres.control();
    tokio::task::spawn_blocking(move || control.stop()).await.expect("stop PostgreSQL");
    let answered = tokio::time::timeout(common::patience(Duration::from_secs(15)), blocked)
        .await
        .expect("the blocked query is answered within seconds, not after its 5m wait")
        .expect("the task")
        .expect("an answer");
    assert_eq!(answered.status(), StatusCode::SERVICE_UNAVAILABLE);
    let again = reqwest::get(registry.at(&format!("/v1/catalog?index={index}&wait=5m"))).await.expect("GET");
    assert_eq!(again.status(), StatusCode::SERVICE_UNAVAILABLE, "a new blocking query does not wait either");
    eventually("readyz answers 503", Duration::from_secs(15), || async {
        let response = reqwest::get(registry.at("/readyz")).await.ok()?;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let refused = reqwest::Client::new().post(registry.at("/v1/instances")).json(&instance("web-2", 300)).send().await.expect("POST");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"), "a 503 says when to come back");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"], "unavailable");
    assert_eq!(reqwest::get(registry.at("/healthz")).await.expect("GET").status(), StatusCode::OK, "the process itself is alive");

    let control = postgres.control();
    tokio::task::spawn_blocking(move || control.start()).await.expect("start PostgreSQL again");
    eventually("readyz recovers without a restart", Duration::from_secs(30), || async {
        let response = reqwest::get(registry.at("/readyz")).await.ok()?;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    eventually("writes work again", Duration::from_secs(30), || async {
        (register(&registry, &instance("web-2", 300)).await == StatusCode::CREATED).then_some(())
    })
    .await;
    let page: Value = reqwest::get(registry.at("/v1/services/web")).await.expect("GET").json().await.expect("json");
    let ids: Vec<&str> = page["instances"].as_array().expect("instances").iter().filter_map(|i| i["id"].as_str()).collect();
    assert_eq!(ids, ["web-1", "web-2"], "nothing stored before the outage was lost");
    drop(registry);
    drop(db);
    drop(postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_cleanly_releases_its_lock_at_once() {
    let db = TestDb::create().await;
    let a = replica(&db).start().await;
    let b = replica(&db).start().await;
    let flags = eventually("one replica leads", Duration::from_secs(10), || async {
        let flags = leader_flags(&[&a, &b]).await;
        (flags.iter().filter(|f| **f).count() == 1).then_some(flags)
    })
    .await;
    let (mut leader, follower) = if flags[0] { (a, b) } else { (b, a) };
    assert_eq!(leader.terminate(Duration::from_secs(10)).await, Some(0));
    assert!(leader.log_text().contains("released the leader lock"), "{}", leader.log_text());
    eventually("the other replica takes over", Duration::from_secs(5), || async {
        (follower.metric("signpost_registry_leader").await == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_fails_over_to_the_next_registry() {
    let db = TestDb::create().await;
    let live = replica(&db).start().await;
    // Nothing listens on the first URL.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let mut config = signpost_shared::client::ClientConfig::new(vec![dead.parse().expect("url"), live.url().parse().expect("url")]);
    config.retries = 1;
    let client = signpost_shared::client::RegistryClient::new(config).expect("client");
    let registration: signpost_shared::Registration = serde_json::from_value(instance("web-1", 300)).expect("registration");
    let (registered, created) = client.register(&registration).await.expect("registered through the second URL");
    assert!(created);
    assert_eq!(registered.id, "web-1");
    assert_eq!(client.current_url().as_str().trim_end_matches('/'), live.url(), "later calls start at the registry that answered");
    let missing = client.heartbeat("nope", &Default::default(), None).await.expect_err("unknown instance");
    assert!(missing.is_not_found(), "a 404 is not retried and tells the caller to register again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_started_before_its_database_is_alive_at_once_and_serves_when_it_comes() {
    let postgres = tokio::task::spawn_blocking(ThrowawayPostgres::start).await.expect("start PostgreSQL");
    let control = postgres.control();
    tokio::task::spawn_blocking(move || control.stop()).await.expect("stop PostgreSQL");
    common::binary("signpost-registry"); // built before the clock starts
    let port = common::free_port();
    let url = postgres.url();
    // `start` returns once the registry logs `listening`, after its migrations.
    let starting = tokio::spawn(async move { RegistryBuilder::new(Some(&url)).port(port).start().await });
    let at = |path: &str| format!("http://127.0.0.1:{port}{path}");
    eventually("/healthz answers while the database is down", Duration::from_secs(30), || async {
        reqwest::get(at("/healthz")).await.ok().filter(|r| r.status() == StatusCode::OK).map(|_| ())
    })
    .await;
    for path in ["/readyz", "/v1/services", "/v1/catalog", "/metrics"] {
        let response = reqwest::get(at(path)).await.expect("GET");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path} before the database is there");
    }
    let refused = reqwest::Client::new().post(at("/v1/instances")).json(&instance("web-1", 300)).send().await.expect("POST");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"), "a 503 says when to come back");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"], "starting");

    let control = postgres.control();
    tokio::task::spawn_blocking(move || control.start()).await.expect("start PostgreSQL");
    let registry = tokio::time::timeout(common::patience(Duration::from_secs(60)), starting)
        .await
        .expect("the registry migrates and serves once the database is there")
        .expect("the start task");
    assert_eq!(reqwest::get(registry.at("/readyz")).await.expect("GET").status(), StatusCode::OK);
    assert_eq!(register(&registry, &instance("web-1", 300)).await, StatusCode::CREATED);
    drop(registry);
    drop(postgres);
}

/// Whether `faketime` (Debian's package of that name, installed by scripts/test) is here.
fn faketime_installed() -> bool {
    std::process::Command::new("faketime").arg("--help").output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_is_ten_minutes_ahead_stamps_and_sweeps_by_the_databases_clock() {
    if !faketime_installed() {
        assert!(std::env::var_os("SIGNPOST_TEST_REQUIRE_TOOLS").is_none(), "faketime is missing (scripts/test installs it)");
        eprintln!("skipped: faketime is not installed (apt-get install faketime)");
        return;
    }
    let db = TestDb::create().await;
    // The leading replica's clock is 10 minutes ahead; the other's is right.
    let ahead = replica(&db).wrapped(&["faketime", "-f", "+10m"]).start().await;
    eventually("the replica that is ahead leads", Duration::from_secs(10), || async {
        (ahead.metric("signpost_registry_leader").await? == 1.0).then_some(())
    })
    .await;
    let right = replica(&db).start().await;
    let skew = |instance: &Value| {
        let lease = instance["lease_expires_at"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        lease.map(|lease| (lease.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds())
    };

    // Stamped by the replica that is ahead: a lease of 30 s runs 30 s, not 10 min and 30 s.
    let stamped: Value = reqwest::Client::new()
        .post(ahead.at("/v1/instances"))
        .json(&instance("stamped", 30))
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    let left = skew(&stamped).expect("a lease");
    assert!((20..=40).contains(&left), "the lease ends {left} s from now: {stamped}");

    // Renewed through the replica that is right, every second, with a lease of 5 s: the
    // leader that is ahead never takes it for lapsed.
    assert_eq!(register(&right, &instance("renewed", 5)).await, StatusCode::CREATED);
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let beat = client.put(right.at("/v1/instances/renewed/heartbeat")).json(&json!({})).send().await.expect("PUT");
        let instance: Value = beat.json().await.expect("json");
        assert_eq!(instance["health"], "passing", "renewed every second, yet: {instance}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(ahead.metric("signpost_registry_leases_expired_total").await, Some(0.0), "the leader expired a live lease");
}
