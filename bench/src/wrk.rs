//! `--driver wrk`: the lookups are sent by `wrk` (a C load generator, far cheaper per request
//! than this process), started as a child with a Lua `done` hook that prints its figures on
//! one line. Its CPU is watched as the `generator`. `wrk` asks for one URL only and runs
//! closed-loop like the other drivers, so the figures compare; its latency percentiles come
//! from its own histogram (microsecond resolution).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cpu::{CpuWatch, Watched};
use crate::load::{Measured, Tally};
use crate::result::{Kind, Latency, RunResult};

/// The `done` hook: one line that [`parse_summary`] reads.
const SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("signpost-bench-wrk %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.3f\n",
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"#;

/// How to run `wrk`.
#[derive(Debug, Clone)]
pub struct Wrk {
    /// The binary.
    pub program: PathBuf,
    /// `-t`: its threads.
    pub threads: usize,
    /// `-c`: connections, each with one request in flight.
    pub connections: usize,
    /// `--timeout`.
    pub timeout: Duration,
}

/// `wrk`'s figures of one run.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    duration_us: f64,
    requests: u64,
    errors: BTreeMap<String, u64>,
    latency_us: [f64; 5],
}

impl Wrk {
    /// Runs `wrk` against `url` for `warmup` (not counted), then for `duration`, watching the
    /// CPU of `wrk` and of `watched`. wrk counts whole seconds: both are rounded. `body_bytes` is the answer's body size (wrk counts
    /// whole answers, headers included).
    pub async fn run(
        &self,
        url: &str,
        warmup: Duration,
        duration: Duration,
        watched: &[Watched],
        body_bytes: u64,
    ) -> anyhow::Result<(Measured, WrkFigures)> {
        let script = std::env::temp_dir().join(format!("signpost-bench-wrk-{}.lua", std::process::id()));
        std::fs::write(&script, SCRIPT).with_context(|| format!("cannot write {}", script.display()))?;
        let result = self.run_with(url, &script, warmup, duration, watched, body_bytes).await;
        let _ = std::fs::remove_file(&script);
        result
    }

    async fn run_with(
        &self,
        url: &str,
        script: &std::path::Path,
        warmup: Duration,
        duration: Duration,
        watched: &[Watched],
        body_bytes: u64,
    ) -> anyhow::Result<(Measured, WrkFigures)> {
        if !warmup.is_zero() {
            let output = self.command(url, warmup, None).output().await.context("cannot start wrk")?;
            if !output.status.success() {
                bail!(
                    "wrk failed in the warm-up: {} {}",
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        let duration = Duration::from_secs(whole_seconds(duration));
        let child = self.command(url, duration, Some(script)).spawn().context("cannot start wrk")?;
        let pid = child.id().context("wrk ended at once")?;
        // wrk ends its counted window by itself; the CPU window is a little inside it, so that
        // it neither sees the connections being opened nor misses wrk once it has exited.
        let margin = (duration / 20).min(Duration::from_millis(250));
        let started = Instant::now();
        let mut cpu = CpuWatch::with_generator(watched, pid);
        tokio::time::sleep(margin).await;
        cpu.start();
        tokio::time::sleep_until((started + duration.saturating_sub(margin)).into()).await;
        let cpu_cores = cpu.cores();
        let rss_kib = cpu.rss_kib();
        let output = child.wait_with_output().await.context("wrk did not finish")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("wrk failed: {} {}", stdout.trim(), String::from_utf8_lossy(&output.stderr).trim());
        }
        let summary = parse_summary(&stdout).with_context(|| format!("wrk printed no summary line: {}", stdout.trim()))?;
        let status_errors = summary.errors.get("status").copied().unwrap_or(0);
        let ok = summary.requests.saturating_sub(status_errors);
        let tally = Tally { ok, bytes: ok * body_bytes, ..Tally::default() };
        let elapsed = Duration::from_secs_f64(summary.duration_us / 1e6);
        Ok((Measured { tally, elapsed, cpu_cores, rss_kib }, WrkFigures { errors: summary.errors, latency_us: summary.latency_us }))
    }

    fn command(&self, url: &str, duration: Duration, script: Option<&std::path::Path>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg(format!("-t{}", self.threads.max(1)))
            .arg(format!("-c{}", self.connections.max(self.threads.max(1))))
            .arg(format!("-d{}s", whole_seconds(duration)))
            .arg(format!("--timeout={}s", whole_seconds(self.timeout)));
        if let Some(script) = script {
            command.arg("-s").arg(script);
        }
        command.arg(url).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        command
    }
}

/// wrk takes whole seconds (at least 1).
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs_f64().round().max(1.0) as u64
}

/// What wrk counted beyond the answers: failures by kind, latency p50/p90/p99/max/mean (µs).
#[derive(Debug, Clone)]
pub struct WrkFigures {
    errors: BTreeMap<String, u64>,
    latency_us: [f64; 5],
}

impl WrkFigures {
    /// Puts wrk's failures and latency into `result`, which was built from its answer count.
    pub fn apply(&self, result: &mut RunResult) {
        let [p50, p90, p99, max, mean] = self.latency_us.map(|us| us / 1000.0);
        result.latency_ms = Latency { p50, p90, p99, max, mean };
        result.failures = self.errors.iter().filter(|(_, n)| **n > 0).map(|(kind, n)| (kind.clone(), *n)).collect();
        result.errors = result.failures.values().sum();
        if let Some((kind, n)) = result.failures.iter().next() {
            result.first_error = Some(format!("wrk counted {n} {kind} errors"));
        }
        result.driver = "wrk".to_owned();
    }
}

fn parse_summary(stdout: &str) -> Option<Summary> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("signpost-bench-wrk "))?;
    let numbers: Vec<f64> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
    let [duration_us, requests, _bytes, connect, read, write, status, timeout, p50, p90, p99, max, mean] = numbers[..] else {
        return None;
    };
    let count = |x: f64| x.max(0.0) as u64;
    let errors = BTreeMap::from([
        ("connect".to_owned(), count(connect)),
        ("read".to_owned(), count(read)),
        ("write".to_owned(), count(write)),
        ("status".to_owned(), count(status)),
        ("timeout".to_owned(), count(timeout)),
    ]);
    Some(Summary { duration_us, requests: count(requests), errors, latency_us: [p50, p90, p99, max, mean] })
}

/// A lookup result from a wrk run.
pub fn result(target: &str, url: &str, connections: usize, measured: Measured, wrk: &WrkFigures) -> RunResult {
    let mut result = RunResult::new(Kind::Lookup, target, url, connections, measured);
    wrk.apply(&mut result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_line() {
        let out = "Running 1s test\nsignpost-bench-wrk 10002000 1000 4000000 0 0 0 2 1 1590 2770 3880 10810 1690.5\n";
        let summary = parse_summary(out).expect("a summary");
        assert_eq!(summary.requests, 1000);
        assert_eq!(summary.errors["status"], 2);
        assert_eq!(summary.errors["timeout"], 1);
        assert_eq!(summary.latency_us, [1590.0, 2770.0, 3880.0, 10810.0, 1690.5]);
        assert_eq!(parse_summary("no line"), None);
        assert_eq!(parse_summary("signpost-bench-wrk 1 2 3"), None);
    }

    #[test]
    fn a_result_carries_wrk_figures() {
        let summary = parse_summary("signpost-bench-wrk 10000000 1000 0 0 0 0 10 0 1590 2770 3880 10810 1690.5\n").expect("a summary");
        let measured = Measured {
            tally: Tally { ok: 990, bytes: 990 * 3866, ..Tally::default() },
            elapsed: Duration::from_secs(10),
            cpu_cores: BTreeMap::new(),
            rss_kib: BTreeMap::new(),
        };
        let figures = WrkFigures { errors: summary.errors, latency_us: summary.latency_us };
        let r = result("agent", "http://127.0.0.1:1", 64, measured, &figures);
        assert_eq!((r.ok, r.errors, r.driver.as_str()), (990, 10, "wrk"));
        assert!((r.per_second - 99.0).abs() < 1e-9);
        assert!((r.latency_ms.p99 - 3.88).abs() < 1e-9);
        assert!((r.bytes_per_response - 3866.0).abs() < 1e-9);
        assert_eq!(r.first_error.as_deref(), Some("wrk counted 10 status errors"));
    }
}
