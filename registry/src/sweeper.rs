//! The lease sweeper: while this replica leads, it marks instances whose lease ran out
//! critical and deregisters them after the grace period, unless self-preservation holds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Store, SweepPolicy, SweepReport};

/// The longest time between two sweeps that counts as sweeping without a gap: five sweep
/// intervals, and at least 5 s (a leader handing over in a second or two is no gap).
pub fn gap_after(sweep_interval: Duration) -> Duration {
    (sweep_interval * 5).max(Duration::from_secs(5))
}

/// Sweeps every `interval` while `leader` is true, until cancelled.
pub async fn run(
    store: Store,
    policy: SweepPolicy,
    interval: Duration,
    max_hold: Duration,
    leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut holding = false;
    // When self-preservation began on this leader; it holds for at most `max_hold`, after
    // which the lapsed leases are taken as real (a zone really died).
    let mut holding_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !*leader.borrow() {
            continue;
        }
        let now_ms = store.now_ms();
        let hold_allowed = holding_since.is_none_or(|since| since.elapsed() < max_hold);
        if !hold_allowed && holding {
            tracing::warn!(held_for = ?max_hold, "self-preservation held too long; expiring the lapsed leases");
        }
        match store.sweep(&policy, now_ms, hold_allowed).await {
            Ok(SweepReport { resumed: Some(resumed), self_preservation, .. }) => {
                tracing::warn!(
                    gap_ms = resumed.gap.as_millis() as u64,
                    leases_extended = resumed.leases_extended,
                    grace_restarted = resumed.grace_restarted,
                    "sweeping resumes after a gap: every live lease gets a full term to be renewed, and no critical instance is removed before it has been critical for deregister_after from now"
                );
                metrics.sweep("resumed", 0, 0, self_preservation);
            }
            Ok(report) => {
                if report.self_preservation {
                    holding_since.get_or_insert_with(tokio::time::Instant::now);
                } else if (report.lapsed as f64) <= policy.self_preservation_threshold * (report.total as f64) {
                    holding_since = None;
                }
                if report.self_preservation && !holding {
                    tracing::warn!(
                        lapsed = report.lapsed,
                        total = report.total,
                        threshold = policy.self_preservation_threshold,
                        "self-preservation: too many leases lapsed at once; expiring none until heartbeats resume"
                    );
                } else if !report.self_preservation && holding {
                    tracing::info!(lapsed = report.lapsed, total = report.total, "self-preservation ended; leases expire again");
                }
                holding = report.self_preservation;
                for id in &report.expired {
                    tracing::info!(instance = %id, "lease ran out; instance marked critical");
                }
                for id in &report.removed {
                    tracing::info!(instance = %id, "instance deregistered after its lease stayed expired");
                }
                let result = if report.self_preservation { "self_preservation" } else { "ok" };
                metrics.sweep(result, report.expired.len(), report.removed.len(), report.self_preservation);
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease sweep failed");
                metrics.sweep("error", 0, 0, holding);
            }
        }
    }
}
