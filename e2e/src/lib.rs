//! The end-to-end harness: a database of its own for every test (on the shared PostgreSQL,
//! or a throwaway server the test starts and stops), the built binaries as real processes on
//! ports of their own with their logs in files, and `eventually`, which waits for a condition
//! with a deadline instead of sleeping.

pub mod gossip_craft;
pub mod netns;
pub mod postgres;
pub mod process;
pub mod raw_peer;
pub mod service;
pub mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use postgres::{TestDb, ThrowawayPostgres};
pub use process::{Agent, AgentBuilder, NetnsHost, Registry, RegistryBuilder, signal};
pub use service::{ServiceProcess, TestService};

/// The timeout `eventually` uses, scaled by `SIGNPOST_TEST_PATIENCE` (a factor ≥ 1) on a slow machine.
pub fn patience(base: Duration) -> Duration {
    let factor = std::env::var("SIGNPOST_TEST_PATIENCE").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(1.0);
    base.mul_f64(factor.max(1.0))
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience(timeout);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// The path of a workspace binary, built once per test process (with the test's profile)
/// so that a test of one package can run another package's binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        // target/<profile>/deps/<test> → target/<profile>
        let dir = exe.parent().and_then(|deps| deps.parent()).expect("a target folder").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--bins", "-p", "signpost-registry", "-p", "signpost-agent", "-p", "signpost-e2e", "-p", "signpost-bench"]);
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        dir
    });
    dir.join(name)
}

/// What a process holds now: open file descriptors and resident memory in KiB (None once it is gone).
pub fn resources(pid: u32) -> Option<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some((fds, rss))
}
