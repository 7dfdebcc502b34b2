//! This agent's own endpoints: its local services and their checks at run time, its own
//! description, and the gossip members.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json as object;
use signpost_shared::http::{ApiError, Body};
use signpost_shared::validate::{self, ValidationErrors};
use signpost_shared::wire::Maintenance;
use warp::Reply as _;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{AgentState, json};
use crate::checks::report_health;
use crate::config::ServiceConfig;
use crate::local::LocalError;

fn local_error(error: LocalError) -> ApiError {
    match error {
        LocalError::NoService(_) | LocalError::NoCheck(_) => ApiError::NotFound(error.to_string()),
        LocalError::NotTtl(_) | LocalError::DuplicateCheck(_) => ApiError::Conflict(error.to_string()),
        LocalError::TooMany(_) => ApiError::QuotaExceeded(error.to_string()),
    }
}

/// Adds (or replaces) a local service: 201 with its registration; 409 when a live peer owns
/// its id.
pub fn add_service(state: Arc<AgentState>, body: Result<Body, ApiError>) -> Result<Response, ApiError> {
    let service: ServiceConfig = body?.json()?;
    let mut errors = ValidationErrors::default();
    service.validate_into("service", &state.node, &state.address, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    let registration = service.registration(&state.node, &state.address, state.config.zone.as_deref());
    let spec = registration.clone().validate()?;
    if let Some(owner) = live_owner_elsewhere(&state, &spec.id) {
        return Err(ApiError::Conflict(format!(
            "instance id `{}` belongs to node `{owner}`, which is alive; ids belong to one node at a time: give this service another id",
            spec.id
        )));
    }
    state.local.upsert(spec, &service.checks).map_err(local_error)?;
    tracing::info!(instance = %registration.id, service = %registration.service, "local service added");
    Ok(json(StatusCode::CREATED, &registration))
}

/// The node other than this one that owns instance `id` and is alive (in gossip, or by its
/// announcement at the registry while the registry's feed answers: a saved or stale page
/// proves nothing), if any: the registry would refuse the id (409).
fn live_owner_elsewhere(state: &AgentState, id: &str) -> Option<String> {
    let snapshot = state.cache.snapshot();
    let owner = snapshot.instances().find(|i| i.id == id)?.node.clone().filter(|node| *node != state.node)?;
    let in_gossip = snapshot.members.iter().any(|m| m.node == owner && m.state == "alive");
    let announced = snapshot.feed_live && state.cache.registry().agents.iter().any(|a| a.node == owner && a.alive);
    (in_gossip || announced).then_some(owner)
}

/// Removes a local service; the syncer deregisters it.
pub fn remove_service(state: Arc<AgentState>, id: String) -> Result<Response, ApiError> {
    validate::instance_id(&id).map_err(|p| ApiError::bad_request("invalid_id", format!("instance id: {p}")))?;
    state.local.remove(&id).map_err(local_error)?;
    tracing::info!(instance = %id, "local service removed");
    Ok(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response())
}

/// Turns maintenance on or off for a local service.
pub fn maintenance(state: Arc<AgentState>, id: String, body: Result<Body, ApiError>) -> Result<Response, ApiError> {
    let maintenance: Maintenance = body?.json()?;
    maintenance.validate()?;
    let reason = maintenance.enabled.then(|| maintenance.reason.clone().unwrap_or_else(|| "maintenance".into()));
    state.local.set_maintenance(&id, reason).map_err(local_error)?;
    Ok(json(StatusCode::OK, &object!({"id": id, "maintenance": maintenance.enabled})))
}

/// The optional body of a TTL report.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Report {
    #[serde(default)]
    output: Option<String>,
}

/// `PUT /v1/agent/checks/{id}/{pass,warn,fail}`: the application reports its own health.
pub fn report(state: Arc<AgentState>, id: String, word: String, body: Result<Body, ApiError>) -> Result<Response, ApiError> {
    let health = report_health(&word)
        .ok_or_else(|| ApiError::NotFound(format!("no such report `{}`: use pass, warn or fail", validate::clip(&word))))?;
    let report: Report = body?.json_or_default()?;
    let output = report.output.unwrap_or_else(|| format!("reported {word}"));
    validate::text(&output, validate::MAX_OUTPUT_LEN, true).map_err(|p| {
        let mut errors = ValidationErrors::default();
        errors.add("output", p);
        ApiError::Invalid(errors)
    })?;
    state.local.report(&id, health, output).map_err(local_error)?;
    Ok(json(StatusCode::OK, &object!({"check": id, "status": health})))
}

/// This agent.
pub fn agent(state: Arc<AgentState>) -> Result<Response, ApiError> {
    let snapshot = state.cache.snapshot();
    let registry: Vec<String> = state.config.registry.iter().map(ToString::to_string).collect();
    let services: Vec<String> = state.local.services().into_iter().map(|s| s.spec.id).collect();
    Ok(json(
        StatusCode::OK,
        &object!({
            "node": state.node,
            "zone": state.config.zone,
            "address": state.address,
            "http_addr": state.http_addr,
            "gossip_addr": state.gossip_addr,
            "cluster_id": state.config.cluster_id,
            "registry": registry,
            "index": snapshot.index,
            "stale_seconds": snapshot.stale_seconds(),
            "services": services,
            "version": env!("CARGO_PKG_VERSION"),
        }),
    ))
}

/// The gossip members.
pub fn members(state: Arc<AgentState>) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &object!({"members": state.cache.snapshot().members})))
}

/// The local checks.
pub fn checks(state: Arc<AgentState>) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &object!({"checks": state.local.checks()})))
}
