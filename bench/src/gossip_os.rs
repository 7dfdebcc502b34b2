//! What the gossip benchmark reads from Linux's `/proc`: a process's CPU ticks and memory,
//! and the network namespace's loopback and UDP counters (the traffic figures, which are
//! only the cluster's own when it runs in a private network namespace).

use std::time::Instant;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on every Linux ABI we run on).
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU ticks of one process (all its threads), `None` once it is gone.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field of `/proc/PID/status` (e.g. `VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    line[field.len() + 1..].split_whitespace().next()?.parse().ok()
}

/// Busy ticks of the whole machine (all cores) from `/proc/stat`.
pub fn machine_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = cpu.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    let total: u64 = values.iter().take(8).sum();
    Some(total - values.get(3).copied().unwrap_or(0) - values.get(4).copied().unwrap_or(0))
}

/// Counters of this network namespace.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetCounters {
    /// Bytes the loopback interface carried (every packet once, as `lo` transmits it).
    pub lo_bytes: u64,
    /// Packets the loopback interface carried.
    pub lo_packets: u64,
    /// UDP datagrams sent (`Udp: OutDatagrams`).
    pub udp_out_datagrams: u64,
    /// TCP segments sent (`Tcp: OutSegs`): HTTP traffic mixed into `lo_bytes`.
    pub tcp_out_segments: u64,
    /// UDP datagrams received by a socket (`Udp: InDatagrams`).
    #[serde(default)]
    pub udp_in_datagrams: u64,
    /// UDP datagrams dropped because the socket's receive buffer was full (`Udp: RcvbufErrors`).
    #[serde(default)]
    pub udp_rcvbuf_errors: u64,
}

impl NetCounters {
    /// Reads the counters now.
    pub fn read() -> anyhow::Result<NetCounters> {
        let dev = std::fs::read_to_string("/proc/net/dev").context("cannot read /proc/net/dev")?;
        let lo = dev.lines().find_map(|l| l.trim_start().strip_prefix("lo:")).context("/proc/net/dev has no `lo` interface")?;
        let values: Vec<u64> = lo.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        let (lo_bytes, lo_packets) = (values.get(8).copied().unwrap_or(0), values.get(9).copied().unwrap_or(0));
        let snmp = std::fs::read_to_string("/proc/net/snmp").context("cannot read /proc/net/snmp")?;
        Ok(NetCounters {
            lo_bytes,
            lo_packets,
            udp_out_datagrams: snmp_field(&snmp, "Udp", "OutDatagrams").unwrap_or(0),
            tcp_out_segments: snmp_field(&snmp, "Tcp", "OutSegs").unwrap_or(0),
            udp_in_datagrams: snmp_field(&snmp, "Udp", "InDatagrams").unwrap_or(0),
            udp_rcvbuf_errors: snmp_field(&snmp, "Udp", "RcvbufErrors").unwrap_or(0),
        })
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &NetCounters) -> NetCounters {
        NetCounters {
            lo_bytes: self.lo_bytes.saturating_sub(earlier.lo_bytes),
            lo_packets: self.lo_packets.saturating_sub(earlier.lo_packets),
            udp_out_datagrams: self.udp_out_datagrams.saturating_sub(earlier.udp_out_datagrams),
            tcp_out_segments: self.tcp_out_segments.saturating_sub(earlier.tcp_out_segments),
            udp_in_datagrams: self.udp_in_datagrams.saturating_sub(earlier.udp_in_datagrams),
            udp_rcvbuf_errors: self.udp_rcvbuf_errors.saturating_sub(earlier.udp_rcvbuf_errors),
        }
    }
}

/// A field of `/proc/net/snmp`, where each protocol has a header line and a value line.
fn snmp_field(snmp: &str, protocol: &str, field: &str) -> Option<u64> {
    let prefix = format!("{protocol}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// True when this network namespace has no interface but `lo`: then nobody else's traffic
/// is in the loopback counters.
pub fn private_network() -> bool {
    std::fs::read_to_string("/proc/net/dev")
        .map(|dev| dev.lines().skip(2).filter_map(|l| l.split(':').next()).all(|name| name.trim() == "lo"))
        .unwrap_or(false)
}

/// CPU of some processes (and the machine) over a window.
#[derive(Debug)]
pub struct CpuWindow {
    at: Instant,
    pids: Vec<(u32, Option<u64>)>,
    machine: Option<u64>,
}

impl CpuWindow {
    /// Starts counting for `pids`.
    pub fn start(pids: &[u32]) -> CpuWindow {
        CpuWindow { at: Instant::now(), pids: pids.iter().map(|p| (*p, process_ticks(*p))).collect(), machine: machine_ticks() }
    }

    /// Seconds since the start, CPU seconds of each pid (`None` when unreadable) and the
    /// machine's busy cores over the window.
    pub fn finish(&self) -> (f64, Vec<Option<f64>>, Option<f64>) {
        let seconds = self.at.elapsed().as_secs_f64();
        let each =
            self.pids.iter().map(|(pid, start)| Some((process_ticks(*pid)?.saturating_sub((*start)?)) as f64 / TICKS_PER_SECOND)).collect();
        let machine = machine_ticks().zip(self.machine).map(|(now, then)| now.saturating_sub(then) as f64 / TICKS_PER_SECOND / seconds);
        (seconds, each, machine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_fields_are_found_by_name() {
        let snmp = "Tcp: RtoAlgorithm OutSegs\nTcp: 1 42\nUdp: InDatagrams NoPorts OutDatagrams\nUdp: 5 0 7\n";
        assert_eq!(snmp_field(snmp, "Udp", "OutDatagrams"), Some(7));
        assert_eq!(snmp_field(snmp, "Tcp", "OutSegs"), Some(42));
        assert_eq!(snmp_field(snmp, "Udp", "Missing"), None);
    }

    #[test]
    fn this_process_has_ticks_and_memory() {
        assert!(process_ticks(std::process::id()).is_some());
        assert!(status_kib(std::process::id(), "VmRSS").is_some_and(|kib| kib > 0));
    }
}
