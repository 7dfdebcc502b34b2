//! Lookups from the local cache: `GET /v1/services`, `GET /v1/services/{name}` (same
//! filters and blocking as the registry) and `GET /v1/services/{name}/pick`. Nothing here
//! crosses the network.

use std::sync::Arc;

use rand::seq::IndexedRandom;
use signpost_shared::http::{ApiError, HealthFilter, ReadQuery};
use signpost_shared::model::Instance;
use signpost_shared::validate;
use signpost_shared::wire::{INDEX_HEADER, ServiceInstances, ServiceSummary, ServicesPage};
use warp::http::{HeaderName, HeaderValue, StatusCode};
use warp::reply::Response;

use super::{AgentState, DEFAULT_WAIT, MAX_WAIT, json};
use crate::cache::{ServiceInstancesRef, Snapshot};

/// Header: the agent's change index (a constant name: not parsed again per request).
const INDEX: HeaderName = HeaderName::from_static(INDEX_HEADER);
/// Header: seconds since the registry last confirmed the catalog.
pub const STALE_HEADER: &str = "x-signpost-stale-seconds";
const STALE: HeaderName = HeaderName::from_static(STALE_HEADER);
/// Header: present (`on`) when the protection threshold made the answer hold every instance.
pub const PROTECTION_HEADER: &str = "x-signpost-protection";

fn headers(mut response: Response, snapshot: &Snapshot) -> Response {
    let headers = response.headers_mut();
    headers.insert(INDEX, HeaderValue::from(snapshot.index));
    if let Some(stale) = snapshot.stale_seconds() {
        headers.insert(STALE, HeaderValue::from(stale));
    }
    response
}

/// Waits until the agent's index moves past `index`, `wait` ends, or the agent stops.
async fn block(state: &AgentState, index: Option<u64>, wait: Option<std::time::Duration>) {
    let Some(index) = index else { return };
    let mut changes = state.cache.subscribe();
    if *changes.borrow_and_update() != index {
        return;
    }
    let wait = wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT);
    tokio::select! {
        _ = tokio::time::timeout(wait, changes.wait_for(|current| *current != index)) => {}
        _ = state.shutdown.cancelled() => {}
    }
}

fn checked_name(name: &str) -> Result<(), ApiError> {
    validate::dns_label(name).map_err(|p| ApiError::bad_request("invalid_name", format!("service name: {p}")))
}

/// Every service with counts by health.
pub async fn services(state: Arc<AgentState>, raw_query: String) -> Result<Response, ApiError> {
    state.metrics.lookup("/v1/services");
    let query = ReadQuery::parse(&raw_query, &["index", "wait"])?;
    block(&state, query.index, query.wait).await;
    let snapshot = state.cache.snapshot();
    let services = snapshot
        .services
        .iter()
        .map(|(name, instances)| {
            let mut health: std::collections::BTreeMap<_, u64> = signpost_shared::Health::ALL.iter().map(|h| (*h, 0)).collect();
            for instance in instances {
                *health.entry(instance.health).or_default() += 1;
            }
            ServiceSummary {
                name: name.clone(),
                instances: instances.len() as u64,
                healthy: instances.iter().filter(|i| i.is_healthy()).count() as u64,
                health,
            }
        })
        .collect();
    let page = ServicesPage { index: snapshot.index, self_preservation: snapshot.self_preservation, services };
    Ok(headers(json(StatusCode::OK, &page), &snapshot))
}

/// True when the service's healthy share is under its protection threshold.
fn protected(state: &AgentState, name: &str, instances: &[Arc<Instance>]) -> bool {
    let Some(threshold) = state.protection.get(name) else { return false };
    if instances.is_empty() {
        return false;
    }
    let healthy = instances.iter().filter(|i| i.is_healthy()).count();
    (healthy as f64) < threshold * (instances.len() as f64)
}

/// The instances of one service, filtered; under the protection threshold, a healthy lookup
/// answers every instance and says so.
pub async fn service(state: Arc<AgentState>, name: String, raw_query: String) -> Result<Response, ApiError> {
    state.metrics.lookup("/v1/services/{name}");
    checked_name(&name)?;
    let query = ReadQuery::parse(&raw_query, &["health", "tag", "zone", "index", "wait"])?;
    block(&state, query.index, query.wait).await;
    let snapshot = state.cache.snapshot();
    let all = snapshot.service(&name);
    let protect = query.health == HealthFilter::Healthy && protected(&state, &name, all);
    let default_query = query.health == HealthFilter::Healthy && query.tags.is_empty() && query.zone.is_none();
    if default_query && !protect {
        let body = snapshot.default_answer(&name).unwrap_or_else(|| empty_answer(&name, snapshot.index));
        let mut response = Response::new(body.into());
        response.headers_mut().insert(warp::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(headers(response, &snapshot));
    }
    let health = if protect { HealthFilter::Any } else { query.health };
    let instances = all
        .iter()
        .map(|i| &**i)
        .filter(|i| health.accepts(i.health) && i.has_tags(&query.tags) && (query.zone.is_none() || i.zone == query.zone))
        .collect();
    let answer = ServiceInstancesRef { service: &name, index: snapshot.index, instances };
    let mut response = headers(json(StatusCode::OK, &answer), &snapshot);
    if protect {
        response.headers_mut().insert(PROTECTION_HEADER, HeaderValue::from_static("on"));
    }
    Ok(response)
}

/// The answer for a service the catalog does not have.
fn empty_answer(name: &str, index: u64) -> bytes::Bytes {
    let answer = ServiceInstances { service: name.to_string(), index, instances: vec![] };
    bytes::Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
}

/// One healthy instance, chosen at random by weight, from the agent's own zone when it has
/// any there. 404 when there is none.
pub fn pick(state: Arc<AgentState>, name: String, raw_query: String) -> Result<Response, ApiError> {
    state.metrics.lookup("/v1/services/{name}/pick");
    checked_name(&name)?;
    let query = ReadQuery::parse(&raw_query, &["tag"])?;
    let snapshot = state.cache.snapshot();
    let all = snapshot.service(&name);
    let protect = protected(&state, &name, all);
    let candidates: Vec<&Instance> = all.iter().map(|i| &**i).filter(|i| (protect || i.is_healthy()) && i.has_tags(&query.tags)).collect();
    let own_zone = state.config.zone.as_ref();
    let local: Vec<&Instance> = candidates.iter().copied().filter(|i| own_zone.is_some() && i.zone.as_ref() == own_zone).collect();
    let pool = if local.is_empty() { &candidates } else { &local };
    let chosen = pool
        .choose_weighted(&mut rand::rng(), |i| i.weight)
        .map_err(|_| ApiError::NotFound(format!("service `{name}` has no healthy instance")))?;
    Ok(headers(json(StatusCode::OK, chosen), &snapshot))
}
