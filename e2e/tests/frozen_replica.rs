//! One registry replica frozen (SIGSTOP: a stalled VM, a paused container, a long GC-like
//! stall) while it holds the catalog's row lock must not stop the other replicas' writes: every
//! write takes that one lock to its commit. Two replicas on one PostgreSQL, registrations
//! pouring through A, A frozen while PostgreSQL shows it inside a transaction (the lock held);
//! then registrations through B must each succeed within a few seconds (retrying a 503 as
//! clients do), and once A resumes it serves again and nothing any replica acknowledged is lost.
//! docs/operations.md, "What happens in each failure".

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use signpost_e2e::{Registry, RegistryBuilder, TestDb, eventually, patience, signal};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// Concurrent registration loops through replica A.
const LOAD_TASKS: usize = 24;
/// Concurrent clients registering through replica B while A is frozen, and how many each.
const B_CLIENTS: usize = 8;
const B_EACH: usize = 5;
/// The user-visible promise: a registration through a replica that is not frozen succeeds
/// within this, retrying 503s (docs/operations.md).
const BOUND: Duration = Duration::from_secs(10);
/// How long the test lets one registration through B try before it calls it hung.
const GIVE_UP: Duration = Duration::from_secs(25);

fn instance(id: &str) -> Value {
    json!({"id": id, "service": "load", "address": "10.0.0.1", "port": 8080, "ttl_s": 600})
}

/// Registers `id` through `registry` once; the status, or None when no answer came in `timeout`.
async fn register_once(client: &reqwest::Client, registry: &str, id: &str, timeout: Duration) -> Option<u16> {
    let sent = client.post(format!("{registry}/v1/instances")).json(&instance(id)).timeout(timeout).send().await;
    sent.ok().map(|r| r.status().as_u16())
}

/// A session of this test's database stuck inside a transaction that wrote (it bumped the
/// change index, so it holds the `catalog_state` row lock) for a while: the frozen replica's.
async fn lock_held_by_a_stuck_session(db: &mut PgConnection) -> bool {
    let stuck: Result<i64, _> = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND state = 'idle in transaction' AND backend_xid IS NOT NULL AND now() - state_change > interval '300 milliseconds'",
    )
    .fetch_one(db)
    .await;
    stuck.is_ok_and(|n| n > 0)
}

/// Every instance id `registry`'s catalog holds.
async fn catalog_ids(registry: &Registry) -> Option<BTreeSet<String>> {
    let page: Value = reqwest::get(registry.at("/v1/catalog")).await.ok()?.json().await.ok()?;
    Some(page["instances"].as_array()?.iter().filter_map(|i| i["id"].as_str().map(str::to_string)).collect())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_holding_the_index_lock_does_not_stop_the_other_replicas_writes() {
    let db = TestDb::create().await;
    let a = RegistryBuilder::new(Some(&db.url)).start().await;
    let b = RegistryBuilder::new(Some(&db.url)).start().await;
    let mut watch = PgConnection::connect(&db.url).await.expect("connect to the test database");

    // Registrations pour through A: each loop registers new ids, one after the other.
    let stop = Arc::new(AtomicBool::new(false));
    let acked_by_a = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for task in 0..LOAD_TASKS {
        let (stop, acked, url) = (stop.clone(), acked_by_a.clone(), a.url());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("a-{task}-{n}");
                n += 1;
                if matches!(register_once(&client, &url, &id, Duration::from_secs(3)).await, Some(200 | 201)) {
                    acked.lock().expect("acks").push(id);
                }
            }
        }));
    }
    eventually("registrations through A go through", Duration::from_secs(30), || async {
        (acked_by_a.lock().expect("acks").len() >= 2 * LOAD_TASKS).then_some(())
    })
    .await;

    // Freeze A at a moment it holds the lock: stop it, and look whether PostgreSQL shows one of
    // its sessions inside a transaction that bumped the index; if not, let it run and try again.
    let mut frozen = false;
    for _ in 0..40 {
        signal(a.pid(), "STOP");
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && !frozen {
            frozen = lock_held_by_a_stuck_session(&mut watch).await;
            if !frozen {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if frozen {
            break;
        }
        signal(a.pid(), "CONT");
        // Let the load go on for a moment (a pace, not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 200)).await;
    }
    assert!(frozen, "could not catch replica A holding the index lock in 40 tries");
    stop.store(true, Ordering::Relaxed);
    eprintln!("replica A frozen while it holds the catalog_state row lock");

    // Registrations through B, while A stays frozen: each retried on 503 (as the agents'
    // client does) until it succeeds or the test gives up on it.
    let mut clients = Vec::new();
    for c in 0..B_CLIENTS {
        let url = b.url();
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut outcomes = Vec::new();
            for n in 0..B_EACH {
                let id = format!("b-{c}-{n}");
                let started = Instant::now();
                let mut unavailable = 0;
                let done = loop {
                    let left = GIVE_UP.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        break None;
                    }
                    match register_once(&client, &url, &id, left).await {
                        Some(200 | 201) => break Some(started.elapsed()),
                        Some(503) => {
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Some(other) => panic!("registering {id} through B answered {other}"),
                        None => break None,
                    }
                };
                outcomes.push((id, done, unavailable));
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.expect("a client through B"));
    }
    let hung: Vec<&String> = outcomes.iter().filter(|(_, done, _)| done.is_none()).map(|(id, _, _)| id).collect();
    let mut latencies: Vec<Duration> = outcomes.iter().filter_map(|(_, done, _)| *done).collect();
    latencies.sort();
    let retried: usize = outcomes.iter().map(|(_, _, n)| n).sum();
    let (p50, p99, max) = if latencies.is_empty() {
        (GIVE_UP, GIVE_UP, GIVE_UP)
    } else {
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99), *latencies.last().expect("one"))
    };
    eprintln!(
        "registrations through B while A is frozen: {} done, {} hung past {GIVE_UP:?}; p50 {p50:?}, p99 {p99:?}, max {max:?}; \
         {retried} answers were 503",
        latencies.len(),
        hung.len()
    );
    assert!(hung.is_empty(), "registrations through B hung past {GIVE_UP:?} while A was frozen: {hung:?}");
    assert!(p99 <= patience(BOUND), "p99 of registrations through B while A is frozen is {p99:?}, over {BOUND:?}");

    // A resumes: it serves writes again, and every acknowledged registration is there.
    signal(a.pid(), "CONT");
    for task in load {
        task.await.expect("a load task");
    }
    let client = reqwest::Client::new();
    eventually("A registers again after it resumes", Duration::from_secs(30), || async {
        matches!(register_once(&client, &a.url(), "a-after", Duration::from_secs(5)).await, Some(200 | 201)).then_some(())
    })
    .await;
    let mut acked: BTreeSet<String> = acked_by_a.lock().expect("acks").iter().cloned().collect();
    acked.extend(outcomes.into_iter().map(|(id, _, _)| id));
    acked.insert("a-after".into());
    for replica in [&a, &b] {
        eventually(&format!("replica {} holds every acknowledged registration", replica.addr), Duration::from_secs(30), || async {
            let ids = catalog_ids(replica).await?;
            acked.is_subset(&ids).then_some(())
        })
        .await;
    }
    assert_eq!(reqwest::get(a.at("/readyz")).await.expect("readyz").status(), 200, "A is ready again");
    eprintln!("{} acknowledged registrations, none lost", acked.len());
}
