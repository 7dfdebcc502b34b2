//! An agent's heartbeats are independent: one instance whose renewal hangs at the registry
//! (its row is locked in the database) delays no other instance's lease.

use std::time::{Duration, Instant};

use serde_json::Value;
use signpost_e2e::{AgentBuilder, Registry, RegistryBuilder, TestDb, eventually};
use sqlx::Connection;

async fn instance(registry: &Registry, id: &str) -> Option<Value> {
    registry.http().get(registry.at(&format!("/v1/instances/{id}"))).send().await.ok()?.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_hangs_delays_no_other_lease() {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).flag("sweep-interval", "200ms").start().await;
    // Leases of 3 s, renewed every second.
    let agent = AgentBuilder::new("node-a", &[registry.url()]).flag("service", "alpha:8081").flag("lease-ttl-s", "3").start().await;
    for (name, port) in [("beta", 8082), ("gamma", 8083)] {
        let added = reqwest::Client::new()
            .post(agent.at("/v1/agent/services"))
            .json(&serde_json::json!({"name": name, "port": port}))
            .send()
            .await
            .expect("POST");
        assert!(added.status().is_success(), "{}", added.text().await.unwrap_or_default());
    }
    let (stuck, others) = ("node-a-alpha-8081", ["node-a-beta-8082", "node-a-gamma-8083"]);
    for id in std::iter::once(stuck).chain(others) {
        eventually("every instance is passing at the registry", Duration::from_secs(20), || async {
            (instance(&registry, id).await?["health"] == "passing").then_some(())
        })
        .await;
    }

    // The first instance's row is locked: its renewal waits in the database.
    let mut conn = sqlx::postgres::PgConnection::connect(&db.url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SELECT id FROM instances WHERE id = $1 FOR UPDATE").bind(stuck).fetch_one(&mut *tx).await.expect("lock the row");

    // For three leases' time, the other two stay passing and keep being renewed.
    let leases = |value: &Value| value["lease_expires_at"].as_str().map(str::to_string);
    let mut renewed = [0usize; 2];
    let mut last: [Option<String>; 2] = [None, None];
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        for (i, id) in others.iter().enumerate() {
            let now = instance(&registry, id).await.expect("the instance");
            assert_eq!(now["health"], "passing", "{id} lapsed while another instance's heartbeat hung: {now}");
            let lease = leases(&now);
            if lease != last[i] {
                renewed[i] += 1;
                last[i] = lease;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(renewed.iter().all(|n| *n >= 5), "each lease was renewed about every second: {renewed:?}");

    tx.rollback().await.expect("unlock");
    eventually("the stuck instance is renewed again", Duration::from_secs(15), || async {
        (instance(&registry, stuck).await?["health"] == "passing").then_some(())
    })
    .await;
}
