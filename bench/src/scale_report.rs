//! `signpost-bench scale-report`: the tables of the registry's scale benchmark
//! (`scripts/bench-registry-scale`). Each line of its input is a heartbeat run's result with
//! the fleet size, the number of replicas, the repeat, the machine's load and what
//! PostgreSQL counted during the window (commits, WAL, sampled wait events).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

use crate::result::{RunResult, thousands};

/// Where the scale benchmark's lines are.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleReportArgs {
    /// The JSON lines the script wrote (`scale.jsonl`).
    pub results: PathBuf,
}

/// One heartbeat run of the scale benchmark.
#[derive(Debug, Clone, Deserialize)]
struct ScaleRun {
    #[serde(flatten)]
    run: RunResult,
    /// Seeded instances.
    instances: u64,
    /// Registry replicas the load was spread over.
    replicas: u32,
    /// Repeat number, from 1.
    repeat: u32,
    /// `/proc/loadavg`'s first three fields before and after the run.
    #[serde(default)]
    load_before: String,
    #[serde(default)]
    load_after: String,
    /// What PostgreSQL counted while the run was measured.
    #[serde(default)]
    pg: Option<PgFacts>,
    /// The instances table right after the run.
    #[serde(default)]
    table: Option<TableFacts>,
}

/// `pg_stat_user_tables` and the size of the instances table.
#[derive(Debug, Clone, Default, Deserialize)]
struct TableFacts {
    /// The table with its indexes, in bytes.
    total_bytes: u64,
    /// Dead row versions not yet vacuumed.
    dead: u64,
}

/// PostgreSQL's counters over (about) the measured window, and the wait events of the
/// benchmark database's active backends, sampled every 100 ms.
#[derive(Debug, Clone, Default, Deserialize)]
struct PgFacts {
    /// Length of the sampled window.
    seconds: f64,
    /// `pg_stat_database.xact_commit` of the benchmark database.
    commits: f64,
    /// `pg_stat_wal`: bytes and `fsync`s of the WAL (server-wide).
    wal_bytes: f64,
    wal_syncs: f64,
    /// Time spent in those `fsync`s, in ms: only the syncs of backends with
    /// `track_wal_io_timing` on are timed, so the mean per sync is a lower bound.
    #[serde(default)]
    wal_sync_ms: f64,
    /// How many samples of `pg_stat_activity` were taken.
    samples: u64,
    /// Active backends seen per wait event over all samples (`CPU` when not waiting).
    waits: BTreeMap<String, u64>,
}

/// Reads `args.results` and renders the tables.
pub fn render_file(args: &ScaleReportArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.results).with_context(|| format!("cannot read {}", args.results.display()))?;
    Ok(render(&parse(&text, &args.results)?))
}

fn parse(text: &str, path: &Path) -> anyhow::Result<Vec<ScaleRun>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| serde_json::from_str(line).with_context(|| format!("{}:{}: not a scale-run line", path.display(), n + 1)))
        .collect()
}

/// Cores of the watched processes whose names start with `prefix`.
fn cores_of(run: &RunResult, prefix: &str) -> f64 {
    run.cpu_cores.iter().filter(|(name, _)| name.starts_with(prefix)).map(|(_, cores)| cores).sum()
}

/// How the window's CPU was split: generator, registry replicas, PostgreSQL backends of the
/// database, PostgreSQL background processes, and everything else on the machine.
struct Split {
    generator: f64,
    registry: f64,
    postgres: f64,
    background: f64,
    other: Option<f64>,
}

impl Split {
    fn of(run: &RunResult) -> Self {
        let generator = cores_of(run, "generator");
        let registry = cores_of(run, "replica");
        let postgres = run.cpu_cores.get("postgres").copied().unwrap_or(0.0);
        let background = cores_of(run, "pg-");
        let other = run.cpu_cores.get("machine").map(|m| (m - generator - registry - postgres - background).max(0.0));
        Split { generator, registry, postgres, background, other }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn micros_per(cores: f64, per_second: f64) -> String {
    if per_second > 0.0 { format!("{:.0} µs", cores / per_second * 1e6) } else { String::new() }
}

fn render(runs: &[ScaleRun]) -> String {
    let mut groups: BTreeMap<(u64, u32), Vec<&ScaleRun>> = BTreeMap::new();
    for run in runs {
        groups.entry((run.instances, run.replicas)).or_default().push(run);
    }
    let sizes: Vec<u64> = {
        let mut sizes: Vec<u64> = groups.keys().map(|(size, _)| *size).collect();
        sizes.dedup();
        sizes
    };
    let mut out = String::new();

    let _ = writeln!(out, "| instances | replicas | heartbeats/s | p50 | p99 | ratio to 1 replica | ratio per repeat |");
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--|");
    for &size in &sizes {
        let one = groups.get(&(size, 1));
        let one_rate = one.map(|g| median(g.iter().map(|r| r.run.per_second).collect()));
        for ((_, replicas), group) in groups.range((size, 0)..=(size, u32::MAX)) {
            let rate = median(group.iter().map(|r| r.run.per_second).collect());
            let p50 = median(group.iter().map(|r| r.run.latency_ms.p50).collect());
            let p99 = median(group.iter().map(|r| r.run.latency_ms.p99).collect());
            let (ratio, per_repeat) = match one_rate {
                Some(base) if *replicas != 1 && base > 0.0 => {
                    let pairs: Vec<String> = group
                        .iter()
                        .filter_map(|r| {
                            let base = one?.iter().find(|b| b.repeat == r.repeat)?;
                            (base.run.per_second > 0.0).then(|| format!("{:.2}×", r.run.per_second / base.run.per_second))
                        })
                        .collect();
                    (format!("{:.2}×", rate / base), pairs.join(", "))
                }
                _ => (String::new(), String::new()),
            };
            let _ = writeln!(
                out,
                "| {} | {replicas} | {} | {p50:.2} ms | {p99:.2} ms | {ratio} | {per_repeat} |",
                thousands(size as f64),
                thousands(rate)
            );
        }
    }
    let most = groups.values().map(Vec::len).max().unwrap_or(0);
    let _ = writeln!(out, "\nMedians of {most} repeat(s) per row; the ratio is heartbeats/s with that many replicas ÷ with one.");

    let _ = writeln!(out, "\nEvery run, in the order run. CPU in cores (the machine has {} cores):\n", cores_hint());
    let _ = writeln!(
        out,
        "| instances | repeat | replicas | heartbeats/s | p50 | p99 | errors | generator | registry | postgres | pg background | other | registry CPU/hb | postgres CPU/hb | commits/s | WAL fsyncs/s | mean WAL fsync | WAL bytes/hb | table + indexes after | load before → after |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--|");
    let mut ordered: Vec<&ScaleRun> = runs.iter().collect();
    ordered.sort_by_key(|r| r.run.unix_time);
    for r in &ordered {
        let split = Split::of(&r.run);
        let rate = r.run.per_second;
        let (commits, syncs, sync_time, wal_per_hb) = match &r.pg {
            Some(pg) if pg.seconds > 0.0 => (
                thousands(pg.commits / pg.seconds),
                thousands(pg.wal_syncs / pg.seconds),
                if pg.wal_sync_ms > 0.0 && pg.wal_syncs > 0.0 { format!("{:.2} ms", pg.wal_sync_ms / pg.wal_syncs) } else { String::new() },
                if rate > 0.0 { thousands(pg.wal_bytes / pg.seconds / rate) } else { String::new() },
            ),
            _ => (String::new(), String::new(), String::new(), String::new()),
        };
        let table = r
            .table
            .as_ref()
            .map_or_else(String::new, |t| format!("{:.1} MiB, {} dead", t.total_bytes as f64 / 1_048_576.0, thousands(t.dead as f64)));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} ms | {:.2} ms | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {commits} | {syncs} | {sync_time} | {wal_per_hb} | {table} | {} → {} |",
            thousands(r.instances as f64),
            r.repeat,
            r.replicas,
            thousands(rate),
            r.run.latency_ms.p50,
            r.run.latency_ms.p99,
            thousands(r.run.errors as f64),
            split.generator,
            split.registry,
            split.postgres,
            split.background,
            split.other.map_or_else(String::new, |o| format!("{o:.2}")),
            micros_per(split.registry, rate),
            micros_per(split.postgres, rate),
            r.load_before,
            r.load_after,
        );
    }

    let _ = writeln!(
        out,
        "\nWhat the database's active backends were doing, from `pg_stat_activity` sampled every 100 ms (all repeats together; `CPU` = active and not waiting):\n"
    );
    let _ = writeln!(out, "| instances | replicas | active backends (mean) | share of samples by wait event |");
    let _ = writeln!(out, "|--:|--:|--:|--|");
    for ((size, replicas), group) in &groups {
        let mut waits: BTreeMap<&str, u64> = BTreeMap::new();
        let mut samples = 0;
        for pg in group.iter().filter_map(|r| r.pg.as_ref()) {
            samples += pg.samples;
            for (event, count) in &pg.waits {
                *waits.entry(event.as_str()).or_default() += count;
            }
        }
        let seen: u64 = waits.values().sum();
        if samples == 0 || seen == 0 {
            continue;
        }
        let mut by_count: Vec<(&str, u64)> = waits.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let shares: Vec<String> =
            by_count.iter().take(6).map(|(event, count)| format!("{event} {:.0} %", *count as f64 * 100.0 / seen as f64)).collect();
        let _ = writeln!(out, "| {} | {replicas} | {:.1} | {} |", thousands(*size as f64), seen as f64 / samples as f64, shares.join(", "));
    }
    out
}

fn cores_hint() -> String {
    std::thread::available_parallelism().map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(instances: u64, replicas: u32, repeat: u32, rate: f64, time: u64) -> String {
        format!(
            r#"{{"kind":"heartbeat","target":"r{replicas}","url":"u","concurrency":64,"seconds":10.0,"ok":{ok},"errors":0,
            "failures":{{}},"first_error":null,"per_second":{rate},"latency_ms":{{"p50":8.0,"p90":9.0,"p99":14.0,"max":20.0,"mean":8.5}},
            "bytes_per_response":388.0,"cpu_cores":{{"generator":0.2,"machine":1.9,"replica-a":0.5,"postgres":1.0,"pg-walwriter":0.05}},
            "unix_time":{time},"instances":{instances},"replicas":{replicas},"repeat":{repeat},"load_before":"1.0 1.0 1.0","load_after":"2.0 1.5 1.0",
            "pg":{{"seconds":10.0,"commits":70000,"wal_records":70000,"wal_bytes":7000000,"wal_syncs":20000,"wal_sync_ms":5000.0,"samples":100,
            "waits":{{"CPU":600,"IO:WALSync":200}}}},"table":{{"total_bytes":3145728,"dead":12}}}}"#,
            ok = rate * 10.0
        )
        .replace('\n', "")
    }

    #[test]
    fn renders_medians_ratios_and_waits() {
        let text = [
            line(10_000, 1, 1, 7000.0, 1),
            line(10_000, 2, 1, 7700.0, 2),
            line(10_000, 1, 2, 8000.0, 3),
            line(10_000, 2, 2, 8000.0, 4),
            line(10_000, 1, 3, 6000.0, 5),
            line(10_000, 2, 3, 6600.0, 6),
        ]
        .join("\n");
        let runs = parse(&text, Path::new("t")).expect("parses");
        let table = render(&runs);
        assert!(table.contains("| 10,000 | 1 | 7,000 | 8.00 ms | 14.00 ms |  |  |"), "{table}");
        assert!(table.contains("| 10,000 | 2 | 7,700 | 8.00 ms | 14.00 ms | 1.10× | 1.10×, 1.00×, 1.10× |"), "{table}");
        assert!(
            table.contains("| 71 µs | 143 µs | 7,000 | 2,000 | 0.25 ms | 100 | 3.0 MiB, 12 dead | 1.0 1.0 1.0 → 2.0 1.5 1.0 |"),
            "{table}"
        );
        assert!(table.contains("| 10,000 | 2 | 8.0 | CPU 75 %, IO:WALSync 25 % |"), "{table}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
