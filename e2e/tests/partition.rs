//! A network partition: five agents, each on a host of its own (a network namespace with a
//! link to a switch), and the registry on PostgreSQL behind the same switch. One host's link is
//! cut, so it hears neither its peers nor the registry; then the link comes back.
//!
//! What the rest of the cluster does: the cut-off agent is dead to every peer within the
//! failure detector's bound, so its instance leaves every healthy answer, and nothing else
//! moves; the registry's lease of that instance runs out. What the cut-off agent does: it keeps
//! answering from its cache, holds every peer dead (so it names only its own instance healthy)
//! and says how stale its registry copy is. Healed, everything converges back.
//!
//! Needs root (network namespaces); without it the test says so and checks nothing else.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use signpost_e2e::netns::Network;
use signpost_e2e::watch::Watcher;
use signpost_e2e::{Agent, AgentBuilder, RegistryBuilder, TestDb, eventually, patience};

const HOSTS: usize = 5;
/// The failure detector's bound, as in the fault suite and docs/operations.md.
const DEAD_AGENT_BOUND: Duration = Duration::from_secs(5);

fn id(i: usize) -> String {
    format!("node-{i}-web-8080")
}

/// Waits until `agent` answers exactly `healthy` as the healthy instances of `web`.
async fn answers(agent: &Agent, healthy: &BTreeSet<String>, within: Duration) {
    eventually(&format!("{} answers {healthy:?} healthy", agent.node), within, || async {
        let body: Value = agent.get("/v1/services/web").await?.json().await.ok()?;
        let found: BTreeSet<String> = body["instances"].as_array()?.iter().filter_map(|i| i["id"].as_str().map(str::to_string)).collect();
        (&found == healthy).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_is_dead_to_the_rest_and_rejoins_when_healed() {
    let network = match Network::create(HOSTS) {
        Ok(network) => network,
        Err(why) => {
            eprintln!("SKIPPED: no partition test here: {why} (docs/operations.md says so)");
            return;
        }
    };
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url))
        .ip(network.data_ip(254))
        // Not loopback, and the test network is ours: plain HTTP must be asked for.
        .arg("--allow-plain-http")
        .flag("read-cache-max-age", "200ms")
        .start()
        .await;
    let mut agents = Vec::new();
    for i in 1..=HOSTS {
        let agent = AgentBuilder::new(&format!("node-{i}"), &[registry.url()])
            .netns(network.host(i))
            .flag("service", "web:8080")
            .flag("lease-ttl-s", "6")
            .flag("catalog-wait", "5s")
            .start()
            .await;
        agents.push(agent);
    }
    // Reached beyond loopback, the agents' API wants their token (the harness presents it).
    let anonymous = reqwest::get(agents[0].at("/v1/services/web")).await.expect("GET").status();
    assert_eq!(anonymous, reqwest::StatusCode::UNAUTHORIZED, "an agent API beyond loopback must need its token");
    assert!(reqwest::get(agents[0].at("/healthz")).await.expect("GET").status().is_success());
    let everyone: BTreeSet<String> = (1..=HOSTS).map(id).collect();
    for agent in &agents {
        answers(agent, &everyone, Duration::from_secs(30)).await;
    }
    let watch = Watcher::start_with_token(
        "web",
        agents.iter().map(|a| format!("http://{}", a.addr)).collect(),
        Some(signpost_e2e::process::netns_api_token()),
    );

    let k = rand::random_range(1..=HOSTS);
    let cut_off = id(k);
    let rest: Vec<usize> = (0..HOSTS).filter(|i| *i != k - 1).collect();
    eprintln!("partition: cutting node-{k} off");
    let start = Instant::now();
    network.cut(k);
    let survivors: BTreeSet<String> = everyone.iter().filter(|i| **i != cut_off).cloned().collect();
    for &i in &rest {
        answers(&agents[i], &survivors, DEAD_AGENT_BOUND).await;
    }
    let gone = Instant::now();
    eprintln!("partition: {cut_off} left every other healthy answer {:?} after the cut", gone.duration_since(start));
    assert!(gone.duration_since(start) <= patience(DEAD_AGENT_BOUND));
    // The cut-off side: its own instance only, and a registry copy that is no longer confirmed.
    let alone: BTreeSet<String> = [cut_off.clone()].into();
    answers(&agents[k - 1], &alone, DEAD_AGENT_BOUND).await;
    eventually("the cut-off agent says its answer is stale", Duration::from_secs(20), || async {
        let response = agents[k - 1].get("/v1/services/web").await?;
        let stale: u64 = response.headers().get("x-signpost-stale-seconds")?.to_str().ok()?.parse().ok()?;
        (stale >= 1).then_some(())
    })
    .await;
    // The registry no longer hears it: the lease runs out.
    eventually("the registry's lease of the cut-off instance ran out", Duration::from_secs(20), || async {
        let instance: Value = reqwest::get(registry.at(&format!("/v1/instances/{cut_off}"))).await.ok()?.json().await.ok()?;
        (instance["health"] == "critical").then_some(())
    })
    .await;
    let healed = Instant::now();
    let survivor_ids: Vec<String> = survivors.iter().cloned().collect();
    watch.assert_kept("partition", &survivor_ids, &rest, start, healed);
    watch.assert_absent("partition", &cut_off, &rest, gone, healed);

    eprintln!("partition: healing node-{k} after {:?}", healed.duration_since(start));
    network.heal(k);
    for agent in &agents {
        answers(agent, &everyone, Duration::from_secs(30)).await;
    }
    eprintln!("partition: every answer whole again {:?} after healing", healed.elapsed());
    eventually("the registry has every instance passing again", Duration::from_secs(30), || async {
        let page: Value = reqwest::get(registry.at("/v1/services/web?health=any")).await.ok()?.json().await.ok()?;
        let passing = page["instances"].as_array()?.iter().filter(|i| i["health"] == "passing").count();
        (passing == HOSTS).then_some(())
    })
    .await;
    let whole = Instant::now();
    eventually("a few more rounds", Duration::from_secs(5), || async { (watch.samples(0, whole).len() >= 10).then_some(()) }).await;
    watch.assert_kept("after healing", &survivor_ids, &rest, healed, Instant::now());
    watch.assert_kept(
        "after healing",
        &everyone.iter().cloned().collect::<Vec<_>>(),
        &(0..HOSTS).collect::<Vec<_>>(),
        whole,
        Instant::now(),
    );
    drop(watch);
    drop(agents);
    drop(registry);
    drop(db);
    drop(network);
}
