//! `GET /healthz` (the process answers), `GET /readyz` (the database answers) and
//! `GET /metrics` (Prometheus text).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{AppState, json};

/// Liveness: always 200 while the process serves.
pub fn healthz() -> Response {
    json(StatusCode::OK, &json!({"status": "ok"}))
}

/// How long one readiness check answers for: every probe within it (kubelets, load
/// balancers, people) shares that one check instead of each running a query.
pub const READINESS_TTL: Duration = Duration::from_secs(1);

/// Longest wait for the database's answer to a readiness check.
const READINESS_TIMEOUT: Duration = Duration::from_secs(1);

/// The outcome of the last readiness check, and when it was made.
#[derive(Debug, Default)]
pub struct Readiness {
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl Readiness {
    /// Whether the database answers (reads the change index, so a missing schema counts as
    /// not ready). One check at a time; its outcome serves every call for `READINESS_TTL`.
    async fn ready(&self, state: &AppState) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, ready)) = *last
            && at.elapsed() < READINESS_TTL
        {
            return ready;
        }
        state.metrics.readiness_check();
        let was_ready = last.is_none_or(|(_, ready)| ready);
        let ready = match tokio::time::timeout(READINESS_TIMEOUT, state.store.refresh_index()).await {
            Ok(Ok(_)) => true,
            // The details (host, user, database) go to the log only, never to the caller.
            Ok(Err(e)) if was_ready => {
                tracing::warn!(error = %e, "not ready: the database does not answer");
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "still not ready: the database does not answer");
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?READINESS_TIMEOUT, "not ready: the database did not answer in time");
                false
            }
        };
        if ready && !was_ready {
            tracing::info!("ready again: the database answers");
        }
        *last = Some((Instant::now(), ready));
        ready
    }
}

/// Readiness: 200 when the database answers within a second, 503 otherwise (why is logged).
pub async fn readyz(state: Arc<AppState>) -> Response {
    if state.readiness.ready(&state).await {
        json(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        let mut response =
            json(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "unavailable", "message": "the database is unavailable; see the log"}));
        response.headers_mut().insert(
            warp::http::header::RETRY_AFTER,
            warp::http::HeaderValue::from(signpost_shared::http::error::UNAVAILABLE_RETRY_AFTER_S),
        );
        response
    }
}

/// Prometheus text; refreshes the gauges from the current snapshot when the database answers.
pub async fn metrics(state: Arc<AppState>) -> Response {
    if let Ok(Ok(snapshot)) = tokio::time::timeout(Duration::from_millis(500), state.cache.get()).await {
        state.metrics.set_instances(&snapshot.health_counts(), snapshot.self_preservation, snapshot.index);
    }
    let (size, idle) = state.store.pool_stats();
    state.metrics.set_pool(size, idle);
    let mut response = Response::new(state.metrics.render().into());
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
