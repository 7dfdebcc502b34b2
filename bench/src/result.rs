//! One run's result: the one-line summary printed to stdout and the JSON line appended to
//! `--json-out`, which `signpost-bench report` reads back.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::load::{Measured, percentile};

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Registrations of the seeded fleet into an empty catalog.
    Seed,
    /// Registrations of new ids with the fleet live.
    Register,
    /// Heartbeats of seeded instances.
    Heartbeat,
    /// `GET /v1/services/{name}` of seeded services.
    Lookup,
}

impl Kind {
    /// As written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Seed => "seed",
            Kind::Register => "register",
            Kind::Heartbeat => "heartbeat",
            Kind::Lookup => "lookup",
        }
    }
}

/// Latency of the counted requests, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// One run against one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// What was measured.
    pub kind: Kind,
    /// Which server, e.g. `registry` or `baseline`.
    pub target: String,
    /// Its base URL.
    pub url: String,
    /// Concurrent connections (workers).
    pub concurrency: usize,
    /// Length of the counted window in seconds.
    pub seconds: f64,
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Failures by HTTP status, plus `transport` for requests without an answer.
    pub failures: BTreeMap<String, u64>,
    /// The first failure seen.
    pub first_error: Option<String>,
    /// Successful requests per second.
    pub per_second: f64,
    /// Latency of the counted requests.
    pub latency_ms: Latency,
    /// Mean body size of the successful answers.
    pub bytes_per_response: f64,
    /// CPU cores used in the window: `generator` (this process, or the `wrk` it ran) and
    /// each `--cpu` watch.
    pub cpu_cores: BTreeMap<String, f64>,
    /// Resident memory of each `--cpu NAME=pid:PID` process at the end of the window, in KiB.
    #[serde(default)]
    pub rss_kib: BTreeMap<String, u64>,
    /// What sent the requests: `reqwest` (the shared client), `raw` (a bare HTTP/1.1
    /// connection per worker) or `wrk`.
    #[serde(default = "default_driver")]
    pub driver: String,
    /// When the run ended (unix seconds).
    pub unix_time: u64,
}

impl RunResult {
    /// The result of a finished run.
    pub fn new(kind: Kind, target: &str, url: &str, concurrency: usize, measured: Measured) -> Self {
        let Measured { tally, elapsed, cpu_cores, rss_kib } = measured;
        let seconds = elapsed.as_secs_f64();
        let ms = |share: f64| f64::from(percentile(&tally.latencies_us, share).unwrap_or(0)) / 1000.0;
        let count = tally.latencies_us.len();
        let mean =
            if count == 0 { 0.0 } else { tally.latencies_us.iter().map(|&us| u64::from(us)).sum::<u64>() as f64 / count as f64 / 1000.0 };
        let mut failures: BTreeMap<String, u64> = tally.statuses.iter().map(|(status, n)| (status.to_string(), *n)).collect();
        if tally.transport_errors > 0 {
            failures.insert("transport".into(), tally.transport_errors);
        }
        RunResult {
            kind,
            target: target.to_owned(),
            url: url.to_owned(),
            concurrency,
            seconds,
            ok: tally.ok,
            errors: tally.errors(),
            failures,
            first_error: tally.first_error.clone(),
            per_second: if seconds > 0.0 { tally.ok as f64 / seconds } else { 0.0 },
            latency_ms: Latency { p50: ms(0.50), p90: ms(0.90), p99: ms(0.99), max: ms(1.0), mean },
            bytes_per_response: if tally.ok == 0 { 0.0 } else { tally.bytes as f64 / tally.ok as f64 },
            cpu_cores,
            rss_kib,
            driver: default_driver(),
            unix_time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        }
    }

    /// Share of the requests that failed.
    pub fn error_rate(&self) -> f64 {
        let total = self.ok + self.errors;
        if total == 0 { 1.0 } else { self.errors as f64 / total as f64 }
    }

    /// The one-line summary.
    pub fn summary(&self) -> String {
        let l = &self.latency_ms;
        let mut line = format!(
            "{:<9} {:<9} {:>8}/s  ok {} errors {}  latency p50 {:.2} ms p99 {:.2} ms max {:.1} ms  {:.0} B/answer  ({} conns, {:.1} s)",
            self.kind.as_str(),
            self.target,
            thousands(self.per_second),
            thousands(self.ok as f64),
            thousands(self.errors as f64),
            l.p50,
            l.p99,
            l.max,
            self.bytes_per_response,
            self.concurrency,
            self.seconds,
        );
        if self.driver != "reqwest" {
            line.push_str(&format!("  driver {}", self.driver));
        }
        if !self.cpu_cores.is_empty() {
            let cpu: Vec<String> = self.cpu_cores.iter().map(|(name, cores)| format!("{name} {cores:.2}")).collect();
            line.push_str(&format!("  cpu cores: {}", cpu.join(", ")));
        }
        if !self.rss_kib.is_empty() {
            let rss: Vec<String> = self.rss_kib.iter().map(|(name, kib)| format!("{name} {:.1} MiB", *kib as f64 / 1024.0)).collect();
            line.push_str(&format!("  rss: {}", rss.join(", ")));
        }
        if let Some(error) = &self.first_error {
            line.push_str(&format!("  first error: {error}"));
        }
        line
    }

    /// Appends this result as one JSON line to `path`.
    pub fn append_to(&self, path: &Path) -> anyhow::Result<()> {
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        file.write_all(&line).with_context(|| format!("cannot write {}", path.display()))
    }
}

fn default_driver() -> String {
    "reqwest".to_owned()
}

/// A number rounded to an integer, with thousands separated by commas: `12,345`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 && digits != "0" { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.8), "1,234,568");
        assert_eq!(thousands(-4500.0), "-4,500");
    }
}
