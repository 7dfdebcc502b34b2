//! `signpost-bench gossip-cluster`: starts a cluster of agents that gossip over loopback UDP
//! (real `signpost-agent` processes, or `signpost_agent::run` many times in this process, or
//! both), each on its own 127.0.0.x address, with a registry that hands their signing keys
//! round and is stopped once they have converged, and measures it: the gossip traffic and CPU of
//! an idle cluster, how long a registration or a health change at one agent takes until
//! every agent's answer shows it, and how long until every agent stops answering a killed
//! agent's instance as healthy. It stops every agent it started before it returns.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use signpost_agent::config::{AgentConfig, ServiceConfig};
use tokio::sync::oneshot;

use crate::gossip_os::{self, CpuWindow, NetCounters};
use crate::gossip_watch::{self, Want, Watch};

/// Settings of one cluster run.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Name of this run in results [default: "<N> processes" or "<N> in-process"].
    #[arg(long)]
    label: Option<String>,
    /// Agents run as processes of --agent-bin (these come first: nodes 0..P).
    #[arg(long, default_value_t = 0)]
    processes: usize,
    /// Agents run inside this process, each one `signpost_agent::run`, on a runtime of their own.
    #[arg(long, default_value_t = 0)]
    in_process: usize,
    /// The agent binary.
    #[arg(long, default_value = "target/release/signpost-agent")]
    agent_bin: PathBuf,
    /// Worker threads of the in-process agents' runtime.
    #[arg(long, default_value_t = 2)]
    agent_threads: usize,
    /// Instances each in-process agent publishes (its own `gossip-bench` one, the rest in
    /// services of 10); process agents publish one.
    #[arg(long, default_value_t = 1)]
    instances_per_node: usize,
    /// Node i listens on the i-th loopback address after this one.
    #[arg(long, default_value = "127.0.0.10")]
    first_ip: Ipv4Addr,
    /// HTTP port of every agent (each has its own address).
    #[arg(long, default_value_t = 7301)]
    http_port: u16,
    /// Gossip (UDP) port of every agent.
    #[arg(long, default_value_t = 7302)]
    gossip_port: u16,
    /// The gossip addresses of the first N nodes are every agent's seeds.
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// The registry binary. The run starts one (SQLite, in --dir) so that each agent's signing
    /// key reaches every other agent (gossip is believed only with the node's key), and stops
    /// it once the cluster has converged: from then on gossip alone carries every change
    /// measured, and the idle window holds no registry traffic.
    #[arg(long, default_value = "target/release/signpost-registry")]
    registry_bin: PathBuf,
    /// Where that registry listens (keep it outside the agents' addresses).
    #[arg(long, default_value = "127.0.0.9:7300")]
    registry_listen: SocketAddr,
    /// The agents' gossip interval.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    gossip_interval: Duration,
    /// Idle window in which traffic, CPU and memory are read (no lookups, no changes).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Changes measured: registrations and health changes (passing, critical), in turn.
    #[arg(long, default_value_t = 99)]
    events: usize,
    /// Pause after each change is seen everywhere.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    event_gap: Duration,
    /// Agents killed one after another (kill -9 of a process agent; an in-process agent is
    /// aborted, which drops its socket and gossip at once).
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Pause after each kill is seen everywhere.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    kill_gap: Duration,
    /// Longest wait for one change or kill to show everywhere.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    event_timeout: Duration,
    /// Longest wait for the cluster to converge at start.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    converge_timeout: Duration,
    /// Folder for the agents' logs and data.
    #[arg(long, default_value = "target/bench-gossip/cluster")]
    dir: PathBuf,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// How one agent runs.
enum Runner {
    Process(tokio::process::Child),
    Task { handle: tokio::task::JoinHandle<Result<(), signpost_agent::Error>>, _stop: oneshot::Sender<()> },
}

struct Node {
    name: String,
    base: String,
    instance: String,
    runner: Runner,
    alive: bool,
}

impl Node {
    fn pid(&self) -> Option<u32> {
        match &self.runner {
            Runner::Process(child) => child.id(),
            Runner::Task { .. } => None,
        }
    }

    /// kill -9 of a process; abort of an in-process agent.
    fn kill(&mut self) {
        match &mut self.runner {
            Runner::Process(child) => {
                let _ = child.start_kill();
            }
            Runner::Task { handle, .. } => handle.abort(),
        }
        self.alive = false;
    }
}

/// One measured change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// `register`, `passing`, `critical` or `kill`.
    pub kind: String,
    /// The node changed (or killed).
    pub node: String,
    /// Seconds until every watched agent showed it (`None`: some did not within the timeout).
    pub all_s: Option<f64>,
    /// The median agent's seconds.
    pub median_s: Option<f64>,
    /// Agents that did not show it within the timeout.
    pub missing: usize,
}

/// p50/p99/max of some seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spread {
    /// How many.
    pub n: usize,
    /// Events that did not reach every agent within the timeout.
    pub incomplete: usize,
    /// Median.
    pub p50_s: Option<f64>,
    /// 99th percentile (nearest rank).
    pub p99_s: Option<f64>,
    /// Largest.
    pub max_s: Option<f64>,
}

impl Spread {
    fn of(events: &[&Event]) -> Spread {
        let mut values: Vec<f64> = events.iter().filter_map(|e| e.all_s).collect();
        values.sort_by(f64::total_cmp);
        Spread {
            n: events.len(),
            incomplete: events.iter().filter(|e| e.all_s.is_none()).count(),
            p50_s: percentile(&values, 0.50),
            p99_s: percentile(&values, 0.99),
            max_s: values.last().copied(),
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

/// A process agent's own figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessFigures {
    /// Node name.
    pub node: String,
    /// `VmRSS` at the end of the idle window, KiB.
    pub rss_kib: Option<u64>,
    /// CPU seconds per minute in the idle window.
    pub idle_cpu_s_per_min: Option<f64>,
    /// CPU seconds per minute while the changes were measured.
    pub events_cpu_s_per_min: Option<f64>,
}

/// The idle window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Idle {
    /// Its length.
    pub seconds: f64,
    /// Whether the loopback counters hold only this cluster (a private network namespace).
    pub private_network: bool,
    /// The namespace's counters over the window.
    pub net: NetCounters,
    /// Loopback bytes per second per agent: what one agent sends, on average (every
    /// datagram is sent by one agent and received by another, so sent plus received is twice it).
    pub sent_bytes_per_s_per_agent: f64,
    /// UDP datagrams sent per second per agent.
    pub datagrams_per_s_per_agent: f64,
    /// CPU seconds per minute per agent (mean of the process agents, or this process's CPU
    /// divided by its agents).
    pub cpu_s_per_min_per_agent: Option<f64>,
    /// Busy cores of the whole machine over the window (others' work included).
    pub machine_cores: Option<f64>,
    /// `VmRSS` of this process (the in-process agents and the driver), KiB.
    pub self_rss_kib: Option<u64>,
}

/// The result of one cluster run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterResult {
    /// Always `gossip-cluster`.
    pub kind: String,
    /// Name of the run.
    pub label: String,
    /// Agents in all.
    pub agents: usize,
    /// Of which processes.
    pub processes: usize,
    /// Instances in the cluster's catalog.
    pub instances: usize,
    /// The gossip interval, ms.
    pub gossip_interval_ms: u64,
    /// Seconds from the first start until every agent knew every instance.
    pub converge_s: f64,
    /// The idle window.
    pub idle: Idle,
    /// Every change.
    pub events: Vec<Event>,
    /// Every kill.
    pub kills: Vec<Event>,
    /// All changes.
    pub change: Spread,
    /// Registrations only.
    pub register: Spread,
    /// Health changes only.
    pub health: Spread,
    /// Kills.
    pub dead: Spread,
    /// CPU seconds of all agents per change while the changes were measured.
    pub cpu_s_per_change: Option<f64>,
    /// Busy cores of the machine while the changes were measured.
    pub events_machine_cores: Option<f64>,
    /// Process agents' own figures.
    pub process_figures: Vec<ProcessFigures>,
    /// The namespace's counters over the whole run (start, changes and kills included).
    #[serde(default)]
    pub run_net: NetCounters,
}

fn address(first: Ipv4Addr, i: usize) -> anyhow::Result<Ipv4Addr> {
    let n = u32::from(first).checked_add(u32::try_from(i)?).context("too many nodes for the address range")?;
    let ip = Ipv4Addr::from(n);
    if ip.octets()[0] != 127 || ip == Ipv4Addr::new(127, 255, 255, 255) {
        bail!("node {i} would leave 127.0.0.0/8 (start lower with --first-ip)");
    }
    Ok(ip)
}

/// Runs the whole measurement.
pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let total = args.processes + args.in_process;
    if total < 2 {
        bail!("a cluster needs at least 2 agents (--processes plus --in-process)");
    }
    if args.kills >= total.saturating_sub(args.seeds.max(1)) && args.kills > 0 {
        bail!("--kills {} leaves too few agents of {total} (the seeds are never killed)", args.kills);
    }
    let label = args.label.clone().unwrap_or_else(|| match (args.processes, args.in_process) {
        (p, 0) => format!("{p} processes"),
        (0, t) => format!("{t} in-process"),
        (p, t) => format!("{p} process + {t} in-process"),
    });
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let gossip: Vec<SocketAddr> =
        (0..total).map(|i| Ok(SocketAddr::from((address(args.first_ip, i)?, args.gossip_port)))).collect::<anyhow::Result<_>>()?;
    let seeds: Vec<String> = gossip.iter().take(args.seeds.max(1)).map(ToString::to_string).collect();

    // The in-process agents get a runtime of their own, so the watchers here are not queued
    // behind them (they still share the machine's cores).
    let agents_runtime = if args.in_process > 0 {
        Some(tokio::runtime::Builder::new_multi_thread().worker_threads(args.agent_threads.max(1)).enable_all().build()?)
    } else {
        None
    };
    let started = Instant::now();
    let net_at_start = NetCounters::read()?;
    let mut registry = Some(start_registry(&args).await?);
    let registry_url = format!("http://{}", args.registry_listen);
    let mut nodes = Vec::with_capacity(total);
    let mut pids = String::new();
    for (i, gossip_addr) in gossip.iter().enumerate() {
        let ip = gossip_addr.ip();
        let name = format!("gossip-{i:03}");
        let port = 10_000 + u16::try_from(i)?;
        let base = format!("http://{ip}:{}", args.http_port);
        let instance = format!("{name}-gossip-bench-{port}");
        let data = args.dir.join(&name);
        let runner = if i < args.processes {
            let log = std::fs::File::create(args.dir.join(format!("{name}.log"))).context("cannot create an agent log")?;
            let mut command = tokio::process::Command::new(&args.agent_bin);
            command
                .args(["--node", &name, "--listen", &format!("{ip}:{}", args.http_port), "--gossip-listen", &gossip_addr.to_string()])
                .args(["--registry", &registry_url, "--service", &format!("gossip-bench:{port}")])
                .args(["--gossip-interval", &format!("{}ms", args.gossip_interval.as_millis())])
                .args(["--log-level", "warn"])
                .arg("--data-dir")
                .arg(&data)
                .args(seeds.iter().flat_map(|s| ["--seed", s.as_str()]))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true);
            let child = command.spawn().with_context(|| format!("cannot start {}", args.agent_bin.display()))?;
            // For the script's clean-up, should this process die before it stops its agents.
            if let Some(pid) = child.id() {
                pids.push_str(&format!("{pid}\n"));
                std::fs::write(args.dir.join("agents.pids"), &pids).context("cannot write agents.pids")?;
            }
            Runner::Process(child)
        } else {
            let mut services = vec![service("gossip-bench", port, None)];
            for j in 1..args.instances_per_node {
                let n = (i - args.processes) * args.instances_per_node + j;
                services.push(service(&format!("fill-{:05}", n / 10), 20_000 + u16::try_from(j)?, Some(format!("fill-{i:03}-{j:04}"))));
            }
            let config = AgentConfig {
                node: Some(name.clone()),
                listen: SocketAddr::new(ip, args.http_port),
                gossip_listen: *gossip_addr,
                seeds: seeds.clone(),
                registry: vec![reqwest::Url::parse(&registry_url).context("the registry's URL")?],
                data_dir: data,
                services,
                gossip_interval: args.gossip_interval,
                ..AgentConfig::default()
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let runtime = agents_runtime.as_ref().context("no runtime for the in-process agents")?;
            let handle = runtime.spawn(signpost_agent::run(config, async move {
                let _ = stopped.await;
            }));
            Runner::Task { handle, _stop: stop }
        };
        nodes.push(Node { name, base, instance, runner, alive: true });
    }
    let result = measure(&args, label, &mut nodes, &mut registry, started).await.and_then(|mut result| {
        result.run_net = NetCounters::read()?.since(&net_at_start);
        Ok(result)
    });
    // Stop everything this run started, whatever happened.
    stop_registry(&mut registry).await;
    for node in &mut nodes {
        node.kill();
    }
    for node in &mut nodes {
        if let Runner::Process(child) = &mut node.runner {
            let _ = child.wait().await;
        }
    }
    if let Some(runtime) = agents_runtime {
        // Every agent is aborted; what is left (their detached syncers) just goes.
        runtime.shutdown_background();
    }
    let result = result?;
    let line = serde_json::to_string(&result)?;
    println!("{}", summary(&result));
    if let Some(path) = &args.json_out {
        append_line(path, &line)?;
    }
    Ok(())
}

/// Starts the registry (SQLite in `--dir`) and waits until it answers.
async fn start_registry(args: &ClusterArgs) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::File::create(args.dir.join("registry.log")).context("cannot create the registry's log")?;
    let mut child = tokio::process::Command::new(&args.registry_bin)
        .args(["--listen", &args.registry_listen.to_string(), "--log-level", "warn"])
        .arg("--data-dir")
        .arg(args.dir.join("registry-data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", args.registry_bin.display()))?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client.get(format!("http://{}/readyz", args.registry_listen)).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the registry exited at start ({status}); see {}", args.dir.join("registry.log").display());
        }
        if Instant::now() > deadline {
            bail!("the registry did not get ready within 30 s; see {}", args.dir.join("registry.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the registry, if it still runs.
async fn stop_registry(registry: &mut Option<tokio::process::Child>) {
    if let Some(mut child) = registry.take() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

fn append_line(path: &std::path::Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

fn service(name: &str, port: u16, id: Option<String>) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        service: None,
        port,
        id,
        address: None,
        tags: vec![],
        meta: Default::default(),
        weight: None,
        zone: None,
        checks: vec![],
    }
}

/// One line per run for the terminal.
fn summary(r: &ClusterResult) -> String {
    let ms = |v: Option<f64>| v.map(|s| format!("{:.0} ms", s * 1000.0)).unwrap_or_else(|| "-".into());
    format!(
        "{}: {} agents, {} instances, converged in {:.1} s; change p50 {} p99 {} (n {}, {} incomplete); dead p50 {} p99 {} (n {}); {:.0} B/s sent per agent; idle CPU {:.2} s/min per agent; UDP {} received, {} dropped (receive buffer full)",
        r.label,
        r.agents,
        r.instances,
        r.converge_s,
        ms(r.change.p50_s),
        ms(r.change.p99_s),
        r.change.n,
        r.change.incomplete,
        ms(r.dead.p50_s),
        ms(r.dead.p99_s),
        r.dead.n,
        r.idle.sent_bytes_per_s_per_agent,
        r.idle.cpu_s_per_min_per_agent.unwrap_or(f64::NAN),
        r.run_net.udp_in_datagrams,
        r.run_net.udp_rcvbuf_errors,
    )
}

/// The number in `signpost_agent_cache_instances` of an agent's metrics.
/// The members an agent has alive in gossip (itself included).
async fn alive_members(client: &reqwest::Client, base: &str) -> Option<usize> {
    let text = client.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("signpost_agent_gossip_members{state=\"alive\"} "))?.trim().parse().ok()
}

async fn cached_instances(client: &reqwest::Client, base: &str) -> Option<usize> {
    let text = client.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("signpost_agent_cache_instances "))?.trim().parse().ok()
}

async fn measure(
    args: &ClusterArgs,
    label: String,
    nodes: &mut [Node],
    registry: &mut Option<tokio::process::Child>,
    started: Instant,
) -> anyhow::Result<ClusterResult> {
    let total = nodes.len();
    let client = crate::load::client(4, args.event_timeout + Duration::from_secs(15))?;
    let instances = args.processes + args.in_process * args.instances_per_node.max(1);

    // 1. Converge: every agent has every other alive in gossip (so it holds their keys) and
    // knows every instance.
    let net_before = NetCounters::read()?;
    let deadline = started + args.converge_timeout;
    let mut waiting: Vec<usize> = (0..total).collect();
    while !waiting.is_empty() {
        for node in nodes.iter_mut() {
            if let Runner::Task { handle, .. } = &node.runner
                && handle.is_finished()
            {
                bail!("in-process agent {} stopped during start (port taken? run in a private network namespace)", node.name);
            }
            if let Runner::Process(child) = &mut node.runner
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("agent {} exited during start ({status}); see its log in {}", node.name, args.dir.display());
            }
        }
        let mut still = Vec::new();
        for i in waiting {
            if alive_members(&client, &nodes[i].base).await != Some(total)
                || cached_instances(&client, &nodes[i].base).await != Some(instances)
            {
                still.push(i);
            }
        }
        waiting = still;
        if Instant::now() > deadline {
            let net = NetCounters::read()?.since(&net_before);
            if let Some(path) = &args.json_out {
                let failed = serde_json::json!({
                    "kind": "gossip-cluster-failed", "label": label, "agents": total, "instances": instances,
                    "converge_timeout_s": args.converge_timeout.as_secs_f64(), "not_converged": waiting.len(),
                    "udp_in_datagrams": net.udp_in_datagrams, "udp_rcvbuf_errors": net.udp_rcvbuf_errors,
                });
                append_line(path, &failed.to_string())?;
            }
            bail!(
                "{} agents did not know all {instances} instances within {:?} (e.g. {}); UDP datagrams so far: {} received, {} dropped with a full receive buffer",
                waiting.len(),
                args.converge_timeout,
                nodes[waiting[0]].name,
                net.udp_in_datagrams,
                net.udp_rcvbuf_errors
            );
        }
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let converge_s = started.elapsed().as_secs_f64();
    eprintln!("gossip-cluster {label}: {total} agents know all {instances} instances after {converge_s:.1} s; stopping the registry");
    stop_registry(registry).await;
    // Let the start-up churn (introductions, catch-up) settle before the idle window.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 2. Idle: traffic, CPU, memory.
    let pids: Vec<u32> = nodes.iter().filter_map(Node::pid).collect();
    let own = std::process::id();
    let mut watched = pids.clone();
    watched.push(own);
    let net_start = NetCounters::read()?;
    let window = CpuWindow::start(&watched);
    tokio::time::sleep(args.idle).await;
    let (seconds, cpu, machine_cores) = window.finish();
    let net = NetCounters::read()?.since(&net_start);
    let per_min = |s: Option<f64>| s.map(|s| s / seconds * 60.0);
    let idle_cpu: Vec<Option<f64>> = cpu.iter().map(|c| per_min(*c)).collect();
    let process_cpu: Vec<f64> = idle_cpu.iter().take(pids.len()).flatten().copied().collect();
    let own_cpu = idle_cpu.last().copied().flatten();
    let cpu_s_per_min_per_agent = if args.processes > 0 && !process_cpu.is_empty() {
        Some(process_cpu.iter().sum::<f64>() / process_cpu.len() as f64)
    } else {
        own_cpu.map(|c| c / args.in_process.max(1) as f64)
    };
    let idle = Idle {
        seconds,
        private_network: gossip_os::private_network(),
        net,
        sent_bytes_per_s_per_agent: net.lo_bytes as f64 / seconds / total as f64,
        datagrams_per_s_per_agent: net.udp_out_datagrams as f64 / seconds / total as f64,
        cpu_s_per_min_per_agent,
        machine_cores,
        self_rss_kib: gossip_os::status_kib(own, "VmRSS"),
    };
    let mut process_figures: Vec<ProcessFigures> = nodes
        .iter()
        .filter_map(|n| n.pid().map(|pid| (n, pid)))
        .zip(idle_cpu.iter())
        .map(|((n, pid), cpu)| ProcessFigures {
            node: n.name.clone(),
            rss_kib: gossip_os::status_kib(pid, "VmRSS"),
            idle_cpu_s_per_min: *cpu,
            events_cpu_s_per_min: None,
        })
        .collect();

    // 3. Changes: register, passing, critical, in turn, each at the next node.
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let mut events = Vec::with_capacity(args.events);
    let window = CpuWindow::start(&watched);
    for k in 0..args.events {
        let group = k / 3;
        let origin = &nodes[group % total];
        let id = format!("prop-{group:04}");
        let check = format!("{id}-ttl");
        let (kind, want, request) = match k % 3 {
            0 => {
                let body = serde_json::json!({
                    "name": "prop", "port": 30_000 + group, "id": id,
                    // A TTL check starts critical; the application's pass and fail move it.
                    "checks": [{"id": check, "ttl": "1h"}],
                });
                ("register", Want::Present(id.clone()), client.post(format!("{}/v1/agent/services", origin.base)).json(&body))
            }
            1 => ("passing", Want::Health(id.clone(), "passing"), client.put(format!("{}/v1/agent/checks/{check}/pass", origin.base))),
            _ => ("critical", Want::Health(id.clone(), "critical"), client.put(format!("{}/v1/agent/checks/{check}/fail", origin.base))),
        };
        let watch = Watch { service: "prop".into(), any: true, want };
        let trigger = async move {
            let response = request.send().await.context("the change request failed")?;
            if !response.status().is_success() {
                bail!("the change request got HTTP {}: {}", response.status(), response.text().await.unwrap_or_default());
            }
            Ok(())
        };
        let seen = gossip_watch::measure(&client, &bases, &watch, trigger, args.event_timeout).await?;
        events.push(event(kind, &origin.name, &seen));
        tokio::time::sleep(args.event_gap).await;
    }
    let (events_seconds, events_cpu, events_machine_cores) = window.finish();
    // The process agents, plus this process when it runs agents (the watchers' share is in it).
    let counted = if args.in_process > 0 { events_cpu.len() } else { pids.len() };
    let agents_cpu: f64 = events_cpu.iter().take(counted).flatten().sum();
    let cpu_s_per_change = (!events.is_empty()).then(|| agents_cpu / events.len() as f64);
    for (figures, cpu) in process_figures.iter_mut().zip(events_cpu.iter()) {
        figures.events_cpu_s_per_min = cpu.map(|c| c / events_seconds * 60.0);
    }

    // 4. Kills: the last agents, one at a time; watch the rest for its instance to leave
    // the healthy answer.
    let mut kills = Vec::with_capacity(args.kills);
    for k in 0..args.kills {
        let victim = total - 1 - k;
        let others: Vec<String> = nodes.iter().enumerate().filter(|(i, n)| n.alive && *i != victim).map(|(_, n)| n.base.clone()).collect();
        let watch = Watch { service: "gossip-bench".into(), any: false, want: Want::Absent(nodes[victim].instance.clone()) };
        let node = &mut nodes[victim];
        let name = node.name.clone();
        let trigger = async {
            node.kill();
            Ok(())
        };
        let seen = gossip_watch::measure(&client, &others, &watch, trigger, args.event_timeout).await?;
        kills.push(event("kill", &name, &seen));
        tokio::time::sleep(args.kill_gap).await;
    }

    let all: Vec<&Event> = events.iter().collect();
    let of = |kinds: &[&str]| Spread::of(&events.iter().filter(|e| kinds.contains(&e.kind.as_str())).collect::<Vec<_>>());
    Ok(ClusterResult {
        kind: "gossip-cluster".into(),
        label,
        agents: total,
        processes: args.processes,
        instances,
        gossip_interval_ms: u64::try_from(args.gossip_interval.as_millis())?,
        converge_s,
        idle,
        change: Spread::of(&all),
        register: of(&["register"]),
        health: of(&["passing", "critical"]),
        dead: Spread::of(&kills.iter().collect::<Vec<_>>()),
        events,
        kills,
        cpu_s_per_change,
        events_machine_cores,
        process_figures,
        run_net: NetCounters::default(),
    })
}

fn event(kind: &str, node: &str, seen: &[Option<f64>]) -> Event {
    let missing = seen.iter().filter(|s| s.is_none()).count();
    let mut times: Vec<f64> = seen.iter().flatten().copied().collect();
    times.sort_by(f64::total_cmp);
    Event {
        kind: kind.into(),
        node: node.into(),
        all_s: if missing == 0 { times.last().copied() } else { None },
        median_s: percentile(&times, 0.5),
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn addresses_stay_in_loopback() -> anyhow::Result<()> {
        assert_eq!(address(Ipv4Addr::new(127, 0, 0, 10), 250)?, Ipv4Addr::new(127, 0, 1, 4));
        assert!(address(Ipv4Addr::new(127, 255, 255, 250), 5).is_err());
        Ok(())
    }
}
