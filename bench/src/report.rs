//! `signpost-bench report`: reads the JSON lines of a benchmark run and prints the Markdown
//! tables of docs/benchmarks.md: a candidate and a baseline side by side with their ratios,
//! the CPU each process used, and how the figures stand against the targets. The targets
//! are reported, never asserted: the exit code does not depend on them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::result::{Kind, RunResult, thousands};

/// What the report compares and against which targets.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// The JSON lines written by the runs' `--json-out`.
    pub results: std::path::PathBuf,
    /// `--target` of the system under test.
    #[arg(long, default_value = "registry")]
    pub candidate: String,
    /// `--target` of the baseline.
    #[arg(long, default_value = "baseline")]
    pub baseline: String,
    /// Column title of the system under test.
    #[arg(long, default_value = "signpost-registry")]
    pub candidate_title: String,
    /// Column title of the baseline.
    #[arg(long, default_value = "Express + PostgreSQL")]
    pub baseline_title: String,
    /// Heartbeats per second the candidate should take.
    #[arg(long, default_value_t = 5000.0)]
    pub heartbeat_target: f64,
    /// Lookups per second the candidate should answer, as a multiple of the baseline's.
    #[arg(long, default_value_t = 3.0)]
    pub lookup_ratio_target: f64,
}

/// Reads `args.results` and renders the report.
pub fn render_file(args: &ReportArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.results).with_context(|| format!("cannot read {}", args.results.display()))?;
    let results = parse(&text, &args.results)?;
    Ok(render(args, &results))
}

fn parse(text: &str, path: &Path) -> anyhow::Result<Vec<RunResult>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| serde_json::from_str(line).with_context(|| format!("{}:{}: not a result line", path.display(), n + 1)))
        .collect()
}

/// Which figure of a result a row shows, and whether more is better.
#[derive(Clone, Copy)]
enum Figure {
    Rate,
    P50,
    P99,
    Max,
    Bytes,
}

impl Figure {
    fn of(self, r: &RunResult) -> f64 {
        match self {
            Figure::Rate => r.per_second,
            Figure::P50 => r.latency_ms.p50,
            Figure::P99 => r.latency_ms.p99,
            Figure::Max => r.latency_ms.max,
            Figure::Bytes => r.bytes_per_response,
        }
    }

    fn show(self, r: &RunResult) -> String {
        let value = self.of(r);
        let mut text = match self {
            Figure::Rate | Figure::Bytes => thousands(value),
            Figure::P50 | Figure::P99 | Figure::Max => format!("{value:.2} ms"),
        };
        if matches!(self, Figure::Rate) && r.errors > 0 {
            let _ = write!(text, " ({} errors)", thousands(r.errors as f64));
        }
        text
    }

    /// Above 1 when the candidate is better.
    fn ratio(self, candidate: &RunResult, baseline: &RunResult) -> Option<f64> {
        let (c, b) = (self.of(candidate), self.of(baseline));
        let ratio = match self {
            Figure::Rate => c / b,
            Figure::P50 | Figure::P99 | Figure::Max => b / c,
            Figure::Bytes => return None,
        };
        ratio.is_finite().then_some(ratio)
    }
}

fn render(args: &ReportArgs, results: &[RunResult]) -> String {
    // The last result of each kind and target wins.
    let mut latest: BTreeMap<(Kind, &str), &RunResult> = BTreeMap::new();
    for r in results {
        latest.insert((r.kind, r.target.as_str()), r);
    }
    let get = |kind: Kind, target: &str| latest.get(&(kind, target)).copied();
    let (cand, base) = (args.candidate.as_str(), args.baseline.as_str());
    let seeded = get(Kind::Seed, cand).map_or_else(|| "the".to_owned(), |r| thousands(r.ok as f64));

    let rows: Vec<(String, Kind, Figure)> = vec![
        (format!("registrations/s, seeding {seeded} instances into an empty catalog"), Kind::Seed, Figure::Rate),
        (format!("registrations/s, new ids, {seeded} instances live"), Kind::Register, Figure::Rate),
        (format!("heartbeats/s, {seeded} instances live"), Kind::Heartbeat, Figure::Rate),
        ("lookups/s, `GET /v1/services/{name}` (10 instances)".to_owned(), Kind::Lookup, Figure::Rate),
        ("lookup latency p50".to_owned(), Kind::Lookup, Figure::P50),
        ("lookup latency p99".to_owned(), Kind::Lookup, Figure::P99),
        ("lookup latency max".to_owned(), Kind::Lookup, Figure::Max),
        ("lookup answer size (bytes)".to_owned(), Kind::Lookup, Figure::Bytes),
        ("heartbeat latency p50".to_owned(), Kind::Heartbeat, Figure::P50),
        ("heartbeat latency p99".to_owned(), Kind::Heartbeat, Figure::P99),
        ("registration latency p50 (new ids)".to_owned(), Kind::Register, Figure::P50),
        ("registration latency p99 (new ids)".to_owned(), Kind::Register, Figure::P99),
    ];

    let mut out = String::new();
    let _ = writeln!(out, "| measure | {} | {} | ratio |", args.candidate_title, args.baseline_title);
    let _ = writeln!(out, "|---|--:|--:|--:|");
    for (label, kind, figure) in rows {
        let (c, b) = (get(kind, cand), get(kind, base));
        if c.is_none() && b.is_none() {
            continue;
        }
        let show = |r: Option<&RunResult>| r.map_or_else(|| "–".to_owned(), |r| figure.show(r));
        let ratio = match (c, b) {
            (Some(c), Some(b)) => figure.ratio(c, b).map_or_else(String::new, |x| format!("{x:.2}×")),
            _ => String::new(),
        };
        let _ = writeln!(out, "| {label} | {} | {} | {ratio} |", show(c), show(b));
    }
    let _ = writeln!(out);
    let _ =
        writeln!(out, "Ratio: above 1 means {} is better (throughput: {cand} ÷ {base}; latency: {base} ÷ {cand}).", args.candidate_title);
    if let Some(r) = get(Kind::Lookup, cand).or_else(|| get(Kind::Heartbeat, cand)) {
        let _ = writeln!(out, "Timed runs: {} concurrent connections, {:.0} s counted each.", r.concurrency, r.seconds);
    }

    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "CPU used during each run, in cores (CPU seconds per second; the machine has {} in all), and per request. \
         \"other\" is everything else that ran on the machine meanwhile.",
        std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get)
    );
    let _ = writeln!(out);
    let _ =
        writeln!(out, "| run | target | requests/s | generator | server | postgres | other | server CPU/request | postgres CPU/request |");
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for kind in [Kind::Seed, Kind::Register, Kind::Heartbeat, Kind::Lookup] {
        for target in [cand, base] {
            let Some(r) = get(kind, target) else { continue };
            let cores = |name: &str| r.cpu_cores.get(name).copied();
            let show_cores = |name: &str| cores(name).map_or_else(|| "–".to_owned(), |c| format!("{c:.2}"));
            let other = cores("machine").map_or_else(
                || "–".to_owned(),
                |machine| {
                    let ours: f64 = ["generator", "server", "postgres"].iter().filter_map(|name| cores(name)).sum();
                    format!("{:.2}", (machine - ours).max(0.0))
                },
            );
            let per_request = |name: &str| match cores(name) {
                Some(c) if r.per_second > 0.0 => format!("{:.0} µs", c * 1e6 / r.per_second),
                _ => "–".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} | {target} | {} | {} | {} | {} | {other} | {} | {} |",
                kind.as_str(),
                thousands(r.per_second),
                show_cores("generator"),
                show_cores("server"),
                show_cores("postgres"),
                per_request("server"),
                per_request("postgres"),
            );
        }
    }

    let _ = writeln!(out);
    let _ = writeln!(out, "Targets (reported, not asserted):");
    let _ = writeln!(out);
    match get(Kind::Heartbeat, cand) {
        Some(r) => {
            let met = if r.per_second >= args.heartbeat_target { "met" } else { "NOT met" };
            let _ = writeln!(
                out,
                "- heartbeats: {}/s at {cand}, target at least {}/s: **{met}**",
                thousands(r.per_second),
                thousands(args.heartbeat_target)
            );
        }
        None => {
            let _ = writeln!(out, "- heartbeats: no run");
        }
    }
    match (get(Kind::Lookup, cand), get(Kind::Lookup, base)) {
        (Some(c), Some(b)) if b.per_second > 0.0 => {
            let ratio = c.per_second / b.per_second;
            let met = if ratio >= args.lookup_ratio_target { "met" } else { "NOT met" };
            let _ = writeln!(
                out,
                "- lookups: {}/s at {cand} vs {}/s at {base} = {ratio:.2}×, target at least {:.0}×: **{met}**",
                thousands(c.per_second),
                thousands(b.per_second),
                args.lookup_ratio_target
            );
        }
        _ => {
            let _ = writeln!(out, "- lookups: no pair of runs to compare");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::Latency;

    fn result(kind: Kind, target: &str, per_second: f64, p50: f64) -> RunResult {
        RunResult {
            kind,
            target: target.into(),
            url: "http://127.0.0.1:1".into(),
            concurrency: 64,
            seconds: 10.0,
            ok: (per_second * 10.0) as u64,
            errors: 0,
            failures: BTreeMap::new(),
            first_error: None,
            per_second,
            latency_ms: Latency { p50, p90: p50, p99: p50 * 2.0, max: p50 * 4.0, mean: p50 },
            bytes_per_response: 500.0,
            cpu_cores: BTreeMap::from([("generator".into(), 0.5), ("server".into(), 1.0), ("machine".into(), 1.75)]),
            rss_kib: BTreeMap::new(),
            driver: "reqwest".into(),
            unix_time: 0,
        }
    }

    fn args() -> ReportArgs {
        ReportArgs {
            results: "r.jsonl".into(),
            candidate: "registry".into(),
            baseline: "baseline".into(),
            candidate_title: "R".into(),
            baseline_title: "B".into(),
            heartbeat_target: 5000.0,
            lookup_ratio_target: 3.0,
        }
    }

    #[test]
    fn compares_side_by_side() {
        let results = vec![
            result(Kind::Lookup, "registry", 10_000.0, 1.0),
            result(Kind::Lookup, "baseline", 4_000.0, 4.0),
            result(Kind::Heartbeat, "registry", 4_000.0, 2.0),
            result(Kind::Heartbeat, "baseline", 4_000.0, 2.0),
        ];
        let text = render(&args(), &results);
        assert!(text.contains("| lookups/s, `GET /v1/services/{name}` (10 instances) | 10,000 | 4,000 | 2.50× |"), "{text}");
        assert!(text.contains("| lookup latency p50 | 1.00 ms | 4.00 ms | 4.00× |"), "{text}");
        assert!(text.contains("heartbeats: 4,000/s at registry, target at least 5,000/s: **NOT met**"), "{text}");
        assert!(text.contains("= 2.50×, target at least 3×: **NOT met**"), "{text}");
        assert!(text.contains("| lookup | registry | 10,000 | 0.50 | 1.00 | – | 0.25 | 100 µs | – |"), "{text}");
    }

    #[test]
    fn the_last_result_of_a_kind_wins() {
        let results = vec![result(Kind::Heartbeat, "registry", 1_000.0, 2.0), result(Kind::Heartbeat, "registry", 6_000.0, 2.0)];
        let text = render(&args(), &results);
        assert!(text.contains("6,000/s at registry, target at least 5,000/s: **met**"), "{text}");
    }

    #[test]
    fn bad_lines_are_named() {
        let error = parse("{}\n", Path::new("x.jsonl")).err().map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("x.jsonl:1: not a result line"));
    }
}
