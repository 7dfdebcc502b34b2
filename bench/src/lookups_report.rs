//! `signpost-bench lookup-report`: the tables of the agent's lookup benchmark. Three targets
//! answered the same lookup in turns, possibly over several repeats: a bare server with the
//! same answer (the limit), the candidate (the agent) and a reference (the registry). The
//! report shows the medians side by side with the candidate's ratios to the other two,
//! every repeat, and how the figures stand against the targets (reported, never asserted).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context as _, bail};

use crate::result::{Kind, RunResult, thousands};

/// Arguments of `signpost-bench lookup-report`.
#[derive(Debug, Clone, clap::Args)]
pub struct LookupReportArgs {
    /// The JSON lines written by the runs' `--json-out`; only lookups are read.
    pub results: std::path::PathBuf,
    /// `--target` of the limit (the bare server).
    #[arg(long, default_value = "bare")]
    pub limit: String,
    /// `--target` of the system under test.
    #[arg(long, default_value = "agent")]
    pub candidate: String,
    /// `--target` of the reference.
    #[arg(long, default_value = "registry")]
    pub reference: String,
    /// Column titles of the limit, the candidate and the reference, comma-separated.
    #[arg(long, default_value = "bare hyper,signpost-agent,signpost-registry (PostgreSQL)")]
    pub titles: String,
    /// The candidate's lookups/s should be at least this share of the limit's.
    #[arg(long, default_value_t = 0.8)]
    pub limit_share_target: f64,
    /// The candidate's p99 should be at most this multiple of the limit's.
    #[arg(long, default_value_t = 1.5)]
    pub p99_multiple_target: f64,
    /// The candidate's lookups/s should be at least this multiple of the reference's.
    #[arg(long, default_value_t = 10.0)]
    pub reference_multiple_target: f64,
}

/// Reads `args.results` and renders the report.
pub fn render_file(args: &LookupReportArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.results).with_context(|| format!("cannot read {}", args.results.display()))?;
    let results = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str::<RunResult>(line).with_context(|| format!("{}:{}: not a result line", args.results.display(), n + 1))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    render(args, &results)
}

/// The lookup runs, grouped by repeat: the k-th run of a target belongs to repeat k.
struct Repeats<'a> {
    /// Per repeat, its runs in the order they ran.
    runs: Vec<Vec<&'a RunResult>>,
}

impl<'a> Repeats<'a> {
    fn new(results: &'a [RunResult], targets: &[&str]) -> Self {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let mut runs: Vec<Vec<&RunResult>> = Vec::new();
        for r in results.iter().filter(|r| r.kind == Kind::Lookup && targets.contains(&r.target.as_str())) {
            let k = seen.entry(r.target.as_str()).or_default();
            if runs.len() <= *k {
                runs.push(Vec::new());
            }
            runs[*k].push(r);
            *k += 1;
        }
        Repeats { runs }
    }

    fn of(&self, target: &str) -> Vec<&'a RunResult> {
        self.runs.iter().flatten().copied().filter(|r| r.target == target).collect()
    }

    fn get(&self, repeat: usize, target: &str) -> Option<&'a RunResult> {
        self.runs.get(repeat)?.iter().copied().find(|r| r.target == target)
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

/// A figure of a run, for the summary rows.
#[derive(Clone, Copy)]
enum Figure {
    Rate,
    P50,
    P99,
    Max,
    Bytes,
    ServerCpuPerRequest,
    Rss,
}

impl Figure {
    fn of(self, r: &RunResult) -> Option<f64> {
        match self {
            Figure::Rate => Some(r.per_second),
            Figure::P50 => Some(r.latency_ms.p50),
            Figure::P99 => Some(r.latency_ms.p99),
            Figure::Max => Some(r.latency_ms.max),
            Figure::Bytes => Some(r.bytes_per_response),
            Figure::ServerCpuPerRequest => {
                let cores = r.cpu_cores.get("server")?;
                (r.per_second > 0.0).then(|| cores * 1e6 / r.per_second)
            }
            Figure::Rss => r.rss_kib.get("server").map(|kib| *kib as f64 / 1024.0),
        }
    }

    fn show(self, value: Option<f64>) -> String {
        let Some(value) = value else { return "–".to_owned() };
        match self {
            Figure::Rate | Figure::Bytes => thousands(value),
            Figure::P50 | Figure::P99 | Figure::Max => format!("{value:.2} ms"),
            Figure::ServerCpuPerRequest => format!("{value:.1} µs"),
            Figure::Rss => format!("{value:.1} MiB"),
        }
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    let r = a? / b?;
    r.is_finite().then_some(r)
}

fn times(x: Option<f64>) -> String {
    x.map_or_else(String::new, |x| if x >= 10.0 { format!("{x:.1}×") } else { format!("{x:.2}×") })
}

fn render(args: &LookupReportArgs, results: &[RunResult]) -> anyhow::Result<String> {
    let (limit, cand, reference) = (args.limit.as_str(), args.candidate.as_str(), args.reference.as_str());
    let titles: Vec<&str> = args.titles.split(',').map(str::trim).collect();
    let [limit_title, cand_title, reference_title] = titles[..] else {
        bail!("--titles needs three titles, comma-separated");
    };
    let repeats = Repeats::new(results, &[limit, cand, reference]);
    if repeats.runs.is_empty() {
        bail!("{}: no lookup run of {limit}, {cand} or {reference}", args.results.display());
    }
    let medians = |target: &str, figure: Figure| median(repeats.of(target).iter().filter_map(|r| figure.of(r)).collect());

    let mut out = String::new();
    let n = repeats.runs.len();
    let what = if n == 1 { "one run each".to_owned() } else { format!("median of {n} repeats") };
    let _ =
        writeln!(out, "| measure ({what}) | {limit_title} | {cand_title} | {reference_title} | {cand} ÷ {limit} | {cand} ÷ {reference} |");
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|");
    let rows = [
        ("lookups/s", Figure::Rate, true),
        ("latency p50", Figure::P50, true),
        ("latency p99", Figure::P99, true),
        ("latency max", Figure::Max, true),
        ("answer body (bytes)", Figure::Bytes, false),
        ("server CPU per lookup", Figure::ServerCpuPerRequest, true),
        ("server RSS at the end of the run", Figure::Rss, false),
    ];
    for (label, figure, ratios) in rows {
        let (l, c, r) = (medians(limit, figure), medians(cand, figure), medians(reference, figure));
        let (to_limit, to_reference) = if ratios { (times(ratio(c, l)), times(ratio(c, r))) } else { (String::new(), String::new()) };
        let _ = writeln!(out, "| {label} | {} | {} | {} | {to_limit} | {to_reference} |", figure.show(l), figure.show(c), figure.show(r));
    }
    let _ = writeln!(out);
    let _ =
        writeln!(out, "Ratios are {cand}'s figure divided by the other's: above 1 is faster for lookups/s, slower for latency and CPU.");
    if let Some(r) = repeats.runs.first().and_then(|runs| runs.first()) {
        let _ = writeln!(out, "Each run: {} connections, {:.0} s counted, load from {}.", r.concurrency, r.seconds, r.driver);
    }

    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Every run, in the order they ran. CPU in cores (the machine has {}); \"other\" is everything else on the machine meanwhile.",
        std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get)
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "| repeat | target | lookups/s | p50 | p99 | max | generator | server | postgres | other | server CPU/lookup |");
    let _ = writeln!(out, "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (k, runs) in repeats.runs.iter().enumerate() {
        for r in runs {
            let cores = |name: &str| r.cpu_cores.get(name).copied();
            let show = |name: &str| cores(name).map_or_else(|| "–".to_owned(), |c| format!("{c:.2}"));
            let other = cores("machine").map_or_else(
                || "–".to_owned(),
                |machine| {
                    let ours: f64 = ["generator", "server", "postgres"].iter().filter_map(|name| cores(name)).sum();
                    format!("{:.2}", (machine - ours).max(0.0))
                },
            );
            let mut rate = thousands(r.per_second);
            if r.errors > 0 {
                let _ = write!(rate, " ({} errors)", thousands(r.errors as f64));
            }
            let _ = writeln!(
                out,
                "| {} | {} | {rate} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} | {} | {other} | {} |",
                k + 1,
                r.target,
                r.latency_ms.p50,
                r.latency_ms.p99,
                r.latency_ms.max,
                show("generator"),
                show("server"),
                show("postgres"),
                Figure::ServerCpuPerRequest.show(Figure::ServerCpuPerRequest.of(r)),
            );
        }
    }

    let per_repeat = |f: &dyn Fn(usize) -> Option<f64>| -> String {
        let values: Vec<String> = (0..n).map(|k| f(k).map_or_else(|| "–".to_owned(), |x| times(Some(x)))).collect();
        values.join(", ")
    };
    let rate = |k: usize, target: &str| repeats.get(k, target).map(|r| r.per_second);
    let p99 = |k: usize, target: &str| repeats.get(k, target).map(|r| r.latency_ms.p99);
    let share = ratio(medians(cand, Figure::Rate), medians(limit, Figure::Rate));
    let p99_multiple = ratio(medians(cand, Figure::P99), medians(limit, Figure::P99));
    let over_reference = ratio(medians(cand, Figure::Rate), medians(reference, Figure::Rate));
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "**met**",
        Some(false) => "**NOT met**",
        None => "no figures",
    };
    let _ = writeln!(out);
    let _ = writeln!(out, "Targets (reported, not asserted):");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- lookups/s at least {:.0} % of {limit}'s: {} ({}), {}",
        args.limit_share_target * 100.0,
        share.map_or_else(|| "–".to_owned(), |s| format!("{:.0} %", s * 100.0)),
        per_repeat(&|k| ratio(rate(k, cand), rate(k, limit))),
        verdict(share.map(|s| s >= args.limit_share_target))
    );
    let _ = writeln!(
        out,
        "- p99 at most {}× {limit}'s: {} ({}), {}",
        args.p99_multiple_target,
        times(p99_multiple),
        per_repeat(&|k| ratio(p99(k, cand), p99(k, limit))),
        verdict(p99_multiple.map(|m| m <= args.p99_multiple_target))
    );
    let _ = writeln!(
        out,
        "- lookups/s at least {:.0}× {reference}'s: {} ({}), {}",
        args.reference_multiple_target,
        times(over_reference),
        per_repeat(&|k| ratio(rate(k, cand), rate(k, reference))),
        verdict(over_reference.map(|m| m >= args.reference_multiple_target))
    );
    if n > 1 {
        let _ = writeln!(out);
        let _ = writeln!(out, "The figures in brackets are those of each repeat.");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::Latency;

    fn run(target: &str, per_second: f64, p99: f64) -> RunResult {
        RunResult {
            kind: Kind::Lookup,
            target: target.into(),
            url: "http://127.0.0.1:1".into(),
            concurrency: 64,
            seconds: 10.0,
            ok: (per_second * 10.0) as u64,
            errors: 0,
            failures: BTreeMap::new(),
            first_error: None,
            per_second,
            latency_ms: Latency { p50: p99 / 2.0, p90: p99, p99, max: p99 * 3.0, mean: p99 / 2.0 },
            bytes_per_response: 3866.0,
            cpu_cores: BTreeMap::from([("generator".into(), 0.9), ("server".into(), 0.8), ("machine".into(), 1.9)]),
            rss_kib: BTreeMap::from([("server".into(), 13_312)]),
            driver: "wrk".into(),
            unix_time: 0,
        }
    }

    fn args() -> LookupReportArgs {
        LookupReportArgs {
            results: "r.jsonl".into(),
            limit: "bare".into(),
            candidate: "agent".into(),
            reference: "registry".into(),
            titles: "B,A,R".into(),
            limit_share_target: 0.8,
            p99_multiple_target: 1.5,
            reference_multiple_target: 10.0,
        }
    }

    #[test]
    fn medians_and_ratios() -> anyhow::Result<()> {
        let results = vec![
            run("bare", 100_000.0, 2.0),
            run("agent", 50_000.0, 4.0),
            run("registry", 20_000.0, 8.0),
            run("agent", 60_000.0, 3.0),
            run("registry", 30_000.0, 6.0),
            run("bare", 120_000.0, 2.0),
        ];
        let text = render(&args(), &results)?;
        assert!(text.contains("| measure (median of 2 repeats) | B | A | R | agent ÷ bare | agent ÷ registry |"), "{text}");
        assert!(text.contains("| lookups/s | 110,000 | 55,000 | 25,000 | 0.50× | 2.20× |"), "{text}");
        assert!(text.contains("| latency p99 | 2.00 ms | 3.50 ms | 7.00 ms | 1.75× | 0.50× |"), "{text}");
        assert!(text.contains("| server RSS at the end of the run | 13.0 MiB | 13.0 MiB | 13.0 MiB |  |  |"), "{text}");
        assert!(text.contains("| 2 | agent | 60,000 | 1.50 ms | 3.00 ms | 9.00 ms | 0.90 | 0.80 | – | 0.20 | 13.3 µs |"), "{text}");
        assert!(text.contains("- lookups/s at least 80 % of bare's: 50 % (0.50×, 0.50×), **NOT met**"), "{text}");
        assert!(text.contains("- p99 at most 1.5× bare's: 1.75× (2.00×, 1.50×), **NOT met**"), "{text}");
        assert!(text.contains("- lookups/s at least 10× registry's: 2.20× (2.50×, 2.00×), **NOT met**"), "{text}");
        Ok(())
    }

    #[test]
    fn other_runs_are_ignored() {
        let mut heartbeat = run("agent", 1.0, 1.0);
        heartbeat.kind = Kind::Heartbeat;
        assert!(render(&args(), &[heartbeat]).is_err());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }
}
