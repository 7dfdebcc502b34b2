//! `signpost-bench`: the load generator of Signpost's benchmarks. It runs in a process of its
//! own and drives a registry (or the Express baseline, which answers the same routes), or an
//! agent's lookups, over HTTP/1.1 keep-alive connections. `scripts/bench-registry` and
//! `scripts/bench-agent` run it; docs/benchmarks.md explains what it measures.
//!
//! # Layout
//! - [`fleet`]: names and bodies of the seeded and new instances
//! - [`load`]: the closed-loop driver and the shared HTTP client
//! - [`raw`]: a bare HTTP/1.1 client per worker (`--driver raw`)
//! - [`wrk`]: lookups sent by `wrk` (`--driver wrk`)
//! - [`bare`]: a minimal hyper server answering a fixed body (`bare`)
//! - [`cpu`]: CPU and memory used by the generator, the server and PostgreSQL (`/proc`)
//! - [`result`]: a run's one-line summary and JSON line
//! - [`report`]: the Markdown tables comparing two targets
//! - [`lookups_report`]: the tables of the agent's lookup benchmark (`lookup-report`)
//! - [`gossip_cluster`], [`gossip_watch`], [`gossip_os`], [`gossip_report`]: the gossip and
//!   agent scale benchmark (`gossip-cluster`, `gossip-sample`, `gossip-report`)
//! - [`spread`]: heartbeats spread over several registry replicas (`heartbeat --also-url`)
//! - [`scale_report`]: the tables of the registry's scale benchmark (`scale-report`)

mod bare;
mod cpu;
mod fleet;
mod gossip_cluster;
mod gossip_os;
mod gossip_report;
mod gossip_watch;
mod load;
mod lookups_report;
mod raw;
mod report;
mod result;
mod scale_report;
mod spread;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Method;

use crate::bare::BareArgs;
use crate::cpu::{CpuWatch, Watched};
use crate::fleet::{Fleet, Registration};
use crate::load::{Progress, Reqwest, Stop, drive, error_chain};
use crate::lookups_report::LookupReportArgs;
use crate::raw::Raw;
use crate::report::ReportArgs;
use crate::result::{Kind, RunResult};
use crate::scale_report::ScaleReportArgs;
use crate::wrk::Wrk;

/// Load generator for the Signpost registry and agent (and the baselines of their benchmarks).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Runtime worker threads of the generator [default: the number of cores].
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register the fleet: --instances instances spread over services of --per-service.
    Seed(SeedArgs),
    /// Registrations per second of new instances (new ids), for a duration.
    Register(TimedArgs),
    /// Heartbeats per second over the seeded instances, for a duration.
    Heartbeat(TimedArgs),
    /// Lookups per second and their latency: GET /v1/services/{name} of the seeded services.
    Lookup(TimedArgs),
    /// Wait until URL+PATH answers 2xx (a server that is still starting), with --min-instances.
    Wait(WaitArgs),
    /// Print the Markdown tables comparing two targets from a --json-out file.
    Report(ReportArgs),
    /// Serve one fixed answer (from a file or copied from a URL) to every request: the limit.
    Bare(BareArgs),
    /// Print the tables of the agent's lookup benchmark (bare, agent, registry) from a --json-out file.
    LookupReport(LookupReportArgs),
    /// Print the tables of the registry's scale benchmark (scripts/bench-registry-scale) from its scale.jsonl.
    ScaleReport(ScaleReportArgs),
    /// Start a cluster of gossiping agents on loopback and measure propagation, dead agents, traffic, CPU.
    GossipCluster(gossip_cluster::ClusterArgs),
    /// Memory and idle CPU of running processes (LABEL=PID), one JSON line each.
    GossipSample(gossip_report::SampleArgs),
    /// Print the tables of the gossip benchmark from the JSON lines of gossip-cluster and gossip-sample.
    GossipReport(gossip_report::ReportArgs),
}

/// What sends the requests of a timed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Driver {
    /// The shared reqwest client (about 17 µs of generator CPU per request).
    Reqwest,
    /// A bare HTTP/1.1 connection per worker (lookups only; a few µs per request).
    Raw,
    /// `wrk`, started as a child process (lookups of one service only).
    Wrk,
}

/// Where to send requests and what to do with the result.
#[derive(Debug, Args)]
struct TargetArgs {
    /// Base URL of the registry (or baseline).
    #[arg(long, default_value = "http://127.0.0.1:7300")]
    url: String,
    /// Name of the target in results, e.g. registry or baseline.
    #[arg(long, default_value = "registry")]
    target: String,
    /// Concurrent connections, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Longest wait for one answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Print the result as JSON instead of the one-line summary.
    #[arg(long)]
    json: bool,
    /// Also measure the CPU of other processes: NAME=pid:PID or NAME=cmdline:TEXT (Linux).
    #[arg(long = "cpu", value_name = "NAME=SPEC")]
    cpu: Vec<Watched>,
    /// Fail (exit 1) when more than this share of the requests fail.
    #[arg(long, default_value_t = 0.01)]
    max_error_rate: f64,
}

/// The seeded fleet's shape; seed, heartbeat and lookup must agree on it.
#[derive(Debug, Args)]
struct FleetArgs {
    /// Seeded instances.
    #[arg(long, default_value_t = 10_000)]
    instances: u64,
    /// Instances per service.
    #[arg(long, default_value_t = 10)]
    per_service: u64,
    /// Start of every instance id and service name (lower case letters, digits, '-').
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Lease of registered instances, long enough that none lapses during the benchmark.
    #[arg(long, default_value_t = 3600)]
    ttl_s: u32,
}

#[derive(Debug, Args)]
struct SeedArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Debug, Args)]
struct TimedArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    fleet: FleetArgs,
    /// Counted time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time before counting starts (connections open, caches and JIT warm up).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Tag that makes `register`'s ids new [default: the current time in base 36].
    #[arg(long)]
    run_tag: Option<String>,
    /// What sends the requests; raw and wrk only for `lookup`.
    #[arg(long, value_enum, default_value_t = Driver::Reqwest)]
    driver: Driver,
    /// The wrk binary of --driver wrk.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Threads of wrk (-t).
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// Another replica of the same registry (repeatable; `heartbeat` only): the workers are
    /// spread round-robin over --url and these, each worker keeping to one.
    #[arg(long = "also-url", value_name = "URL")]
    also_url: Vec<String>,
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:7300")]
    url: String,
    /// Path that answers 2xx once the server is ready.
    #[arg(long, default_value = "/readyz")]
    path: String,
    /// Longest wait.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Also wait until the answer is JSON with at least this many entries in `instances`
    /// (e.g. an agent's lookup once its cache holds the service).
    #[arg(long)]
    min_instances: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let result = runtime.enable_all().build().context("cannot start the runtime").and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("signpost-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Seed(args) => seed(args).await,
        Command::Register(args) => timed(Kind::Register, args).await,
        Command::Heartbeat(args) => timed(Kind::Heartbeat, args).await,
        Command::Lookup(args) => timed(Kind::Lookup, args).await,
        Command::Wait(args) => wait(args).await,
        Command::Report(args) => {
            print!("{}", report::render_file(&args)?);
            Ok(())
        }
        Command::Bare(args) => bare::run(args).await,
        Command::LookupReport(args) => {
            print!("{}", lookups_report::render_file(&args)?);
            Ok(())
        }
        Command::GossipCluster(args) => gossip_cluster::run(args).await,
        Command::GossipSample(args) => gossip_report::sample(args).await,
        Command::GossipReport(args) => {
            print!("{}", gossip_report::render_file(&args)?);
            Ok(())
        }
        Command::ScaleReport(args) => {
            print!("{}", scale_report::render_file(&args)?);
            Ok(())
        }
    }
}

fn fleet(args: &FleetArgs) -> anyhow::Result<Fleet> {
    let fleet = Fleet { prefix: args.prefix.clone(), instances: args.instances, per_service: args.per_service };
    if args.instances == 0 || args.per_service == 0 {
        bail!("--instances and --per-service must be at least 1");
    }
    if !fleet::is_dns_label(&fleet.service(fleet.services())) {
        bail!("--prefix `{}` does not make valid service names (lower case letters, digits and '-', at most 50 characters)", args.prefix);
    }
    Ok(fleet)
}

fn base_url(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

async fn seed(args: SeedArgs) -> anyhow::Result<()> {
    let fleet = fleet(&args.fleet)?;
    let t = &args.target;
    let client = load::client(t.concurrency, t.request_timeout)?;
    let (url, ttl_s) = (base_url(&t.url), args.fleet.ttl_s);
    let endpoint = format!("{url}/v1/instances");
    let progress = Progress { label: format!("seed {}", t.target) };
    let request = move |client: &reqwest::Client, n: u64| {
        client.post(&endpoint).json(&Registration::new(fleet.instance_id(n), fleet.service_of(n), n, ttl_s))
    };
    let sessions = Reqwest::sessions(client, request);
    let measured = drive(t.concurrency, Stop::Count(args.fleet.instances), Some(progress), CpuWatch::new(&t.cpu), sessions).await?;
    // A partial fleet would make every later figure wrong: no failure is tolerated.
    finish(Kind::Seed, t, 0.0, measured)
}

async fn timed(kind: Kind, args: TimedArgs) -> anyhow::Result<()> {
    let fleet = fleet(&args.fleet)?;
    let t = &args.target;
    let client = load::client(t.concurrency, t.request_timeout)?;
    let url = base_url(&t.url);
    let stop = Stop::Timed { warmup: args.warmup, measure: args.duration };
    let cpu = CpuWatch::new(&t.cpu);
    if args.driver != Driver::Reqwest && kind != Kind::Lookup {
        bail!("--driver {} sends lookups only; {} runs use --driver reqwest", format!("{:?}", args.driver).to_lowercase(), kind.as_str());
    }
    if !args.also_url.is_empty() && kind != Kind::Heartbeat {
        bail!("--also-url spreads heartbeats only, not {} runs", kind.as_str());
    }
    let measured = match kind {
        Kind::Heartbeat if !args.also_url.is_empty() => {
            let mut urls = vec![url.clone()];
            urls.extend(args.also_url.iter().map(|u| base_url(u)));
            for replica in &urls {
                check_seeded_instance(&client, replica, &fleet).await?;
            }
            let mut result = RunResult::new(
                kind,
                &t.target,
                &url,
                t.concurrency,
                drive(t.concurrency, stop, None, cpu, spread::sessions(client, &urls, fleet)?).await?,
            );
            result.url = urls.join(" ");
            return emit(result, t, t.max_error_rate);
        }
        Kind::Heartbeat => {
            check_seeded_instance(&client, &url, &fleet).await?;
            let request = move |client: &reqwest::Client, n: u64| {
                client.put(format!("{url}/v1/instances/{}/heartbeat", fleet.instance_id(n % fleet.instances)))
            };
            drive(t.concurrency, stop, None, cpu, Reqwest::sessions(client, request)).await?
        }
        Kind::Lookup => {
            let body_bytes = check_seeded_service(&client, &url, &fleet).await?;
            match args.driver {
                Driver::Reqwest => {
                    let request = move |client: &reqwest::Client, n: u64| {
                        client.get(format!("{url}/v1/services/{}", fleet.service(n % fleet.services())))
                    };
                    drive(t.concurrency, stop, None, cpu, Reqwest::sessions(client, request)).await?
                }
                Driver::Raw => {
                    let paths: Vec<String> = (0..fleet.services()).map(|s| format!("/v1/services/{}", fleet.service(s))).collect();
                    drive(t.concurrency, stop, None, cpu, Raw::sessions(&url, &paths, t.request_timeout)?).await?
                }
                Driver::Wrk => {
                    if fleet.services() > 1 {
                        bail!("--driver wrk looks up one service: give --instances no larger than --per-service");
                    }
                    let wrk = Wrk {
                        program: args.wrk.clone(),
                        threads: args.wrk_threads,
                        connections: t.concurrency,
                        timeout: t.request_timeout,
                    };
                    let lookup = format!("{url}/v1/services/{}", fleet.service(0));
                    let (measured, figures) = wrk.run(&lookup, args.warmup, args.duration, &t.cpu, body_bytes).await?;
                    return emit(wrk::result(&t.target, &url, t.concurrency, measured, &figures), t, t.max_error_rate);
                }
            }
        }
        Kind::Register | Kind::Seed => {
            let run = args.run_tag.clone().unwrap_or_else(fleet::run_tag);
            if !fleet::is_dns_label(&fleet.new_service_of(&run, 9_999_999)) {
                bail!("--run-tag `{run}` does not make valid service names");
            }
            let (endpoint, ttl_s) = (format!("{url}/v1/instances"), args.fleet.ttl_s);
            let request = move |client: &reqwest::Client, n: u64| {
                client.post(&endpoint).json(&Registration::new(fleet.new_instance_id(&run, n), fleet.new_service_of(&run, n), n, ttl_s))
            };
            drive(t.concurrency, stop, None, cpu, Reqwest::sessions(client, request)).await?
        }
    };
    let mut result = RunResult::new(kind, &t.target, &base_url(&t.url), t.concurrency, measured);
    if kind == Kind::Lookup && args.driver == Driver::Raw {
        "raw".clone_into(&mut result.driver);
    }
    emit(result, t, t.max_error_rate)
}

/// Prints (and stores) the result; fails when too many requests failed.
fn finish(kind: Kind, t: &TargetArgs, max_error_rate: f64, measured: load::Measured) -> anyhow::Result<()> {
    emit(RunResult::new(kind, &t.target, &base_url(&t.url), t.concurrency, measured), t, max_error_rate)
}

/// Prints (and stores) a result; fails when too many requests failed.
fn emit(result: RunResult, t: &TargetArgs, max_error_rate: f64) -> anyhow::Result<()> {
    if t.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("{}", result.summary());
    }
    if let Some(path) = &t.json_out {
        result.append_to(path)?;
    }
    if result.ok == 0 || result.error_rate() > max_error_rate {
        bail!(
            "{} of {} requests to {} failed ({:?}); first error: {}",
            result.errors,
            result.ok + result.errors,
            result.target,
            result.failures,
            result.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

/// A heartbeat of the first seeded instance must be answered 200: otherwise nothing was seeded.
async fn check_seeded_instance(client: &reqwest::Client, url: &str, fleet: &Fleet) -> anyhow::Result<()> {
    let id = fleet.instance_id(0);
    let (status, body) = call(client, Method::PUT, &format!("{url}/v1/instances/{id}/heartbeat")).await?;
    if status != 200 {
        bail!("the heartbeat of seeded instance `{id}` got HTTP {status} (run `signpost-bench seed` first): {body}");
    }
    Ok(())
}

/// The first seeded service must answer with all its instances healthy, so that every
/// target is asked for the same work. Returns the size of its answer's body.
async fn check_seeded_service(client: &reqwest::Client, url: &str, fleet: &Fleet) -> anyhow::Result<u64> {
    let service = fleet.service(0);
    let (status, body) = call(client, Method::GET, &format!("{url}/v1/services/{service}")).await?;
    if status != 200 {
        bail!("GET /v1/services/{service} got HTTP {status}: {body}");
    }
    let answer: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("GET /v1/services/{service} answered no JSON"))?;
    let found = answer.get("instances").and_then(serde_json::Value::as_array).map(Vec::len);
    let expected = fleet.instances_in_service(0);
    if found != Some(usize::try_from(expected)?) {
        bail!("service `{service}` has {found:?} healthy instances, not {expected} (run `signpost-bench seed` with the same fleet first)");
    }
    Ok(body.len() as u64)
}

async fn call(client: &reqwest::Client, method: Method, url: &str) -> anyhow::Result<(u16, String)> {
    let response = client.request(method, url).send().await.map_err(|e| anyhow::anyhow!("{url}: {}", error_chain(&e)))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| anyhow::anyhow!("{url}: {}", error_chain(&e)))?;
    Ok((status, body))
}

async fn wait(args: WaitArgs) -> anyhow::Result<()> {
    let client = load::client(1, Duration::from_secs(2))?;
    let url = format!("{}{}", base_url(&args.url), args.path);
    let deadline = Instant::now() + args.timeout;
    loop {
        let last = match call(&client, Method::GET, &url).await {
            Ok((status, body)) if (200..300).contains(&status) => match args.min_instances {
                None => return Ok(()),
                Some(min) => {
                    let found = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|answer| answer.get("instances")?.as_array().map(Vec::len));
                    match found {
                        Some(n) if n >= min => return Ok(()),
                        Some(n) => format!("{n} instances, waiting for {min}"),
                        None => format!("no `instances` list in the answer: {}", body.chars().take(200).collect::<String>()),
                    }
                }
            },
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("{url} was not ready within {}: {last}", humantime::format_duration(args.timeout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
