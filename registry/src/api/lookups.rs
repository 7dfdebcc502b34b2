//! `GET /v1/services`, `GET /v1/services/{name}` and `GET /v1/catalog`, answered from the
//! catalog snapshot; each takes `index` and `wait` to block until the catalog changes.

use std::sync::Arc;

use signpost_shared::validate;
use signpost_shared::wire::{ServiceInstances, ServicesPage};
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::request::ReadQuery;
use super::{AppState, block, json, json_bytes, with_index};

/// Every service with its counts by health.
pub async fn services(state: Arc<AppState>, authorization: Option<String>, raw_query: String) -> Result<Response, ApiError> {
    state.auth.check_read(authorization.as_deref())?;
    let query = ReadQuery::parse(&raw_query, &["index", "wait"])?;
    block(&state, query.index, query.wait).await?;
    let snapshot = state.cache.get().await?;
    let page = ServicesPage { index: snapshot.index, self_preservation: snapshot.self_preservation, services: snapshot.summaries() };
    Ok(with_index(json(StatusCode::OK, &page), snapshot.index))
}

/// The instances of one service, filtered by health, tags and zone. An unknown service is
/// an empty list, not a 404, so that a client can wait for its first instance.
pub async fn service(state: Arc<AppState>, authorization: Option<String>, name: String, raw_query: String) -> Result<Response, ApiError> {
    state.auth.check_read(authorization.as_deref())?;
    validate::dns_label(&name).map_err(|p| ApiError::bad_request("invalid_name", format!("service name: {p}")))?;
    let query = ReadQuery::parse(&raw_query, &["health", "tag", "zone", "index", "wait"])?;
    block(&state, query.index, query.wait).await?;
    let snapshot = state.cache.get().await?;
    let instances = snapshot
        .service(&name)
        .iter()
        .filter(|i| query.health.accepts(i.health) && i.has_tags(&query.tags) && (query.zone.is_none() || i.zone == query.zone))
        .cloned()
        .collect();
    let answer = ServiceInstances { service: name, index: snapshot.index, instances };
    Ok(with_index(json(StatusCode::OK, &answer), snapshot.index))
}

/// The whole catalog (instances and agents) with its index, tagged with the index as its
/// `ETag`. With `If-None-Match` naming the index it would answer (a caller that holds the
/// catalog at that index, typically when a blocking query's wait ended with nothing changed):
/// 304 with the index header and no body, instead of the whole catalog again.
pub async fn catalog(
    state: Arc<AppState>,
    authorization: Option<String>,
    raw_query: String,
    if_none_match: Option<String>,
) -> Result<Response, ApiError> {
    state.auth.check_read(authorization.as_deref())?;
    let query = ReadQuery::parse(&raw_query, &["index", "wait"])?;
    // A caller whose copy carries this index but another tag holds a catalog of another
    // history (the database was restored and climbed back to the index): it must not wait.
    // An older agent's bare `"index"` tag names no history: it waits as it always did.
    let other_history = match (query.index, if_none_match.as_deref()) {
        (Some(index), Some(header)) if signpost_shared::wire::names_catalog_history(header) => {
            let current = state.cache.get().await?;
            current.index == index && !signpost_shared::wire::etag_matches(header, &current.etag())
        }
        _ => false,
    };
    if !other_history {
        block(&state, query.index, query.wait).await?;
    }
    let snapshot = state.cache.get().await?;
    let etag = snapshot.etag();
    let mut response = if if_none_match.as_deref().is_some_and(|header| signpost_shared::wire::etag_matches(header, &etag)) {
        let mut response = Response::new(bytes::Bytes::new().into());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        with_index(response, snapshot.index)
    } else {
        json_bytes(snapshot.catalog_json(), snapshot.index)
    };
    if let Ok(value) = warp::http::HeaderValue::from_str(&etag) {
        response.headers_mut().insert(warp::http::header::ETAG, value);
    }
    Ok(response)
}
