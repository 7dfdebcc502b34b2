//! The registry's HTTP API (warp). Routes:
//! - `POST /v1/instances`, `GET|DELETE /v1/instances/{id}`,
//!   `PUT /v1/instances/{id}/heartbeat`, `PUT /v1/instances/{id}/maintenance` ([`instances`])
//! - `GET /v1/services`, `GET /v1/services/{name}`, `GET /v1/catalog` ([`lookups`])
//! - `PUT /v1/agents/{node}`, `GET /v1/agents` ([`agents`])
//! - `GET /healthz`, `GET /readyz`, `GET /metrics` ([`ops`])

pub mod agents;
pub mod auth;
pub mod error;
pub mod instances;
pub mod lookups;
pub mod ops;
pub mod request;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use self::auth::Auth;
use self::error::ApiError;
use crate::metrics::Metrics;
use crate::snapshot::CatalogCache;
use crate::store::Store;
pub use signpost_shared::http::json;
use signpost_shared::http::{body, raw_query, respond, with_state};

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// The snapshot that answers reads.
    pub cache: CatalogCache,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Write tokens.
    pub auth: Auth,
    /// Largest body.
    pub max_body_bytes: u64,
    /// Longest blocking wait.
    pub max_wait: Duration,
    /// Cancelled on shutdown: blocking queries answer at once.
    pub shutdown: CancellationToken,
    /// Set once the database answered and is migrated; until then only /healthz serves.
    pub started: std::sync::atomic::AtomicBool,
    /// One permit per blocking query allowed to wait at once (`max_blocking_queries`).
    pub blocking: tokio::sync::Semaphore,
    /// The cached outcome of the last readiness check.
    pub readiness: ops::Readiness,
}

/// `Retry-After` of a blocking query refused because too many wait already: long enough that
/// the refused callers do not come straight back as a herd.
pub const BLOCKING_RETRY_AFTER_S: u32 = 5;

/// The default wait of a blocking query (Consul's).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

type State = Arc<AppState>;

/// The `Authorization` header, if any.
fn authorization() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
}

/// A JSON answer already serialized.
pub fn json_bytes(bytes: Bytes, index: u64) -> Response {
    let mut response = Response::new(bytes.into());
    let headers = response.headers_mut();
    headers.insert(warp::http::header::CONTENT_TYPE, warp::http::HeaderValue::from_static("application/json"));
    headers.insert(signpost_shared::wire::INDEX_HEADER, warp::http::HeaderValue::from(index));
    response
}

/// Adds the catalog index header.
pub fn with_index(mut response: Response, index: u64) -> Response {
    response.headers_mut().insert(signpost_shared::wire::INDEX_HEADER, warp::http::HeaderValue::from(index));
    response
}

/// Every route, with error recovery and request metrics.
pub fn routes(state: State) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let s = || with_state(state.clone());
    let register = warp::path!("v1" / "instances")
        .and(warp::post())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .and(body(state.max_body_bytes))
        .then(|st, auth, q, body| async move { respond(instances::register(st, auth, q, body).await) });
    let get_instance = warp::path!("v1" / "instances" / String)
        .and(warp::get())
        .and(s())
        .and(authorization())
        .then(|id, st, auth| async move { respond(instances::get(st, auth, id).await) });
    let deregister = warp::path!("v1" / "instances" / String)
        .and(warp::delete())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .then(|id, st, auth, q| async move { respond(instances::deregister(st, auth, id, q).await) });
    let heartbeat = warp::path!("v1" / "instances" / String / "heartbeat")
        .and(warp::put())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .and(body(state.max_body_bytes))
        .then(|id, st, auth, q, body| async move { respond(instances::heartbeat(st, auth, id, q, body).await) });
    let maintenance = warp::path!("v1" / "instances" / String / "maintenance")
        .and(warp::put())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .and(body(state.max_body_bytes))
        .then(|id, st, auth, q, body| async move { respond(instances::maintenance(st, auth, id, q, body).await) });
    let services = warp::path!("v1" / "services")
        .and(warp::get())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .then(|st, auth, q| async move { respond(lookups::services(st, auth, q).await) });
    let service = warp::path!("v1" / "services" / String)
        .and(warp::get())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .then(|name, st, auth, q| async move { respond(lookups::service(st, auth, name, q).await) });
    let catalog = warp::path!("v1" / "catalog")
        .and(warp::get())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .and(warp::header::optional::<String>("if-none-match"))
        .then(|st, auth, q, etag| async move { respond(lookups::catalog(st, auth, q, etag).await) });
    let announce = warp::path!("v1" / "agents" / String)
        .and(warp::put())
        .and(s())
        .and(authorization())
        .and(body(state.max_body_bytes))
        .then(|node, st, auth, body| async move { respond(agents::announce(st, auth, node, body).await) });
    let list_agents = warp::path!("v1" / "agents")
        .and(warp::get())
        .and(s())
        .and(authorization())
        .and(raw_query())
        .then(|st, auth, q| async move { respond(agents::list(st, auth, q).await) });
    let healthz = warp::path!("healthz").and(warp::get()).map(ops::healthz);
    // Before the start-up migration, everything but /healthz answers 503; afterwards this
    // rejects, and the request goes on to its route.
    let starting = s().and_then(|st: State| async move {
        if st.started.load(std::sync::atomic::Ordering::Acquire) {
            Err(warp::reject::not_found())
        } else {
            Ok(respond(Err(ApiError::Starting("waiting for the database and its migrations".into()))))
        }
    });
    let readyz = warp::path!("readyz").and(warp::get()).and(s()).then(ops::readyz);
    let metrics = warp::path!("metrics").and(warp::get()).and(s()).then(ops::metrics);

    let metrics_sink = state.metrics.clone();
    healthz
        .or(starting)
        .unify()
        .or(register)
        .unify()
        .or(get_instance)
        .unify()
        .or(deregister)
        .unify()
        .or(heartbeat)
        .unify()
        .or(maintenance)
        .unify()
        .or(services)
        .unify()
        .or(service)
        .unify()
        .or(catalog)
        .unify()
        .or(announce)
        .unify()
        .or(list_agents)
        .unify()
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .recover(error::recover)
        .unify()
        .with(warp::log::custom(move |info| {
            let route = route_of(info.path());
            let status = info.status().as_u16();
            metrics_sink.request(route, method_label(info.method()), status, info.elapsed());
            tracing::debug!(method = %info.method(), route, status, elapsed_ms = info.elapsed().as_secs_f64() * 1000.0, "request");
        }))
}

/// The method as a metrics label: a fixed set, so that a client cannot grow it.
fn method_label(method: &warp::http::Method) -> &'static str {
    use warp::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// The route template of a path, for metrics labels (bounded cardinality).
fn route_of(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "instances"] => "/v1/instances",
        ["v1", "instances", _] => "/v1/instances/{id}",
        ["v1", "instances", _, "heartbeat"] => "/v1/instances/{id}/heartbeat",
        ["v1", "instances", _, "maintenance"] => "/v1/instances/{id}/maintenance",
        ["v1", "services"] => "/v1/services",
        ["v1", "services", _] => "/v1/services/{name}",
        ["v1", "catalog"] => "/v1/catalog",
        ["v1", "agents"] => "/v1/agents",
        ["v1", "agents", _] => "/v1/agents/{node}",
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["metrics"] => "/metrics",
        _ => "other",
    }
}

/// Waits, for a blocking query, until the catalog index moves past `index`, `wait` ends or
/// the registry shuts down. An index the registry has not reached (the database was reset,
/// or another replica is ahead) does not block. While the database cannot be reached the
/// registry cannot see changes, so a blocking query fails at once (503) instead of waiting
/// in vain: its client learns that its copy is no longer confirmed.
pub async fn block(state: &AppState, index: Option<u64>, wait: Option<Duration>) -> Result<(), ApiError> {
    let Some(index) = index else { return Ok(()) };
    let unreachable = || ApiError::Unavailable("database unavailable: this registry cannot see catalog changes".into());
    let mut reachable = state.store.reachability();
    if !*reachable.borrow_and_update() {
        return Err(unreachable());
    }
    let mut changes = state.store.subscribe();
    if *changes.borrow_and_update() < index {
        // The client saw a newer index through another replica, or this database was reset:
        // read the index once before deciding.
        let _ = state.store.refresh_index().await;
    }
    if *changes.borrow_and_update() != index {
        return Ok(());
    }
    let wait = wait.unwrap_or(DEFAULT_WAIT).min(state.max_wait);
    if wait.is_zero() {
        return Ok(());
    }
    // Waiters are capped below the connection cap, so that they never hold every connection:
    // past the cap the caller is told to come back later instead of holding a slot.
    let Ok(_permit) = state.blocking.try_acquire() else {
        state.metrics.blocking_query_refused();
        return Err(ApiError::Busy {
            message: "too many blocking queries are waiting on this registry; retry later, or ask another replica".into(),
            retry_after_s: BLOCKING_RETRY_AFTER_S,
        });
    };
    let _waiting = state.metrics.blocking_query_waiting();
    tracing::debug!(index, wait_ms = wait.as_millis() as u64, "blocking query waiting for a change");
    tokio::select! {
        _ = tokio::time::timeout(wait, changes.wait_for(|current| *current != index)) => Ok(()),
        _ = reachable.wait_for(|up| !*up) => Err(unreachable()),
        _ = state.shutdown.cancelled() => Ok(()),
    }
}
