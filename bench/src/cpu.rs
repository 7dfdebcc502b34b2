//! CPU used by the processes around a run (this generator, the server under test, its
//! database backends), read from Linux's `/proc`, so a result says how much of the machine
//! each side took. Elsewhere the figures are simply missing.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on every Linux ABI we run on).
const TICKS_PER_SECOND: f64 = 100.0;

/// Which processes a name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// One process (all its threads).
    Pid(u32),
    /// Every process whose command line contains the text, e.g. the PostgreSQL backends
    /// serving one database (`postgres: USER DBNAME 127.0.0.1(…) idle`).
    Cmdline(String),
}

/// A `--cpu NAME=pid:PID` or `--cpu NAME=cmdline:TEXT` (or `NAME=PID`) argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// Shown in results, e.g. `server`, `postgres`.
    pub name: String,
    /// The processes.
    pub selector: Selector,
}

impl std::str::FromStr for Watched {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, spec) = text.split_once('=').ok_or_else(|| format!("`{text}` is not NAME=pid:PID or NAME=cmdline:TEXT"))?;
        if name.is_empty() {
            return Err(format!("`{text}` has no name before `=`"));
        }
        let selector = if let Some(text) = spec.strip_prefix("cmdline:") {
            if text.is_empty() {
                return Err("cmdline: needs a text to look for".into());
            }
            Selector::Cmdline(text.to_owned())
        } else {
            let pid = spec.strip_prefix("pid:").unwrap_or(spec);
            Selector::Pid(pid.parse().map_err(|_| format!("`{pid}` is not a process id"))?)
        };
        Ok(Watched { name: name.to_owned(), selector })
    }
}

/// Measures the CPU time of `generator` (this process), of the watched processes and of the
/// whole `machine` between [`CpuWatch::start`] and [`CpuWatch::cores`]. On a shared machine,
/// `machine` minus the rest tells how much other work ran beside the benchmark.
#[derive(Debug)]
pub struct CpuWatch {
    watched: Vec<Watched>,
    start: Option<Reading>,
}

#[derive(Debug)]
struct Reading {
    at: Instant,
    /// Busy ticks of the whole machine (all cores), when `/proc/stat` is readable.
    machine: Option<u64>,
    /// Ticks of each watched name's processes, by pid.
    watched: Vec<HashMap<u32, u64>>,
}

impl CpuWatch {
    /// A watch over this process (as `generator`) and `watched`.
    pub fn new(watched: &[Watched]) -> Self {
        Self::with_generator(watched, std::process::id())
    }

    /// A watch over process `generator` (e.g. a `wrk` this process started) and `watched`.
    pub fn with_generator(watched: &[Watched], generator: u32) -> Self {
        let mut all = vec![Watched { name: "generator".into(), selector: Selector::Pid(generator) }];
        all.extend(watched.iter().cloned());
        CpuWatch { watched: all, start: None }
    }

    /// Resident memory (`VmRSS`) now of each watched single process (`pid:` watches), in
    /// KiB, by name; the generator is left out.
    pub fn rss_kib(&self) -> BTreeMap<String, u64> {
        self.watched
            .iter()
            .skip(1)
            .filter_map(|w| match w.selector {
                Selector::Pid(pid) => Some((w.name.clone(), process_rss_kib(pid)?)),
                Selector::Cmdline(_) => None,
            })
            .collect()
    }

    /// Takes the first reading.
    pub fn start(&mut self) {
        let watched = self.watched.iter().map(|w| ticks(&w.selector)).collect();
        self.start = Some(Reading { at: Instant::now(), machine: machine_busy_ticks(), watched });
    }

    /// Cores used since [`CpuWatch::start`], by name (CPU seconds per second). A process
    /// that appeared since counts whole (it started in the window); one that ended is lost.
    pub fn cores(&self) -> BTreeMap<String, f64> {
        let Some(start) = &self.start else {
            return BTreeMap::new();
        };
        let seconds = start.at.elapsed().as_secs_f64();
        let mut cores = BTreeMap::new();
        if let (Some(before), Some(now)) = (start.machine, machine_busy_ticks())
            && seconds > 0.0
        {
            cores.insert("machine".to_owned(), now.saturating_sub(before) as f64 / TICKS_PER_SECOND / seconds);
        }
        for (watched, before) in self.watched.iter().zip(&start.watched) {
            let now = ticks(&watched.selector);
            if now.is_empty() {
                continue;
            }
            let used: u64 = now.iter().map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0))).sum();
            if seconds > 0.0 {
                cores.insert(watched.name.clone(), used as f64 / TICKS_PER_SECOND / seconds);
            }
        }
        cores
    }
}

/// User plus system ticks of every process the selector stands for, by pid.
fn ticks(selector: &Selector) -> HashMap<u32, u64> {
    match selector {
        Selector::Pid(pid) => process_ticks(*pid).map(|t| HashMap::from([(*pid, t)])).unwrap_or_default(),
        Selector::Cmdline(text) => {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return HashMap::new();
            };
            // This process's own command line holds the text too (in its `--cpu` argument).
            let own = std::process::id();
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| *pid != own)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|raw| String::from_utf8_lossy(&raw).replace('\0', " ").contains(text.as_str()))
                })
                .filter_map(|pid| Some((pid, process_ticks(pid)?)))
                .collect()
        }
    }
}

/// Busy ticks of all cores since boot: the `cpu` line of `/proc/stat` less idle and iowait.
fn machine_busy_ticks() -> Option<u64> {
    parse_machine_busy(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| fields.get(i)).sum();
    (fields.len() >= 4).then_some(busy)
}

/// `VmRSS` of a process, in KiB.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    parse_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.trim_start_matches("VmRSS:").split_whitespace().next()?.parse().ok()
}

fn process_ticks(pid: u32) -> Option<u64> {
    parse_stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of a `/proc/PID/stat` line. The command name (2nd field) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // Fields 3.. of the line: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_watch_arguments() {
        assert_eq!("server=pid:42".parse(), Ok(Watched { name: "server".into(), selector: Selector::Pid(42) }));
        assert_eq!("server=42".parse(), Ok(Watched { name: "server".into(), selector: Selector::Pid(42) }));
        assert_eq!("pg=cmdline: db1 ".parse(), Ok(Watched { name: "pg".into(), selector: Selector::Cmdline(" db1 ".into()) }));
        assert!("server".parse::<Watched>().is_err());
        assert!("=1".parse::<Watched>().is_err());
        assert!("x=pid:abc".parse::<Watched>().is_err());
        assert!("x=cmdline:".parse::<Watched>().is_err());
    }

    #[test]
    fn reads_ticks_after_the_command_name() {
        let stat = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn reads_the_resident_memory() {
        assert_eq!(parse_rss_kib("Name:\tx\nVmHWM:\t  13228 kB\nVmRSS:\t   13164 kB\n"), Some(13164));
        assert_eq!(parse_rss_kib("Name:\tkthreadd\n"), None);
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(process_rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
        }
    }

    #[test]
    fn reads_the_machine_busy_time() {
        let stat = "cpu  100 5 50 9000 40 3 2 1 0 0\ncpu0 50 2 25 4500 20 1 1 0 0 0\n";
        assert_eq!(parse_machine_busy(stat), Some(161));
        assert_eq!(parse_machine_busy("intr 1 2 3"), None);
    }

    #[test]
    fn watches_this_process() {
        let mut watch = CpuWatch::new(&[]);
        watch.start();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(watch.cores().contains_key("generator"));
        }
    }
}
