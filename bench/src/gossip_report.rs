//! `signpost-bench gossip-sample` (memory and idle CPU of running processes, e.g. an agent
//! holding a large catalog beside the registry holding the same) and `gossip-report` (the
//! Markdown tables of `scripts/bench-gossip` from the JSON lines of both commands).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cpu::{Selector, Watched};
use crate::gossip_cluster::{ClusterResult, Spread};
use crate::gossip_os::{self, CpuWindow};

/// Settings of `gossip-sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A process to sample, LABEL=PID (repeatable; all are sampled over the same window).
    #[arg(long = "process", value_name = "LABEL=PID", required = true)]
    processes: Vec<Watched>,
    /// Instances in the catalog the processes hold (for the table).
    #[arg(long)]
    instances: u64,
    /// How the catalog reached the processes, for the table (e.g. "registry feed").
    #[arg(long, default_value = "")]
    source: String,
    /// CPU is counted over this window (no lookups, no changes meanwhile).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Append one JSON line per process to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// One process's memory and idle CPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Always `gossip-sample`.
    pub kind: String,
    /// e.g. `agent`, `registry`.
    pub label: String,
    /// Instances in the catalog.
    pub instances: u64,
    /// How the catalog reached it.
    pub source: String,
    /// `VmRSS` at the end of the window, KiB.
    pub rss_kib: Option<u64>,
    /// `VmHWM` (peak RSS), KiB.
    pub hwm_kib: Option<u64>,
    /// CPU seconds per minute over the window.
    pub cpu_s_per_min: Option<f64>,
    /// The window, seconds.
    pub window_s: f64,
}

/// Samples every process over one window and prints (and stores) one line each.
pub async fn sample(args: SampleArgs) -> anyhow::Result<()> {
    let mut pids = Vec::new();
    for watched in &args.processes {
        match watched.selector {
            Selector::Pid(pid) => pids.push(pid),
            Selector::Cmdline(_) => anyhow::bail!("--process {} must be LABEL=PID", watched.name),
        }
    }
    let window = CpuWindow::start(&pids);
    tokio::time::sleep(args.window).await;
    let (seconds, cpu, _) = window.finish();
    let mut lines = String::new();
    for ((watched, pid), cpu) in args.processes.iter().zip(&pids).zip(cpu) {
        let sample = Sample {
            kind: "gossip-sample".into(),
            label: watched.name.clone(),
            instances: args.instances,
            source: args.source.clone(),
            rss_kib: gossip_os::status_kib(*pid, "VmRSS"),
            hwm_kib: gossip_os::status_kib(*pid, "VmHWM"),
            cpu_s_per_min: cpu.map(|c| c / seconds * 60.0),
            window_s: seconds,
        };
        println!(
            "{} with {} instances ({}): RSS {} (peak {}), {} CPU s/min",
            sample.label,
            sample.instances,
            sample.source,
            mib(sample.rss_kib),
            mib(sample.hwm_kib),
            sample.cpu_s_per_min.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into())
        );
        lines.push_str(&serde_json::to_string(&sample)?);
        lines.push('\n');
    }
    if let Some(path) = &args.json_out {
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.write_all(lines.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Settings of `gossip-report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// JSON lines written by gossip-cluster and gossip-sample.
    file: PathBuf,
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "-".into())
}

fn ms(seconds: Option<f64>) -> String {
    seconds.map(|s| format!("{:.0} ms", s * 1000.0)).unwrap_or_else(|| "-".into())
}

fn spread(s: &Spread) -> String {
    let incomplete = if s.incomplete > 0 { format!(", {} not everywhere", s.incomplete) } else { String::new() };
    format!("{} / {} (max {}; n {}{incomplete})", ms(s.p50_s), ms(s.p99_s), ms(s.max_s), s.n)
}

fn bytes(b: f64) -> String {
    if b >= 10.0 * 1024.0 { format!("{:.0} KiB/s", b / 1024.0) } else { format!("{b:.0} B/s") }
}

/// The Markdown tables.
pub fn render_file(args: &ReportArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut clusters = Vec::new();
    let mut samples = Vec::new();
    let mut failed = String::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("line {} is not JSON", n + 1))?;
        match value.get("kind").and_then(serde_json::Value::as_str) {
            Some("gossip-cluster") => {
                clusters.push(serde_json::from_value::<ClusterResult>(value).with_context(|| format!("line {}", n + 1))?)
            }
            Some("gossip-sample") => samples.push(serde_json::from_value::<Sample>(value).with_context(|| format!("line {}", n + 1))?),
            Some("gossip-cluster-failed") => {
                let num = |key: &str| value.get(key).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
                failed.push_str(&format!(
                    "**{}: did not converge.** After {:.0} s, {} of {} agents did not yet know all {} instances; {:.0} UDP datagrams were dropped because a socket's receive buffer was full, against {:.0} received.\n\n",
                    value.get("label").and_then(serde_json::Value::as_str).unwrap_or("?"),
                    num("converge_timeout_s"),
                    num("not_converged"),
                    num("agents"),
                    num("instances"),
                    num("udp_rcvbuf_errors"),
                    num("udp_in_datagrams"),
                ));
            }
            _ => {}
        }
    }
    Ok(format!("{}{failed}", render(&clusters, &samples)))
}

fn render(clusters: &[ClusterResult], samples: &[Sample]) -> String {
    let mut out = String::new();
    if !clusters.is_empty() {
        out.push_str("| cluster | agents | instances | change seen by every agent, p50 / p99 | of which registrations | of which health changes | killed agent dropped by every agent, p50 / p99 |\n");
        out.push_str("|---|--:|--:|---|---|---|---|\n");
        for c in clusters {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                c.label,
                c.agents,
                c.instances,
                spread(&c.change),
                spread(&c.register),
                spread(&c.health),
                spread(&c.dead)
            ));
        }
        out.push('\n');
        out.push_str("| cluster | converged after | gossip sent per agent (idle) | sent + received per agent | datagrams/s per agent | idle CPU per agent | agent RSS (processes: median, max) | CPU of all agents per change | machine busy during changes | UDP datagrams dropped, receive buffer full (whole run) |\n");
        out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for c in clusters {
            let mut rss: Vec<u64> = c.process_figures.iter().filter_map(|p| p.rss_kib).collect();
            rss.sort_unstable();
            let rss_text = match (rss.get(rss.len() / 2), rss.last()) {
                (Some(median), Some(max)) => format!("{} / {}", mib(Some(*median)), mib(Some(*max))),
                _ => format!("whole process {}", mib(c.idle.self_rss_kib)),
            };
            let private = if c.idle.private_network { "" } else { " (shared network: includes others' loopback traffic)" };
            out.push_str(&format!(
                "| {} | {:.1} s | {}{private} | {} | {:.0} | {} | {} | {} | {} | {} of {} |\n",
                c.label,
                c.converge_s,
                bytes(c.idle.sent_bytes_per_s_per_agent),
                bytes(2.0 * c.idle.sent_bytes_per_s_per_agent),
                c.idle.datagrams_per_s_per_agent,
                c.idle.cpu_s_per_min_per_agent.map(|s| format!("{s:.2} s/min")).unwrap_or_else(|| "-".into()),
                rss_text,
                c.cpu_s_per_change.map(|s| format!("{:.0} ms", s * 1000.0)).unwrap_or_else(|| "-".into()),
                c.events_machine_cores.map(|m| format!("{m:.2} cores")).unwrap_or_else(|| "-".into()),
                c.run_net.udp_rcvbuf_errors,
                c.run_net.udp_rcvbuf_errors + c.run_net.udp_in_datagrams,
            ));
        }
        out.push('\n');
        let observed: Vec<(&ClusterResult, &crate::gossip_cluster::ProcessFigures)> = clusters
            .iter()
            .filter(|c| c.processes > 0 && c.processes < 3)
            .flat_map(|c| c.process_figures.iter().map(move |p| (c, p)))
            .collect();
        if !observed.is_empty() {
            out.push_str("| cluster | agent process | instances it caches (from gossip) | RSS | idle CPU | CPU during the changes |\n");
            out.push_str("|---|---|--:|--:|--:|--:|\n");
            for (c, p) in observed {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    c.label,
                    p.node,
                    c.instances,
                    mib(p.rss_kib),
                    p.idle_cpu_s_per_min.map(|s| format!("{s:.2} s/min")).unwrap_or_else(|| "-".into()),
                    p.events_cpu_s_per_min.map(|s| format!("{s:.1} s/min")).unwrap_or_else(|| "-".into()),
                ));
            }
            out.push('\n');
        }
    }
    if !samples.is_empty() {
        out.push_str("| process | instances | from | RSS | peak RSS | idle CPU |\n");
        out.push_str("|---|--:|---|--:|--:|--:|\n");
        for s in samples {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                s.label,
                s.instances,
                s.source,
                mib(s.rss_kib),
                mib(s.hwm_kib),
                s.cpu_s_per_min.map(|c| format!("{c:.3} s/min")).unwrap_or_else(|| "-".into())
            ));
        }
    }
    out
}
