//! A database restored under the registry: an agent never keeps a catalog of another history
//! as if it were current, even when the restored index climbs back to the one it holds.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use signpost_e2e::{Agent, AgentBuilder, Registry, RegistryBuilder, TestDb, eventually, free_port, signal};

async fn register(registry: &Registry, id: &str) {
    let body = json!({"id": id, "service": "db", "address": "10.0.0.9", "port": 5432, "ttl_s": 300});
    let response = registry.http().post(registry.at("/v1/instances")).json(&body).send().await.expect("POST");
    assert!(response.status().is_success(), "{}", response.text().await.unwrap_or_default());
}

async fn catalog(registry: &Registry) -> Value {
    registry.http().get(registry.at("/v1/catalog")).send().await.expect("GET").json().await.expect("json")
}

async fn ids_at(agent: &Agent) -> Option<BTreeSet<String>> {
    Some(agent.lookup("db").await?.into_iter().map(|(id, _)| id).collect())
}

async fn agent_sees(agent: &Agent, want: &[&str], within: Duration) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(&format!("the agent answers {want:?}"), within, || async { (ids_at(agent).await? == want).then_some(()) }).await;
}

fn pg_tool(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn dump(url: &str, file: &Path) {
    pg_tool("pg_dump", &["--format=custom", "--file", &file.display().to_string(), url]);
}

fn restore(url: &str, file: &Path) {
    pg_tool("pg_restore", &["--clean", "--if-exists", "--single-transaction", "--dbname", url, &file.display().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_takes_a_restored_catalog_whole_even_at_the_index_it_holds() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let backup = dir.path().join("backup.dump");
    let mut registry = RegistryBuilder::new(Some(&db.url)).port(free_port()).flag("read-cache-max-age", "100ms").start().await;
    // A long wait: an agent that wrongly takes its copy as current would keep it that long.
    let agent = AgentBuilder::new("watcher", &[registry.url()]).flag("catalog-wait", "60s").start().await;
    register(&registry, "x1").await;
    agent_sees(&agent, &["x1"], Duration::from_secs(20)).await;
    // The agent's announcement (which moves the index) is in the backup, not after it.
    eventually("the agent's announcement is in the catalog", Duration::from_secs(20), || async {
        catalog(&registry).await["agents"].as_array()?.iter().any(|a| a["node"] == "watcher").then_some(())
    })
    .await;
    dump(&db.url, &backup);
    register(&registry, "y1").await;
    register(&registry, "y2").await;
    agent_sees(&agent, &["x1", "y1", "y2"], Duration::from_secs(20)).await;
    let held = catalog(&registry).await["index"].as_u64().expect("index");

    // The registry is down while the backup is restored; once it is back, two registrations
    // bring the restored index back to the one the agent holds, before the agent asks again.
    signal(agent.pid(), "STOP");
    registry.kill();
    restore(&db.url, &backup);
    registry.restart().await;
    register(&registry, "z1").await;
    register(&registry, "z2").await;
    assert_eq!(catalog(&registry).await["index"].as_u64(), Some(held), "the restored index climbed back to the agent's");
    signal(agent.pid(), "CONT");
    agent_sees(&agent, &["x1", "z1", "z2"], Duration::from_secs(20)).await;

    // Restored again under the running registry: it sees its index go back, gives the
    // catalog a new epoch, and the agent takes it whole.
    let epoch = catalog(&registry).await["epoch"].as_u64().expect("epoch");
    restore(&db.url, &backup);
    agent_sees(&agent, &["x1"], Duration::from_secs(20)).await;
    // The registry notices the index going back on its own schedule (a notification or its
    // next read), which may come after the agent's answer moved.
    eventually("the registry gives the catalog a new epoch", Duration::from_secs(10), || async {
        (catalog(&registry).await["epoch"].as_u64() != Some(epoch)).then_some(())
    })
    .await;
    eventually("the agent logged the new epoch", Duration::from_secs(10), || async {
        agent.log_text().contains("new epoch").then_some(())
    })
    .await;
    assert!(registry.log_text().contains("the catalog index went back"));
}
