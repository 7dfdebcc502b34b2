//! The fault suite: five agents, each beside its own service process, and two registry
//! replicas on one PostgreSQL. Processes are killed (-9), paused and restarted, and the
//! database is stopped and started, in turn and together; a watcher asks every agent for the
//! healthy instances ten times a second throughout. After each fault the suite checks what a
//! user relies on (docs/operations.md, "Timings and bounds"):
//! - no healthy answer names a dead instance longer than its bound after it died
//!   (`DEAD_AGENT_BOUND`, `DEAD_SERVICE_BOUND`), and none names it again until it is back;
//! - no live instance ever leaves a live agent's healthy answer, and live agents always answer;
//! - after recovery every agent and every replica answers the truth again;
//! - no process crashed, logged a panic or grew its descriptors or memory without bound.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};
use signpost_e2e::watch::Watcher;
use signpost_e2e::{
    Agent, AgentBuilder, Registry, RegistryBuilder, ServiceProcess, TestDb, ThrowawayPostgres, eventually, free_port, patience, resources,
    signal,
};
use tokio::sync::Mutex;

/// How long after an agent dies its instance may still be named healthy: the bound
/// docs/operations.md promises with the default gossip settings (failure detector).
const DEAD_AGENT_BOUND: Duration = Duration::from_secs(5);
/// How long after a service dies its instance may still be named healthy: its check's
/// detection (every 500 ms, critical after two failures, 500 ms timeout: 1.5 s) plus gossip,
/// within the same bound as a dead agent.
const DEAD_SERVICE_BOUND: Duration = Duration::from_millis(6_500);
/// Agents in the cluster.
const AGENTS: usize = 5;

/// One cluster at a time: each is eight processes and a watcher on a machine of two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

struct Cluster {
    replicas: Vec<Registry>,
    services: Vec<ServiceProcess>,
    agents: Vec<Agent>,
    watch: Watcher,
    /// (pid, open descriptors, RSS KiB) of every process once the cluster was ready.
    baseline: Vec<(u32, usize, u64)>,
    /// The agents' configuration files (read again when an agent restarts).
    _configs: tempfile::TempDir,
}

async fn cluster(database_url: &str) -> Cluster {
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let replica = RegistryBuilder::new(Some(database_url))
            .port(free_port())
            .flag("read-cache-max-age", "200ms")
            .flag("sweep-interval", "200ms")
            .flag("leader-check-interval", "200ms")
            .start()
            .await;
        replicas.push(replica);
    }
    let urls: Vec<String> = replicas.iter().map(Registry::url).collect();
    let configs = tempfile::Builder::new().prefix("signpost-faults-").tempdir().expect("temp dir");
    let mut services = Vec::new();
    let mut agents = Vec::new();
    for i in 1..=AGENTS {
        let service = ServiceProcess::start().await;
        // A check every 500 ms that must fail twice in a row: a refused connection shows
        // within a second, and one slow answer on this busy machine is not taken for a death.
        let config = configs.path().join(format!("node-{i}.toml"));
        let check =
            format!(r#"{{ http = "{}", interval = "500ms", timeout = "500ms", failures_before_critical = 2 }}"#, service.health_url());
        std::fs::write(&config, format!("[[services]]\nname = \"web\"\nport = {}\nchecks = [{check}]\n", service.port))
            .expect("write the agent's config");
        let agent = AgentBuilder::new(&format!("node-{i}"), &urls)
            .flag("config", config.display().to_string())
            .flag("lease-ttl-s", "6")
            .flag("catalog-wait", "5s")
            .start()
            .await;
        services.push(service);
        agents.push(agent);
    }
    let watch = Watcher::start("web", agents.iter().map(|a| format!("http://{}", a.addr)).collect());
    let mut cluster = Cluster { replicas, services, agents, watch, baseline: Vec::new(), _configs: configs };
    cluster.converged("the cluster starts").await;
    cluster.baseline = cluster.pids().into_iter().filter_map(|pid| resources(pid).map(|(fds, rss)| (pid, fds, rss))).collect();
    cluster
}

impl Cluster {
    fn id(&self, i: usize) -> String {
        format!("{}-web-{}", self.agents[i].node, self.services[i].port)
    }

    fn all_ids(&self) -> Vec<String> {
        (0..AGENTS).map(|i| self.id(i)).collect()
    }

    fn pids(&mut self) -> Vec<u32> {
        let agents = self.agents.iter().map(Agent::pid);
        agents.chain(self.replicas.iter().map(Registry::pid)).collect()
    }

    /// Waits until every agent answers every instance passing, and every replica too.
    async fn converged(&self, what: &str) {
        let expected: BTreeSet<(String, String)> = self.all_ids().into_iter().map(|id| (id, "passing".to_string())).collect();
        for agent in &self.agents {
            eventually(&format!("{what}: {} answers every instance passing", agent.node), Duration::from_secs(30), || async {
                let found: BTreeSet<(String, String)> = agent.lookup("web").await?.into_iter().collect();
                (found == expected).then_some(())
            })
            .await;
        }
        for replica in &self.replicas {
            eventually(&format!("{what}: replica {} has every instance passing", replica.addr), Duration::from_secs(30), || async {
                let page: Value = reqwest::get(replica.at("/v1/services/web?health=any")).await.ok()?.json().await.ok()?;
                let found: BTreeSet<(String, String)> = page["instances"]
                    .as_array()?
                    .iter()
                    .filter_map(|i| Some((i["id"].as_str()?.to_string(), i["health"].as_str()?.to_string())))
                    .collect();
                (found == expected).then_some(())
            })
            .await;
        }
    }

    /// Waits until no agent in `agents` names `id` healthy, and returns when that was.
    async fn gone_everywhere(&self, what: &str, id: &str, agents: &[usize], since: Instant, bound: Duration) -> Instant {
        for &i in agents {
            let agent = &self.agents[i];
            eventually(&format!("{what}: {} no longer names {id} healthy", agent.node), bound, || async {
                let found = agent.lookup("web").await?;
                found.iter().all(|(other, health)| other != id || health == "critical").then_some(())
            })
            .await;
        }
        let gone = Instant::now();
        eprintln!("{what}: {id} left every healthy answer {:?} after the fault", gone.duration_since(since));
        assert!(gone.duration_since(since) <= patience(bound), "{what}: {id} was named healthy past the bound");
        gone
    }

    /// The index of the replica holding the leader lock.
    async fn leader(&self) -> usize {
        eventually("one replica leads", Duration::from_secs(20), || async {
            let mut leaders = Vec::new();
            for (i, replica) in self.replicas.iter().enumerate() {
                if replica.metric("signpost_registry_leader").await == Some(1.0) {
                    leaders.push(i);
                }
            }
            (leaders.len() == 1).then(|| leaders[0])
        })
        .await
    }

    fn kill_agent(&mut self, i: usize) {
        self.watch.set_target(i, None);
        self.agents[i].kill();
    }

    async fn restart_agent(&mut self, i: usize) {
        self.agents[i].restart().await;
        self.watch.set_target(i, Some(format!("http://{}", self.agents[i].addr)));
    }

    /// Every process runs, none logged a panic, and those that ran all along hold about what
    /// they held at the start.
    fn assert_healthy_processes(&mut self) {
        for agent in &mut self.agents {
            assert!(agent.is_running(), "{} is running", agent.node);
            assert!(!agent.log_text().contains("panicked"), "{} logged a panic:\n{}", agent.node, agent.log_text());
        }
        for replica in &mut self.replicas {
            assert!(replica.is_running(), "replica {} is running", replica.addr);
            assert!(!replica.log_text().contains("panicked"), "replica {} logged a panic:\n{}", replica.addr, replica.log_text());
        }
        for pid in self.pids() {
            let Some(&(_, fds, rss)) = self.baseline.iter().find(|(p, _, _)| *p == pid) else { continue };
            let (now_fds, now_rss) = resources(pid).expect("a running process's resources");
            assert!(now_fds <= fds + 16, "process {pid} held {fds} descriptors at the start and {now_fds} now");
            assert!(now_rss <= 2 * rss + 32 * 1024, "process {pid} used {rss} KiB at the start and {now_rss} KiB now");
            eprintln!("process {pid}: descriptors {fds} → {now_fds}, RSS {rss} → {now_rss} KiB");
        }
    }
}

fn except(excluded: &[usize]) -> Vec<usize> {
    (0..AGENTS).filter(|i| !excluded.contains(i)).collect()
}

fn ids_except(cluster: &Cluster, excluded: &[usize]) -> Vec<String> {
    except(excluded).into_iter().map(|i| cluster.id(i)).collect()
}

/// An agent dies: its instance leaves every other agent's healthy answer within the bound and
/// stays out; nothing else moves; restarted, it is back everywhere.
async fn kill_an_agent(cluster: &mut Cluster, k: usize) {
    let what = format!("agent {} killed", cluster.agents[k].node);
    let id = cluster.id(k);
    let others = except(&[k]);
    let start = Instant::now();
    cluster.kill_agent(k);
    let gone = cluster.gone_everywhere(&what, &id, &others, start, DEAD_AGENT_BOUND).await;
    // Watch it stay out for a while: the registry's lease (6 s) runs out meanwhile.
    eventually("the registry's lease of the dead agent's instance ran out", Duration::from_secs(20), || async {
        let instance: Value = reqwest::get(cluster.replicas[0].at(&format!("/v1/instances/{id}"))).await.ok()?.json().await.ok()?;
        (instance["health"] == "critical").then_some(())
    })
    .await;
    let back = Instant::now();
    cluster.watch.assert_absent(&what, &id, &others, gone, back);
    cluster.watch.assert_kept(&what, &ids_except(cluster, &[k]), &others, start, back);
    cluster.restart_agent(k).await;
    cluster.converged(&format!("{what}, then restarted")).await;
}

/// A service dies: its own agent's check says critical, and gossip carries it everywhere.
async fn kill_a_service(cluster: &mut Cluster, s: usize) {
    let what = format!("service of {} killed", cluster.agents[s].node);
    let id = cluster.id(s);
    let start = Instant::now();
    cluster.services[s].kill();
    let everyone = except(&[]);
    let gone = cluster.gone_everywhere(&what, &id, &everyone, start, DEAD_SERVICE_BOUND).await;
    eventually("the registry heard it with the next heartbeat", Duration::from_secs(10), || async {
        let instance: Value = reqwest::get(cluster.replicas[1].at(&format!("/v1/instances/{id}"))).await.ok()?.json().await.ok()?;
        (instance["health"] == "critical").then_some(())
    })
    .await;
    let back = Instant::now();
    cluster.watch.assert_absent(&what, &id, &everyone, gone, back);
    cluster.watch.assert_kept(&what, &ids_except(cluster, &[s]), &everyone, start, back);
    cluster.services[s].restart().await;
    cluster.converged(&format!("{what}, then restarted")).await;
}

/// The leading replica dies: agents lose nothing, writes go on through the other replica,
/// which takes the lead; restarted, the replica serves again.
async fn kill_the_leader(cluster: &mut Cluster, service: &str) {
    let leader = cluster.leader().await;
    let what = format!("leading replica {} killed", cluster.replicas[leader].addr);
    let start = Instant::now();
    cluster.replicas[leader].kill();
    let other = 1 - leader;
    eventually("the other replica takes the lead", Duration::from_secs(10), || async {
        (cluster.replicas[other].metric("signpost_registry_leader").await == Some(1.0)).then_some(())
    })
    .await;
    // A service added at an agent now reaches the registry through the other replica.
    let added = reqwest::Client::new()
        .post(cluster.agents[0].at("/v1/agent/services"))
        .json(&json!({"name": service, "port": 9100}))
        .send()
        .await
        .expect("POST /v1/agent/services");
    assert_eq!(added.status(), reqwest::StatusCode::CREATED);
    eventually("the new service reached the surviving replica", Duration::from_secs(20), || async {
        let page: Value = reqwest::get(cluster.replicas[other].at(&format!("/v1/services/{service}"))).await.ok()?.json().await.ok()?;
        (page["instances"].as_array()?.len() == 1).then_some(())
    })
    .await;
    for agent in &cluster.agents {
        eventually(&format!("{} answers the new service", agent.node), Duration::from_secs(10), || async {
            (agent.lookup(service).await?.len() == 1).then_some(())
        })
        .await;
    }
    let back = Instant::now();
    cluster.watch.assert_kept(&what, &cluster.all_ids(), &except(&[]), start, back);
    cluster.replicas[leader].restart().await;
    cluster.converged(&format!("{what}, then restarted")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_services_and_the_leader_killed_in_turn_then_together() {
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::create().await;
    let mut cluster = cluster(&db.url).await;
    let mut rng = rand::rng();

    let k = rng.random_range(0..AGENTS);
    eprintln!("fault: kill -9 agent node-{}", k + 1);
    kill_an_agent(&mut cluster, k).await;

    let s = rng.random_range(0..AGENTS);
    eprintln!("fault: kill -9 the service beside node-{}", s + 1);
    kill_a_service(&mut cluster, s).await;

    eprintln!("fault: kill -9 the leading replica");
    kill_the_leader(&mut cluster, "api").await;

    // All three at once: an agent, another node's service and the leader.
    let a = rng.random_range(0..AGENTS);
    let s = (a + 1 + rng.random_range(0..AGENTS - 1)) % AGENTS;
    let leader = cluster.leader().await;
    eprintln!("fault: kill -9 agent node-{}, the service beside node-{} and the leading replica together", a + 1, s + 1);
    let what = "agent, service and leader killed together";
    let (dead_agent, dead_service) = (cluster.id(a), cluster.id(s));
    let start = Instant::now();
    cluster.kill_agent(a);
    cluster.services[s].kill();
    cluster.replicas[leader].kill();
    let live = except(&[a]);
    let gone_agent = cluster.gone_everywhere(what, &dead_agent, &live, start, DEAD_AGENT_BOUND).await;
    let gone_service = cluster.gone_everywhere(what, &dead_service, &live, start, DEAD_SERVICE_BOUND).await;
    // Hold the faults a while so that flapping would show, then check the whole window.
    eventually("the other replica takes the lead", Duration::from_secs(10), || async {
        (cluster.replicas[1 - leader].metric("signpost_registry_leader").await == Some(1.0)).then_some(())
    })
    .await;
    eventually("the dead agent's lease ran out at the surviving replica", Duration::from_secs(20), || async {
        let page: Value =
            reqwest::get(cluster.replicas[1 - leader].at(&format!("/v1/instances/{dead_agent}"))).await.ok()?.json().await.ok()?;
        (page["health"] == "critical").then_some(())
    })
    .await;
    let back = Instant::now();
    cluster.watch.assert_absent(what, &dead_agent, &live, gone_agent, back);
    cluster.watch.assert_absent(what, &dead_service, &live, gone_service, back);
    cluster.watch.assert_kept(what, &ids_except(&cluster, &[a, s]), &live, start, back);
    cluster.replicas[leader].restart().await;
    cluster.services[s].restart().await;
    cluster.restart_agent(a).await;
    cluster.converged(&format!("{what}, then all restarted")).await;
    cluster.assert_healthy_processes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_paused_past_the_failure_detector_is_dead_to_its_peers_then_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::create().await;
    let mut cluster = cluster(&db.url).await;
    let k = rand::rng().random_range(0..AGENTS);
    let (id, node) = (cluster.id(k), cluster.agents[k].node.clone());
    let others = except(&[k]);
    eprintln!("fault: SIGSTOP agent {node}");
    let start = Instant::now();
    cluster.watch.set_target(k, None);
    signal(cluster.agents[k].pid(), "STOP");
    let gone = cluster.gone_everywhere("agent paused", &id, &others, start, DEAD_AGENT_BOUND).await;
    // Past the failure detector's threshold: every peer holds it dead.
    for &i in &others {
        let agent = &cluster.agents[i];
        eventually(&format!("{} holds {node} dead", agent.node), DEAD_AGENT_BOUND, || async {
            let members: Value = reqwest::get(agent.at("/v1/agent/members")).await.ok()?.json().await.ok()?;
            members["members"].as_array()?.iter().any(|m| m["node"] == node.as_str() && m["state"] == "dead").then_some(())
        })
        .await;
    }
    let resumed = Instant::now();
    cluster.watch.assert_absent("agent paused", &id, &others, gone, resumed);
    cluster.watch.assert_kept("agent paused", &ids_except(&cluster, &[k]), &others, start, resumed);
    eprintln!("fault: SIGCONT agent {node} after {:?}", resumed.duration_since(start));
    signal(cluster.agents[k].pid(), "CONT");
    cluster.watch.set_target(k, Some(format!("http://{}", cluster.agents[k].addr)));
    cluster.converged("agent resumed").await;
    let converged = Instant::now();
    eprintln!("agent resumed: every answer whole again {:?} after the resume", converged.duration_since(resumed));
    // Once whole, it stays whole: nothing flaps back.
    eventually("a few more rounds of gossip", Duration::from_secs(5), || async {
        (cluster.watch.samples(k, converged).len() >= 10).then_some(())
    })
    .await;
    cluster.watch.assert_kept("after the resume", &cluster.all_ids(), &except(&[]), converged, Instant::now());
    cluster.assert_healthy_processes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stops_and_starts_under_two_replicas_and_five_agents() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = tokio::task::spawn_blocking(ThrowawayPostgres::start).await.expect("start a throwaway PostgreSQL");
    let mut cluster = cluster(&postgres.url()).await;
    let control = postgres.control();
    eprintln!("fault: PostgreSQL stopped");
    let start = Instant::now();
    tokio::task::spawn_blocking({
        let control = control.clone();
        move || control.stop()
    })
    .await
    .expect("stop PostgreSQL");
    for replica in &cluster.replicas {
        eventually("the replica is not ready without its database", Duration::from_secs(15), || async {
            let status = reqwest::get(replica.at("/readyz")).await.ok()?.status();
            (status == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
        })
        .await;
    }
    // The agents answer from their caches and say how stale they are.
    eventually("an agent says its answer is stale", Duration::from_secs(15), || async {
        let response = reqwest::get(cluster.agents[0].at("/v1/services/web")).await.ok()?;
        let stale: u64 = response.headers().get("x-signpost-stale-seconds")?.to_str().ok()?.parse().ok()?;
        (stale >= 1).then_some(())
    })
    .await;
    // Health still travels: a service dies during the outage.
    let s = rand::rng().random_range(0..AGENTS);
    let id = cluster.id(s);
    let died = Instant::now();
    cluster.services[s].kill();
    let gone = cluster.gone_everywhere("service killed while PostgreSQL is down", &id, &except(&[]), died, DEAD_SERVICE_BOUND).await;
    let restarted = Instant::now();
    cluster.watch.assert_kept("PostgreSQL down", &cluster.all_ids(), &except(&[]), start, died);
    cluster.watch.assert_kept("PostgreSQL down", &ids_except(&cluster, &[s]), &except(&[]), died, restarted);
    cluster.watch.assert_absent("PostgreSQL down", &id, &except(&[]), gone, restarted);

    eprintln!("fault: PostgreSQL started again after {:?}", start.elapsed());
    tokio::task::spawn_blocking(move || control.start()).await.expect("start PostgreSQL");
    for replica in &cluster.replicas {
        eventually("the replica is ready again without a restart", Duration::from_secs(30), || async {
            let status = reqwest::get(replica.at("/readyz")).await.ok()?.status();
            status.is_success().then_some(())
        })
        .await;
    }
    cluster.services[s].restart().await;
    cluster.converged("PostgreSQL back").await;
    eventually("answers are fresh again", Duration::from_secs(15), || async {
        let response = reqwest::get(cluster.agents[0].at("/v1/services/web")).await.ok()?;
        (response.headers().get("x-signpost-stale-seconds")?.to_str().ok()? == "0").then_some(())
    })
    .await;
    cluster.assert_healthy_processes();
}
