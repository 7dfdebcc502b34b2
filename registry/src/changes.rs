//! Keeps this replica's view of the catalog's change index current: PostgreSQL
//! notifications (a change through any replica) and, as a safety net, a periodic read.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::store::{NOTIFY_CHANNEL, Store};

/// Follows `NOTIFY signpost_catalog` until cancelled; reconnects after a failure.
pub async fn listen(store: Store, shutdown: CancellationToken) {
    let Some(pool) = store.pg_pool().cloned() else {
        // SQLite: every write goes through this process; nothing to listen for.
        shutdown.cancelled().await;
        return;
    };
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            tracing::debug!("listening for catalog changes");
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = listener => match result {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for catalog changes");
                    tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(100);
        // A notification lost while reconnecting is covered by this read.
        let _ = store.refresh_index().await;
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => match notification.payload().parse::<u64>() {
                    Ok(index) => store.observe_index(index),
                    Err(_) => tracing::warn!(payload = notification.payload(), "ignoring a malformed catalog notification"),
                },
                Ok(None) => {
                    tracing::warn!("catalog listener lost its connection; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catalog listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Reads the change index every `interval` until cancelled.
pub async fn poll(store: Store, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A lower index in the database than the one known, twice in a row, means the database
    // was restored or emptied (once may be a read racing a local commit).
    let mut lower_before = false;
    let mut last_repair_warning = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match store.refresh_index().await {
            Ok(index) if index < store.known_index() => {
                if lower_before {
                    tracing::warn!(index, known = store.known_index(), "the catalog index went back; the database was restored or emptied");
                    store.reset_index(index);
                    // What clients hold is of another history: a new epoch makes them take the
                    // catalog again whole, even once the index has climbed back.
                    match store.new_epoch().await {
                        Ok(epoch) => tracing::warn!(epoch, "the catalog has a new epoch; agents take it again whole"),
                        Err(e) => tracing::warn!(error = %e, "cannot give the catalog a new epoch"),
                    }
                }
                lower_before = !lower_before;
            }
            Ok(_) => lower_before = false,
            Err(e) if e.needs_migration() => repair(&store, &e, &mut last_repair_warning).await,
            Err(e) => tracing::debug!(error = %e, "cannot read the change index"),
        }
    }
}

/// How often a repair that keeps failing is logged at `warn` (every try is at `debug`).
const REPAIR_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The schema or the `catalog_state` row went missing under the running registry (the
/// database was dropped and created again, or emptied by hand): requests answer 503 meanwhile;
/// migrate again (which recreates the row) and serve once that is done. Another try follows at
/// the next poll if this one fails: a table dropped by hand while the migrations stay recorded
/// as applied cannot be migrated back, and says so once a minute until an operator restores it.
async fn repair(store: &Store, cause: &crate::store::StoreError, last_warning: &mut Option<std::time::Instant>) {
    let warn = last_warning.is_none_or(|at| at.elapsed() >= REPAIR_WARNING_EVERY);
    if warn {
        tracing::warn!(error = %cause, "the database lost its schema or its catalog_state row; running the migrations again");
    } else {
        tracing::debug!(error = %cause, "the schema is still missing; running the migrations again");
    }
    match store.migrate().await {
        Ok(()) => {
            // The database starts over (an emptied one from index 1): its index is the truth
            // at once, so waiters at a higher one are answered instead of waiting for it.
            match store.refresh_index().await {
                Ok(index) => store.reset_index(index),
                Err(e) => tracing::warn!(error = %e, "cannot read the index after migrating; the next poll reads it"),
            }
            tracing::info!(index = store.known_index(), "migrations applied again; serving");
            *last_warning = None;
        }
        Err(e) if warn => {
            *last_warning = Some(std::time::Instant::now());
            let hint = if e.needs_migration() {
                "a table is missing although the migrations are recorded as applied: restore it from a backup, or drop and \
                 create the database again (agents register their instances again)"
            } else {
                "retrying at the next poll"
            };
            tracing::warn!(error = %e, hint, "cannot run the migrations again");
        }
        Err(e) => tracing::debug!(error = %e, "cannot run the migrations again yet"),
    }
}
