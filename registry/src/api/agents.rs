//! `PUT /v1/agents/{node}` (an agent announces itself) and `GET /v1/agents` (the list that
//! seeds gossip).

use std::sync::Arc;

use signpost_shared::validate;
use signpost_shared::wire::{AgentAnnouncement, AgentsPage};
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::request::{Body, only_param};
use super::{AppState, json, with_index};
use crate::store::time;

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
    let info = state.store.announce_agent(&node, &announcement, state.store.now_ms()).await?;
    Ok(json(StatusCode::OK, &info))
}

/// Most agents one `GET /v1/agents?node=…` may name.
pub const MAX_NODES_ASKED: usize = 100;

/// The `node` query parameters of `GET /v1/agents` (repeatable; none: every agent).
fn asked_nodes(raw_query: &str) -> Result<Vec<String>, ApiError> {
    let mut nodes = only_param(raw_query, "node")?;
    for node in &nodes {
        validate::node_name(node).map_err(|p| ApiError::bad_request("invalid_query", format!("node: {p}")))?;
    }
    if nodes.len() > MAX_NODES_ASKED {
        return Err(ApiError::bad_request("invalid_query", format!("at most {MAX_NODES_ASKED} nodes may be asked for at once")));
    }
    nodes.sort();
    nodes.dedup();
    Ok(nodes)
}

/// Every known agent, or the ones named by `node=` (read from the database, so that their
/// renewals are current: agents ask this for evidence that a peer lives), with the
/// registry's clock.
pub async fn list(state: Arc<AppState>, authorization: Option<String>, raw_query: String) -> Result<Response, ApiError> {
    state.auth.check_read(authorization.as_deref())?;
    let nodes = asked_nodes(&raw_query)?;
    let (index, agents) = if nodes.is_empty() {
        let snapshot = state.cache.get().await?;
        (snapshot.index, snapshot.agents.clone())
    } else {
        let agents = state.store.agents_named(&nodes, state.store.now_ms()).await?;
        (state.store.known_index(), agents)
    };
    let page = AgentsPage { index, agents, now: Some(time(state.store.now_ms())) };
    Ok(with_index(json(StatusCode::OK, &page), index))
}
