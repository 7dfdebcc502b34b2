//! The registry's database in trouble, on the real binary: the start window (no database yet)
//! answers 503 `starting` with `Retry-After`; a missing `catalog_state` row is recreated above
//! every stored change instead of stopping the start; a database dropped and created again
//! under a running registry answers 503 (never 500) and then serves again without a restart;
//! `/readyz` shares one database check per second among its callers and keeps the database's
//! details (host, user, database) in the log. docs/operations.md, "What happens in each failure".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use signpost_e2e::postgres::server_url;
use signpost_e2e::{RegistryBuilder, TestDb, binary, eventually, free_port};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

fn instance(id: &str) -> Value {
    json!({"id": id, "service": "web", "address": "10.0.0.1", "port": 8080, "ttl_s": 600})
}

async fn register(url: &str, id: &str) -> Option<u16> {
    let response = reqwest::Client::new().post(format!("{url}/v1/instances")).json(&instance(id)).send().await.ok()?;
    Some(response.status().as_u16())
}

/// The catalog's change index as a replica answers it.
async fn catalog_index(url: &str) -> Option<u64> {
    let page: Value = reqwest::get(format!("{url}/v1/catalog")).await.ok()?.json().await.ok()?;
    page["index"].as_u64()
}

/// The name of the test database, the last segment of its URL.
fn database_name(db: &TestDb) -> String {
    db.url.rsplit('/').next().expect("a database name").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_window_answers_503_starting_with_retry_after() {
    binary("signpost-registry"); // built before the clock starts
    let port = free_port();
    // Nothing listens there: the registry waits for its database for as long as the test runs.
    let nowhere = format!("postgres://signpost@127.0.0.1:{}/signpost", free_port());
    // `start` returns only once the registry logs `listening`, after its migrations: never here.
    let starting = tokio::spawn(async move { RegistryBuilder::new(Some(&nowhere)).port(port).start().await });
    let at = |path: &str| format!("http://127.0.0.1:{port}{path}");
    eventually("/healthz answers while the database is not there", Duration::from_secs(30), || async {
        reqwest::get(at("/healthz")).await.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    let client = reqwest::Client::new();
    let requests = [
        client.get(at("/readyz")),
        client.get(at("/v1/services")),
        client.get(at("/v1/services/web?index=3&wait=10s")),
        client.get(at("/v1/catalog")),
        client.get(at("/v1/instances/web-1")),
        client.get(at("/metrics")),
        client.post(at("/v1/instances")).json(&instance("web-1")),
        client.put(at("/v1/instances/web-1/heartbeat")).json(&json!({})),
    ];
    for request in requests {
        let response = request.send().await.expect("an answer");
        let what = format!("{} {}", response.status(), response.url().path());
        assert_eq!(response.status(), 503, "{what}");
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
        let body: Value = response.json().await.expect("the contract's error body");
        assert_eq!(body["error"], "starting", "{what}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| m.contains("starting") && m.contains("database")), "{what}: {body}");
        assert!(retry_after.is_some_and(|s| s >= 1), "{what}: Retry-After is {retry_after:?}");
    }
    starting.abort(); // drops the process (killed) with the task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_catalog_state_row_is_recreated_above_every_stored_change() {
    let db = TestDb::create().await;
    let mut first = RegistryBuilder::new(Some(&db.url)).start().await;
    for id in ["web-1", "web-2", "web-3"] {
        assert_eq!(register(&first.url(), id).await, Some(201));
    }
    assert_eq!(first.terminate(Duration::from_secs(10)).await, Some(0));

    // The row goes missing (deleted by hand, a partial restore) while the registry is down.
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    sqlx::query("DELETE FROM catalog_state").execute(&mut conn).await.expect("delete the row");
    let stored: i64 = sqlx::query_scalar(
        "SELECT GREATEST((SELECT COALESCE(MAX(change_index), 0) FROM instances), (SELECT COALESCE(MAX(change_index), 0) FROM agents))",
    )
    .fetch_one(&mut conn)
    .await
    .expect("the highest stored change");
    let stored = u64::try_from(stored).expect("an index");

    // It starts (before: exit with "no rows returned by a query"), says so, and its index is
    // above every stored change, so no follower's index is ever repeated.
    let registry = RegistryBuilder::new(Some(&db.url)).start().await;
    assert!(registry.log_text().contains("catalog_state row was missing"), "{}", registry.log_text());
    let index = catalog_index(&registry.url()).await.expect("the catalog");
    assert!(index > stored, "the recreated index {index} is not above the highest stored change {stored}");
    assert_eq!(register(&registry.url(), "web-4").await, Some(201));
    let after = catalog_index(&registry.url()).await.expect("the catalog");
    assert!(after > index, "a registration moves the index on: {index} → {after}");

    // The row goes missing under the running registry: writes answer 503 (never 500) until the
    // poller recreates it, then succeed, and the index stays above what was stored.
    sqlx::query("DELETE FROM catalog_state").execute(&mut conn).await.expect("delete the row again");
    let mut n = 0;
    eventually("registrations succeed again", Duration::from_secs(30), || {
        n += 1;
        let id = format!("late-{n}");
        let url = registry.url();
        async move {
            let status = register(&url, &id).await?;
            assert!(status == 201 || status == 503, "registering {id} while the row is missing answered {status}");
            (status == 201).then_some(())
        }
    })
    .await;
    let last = catalog_index(&registry.url()).await.expect("the catalog");
    assert!(last > after, "the index went back to {last} below {after}");
    let _ = conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_dropped_and_created_again_answers_503_then_serves_without_a_restart() {
    let db = TestDb::create().await;
    let name = database_name(&db);
    let mut registry = RegistryBuilder::new(Some(&db.url)).start().await;
    let pid = registry.pid();
    assert_eq!(register(&registry.url(), "web-1").await, Some(201));

    // Requests keep coming throughout; every answer is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<BTreeMap<(String, u16), usize>>> = Arc::default();
    let hammer = {
        let (stop, seen, url) = (stop.clone(), seen.clone(), registry.url());
        tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let requests = [
                    ("GET /v1/instances/web-1", client.get(format!("{url}/v1/instances/web-1"))),
                    ("POST /v1/instances", client.post(format!("{url}/v1/instances")).json(&instance(&format!("web-x{n}")))),
                    ("GET /v1/services/web", client.get(format!("{url}/v1/services/web"))),
                    ("GET /v1/catalog", client.get(format!("{url}/v1/catalog"))),
                    ("PUT heartbeat", client.put(format!("{url}/v1/instances/web-1/heartbeat")).json(&json!({}))),
                ];
                for (what, request) in requests {
                    if let Ok(response) = request.send().await {
                        *seen.lock().expect("seen").entry((what.to_string(), response.status().as_u16())).or_default() += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let statuses = |code: u16| seen.lock().expect("seen").iter().filter(|((_, s), _)| *s == code).map(|(_, n)| n).sum::<usize>();

    let mut admin = PgConnection::connect(&server_url()).await.expect("connect to the server");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut admin).await.expect("drop");
    eventually("requests answer 503 while the database is gone", Duration::from_secs(30), || async { (statuses(503) > 0).then_some(()) })
        .await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.expect("create it again, empty");
    let _ = admin.close().await;
    let created_at = Instant::now();

    let mut n = 0;
    eventually("the registry serves the new, empty database", Duration::from_secs(30), || {
        n += 1;
        let (id, url) = (format!("web-new-{n}"), registry.url());
        let errors = statuses(500);
        async move {
            assert_eq!(errors, 0, "requests answered 500 after the database was created again");
            (register(&url, &id).await? == 201).then_some(())
        }
    })
    .await;
    eprintln!("serving again {:?} after the database was created again", created_at.elapsed());
    stop.store(true, Ordering::Relaxed);
    hammer.await.expect("the request loop");
    let seen = seen.lock().expect("seen").clone();
    eprintln!("answers while the database was dropped and created again: {seen:?}");
    assert_eq!(statuses(500), 0, "answers with 500: {seen:?}");
    assert!(seen.keys().all(|(_, s)| *s < 500 || *s == 503), "answers other than 503 among the 5xx: {seen:?}");
    // The database is the new, empty one: what was in the old one is gone, until re-registered.
    let old = reqwest::get(registry.at("/v1/instances/web-1")).await.expect("GET");
    assert_eq!(old.status(), 404);
    assert!(registry.is_running() && registry.pid() == pid, "the same process serves (no restart)");
    assert!(registry.log_text().contains("running the migrations again"), "{}", registry.log_text());
    assert_eq!(reqwest::get(registry.at("/readyz")).await.expect("readyz").status(), 200);
}

/// A role of the test's own on the shared server, dropped (after its database) when dropped.
struct Role(String);

impl Drop for Role {
    fn drop(&mut self) {
        let (server, name) = (server_url(), self.0.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&server).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {name}"))).execute(&mut conn).await.ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("could not drop test role {}", self.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_shares_one_check_per_second_and_keeps_the_database_details_in_the_log() {
    // A role of its own owns the test database, so that the registry's URL names a user that
    // can be told apart in an answer. Declared first: dropped after the database.
    let role = Role(format!("signpost_probe_{:012x}", rand::random::<u64>() >> 16));
    let db = TestDb::create().await;
    let name = database_name(&db);
    let mut admin = PgConnection::connect(&server_url()).await.expect("connect to the server");
    for sql in [format!("CREATE ROLE {} LOGIN", role.0), format!("ALTER DATABASE {name} OWNER TO {}", role.0)] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.expect("set up the role");
    }
    let mut url = reqwest::Url::parse(&db.url).expect("the database URL");
    url.set_username(&role.0).expect("a user name");
    let host = url.host_str().expect("a host").to_string();
    let registry = RegistryBuilder::new(Some(url.as_str())).start().await;
    assert_eq!(reqwest::get(registry.at("/readyz")).await.expect("readyz").status(), 200);

    // The database turns the registry away: its role may no longer log in, its sessions end.
    for sql in [
        format!("ALTER ROLE {} NOLOGIN", role.0),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'", role.0),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.expect("turn the registry away");
    }
    let _ = admin.close().await;
    let body = eventually("/readyz answers 503", Duration::from_secs(30), || async {
        let response = reqwest::get(registry.at("/readyz")).await.ok()?;
        if response.status() != 503 {
            return None;
        }
        let retry_after = response.headers().contains_key("retry-after");
        Some((response.text().await.ok()?, retry_after))
    })
    .await;
    let (body, retry_after) = body;
    for secret in [role.0.as_str(), name.as_str(), host.as_str()] {
        assert!(!body.contains(secret), "/readyz tells anyone `{secret}`: {body}");
    }
    let parsed: Value = serde_json::from_str(&body).expect("the contract's error body");
    assert_eq!(parsed["error"], "unavailable", "{body}");
    assert!(retry_after, "a 503 says when to come back");
    // The operator finds the reason in the log.
    eventually("the log says why the registry is not ready", Duration::from_secs(10), || async {
        let log = registry.log_text();
        (log.contains("not ready") && log.contains(&role.0)).then_some(())
    })
    .await;

    // Many probes at once and in a row share one check per second.
    let checks = "signpost_registry_readiness_checks_total";
    let before = registry.metric(checks).await.expect("the readiness check counter");
    let started = Instant::now();
    let mut together = Vec::new();
    for _ in 0..50 {
        let url = registry.at("/readyz");
        together.push(tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()).ok() }));
    }
    let mut answers = Vec::new();
    for probe in together {
        answers.push(probe.await.expect("a probe"));
    }
    // Then one after the other for a few seconds, past the cached answer's second.
    let client = reqwest::Client::new();
    while started.elapsed() < Duration::from_millis(2500) {
        answers.push(client.get(registry.at("/readyz")).send().await.map(|r| r.status().as_u16()).ok());
    }
    let elapsed = started.elapsed();
    let after = registry.metric(checks).await.expect("the readiness check counter");
    assert!(answers.iter().all(|a| *a == Some(503)), "every probe answers 503: {answers:?}");
    let ran = after - before;
    let allowed = elapsed.as_secs_f64().ceil() + 1.0;
    eprintln!("{} probes in {elapsed:?} ran {ran} database checks", answers.len());
    assert!(ran <= allowed, "{} probes in {elapsed:?} ran {ran} database checks (at most {allowed})", answers.len());
    assert!(ran >= 1.0, "the database is checked again once the cached answer is a second old");
}
