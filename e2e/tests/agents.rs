//! Agents end to end: a registry on PostgreSQL, three agents each beside a small HTTP
//! service, real UDP gossip, and the faults a fleet meets.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_e2e::{Agent, AgentBuilder, Registry, RegistryBuilder, TestDb, TestService, eventually, signal};

struct Fleet {
    db: TestDb,
    registry: Registry,
    services: Vec<TestService>,
    agents: Vec<Agent>,
}

/// A registry and `n` agents, agent `i` beside service `web` on its own test service.
async fn fleet(n: usize) -> Fleet {
    let db = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&db.url)).flag("read-cache-max-age", "200ms").start().await;
    let mut services = Vec::new();
    let mut agents = Vec::new();
    for i in 1..=n {
        let service = TestService::start().await;
        let agent = AgentBuilder::new(&format!("node-{i}"), &[registry.url()])
            .flag("service", format!("web:{}", service.port))
            .flag("check-http", service.health_url())
            .flag("check-interval", "200ms")
            .flag("lease-ttl-s", "6")
            .flag("catalog-wait", "5s")
            .start()
            .await;
        services.push(service);
        agents.push(agent);
    }
    let fleet = Fleet { db, registry, services, agents };
    for agent in &fleet.agents {
        wait_for(agent, "web", n, "passing").await;
    }
    fleet
}

/// Waits until `agent` answers `count` instances of `service`, all with `health`.
async fn wait_for(agent: &Agent, service: &str, count: usize, health: &str) {
    let what = format!("{} answers {count} {health} instances of {service}", agent.node);
    eventually(&what, Duration::from_secs(20), || async {
        let found = agent.lookup(service).await?;
        (found.len() == count && found.iter().all(|(_, h)| h == health)).then_some(())
    })
    .await;
}

/// The health `agent` answers for instance `id` (None when absent).
async fn health_at(agent: &Agent, service: &str, id: &str) -> Option<String> {
    agent.lookup(service).await?.into_iter().find(|(i, _)| i == id).map(|(_, h)| h)
}

fn instance_id(node: &str, port: u16) -> String {
    format!("{node}-web-{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_finds_every_service_and_gossip_carries_news_while_the_feed_is_paused() {
    let fleet = fleet(3).await;
    // The registry has them too, registered by their agents.
    // (An agent may learn of a peer's passing check by gossip before that agent's heartbeat
    // has carried it to the registry.)
    eventually("the registry lists the three healthy", Duration::from_secs(10), || async {
        let page: Value = reqwest::get(fleet.registry.at("/v1/services/web")).await.ok()?.json().await.ok()?;
        (page["instances"].as_array().map(Vec::len) == Some(3)).then_some(())
    })
    .await;
    // Healthy lookups at every agent carry the index and staleness headers.
    let response = reqwest::get(fleet.agents[0].at("/v1/services/web")).await.expect("GET");
    assert!(response.headers().contains_key("x-signpost-index"));
    assert!(response.headers().contains_key("x-signpost-stale-seconds"));

    // Pause the registry: its feed stops answering.
    let registry_pid = fleet.registry.pid();
    signal(registry_pid, "STOP");
    let added = reqwest::Client::new()
        .post(fleet.agents[0].at("/v1/agent/services"))
        .json(&json!({"name": "api", "port": 9100, "tags": ["v1"]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(added.status(), StatusCode::CREATED);
    for agent in &fleet.agents[1..] {
        wait_for(agent, "api", 1, "passing").await;
    }
    signal(registry_pid, "CONT");
    // Once the registry runs again, the agent registers it there too.
    eventually("the registry has the new instance", Duration::from_secs(20), || async {
        let page: Value = reqwest::get(fleet.registry.at("/v1/services/api")).await.ok()?.json().await.ok()?;
        (page["instances"].as_array()?.len() == 1).then_some(())
    })
    .await;
    // Removing it at run time takes it out everywhere and at the registry.
    let removed = reqwest::Client::new().delete(fleet.agents[0].at("/v1/agent/services/node-1-api-9100")).send().await.expect("DELETE");
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    for agent in &fleet.agents {
        eventually("the removed instance is gone", Duration::from_secs(10), || async {
            agent.lookup("api").await.filter(|f| f.is_empty()).map(|_| ())
        })
        .await;
    }
    eventually("the registry dropped it", Duration::from_secs(20), || async {
        let response = reqwest::get(fleet.registry.at("/v1/instances/node-1-api-9100")).await.ok()?;
        (response.status() == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_service_turns_critical_everywhere_then_recovers() {
    let fleet = fleet(3).await;
    let id = instance_id("node-2", fleet.services[1].port);
    fleet.services[1].answer(503);
    for agent in &fleet.agents {
        eventually("the failing instance is critical", Duration::from_secs(10), || async {
            (health_at(agent, "web", &id).await.as_deref() == Some("critical")).then_some(())
        })
        .await;
    }
    // Healthy answers leave it out; pick never chooses it.
    let healthy: Value = reqwest::get(fleet.agents[0].at("/v1/services/web")).await.expect("GET").json().await.expect("json");
    assert_eq!(healthy["instances"].as_array().map(Vec::len), Some(2));
    for _ in 0..20 {
        let picked: Value = reqwest::get(fleet.agents[0].at("/v1/services/web/pick")).await.expect("GET").json().await.expect("json");
        assert_ne!(picked["id"], id.as_str());
    }
    // 429 is a warning: still healthy.
    fleet.services[1].answer(429);
    eventually("a 429 makes it a warning", Duration::from_secs(10), || async {
        (health_at(&fleet.agents[2], "web", &id).await.as_deref() == Some("warning")).then_some(())
    })
    .await;
    fleet.services[1].answer(200);
    for agent in &fleet.agents {
        wait_for(agent, "web", 3, "passing").await;
    }
    // The registry heard it too, with the next heartbeat.
    let checks: Value = reqwest::get(fleet.agents[1].at("/v1/agent/checks")).await.expect("GET").json().await.expect("json");
    assert_eq!(checks["checks"][0]["status"], "passing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_every_healthy_answer_without_the_registry_and_returns() {
    let mut fleet = fleet(3).await;
    let id = instance_id("node-3", fleet.services[2].port);
    // The registry cannot help: it is paused.
    let registry_pid = fleet.registry.pid();
    signal(registry_pid, "STOP");
    fleet.agents[2].kill();
    for agent in &fleet.agents[..2] {
        // Critical when the agent's copy of the registry's catalog already held it, gone when
        // only gossip had told it yet (the merge rule); either way out of every healthy answer.
        eventually("the dead agent's instance is not healthy", Duration::from_secs(5), || async {
            let answered = agent.lookup("web").await?;
            let health = answered.iter().find(|(i, _)| *i == id).map(|(_, h)| h.as_str());
            matches!(health, None | Some("critical")).then_some(())
        })
        .await;
        let members: Value = reqwest::get(agent.at("/v1/agent/members")).await.expect("GET").json().await.expect("json");
        let dead = members["members"].as_array().expect("members").iter().any(|m| m["node"] == "node-3" && m["state"] == "dead");
        assert!(dead, "node-3 is dead in gossip: {members}");
    }
    signal(registry_pid, "CONT");
    fleet.agents[2].restart().await;
    for agent in &fleet.agents {
        wait_for(agent, "web", 3, "passing").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_answer_while_the_registry_is_down_and_reregister_into_an_empty_one() {
    let mut fleet = fleet(3).await;
    let port = fleet.registry.addr.port();
    fleet.registry.kill();
    // Lookups go on from the cache, saying how stale they are.
    for agent in &fleet.agents {
        wait_for(agent, "web", 3, "passing").await;
    }
    eventually("the staleness shows", Duration::from_secs(10), || async {
        let response = reqwest::get(fleet.agents[0].at("/v1/services/web")).await.ok()?;
        let stale: i64 = response.headers().get("x-signpost-stale-seconds")?.to_str().ok()?.parse().ok()?;
        (stale >= 1).then_some(())
    })
    .await;
    // Gossip keeps health current.
    let id = instance_id("node-1", fleet.services[0].port);
    fleet.services[0].answer(500);
    eventually("health still travels", Duration::from_secs(10), || async {
        (health_at(&fleet.agents[2], "web", &id).await.as_deref() == Some("critical")).then_some(())
    })
    .await;
    fleet.services[0].answer(200);
    // The registry returns with an emptied database on the same address.
    let empty = TestDb::create().await;
    let registry = RegistryBuilder::new(Some(&empty.url)).port(port).start().await;
    eventually("every instance is registered again", Duration::from_secs(30), || async {
        let page: Value = reqwest::get(registry.at("/v1/services/web")).await.ok()?.json().await.ok()?;
        (page["instances"].as_array()?.len() == 3).then_some(())
    })
    .await;
    let agents: Value = reqwest::get(registry.at("/v1/agents")).await.expect("GET").json().await.expect("json");
    assert_eq!(agents["agents"].as_array().map(Vec::len), Some(3), "the agents announced themselves again");
    for agent in &fleet.agents {
        wait_for(agent, "web", 3, "passing").await;
    }
    drop(fleet.db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_while_the_registry_is_down_answers_from_its_saved_cache() {
    let mut fleet = fleet(3).await;
    // The persister writes at most once a second after the registry's word changed.
    let file = signpost_agent::persist::path(&fleet.agents[0].data_dir());
    eventually("the saved cache holds the fleet", Duration::from_secs(10), || async {
        let saved = signpost_agent::persist::load(&file).ok()??;
        (saved.instances.len() == 3).then_some(())
    })
    .await;
    fleet.agents[1].kill();
    fleet.agents[2].kill();
    fleet.registry.kill();
    fleet.agents[0].restart().await;
    // The first answer after the restart already holds every instance.
    let found = fleet.agents[0].lookup("web").await.expect("lookup");
    assert_eq!(found.len(), 3, "served from the saved cache: {found:?}");
    assert!(fleet.agents[0].log_text().contains("serving the saved catalog cache"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_leave_deregisters_and_leaves_gossip() {
    let mut fleet = fleet(2).await;
    let id = instance_id("node-2", fleet.services[1].port);
    assert_eq!(fleet.agents[1].terminate(Duration::from_secs(10)).await, Some(0), "left within a few seconds");
    eventually("the leaving agent's instance left the others' answers", Duration::from_secs(5), || async {
        let h = health_at(&fleet.agents[0], "web", &id).await;
        (h.is_none() || h.as_deref() == Some("critical")).then_some(())
    })
    .await;
    eventually("the registry no longer has it", Duration::from_secs(10), || async {
        let response = reqwest::get(fleet.registry.at(&format!("/v1/instances/{id}"))).await.ok()?;
        (response.status() == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
}
