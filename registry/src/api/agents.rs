//! `PUT /v1/agents/{node}` (an agent announces itself) and `GET /v1/agents` (the list that
//! seeds gossip).

use std::sync::Arc;

use signpost_shared::validate;
use signpost_shared::wire::{AgentAnnouncement, AgentsPage};
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::request::Body;
use super::{AppState, json, with_index};

/// Records an agent's addresses; repeated before `ttl_s` runs out, it keeps the agent alive.
pub async fn announce(
    state: Arc<AppState>,
    authorization: Option<String>,
    node: String,
    body: Result<Body, ApiError>,
) -> Result<Response, ApiError> {
    state.auth.check_instance_writer(authorization.as_deref())?;
    validate::node_name(&node).map_err(|p| ApiError::bad_request("invalid_node", format!("node: {p}")))?;
    state.auth.check_node_write(authorization.as_deref(), Some(&node))?;
    let announcement: AgentAnnouncement = body?.json()?;
    announcement.validate()?;
    let info = state.store.announce_agent(&node, &announcement, chrono::Utc::now().timestamp_millis()).await?;
    Ok(json(StatusCode::OK, &info))
}

/// Every known agent.
pub async fn list(state: Arc<AppState>, authorization: Option<String>) -> Result<Response, ApiError> {
    state.auth.check_read(authorization.as_deref())?;
    let snapshot = state.cache.get().await?;
    let page = AgentsPage { index: snapshot.index, agents: snapshot.agents.clone() };
    Ok(with_index(json(StatusCode::OK, &page), snapshot.index))
}
