//! The agent's local HTTP API (warp, loopback by default). Routes:
//! - `GET /v1/services`, `GET /v1/services/{name}`, `GET /v1/services/{name}/pick` ([`lookups`])
//! - `POST /v1/agent/services`, `DELETE /v1/agent/services/{id}`,
//!   `PUT /v1/agent/services/{id}/maintenance`, `PUT /v1/agent/checks/{id}/{pass,warn,fail}`,
//!   `GET /v1/agent`, `GET /v1/agent/members`, `GET /v1/agent/checks` ([`local`])
//! - `GET /healthz`, `GET /metrics`

pub mod local;
pub mod lookups;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use signpost_shared::config::Secret;
pub use signpost_shared::http::json;
use signpost_shared::http::{ApiError, Body, raw_query, recover, respond, with_state};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::cache::Cache;
use crate::config::AgentConfig;
use crate::local::LocalState;
use crate::metrics::Metrics;

/// Everything a request handler needs.
pub struct AgentState {
    /// The local services.
    pub local: Arc<LocalState>,
    /// The merged catalog.
    pub cache: Arc<Cache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The settings (services as configured at start).
    pub config: AgentConfig,
    /// This node's name.
    pub node: String,
    /// The address local services are reached at.
    pub address: String,
    /// Where gossip is advertised.
    pub gossip_addr: String,
    /// Where this API listens.
    pub http_addr: String,
    /// Per service, the protection threshold.
    pub protection: BTreeMap<String, f64>,
    /// Cancelled on shutdown: blocking lookups answer at once.
    pub shutdown: CancellationToken,
}

/// Largest request body.
pub const MAX_BODY_BYTES: u64 = 64 * 1024;
/// Default wait of a blocking lookup.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Longest wait of a blocking lookup.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

type State = Arc<AgentState>;

/// How long a change to a local service waits for this agent's answers to show it.
const ANSWERED_WITHIN: Duration = Duration::from_secs(2);

/// Answers a change to a local service once this agent's lookups show it (read your own
/// writes), or after `ANSWERED_WITHIN` at the latest: the change is made either way.
async fn answered(state: &State, result: Result<Response, ApiError>) -> Response {
    if result.is_ok() && !state.local.until_answered(ANSWERED_WITHIN).await {
        tracing::warn!(within_ms = ANSWERED_WITHIN.as_millis() as u64, "a local change is not in the answers yet");
    }
    respond(result)
}

fn body() -> impl Filter<Extract = (Result<Body, ApiError>,), Error = Rejection> + Clone {
    signpost_shared::http::body(MAX_BODY_BYTES)
}

/// Checks the `Authorization` header against the API token (none configured: open), in
/// constant time.
fn check_api_token(token: Option<&Secret>, header: Option<&str>) -> Result<(), ApiError> {
    let Some(token) = token else { return Ok(()) };
    let header = header.ok_or_else(|| ApiError::Unauthorized("this agent's API needs `Authorization: Bearer <api token>`".into()))?;
    let presented = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
    if bool::from(presented.trim().as_bytes().ct_eq(token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Forbidden("the token is not this agent's API token".into()))
    }
}

/// Refuses a request whose `Host` names neither a loopback name or address nor the address
/// the API listens on, unless an API token is configured (a request then needs the token).
/// A web page in a browser on this host can reach the loopback API through a name of its own
/// that resolves to 127.0.0.1 (DNS rebinding); the browser then sends that name as `Host`,
/// while every local client (curl, libraries, the agent's users) sends the address it used.
fn check_host(listen: std::net::SocketAddr, token: Option<&Secret>, host: Option<&str>) -> Result<(), ApiError> {
    let Some(host) = host else { return Ok(()) }; // no browser leaves it out
    if token.is_some() {
        return Ok(());
    }
    let name = host_name(host);
    let allowed = match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || (!listen.ip().is_unspecified() && ip == listen.ip()),
        Err(_) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "Host `{}` is not this agent: its API answers requests for localhost, a loopback address or {} (set api_token to serve other names)",
            signpost_shared::validate::clip(host),
            listen.ip()
        )))
    }
}

/// The name or address of a `Host` header, without its port (and an IPv6 address without
/// its brackets).
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Every route, with error recovery.
pub fn routes(state: State) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let s = || with_state(state.clone());
    let services = warp::path!("v1" / "services")
        .and(warp::get())
        .and(s())
        .and(raw_query())
        .then(|st, q| async move { respond(lookups::services(st, q).await) });
    let service = warp::path!("v1" / "services" / String)
        .and(warp::get())
        .and(s())
        .and(raw_query())
        .then(|name, st, q| async move { respond(lookups::service(st, name, q).await) });
    let pick = warp::path!("v1" / "services" / String / "pick")
        .and(warp::get())
        .and(s())
        .and(raw_query())
        .then(|name, st, q| async move { respond(lookups::pick(st, name, q)) });
    let add = warp::path!("v1" / "agent" / "services")
        .and(warp::post())
        .and(s())
        .and(body())
        .then(|st: State, b| async move { answered(&st, local::add_service(st.clone(), b)).await });
    let remove = warp::path!("v1" / "agent" / "services" / String)
        .and(warp::delete())
        .and(s())
        .then(|id, st: State| async move { answered(&st, local::remove_service(st.clone(), id)).await });
    let maintenance = warp::path!("v1" / "agent" / "services" / String / "maintenance")
        .and(warp::put())
        .and(s())
        .and(body())
        .then(|id, st: State, b| async move { answered(&st, local::maintenance(st.clone(), id, b)).await });
    let report = warp::path!("v1" / "agent" / "checks" / String / String)
        .and(warp::put())
        .and(s())
        .and(body())
        .then(|id, word, st: State, b| async move { answered(&st, local::report(st.clone(), id, word, b)).await });
    let agent = warp::path!("v1" / "agent").and(warp::get()).and(s()).map(|st| respond(local::agent(st)));
    let members = warp::path!("v1" / "agent" / "members").and(warp::get()).and(s()).map(|st| respond(local::members(st)));
    let checks = warp::path!("v1" / "agent" / "checks").and(warp::get()).and(s()).map(|st| respond(local::checks(st)));
    let healthz = warp::path!("healthz").and(warp::get()).map(|| json(StatusCode::OK, &serde_json::json!({"status": "ok"})));
    // Every other route first checks the Host (no DNS rebinding from a browser) and, with
    // an API token, the token: a refusal answers here; a request that passes is rejected
    // (not found) here so that it goes on to its route.
    let host_gate = s().and(warp::header::optional::<String>("host")).and_then(|st: State, host: Option<String>| async move {
        match check_host(st.config.listen, st.config.api_token.as_ref(), host.as_deref()) {
            Ok(()) => Err(warp::reject::not_found()),
            Err(error) => Ok(respond(Err(error))),
        }
    });
    let gate = s().and(warp::header::optional::<String>("authorization")).and_then(|st: State, header: Option<String>| async move {
        match check_api_token(st.config.api_token.as_ref(), header.as_deref()) {
            Ok(()) => Err(warp::reject::not_found()),
            Err(error) => Ok(respond(Err(error))),
        }
    });
    let metrics = warp::path!("metrics").and(warp::get()).and(s()).map(|st: State| {
        let snapshot = st.cache.snapshot();
        let text = st.metrics.render(snapshot.instances().count(), snapshot.stale_seconds());
        let mut response = Response::new(text.into());
        response.headers_mut().insert(
            warp::http::header::CONTENT_TYPE,
            warp::http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    });
    healthz
        .or(host_gate)
        .unify()
        .or(gate)
        .unify()
        .or(services)
        .unify()
        .or(service)
        .unify()
        .or(pick)
        .unify()
        .or(add)
        .unify()
        .or(remove)
        .unify()
        .or(maintenance)
        .unify()
        .or(report)
        .unify()
        .or(agent)
        .unify()
        .or(members)
        .unify()
        .or(checks)
        .unify()
        .or(metrics)
        .unify()
        .recover(recover)
        .unify()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_or_the_listen_address_reach_a_tokenless_api() {
        let loopback: std::net::SocketAddr = "127.0.0.1:7301".parse().expect("an address");
        for host in ["localhost:7301", "LOCALHOST", "localhost.", "app.localhost:7301", "127.0.0.1:7301", "127.9.9.9", "[::1]:7301", "::1"]
        {
            assert!(check_host(loopback, None, Some(host)).is_ok(), "{host}");
        }
        for host in ["evil.example:7301", "evil.example", "localhost.evil.example", "10.0.0.5:7301", "[fe80::1]:7301", "0.0.0.0:7301", ""] {
            assert!(check_host(loopback, None, Some(host)).is_err(), "{host}");
        }
        assert!(check_host(loopback, None, None).is_ok(), "no Host: not a browser");
        let remote: std::net::SocketAddr = "10.0.0.5:7301".parse().expect("an address");
        assert!(check_host(remote, None, Some("10.0.0.5:7301")).is_ok(), "the address it listens on");
        let token = Secret::new("t".repeat(32));
        assert!(check_host(loopback, Some(&token), Some("evil.example")).is_ok(), "a token guards it instead");
    }
}
