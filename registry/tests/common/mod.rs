//! Test harness: a database of its own for every test (on the shared PostgreSQL, or a
//! throwaway server the test starts and stops), the registry binary as a real process on a
//! port of its own, and `eventually`, which waits for a condition with a deadline.

#![allow(dead_code, unused_imports)]

pub mod postgres;
pub mod process;

use std::future::Future;
use std::time::{Duration, Instant};

pub use postgres::{TestDb, ThrowawayPostgres};
pub use process::{Registry, RegistryBuilder};

/// How long `eventually` waits by default; `SIGNPOST_TEST_PATIENCE_MS` scales it on a slow machine.
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
