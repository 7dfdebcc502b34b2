//! A fleet set up as production runs it: the registry with an admin token and agent tokens
//! (per node, or one for the fleet), agents presenting theirs. An agent's token must be enough
//! for everything the agent does: registering once, heartbeating, and putting its own
//! services into maintenance.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_e2e::{Agent, AgentBuilder, Registry, RegistryBuilder, TestDb, eventually};

const ADMIN: &str = "secured-admin-0123456789";
const FLEET: &str = "secured-fleet-0123456789";
const NODE_A: &str = "secured-node-a-0123456789";

/// How the registry knows the agents' token.
#[derive(Debug, Clone, Copy)]
enum AgentToken {
    /// `--agent-tokens-file`: one token per node (what the docs recommend).
    PerNode,
    /// `--agent-token`: one token for every agent.
    Fleet,
}

async fn secured_registry(db: &TestDb, kind: AgentToken) -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().expect("temp dir");
    let builder = RegistryBuilder::new(Some(&db.url)).flag("admin-token", ADMIN).flag("read-cache-max-age", "100ms");
    let builder = match kind {
        AgentToken::PerNode => {
            let file = dir.path().join("agent-tokens");
            std::fs::write(&file, format!("node-a {NODE_A}\n")).expect("write the tokens file");
            builder.flag("agent-tokens-file", file.display().to_string())
        }
        AgentToken::Fleet => builder.flag("agent-token", FLEET),
    };
    (dir, builder.start().await)
}

async fn registry_instance(registry: &Registry, id: &str) -> Option<Value> {
    let response = registry.http().get(registry.at(&format!("/v1/instances/{id}"))).bearer_auth(ADMIN).send().await.ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    response.json().await.ok()
}

fn registrations_logged(agent: &Agent) -> usize {
    agent.log_text().lines().filter(|l| l.contains("registered with the registry")).count()
}

/// One agent with a 3 s lease (so it heartbeats every second) and the token of `kind`.
async fn agent(registry: &Registry, kind: AgentToken) -> Agent {
    let token = match kind {
        AgentToken::PerNode => NODE_A,
        AgentToken::Fleet => FLEET,
    };
    AgentBuilder::new("node-a", &[registry.url()]).flag("service", "web:8080").flag("token", token).flag("lease-ttl-s", "3").start().await
}

async fn an_agent_with_its_token_registers_once_then_heartbeats(kind: AgentToken) {
    let db = TestDb::create().await;
    let (_dir, registry) = secured_registry(&db, kind).await;
    let agent = agent(&registry, kind).await;
    let id = "node-a-web-8080";
    let first = eventually("the registry holds the agent's instance", Duration::from_secs(20), || registry_instance(&registry, id)).await;
    assert_eq!(first["health"], "passing", "{first}");
    let first_lease = first["lease_expires_at"].as_str().expect("a lease").to_string();

    // Four renewals of the lease (a heartbeat a second): enough time for a broken agent to
    // have registered again several times.
    let leases = std::sync::Mutex::new(std::collections::BTreeSet::from([first_lease]));
    eventually("the lease is renewed four times", Duration::from_secs(30), || async {
        let lease = registry_instance(&registry, id).await?["lease_expires_at"].as_str()?.to_string();
        let mut leases = leases.lock().ok()?;
        leases.insert(lease);
        (leases.len() >= 5).then_some(())
    })
    .await;
    assert_eq!(
        agent.metric("signpost_agent_registry_errors_total").await,
        Some(0.0),
        "no call of the agent was refused; agent log:\n{}",
        agent.log_text()
    );
    assert_eq!(registrations_logged(&agent), 1, "the agent registered once, then heartbeat; its log:\n{}", agent.log_text());

    // Maintenance through the agent's local API reaches the registry with the agent's token.
    let answer = reqwest::Client::new()
        .put(agent.at(&format!("/v1/agent/services/{id}/maintenance")))
        .json(&json!({"enabled": true, "reason": "draining"}))
        .send()
        .await
        .expect("PUT maintenance");
    assert!(answer.status().is_success(), "{}", answer.text().await.unwrap_or_default());
    eventually("the registry shows the instance in maintenance", Duration::from_secs(10), || async {
        let now = registry_instance(&registry, id).await?;
        (now["health"] == "maintenance" && now["maintenance_reason"] == "draining").then_some(())
    })
    .await;
    let answer = reqwest::Client::new()
        .put(agent.at(&format!("/v1/agent/services/{id}/maintenance")))
        .json(&json!({"enabled": false}))
        .send()
        .await
        .expect("PUT maintenance");
    assert!(answer.status().is_success());
    eventually("the registry shows the instance passing again", Duration::from_secs(10), || async {
        (registry_instance(&registry, id).await?["health"] == "passing").then_some(())
    })
    .await;
    assert_eq!(agent.metric("signpost_agent_registry_errors_total").await, Some(0.0), "agent log:\n{}", agent.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_per_node_token_registers_once_then_heartbeats() {
    an_agent_with_its_token_registers_once_then_heartbeats(AgentToken::PerNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_the_fleet_token_registers_once_then_heartbeats() {
    an_agent_with_its_token_registers_once_then_heartbeats(AgentToken::Fleet).await;
}
