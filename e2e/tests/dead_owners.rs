//! A dead agent's instances never come back as healthy by forgetting: with a lease far longer
//! than gossip remembers a dead node, an agent killed with its service stays critical at every
//! peer after gossip forgets it, at a peer started after it died, and at a peer restarted
//! while the registry is down; only evidence of life (the agent back in gossip) heals it.

use std::time::Duration;

use serde_json::Value;
use signpost_e2e::{Agent, AgentBuilder, Registry, RegistryBuilder, TestDb, eventually};

/// An agent with one service (`web` on `port`), a 600 s lease and a short gossip memory.
async fn agent(node: &str, registry: &Registry, port: u16, seed: Option<u16>) -> Agent {
    let mut builder = AgentBuilder::new(node, &[registry.url()])
        .flag("service", format!("web:{port}"))
        .flag("lease-ttl-s", "600")
        .flag("dead-node-grace", "4s")
        .flag("catalog-wait", "5s");
    if let Some(seed) = seed {
        builder = builder.flag("seed", format!("127.0.0.1:{seed}"));
    }
    builder.start().await
}

async fn health_at(agent: &Agent, id: &str) -> Option<String> {
    agent.lookup("web").await?.into_iter().find(|(i, _)| i == id).map(|(_, h)| h)
}

/// Whether `agent`'s gossip members list `node` at all (alive or dead).
async fn lists_member(agent: &Agent, node: &str) -> Option<bool> {
    let members: Value = agent.get("/v1/agent/members").await?.json().await.ok()?;
    Some(members["members"].as_array()?.iter().any(|m| m["node"] == node))
}

/// Requests the registry answered on a route (from its `/metrics`).
async fn requests_on(registry: &Registry, route: &str) -> f64 {
    let text = reqwest::get(registry.at("/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .filter(|l| l.starts_with("signpost_registry_http_requests_total{") && l.contains(&format!("route=\"{route}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_instance_stays_critical_after_gossip_forgets_it() {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).flag("read-cache-max-age", "200ms").start().await;
    let a = agent("node-a", &registry, 8081, None).await;
    let b = agent("node-b", &registry, 8082, Some(a.gossip_port)).await;
    let mut c = agent("node-c", &registry, 8083, Some(a.gossip_port)).await;
    let dead_id = "node-c-web-8083";
    for observer in [&a, &b] {
        eventually("every instance passing", Duration::from_secs(20), || async {
            let found = observer.lookup("web").await?;
            (found.len() == 3 && found.iter().all(|(_, h)| h == "passing")).then_some(())
        })
        .await;
        // The observers saw node-c alive in gossip (not only the registry's word for it).
        eventually("node-c is an alive member", Duration::from_secs(20), || async {
            let members: Value = observer.get("/v1/agent/members").await?.json().await.ok()?;
            members["members"].as_array()?.iter().any(|m| m["node"] == "node-c" && m["state"] == "alive").then_some(())
        })
        .await;
    }

    c.kill();
    for observer in [&a, &b] {
        eventually("the killed agent's instance is critical", Duration::from_secs(10), || async {
            (health_at(observer, dead_id).await? == "critical").then_some(())
        })
        .await;
    }
    // Gossip forgets the dead node after its grace period (4 s here)...
    for observer in [&a, &b] {
        eventually("gossip forgot node-c", Duration::from_secs(20), || async { (!lists_member(observer, "node-c").await?).then_some(()) })
            .await;
    }
    // ... and for the next 8 s (more than one announcement period, in which each observer
    // asks the registry for evidence of life and has none) it stays critical everywhere.
    let asked = requests_on(&registry, "/v1/agents").await;
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until {
        for observer in [&a, &b] {
            assert_eq!(
                health_at(observer, dead_id).await.as_deref(),
                Some("critical"),
                "{}: the registry's lease (600 s) has not run out, but its owner was seen dead",
                observer.node
            );
            let healthy: Value = observer.get("/v1/services/web").await.expect("GET").json().await.expect("json");
            let ids: Vec<&str> = healthy["instances"].as_array().expect("instances").iter().filter_map(|i| i["id"].as_str()).collect();
            assert!(!ids.contains(&dead_id), "{}: the dead instance is not in the healthy answer: {healthy}", observer.node);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(requests_on(&registry, "/v1/agents").await >= asked + 2.0, "the observers asked the registry meanwhile");

    // A peer that starts now never saw node-c alive: once gossip has settled, the lease that
    // merely has not run out is not enough either.
    let d = AgentBuilder::new("node-d", &[registry.url()])
        .flag("dead-node-grace", "4s")
        .flag("catalog-wait", "5s")
        .flag("seed", format!("127.0.0.1:{}", a.gossip_port))
        .start()
        .await;
    eventually("the new peer answers a and b passing, c critical", Duration::from_secs(20), || async {
        let found = d.lookup("web").await?;
        let health = |id: &str| found.iter().find(|(i, _)| i == id).map(|(_, h)| h.as_str());
        (health("node-a-web-8081") == Some("passing")
            && health("node-b-web-8082") == Some("passing")
            && health(dead_id) == Some("critical"))
        .then_some(())
    })
    .await;

    // Evidence of life heals it: node-c comes back (a new generation in gossip).
    c.restart().await;
    for observer in [&a, &b, &d] {
        eventually("node-c's instance is passing again", Duration::from_secs(20), || async {
            (health_at(observer, dead_id).await? == "passing").then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restarted_while_the_registry_is_down_does_not_trust_a_dead_owners_lease() {
    let db = TestDb::create().await;
    let mut registry = RegistryBuilder::new(Some(&db.url)).flag("read-cache-max-age", "200ms").start().await;
    let mut a = agent("node-a", &registry, 8081, None).await;
    let b = agent("node-b", &registry, 8082, Some(a.gossip_port)).await;
    let mut c = agent("node-c", &registry, 8083, Some(a.gossip_port)).await;
    let dead_id = "node-c-web-8083";
    eventually("a answers every instance passing", Duration::from_secs(20), || async {
        let found = a.lookup("web").await?;
        (found.len() == 3 && found.iter().all(|(_, h)| h == "passing")).then_some(())
    })
    .await;
    // a has saved the catalog (with node-c's instance passing at the registry).
    eventually("a saved its cache", Duration::from_secs(10), || async { a.data_dir().join("catalog-cache.bin").exists().then_some(()) })
        .await;

    c.kill();
    // Gossip forgets the dead node before a restarts: nothing but the saved catalog names it.
    eventually("gossip forgot node-c", Duration::from_secs(30), || async { (!lists_member(&b, "node-c").await?).then_some(()) }).await;
    registry.kill();
    a.restart().await;
    eventually("restarted a answers b passing and c critical", Duration::from_secs(30), || async {
        let found = a.lookup("web").await?;
        let health = |id: &str| found.iter().find(|(i, _)| i == id).map(|(_, h)| h.as_str());
        (health("node-b-web-8082") == Some("passing") && health(dead_id) == Some("critical")).then_some(())
    })
    .await;
}
