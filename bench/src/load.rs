//! The closed-loop load driver: `concurrency` workers, each sending its next request as soon
//! as the previous answer's body has been read, over one shared HTTP client. A run stops
//! after a count of requests or after a warm-up plus a measured window; only requests that
//! complete inside the window count. Each worker sends through a [`Session`]: the shared
//! reqwest client, or a bare keep-alive connection of its own ([`crate::raw`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cpu::CpuWatch;

/// When a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this many requests (each sequence number is sent once).
    Count(u64),
    /// After `warmup` (not counted) and then `measure` (counted).
    Timed {
        /// Requests completing before its end are not counted.
        warmup: Duration,
        /// The measured window.
        measure: Duration,
    },
}

/// The HTTP client every worker shares: HTTP/1.1 only (as agents talk to the registry), one
/// pooled keep-alive connection per worker, no proxy.
pub fn client(concurrency: usize, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(concurrency)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("cannot build the HTTP client")
}

/// What one worker saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Body bytes of the 2xx answers.
    pub bytes: u64,
    /// Non-2xx answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connect, timeout, reset).
    pub transport_errors: u64,
    /// The first failure, to tell the user what went wrong.
    pub first_error: Option<String>,
    /// Latency of every counted request, in microseconds (answered or not).
    pub latencies_us: Vec<u32>,
}

impl Tally {
    /// Every failed request.
    pub fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.bytes += other.bytes;
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.transport_errors += other.transport_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_us.extend(other.latencies_us);
    }

    fn record(&mut self, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Ok { bytes } => {
                self.ok += 1;
                self.bytes += bytes;
            }
            Outcome::Status { status, body } => {
                *self.statuses.entry(status).or_default() += 1;
                self.first_error.get_or_insert_with(|| format!("HTTP {status}: {body}"));
            }
            Outcome::Failed(error) => {
                self.transport_errors += 1;
                self.first_error.get_or_insert(error);
            }
        }
        self.latencies_us.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }
}

/// How one request ended.
#[derive(Debug)]
pub enum Outcome {
    /// Answered 2xx with a body of this size.
    Ok {
        /// Body bytes.
        bytes: u64,
    },
    /// Answered with another status.
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// No answer (connect, timeout, reset, unreadable answer).
    Failed(String),
}

/// A finished run.
#[derive(Debug)]
pub struct Measured {
    /// Everything counted, latencies sorted.
    pub tally: Tally,
    /// Length of the counted window.
    pub elapsed: Duration,
    /// CPU cores used during the window, by watched process.
    pub cpu_cores: BTreeMap<String, f64>,
    /// Resident memory of the watched single processes at the end of the window, in KiB.
    pub rss_kib: BTreeMap<String, u64>,
}

/// Prints progress to stderr once a second while a counted run goes on.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Shown before the numbers, e.g. `seed registry`.
    pub label: String,
}

/// One worker's way of sending requests: over the shared reqwest client ([`Reqwest`]) or
/// over a connection of its own ([`crate::raw::Raw`]).
pub trait Session: Send + 'static {
    /// Sends request number `seq` and reads its whole answer.
    fn send(&mut self, seq: u64) -> impl std::future::Future<Output = Outcome> + Send;
}

/// Requests built by a closure and sent through the shared reqwest client.
pub struct Reqwest<F> {
    client: reqwest::Client,
    request: Arc<F>,
}

impl<F> Reqwest<F>
where
    F: Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    /// A factory of sessions sharing `client`, one per worker.
    pub fn sessions(client: reqwest::Client, request: F) -> impl FnMut() -> Self {
        let request = Arc::new(request);
        move || Reqwest { client: client.clone(), request: request.clone() }
    }
}

impl<F> Session for Reqwest<F>
where
    F: Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    fn send(&mut self, seq: u64) -> impl std::future::Future<Output = Outcome> + Send {
        send((self.request)(&self.client, seq))
    }
}

/// Sends `request(seq)` for seq = 0, 1, 2, … from `concurrency` workers, each with a session
/// from `session`, until `stop`.
pub async fn drive<S: Session>(
    concurrency: usize,
    stop: Stop,
    progress: Option<Progress>,
    mut cpu: CpuWatch,
    mut session: impl FnMut() -> S,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let (measure_from, end) = match stop {
        Stop::Count(_) => (started, None),
        Stop::Timed { warmup, measure } => (started + warmup, Some(started + warmup + measure)),
    };
    let limit = match stop {
        Stop::Count(n) => n,
        Stop::Timed { .. } => u64::MAX,
    };
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (mut session, next, done) = (session(), next.clone(), done.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let began = Instant::now();
                if seq >= limit || end.is_some_and(|end| began >= end) {
                    break;
                }
                let outcome = session.send(seq).await;
                let finished = Instant::now();
                done.fetch_add(1, Ordering::Relaxed);
                if end.is_some_and(|end| finished > end) {
                    break;
                }
                if finished >= measure_from {
                    tally.record(outcome, finished - began);
                }
            }
            tally
        });
    }
    let reporter = progress.map(|p| tokio::spawn(report_progress(p, limit, done.clone())));

    tokio::time::sleep_until(measure_from.into()).await;
    cpu.start();
    let window_start = Instant::now();
    let mut tally = Tally::default();
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker.context("a load worker panicked")?);
    }
    let window_end = end.map_or_else(Instant::now, |end| end.min(Instant::now()));
    let elapsed = window_end.saturating_duration_since(window_start);
    let cpu_cores = cpu.cores();
    let rss_kib = cpu.rss_kib();
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    tally.latencies_us.sort_unstable();
    Ok(Measured { tally, elapsed, cpu_cores, rss_kib })
}

/// Sends one request through the shared client and reads its whole answer.
pub async fn send(request: reqwest::RequestBuilder) -> Outcome {
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => return Outcome::Failed(error_chain(&e)),
    };
    let status = response.status();
    match response.bytes().await {
        Ok(body) if status.is_success() => Outcome::Ok { bytes: body.len() as u64 },
        Ok(body) => Outcome::Status { status: status.as_u16(), body: String::from_utf8_lossy(&body).chars().take(300).collect() },
        Err(e) => Outcome::Failed(error_chain(&e)),
    }
}

/// An error with its causes, e.g. `error sending request: connection refused`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn report_progress(progress: Progress, total: u64, done: Arc<AtomicU64>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let count = done.load(Ordering::Relaxed).min(total);
        let rate = count as f64 / started.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} / {} ({}/s)",
            progress.label,
            crate::result::thousands(count as f64),
            crate::result::thousands(total as f64),
            crate::result::thousands(rate)
        );
    }
}

/// The value below which `share` (0..=1) of the sorted `values` lie (nearest rank).
pub fn percentile(sorted: &[u32], share: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (share * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), Some(50));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn tallies_merge() {
        let mut a = Tally::default();
        a.record(Outcome::Ok { bytes: 10 }, Duration::from_micros(5));
        let mut b = Tally::default();
        b.record(Outcome::Status { status: 503, body: "busy".into() }, Duration::from_micros(9));
        b.record(Outcome::Failed("reset".into()), Duration::from_micros(1));
        a.merge(b);
        assert_eq!((a.ok, a.bytes, a.errors()), (1, 10, 2));
        assert_eq!(a.first_error.as_deref(), Some("HTTP 503: busy"));
        assert_eq!(a.latencies_us.len(), 3);
    }
}
