//! `POST /v1/instances`, `GET|DELETE /v1/instances/{id}`, `PUT /v1/instances/{id}/heartbeat`,
//! `PUT /v1/instances/{id}/maintenance`.

use std::sync::Arc;

use signpost_shared::model::Registration;
use signpost_shared::validate;
use signpost_shared::wire::{Heartbeat, Maintenance};
use warp::Reply as _;
use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::Caller;
use super::error::ApiError;
use super::request::{Body, only_param};
use super::{AppState, json, with_index};
use crate::store::{Deregistered, Registered, StoreError};

/// The `node` query parameter of a heartbeat, a maintenance change or a deregistration: the
/// agent that sends it, acting for its own instance. A node-bound token may only name its node.
fn named_node(caller: &Caller, raw_query: &str) -> Result<Option<String>, ApiError> {
    let node = only_param(raw_query, "node")?.pop();
    if let Some(node) = &node {
        validate::node_name(node).map_err(|p| ApiError::bad_request("invalid_query", format!("node: {p}")))?;
    }
    if let (Some(own), Some(named)) = (caller.bound_node(), node.as_deref())
        && own != named
    {
        return Err(ApiError::Forbidden(format!("this agent token belongs to node `{own}`, not `{named}`")));
    }
    Ok(node)
}

/// The node whose instances the caller may renew or put in maintenance: its token's node, or
/// the node it names (None: any).
fn acting_node(caller: &Caller, raw_query: &str) -> Result<Option<String>, ApiError> {
    Ok(named_node(caller, raw_query)?.or_else(|| caller.bound_node().map(str::to_string)))
}

/// The query of a registration: `move=true` lets the admin move an id to another node.
fn move_requested(raw_query: &str) -> Result<bool, ApiError> {
    match only_param(raw_query, "move")?.pop().as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::bad_request("invalid_query", format!("move: `{}` is not true or false", validate::clip(other)))),
    }
}

/// Refuses an id that cannot exist (400) before it reaches the database.
fn checked_id(id: &str) -> Result<(), ApiError> {
    validate::instance_id(id).map_err(|problem| ApiError::bad_request("invalid_id", format!("instance id: {problem}")))
}

/// Registers or updates an instance: 201 when new, 200 otherwise; 409 when another node's
/// live agent owns the id (the admin moves it with `?move=true`).
pub async fn register(
    state: Arc<AppState>,
    authorization: Option<String>,
    raw_query: String,
    body: Result<Body, ApiError>,
) -> Result<Response, ApiError> {
    state.auth.check_instance_writer(authorization.as_deref())?;
    let move_allowed = move_requested(&raw_query)?;
    if move_allowed {
        state.auth.check_admin(authorization.as_deref())?;
    }
    let spec = body?.json::<Registration>()?.validate()?;
    let caller = state.auth.check_node_write(authorization.as_deref(), spec.node.as_deref())?;
    let (instance, outcome) = state.store.register(&spec, state.store.now_ms(), caller.bound_node(), move_allowed).await?;
    let status = if outcome == Registered::Created { StatusCode::CREATED } else { StatusCode::OK };
    if outcome != Registered::Renewed {
        tracing::info!(instance = %instance.id, service = %instance.service, created = outcome == Registered::Created, "registered");
    }
    Ok(with_index(json(status, &instance), instance.index))
}

/// One instance, always read from the database.
pub async fn get(state: Arc<AppState>, authorization: Option<String>, id: String) -> Result<Response, ApiError> {
    state.auth.check_read(authorization.as_deref())?;
    checked_id(&id)?;
    let instance = state.store.instance(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no instance `{id}`")))?;
    Ok(json(StatusCode::OK, &instance))
}

/// Renews the lease; 404 tells the caller to register again, also when the id is another
/// node's now (it was moved): registering again tells the agent so (409).
pub async fn heartbeat(
    state: Arc<AppState>,
    authorization: Option<String>,
    id: String,
    raw_query: String,
    body: Result<Body, ApiError>,
) -> Result<Response, ApiError> {
    let caller = state.auth.check_instance_writer(authorization.as_deref())?;
    checked_id(&id)?;
    let node = acting_node(&caller, &raw_query)?;
    let heartbeat: Heartbeat = body?.json_or_default()?;
    heartbeat.validate()?;
    let instance = match state.store.heartbeat(&id, &heartbeat, state.store.now_ms(), node.as_deref()).await {
        Ok(Some(instance)) => instance,
        Ok(None) => return Err(ApiError::NotFound(format!("no instance `{id}`; register it again"))),
        Err(StoreError::NotOwner { owner, .. }) => {
            return Err(ApiError::NotFound(format!("node `{owner}` has no instance `{id}` (it is another node's); register it again")));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(json(StatusCode::OK, &instance))
}

/// Turns maintenance on or off: the admin, a fleet agent, or the agent of the instance's
/// own node (an agent sets its own services' maintenance).
pub async fn maintenance(
    state: Arc<AppState>,
    authorization: Option<String>,
    id: String,
    raw_query: String,
    body: Result<Body, ApiError>,
) -> Result<Response, ApiError> {
    let caller = state.auth.check_instance_writer(authorization.as_deref())?;
    checked_id(&id)?;
    let node = acting_node(&caller, &raw_query)?;
    let maintenance: Maintenance = body?.json()?;
    maintenance.validate()?;
    let instance = state
        .store
        .set_maintenance(&id, &maintenance, state.store.now_ms(), node.as_deref())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance `{id}`")))?;
    tracing::info!(instance = %id, enabled = maintenance.enabled, "maintenance changed");
    Ok(json(StatusCode::OK, &instance))
}

/// Deregisters: 204, 404, or 409 when a live agent owns the instance.
pub async fn deregister(state: Arc<AppState>, authorization: Option<String>, id: String, raw_query: String) -> Result<Response, ApiError> {
    let token = state.auth.check_instance_writer(authorization.as_deref())?;
    checked_id(&id)?;
    let caller = named_node(&token, &raw_query)?;
    match state.store.deregister(&id, caller.as_deref(), state.store.now_ms(), token.bound_node()).await? {
        Deregistered::Removed => {
            tracing::info!(instance = %id, "deregistered");
            Ok(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response())
        }
        Deregistered::NotFound => Err(ApiError::NotFound(format!("no instance `{id}`"))),
        Deregistered::OwnedByLiveAgent { node, http_addr } => Err(ApiError::Conflict(format!(
            "instance `{id}` belongs to agent `{node}`, which is alive and would register it again; \
             remove it there: DELETE http://{http_addr}/v1/agent/services/{id}"
        ))),
    }
}
