//! `GET /healthz` (the process answers), `GET /readyz` (the database answers) and
//! `GET /metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{AppState, json};

/// Liveness: always 200 while the process serves.
pub fn healthz() -> Response {
    json(StatusCode::OK, &json!({"status": "ok"}))
}

/// Readiness: 200 when the database answers within a second, 503 otherwise.
pub async fn readyz(state: Arc<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await {
        Ok(Ok(())) => json(StatusCode::OK, &json!({"status": "ready"})),
        Ok(Err(e)) => json(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "unavailable", "message": format!("database: {e}")})),
        Err(_) => json(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "unavailable", "message": "database: no answer within 1s"})),
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
