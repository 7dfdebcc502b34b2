//! Which replica runs the sweeper and the prober. On PostgreSQL the leader holds a session
//! advisory lock on a connection of its own; when that process dies, PostgreSQL drops the
//! session and the lock with it, and another replica takes it at its next try. On SQLite
//! there is one registry, and it leads.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// The advisory lock key ("SIGN").
const LOCK_KEY: i64 = 0x5349_474e;

/// Runs the election until cancelled, publishing this replica's role on `role`.
pub async fn run(store: Store, interval: Duration, role: watch::Sender<bool>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let Some(pool) = store.pg_pool().cloned() else {
        set_role(&role, &metrics, true);
        shutdown.cancelled().await;
        set_role(&role, &metrics, false);
        return;
    };
    let check = interval.max(Duration::from_millis(500)) * 2;
    // If the leader's host dies without closing its connection, PostgreSQL must still end the
    // session (and free the lock) soon: the leader pings every interval, so a session idle
    // for three checks is gone, and TCP keepalives catch a vanished peer.
    let idle_ms = (check * 3).as_millis().to_string();
    let options = (*pool.connect_options()).clone().options([
        ("idle_session_timeout", idle_ms.as_str()),
        ("tcp_keepalives_idle", "5"),
        ("tcp_keepalives_interval", "2"),
        ("tcp_keepalives_count", "2"),
    ]);
    let mut held: Option<PgConnection> = None;
    // A follower keeps one connection to try the lock on, rather than one per try.
    let mut candidate: Option<PgConnection> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match held.as_mut() {
            Some(conn) => {
                let alive = tokio::time::timeout(check, sqlx::query("SELECT 1").execute(&mut *conn)).await;
                if !matches!(alive, Ok(Ok(_))) {
                    tracing::warn!("lost the leader lock's connection; stepping down");
                    held = None;
                    set_role(&role, &metrics, false);
                }
            }
            None => {
                let attempt = async {
                    let mut conn = match candidate.take() {
                        Some(conn) => conn,
                        None => options.connect().await?,
                    };
                    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(LOCK_KEY).fetch_one(&mut conn).await?;
                    Ok::<_, sqlx::Error>((got, conn))
                };
                match tokio::time::timeout(check, attempt).await {
                    Ok(Ok((true, conn))) => {
                        tracing::info!("took the leader lock: this replica runs the sweeper and the prober");
                        held = Some(conn);
                        set_role(&role, &metrics, true);
                    }
                    Ok(Ok((false, conn))) => candidate = Some(conn),
                    Ok(Err(e)) => tracing::debug!(error = %e, "cannot try the leader lock"),
                    Err(_) => tracing::debug!("trying the leader lock timed out"),
                }
            }
        }
    }
    if let Some(conn) = candidate {
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
    }
    if let Some(mut conn) = held {
        let released =
            tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK_KEY).execute(&mut conn))
                .await;
        if matches!(released, Ok(Ok(_))) {
            tracing::info!("released the leader lock");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
    }
    set_role(&role, &metrics, false);
}

fn set_role(role: &watch::Sender<bool>, metrics: &Metrics, leader: bool) {
    role.send_replace(leader);
    metrics.set_leader(leader);
}
