//! warp filters and replies both servers use.

use std::convert::Infallible;

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::{ApiError, Body};

/// Hands a clone of `state` to every request.
pub fn with_state<S: Clone + Send + Sync + 'static>(state: S) -> impl Filter<Extract = (S,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The raw query string, empty when there is none.
pub fn raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// The body, read up to `limit` bytes; a reading error is handed to the handler, which
/// answers it in the contract's form.
pub fn body(limit: u64) -> impl Filter<Extract = (Result<Body, ApiError>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .then(move |content_type, length, stream| async move { Body::read(content_type, length, stream, limit).await })
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

/// Turns a handler's outcome into a response.
pub fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(ApiError::into_response)
}
