//! `ApiError`: every failure of a request to the registry or an agent, mapped in this one place to its status and the
//! contract's JSON body `{"error", "message"}`; and the recovery of warp's own rejections.

use std::convert::Infallible;

use crate::validate::ValidationErrors;
use crate::wire::{BodyError, ErrorBody};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

/// The `Retry-After` of a 503 for an unreachable database or a start in progress: the
/// registry's poller looks again every second.
pub const UNAVAILABLE_RETRY_AFTER_S: u32 = 1;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong in a way that is not a body field (a query, a path, a header).
    #[error("{message}")]
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// What and why.
        message: String,
    },
    /// The body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON, but some fields are wrong.
    #[error("{0}")]
    Invalid(ValidationErrors),
    /// No usable credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Credentials that do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// The state of the thing forbids this.
    #[error("{0}")]
    Conflict(String),
    /// A configured limit (a quota) forbids this; retrying will not help until something is
    /// removed or the limit raised.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The body is larger than allowed.
    #[error("the body is larger than the limit of {0} bytes")]
    PayloadTooLarge(u64),
    /// The body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The path exists, but not with this method.
    #[error("this path does not take that method")]
    MethodNotAllowed,
    /// A dependency (the database) cannot be reached: retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The server is starting (the registry: waiting for its database and migrations).
    #[error("starting: {0}")]
    Starting(String),
    /// Too much of one kind of work at once (blocking queries, connections): retry after a while.
    #[error("{message}")]
    Busy {
        /// What is full, and what to do.
        message: String,
        /// Seconds the client should wait before asking again (`Retry-After`).
        retry_after_s: u32,
    },
    /// A defect, not bad input; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::Malformed(message) => ApiError::MalformedJson(message),
            BodyError::Invalid(errors) => ApiError::Invalid(errors),
        }
    }
}

impl From<ValidationErrors> for ApiError {
    fn from(errors: ValidationErrors) -> Self {
        ApiError::Invalid(errors)
    }
}

impl ApiError {
    /// A 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { code, message: message.into() }
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::QuotaExceeded(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) | ApiError::Starting(_) | ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code in the body's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::Invalid(_) => "invalid",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Starting(_) => "starting",
            ApiError::Busy { .. } => "busy",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Seconds a client should wait before trying again (`Retry-After`), for a 503.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            ApiError::Unavailable(_) | ApiError::Starting(_) => Some(UNAVAILABLE_RETRY_AFTER_S),
            ApiError::Busy { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }

    /// The response; 5xx are logged at `warn` (but `busy`, counted instead), the rest at
    /// `debug`. A 503 carries `Retry-After`.
    pub fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code().to_string();
        let message = match &self {
            ApiError::Unavailable(_) => "the database is unreachable; try again shortly".to_string(),
            ApiError::Starting(_) => {
                "the registry is starting: it is waiting for its database and migrations; try again shortly".to_string()
            }
            ApiError::Internal(_) => "internal error; see the log".to_string(),
            other => other.to_string(),
        };
        if let ApiError::Busy { .. } = self {
            // Load shed on purpose, counted in the metrics: not one warning per caller.
            tracing::debug!(status = status.as_u16(), error = %self, "request refused: busy");
        } else if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request refused");
        }
        let retry_after = self.retry_after_s();
        let problems = match self {
            ApiError::Invalid(errors) => errors.0,
            _ => vec![],
        };
        let body = ErrorBody { error: code, message, problems };
        let mut response = warp::reply::with_status(warp::reply::json(&body), status).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(warp::http::header::RETRY_AFTER, warp::http::HeaderValue::from(seconds));
        }
        response
    }
}

/// Turns warp's own rejections (no route, wrong method, bad header) into contract bodies.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::PayloadTooLarge(0)
    } else if rejection.find::<warp::reject::UnsupportedMediaType>().is_some() {
        ApiError::UnsupportedMediaType("the body must be application/json".into())
    } else if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request("invalid_query", e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request("invalid_header", e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request("missing_header", e.to_string())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else if rejection.is_not_found() {
        ApiError::NotFound("no such endpoint; the README lists the API".into())
    } else {
        tracing::warn!(rejection = ?rejection, "unhandled rejection");
        ApiError::bad_request("bad_request", "the request cannot be handled")
    };
    Ok(error.into_response())
}
