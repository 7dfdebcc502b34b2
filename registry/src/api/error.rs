//! The registry's errors are the shared `ApiError`; a storage failure is 503 when the
//! database is unreachable and 500 (logged, never detailed to the client) otherwise.

pub use signpost_shared::http::error::{ApiError, recover};

use crate::store::StoreError;

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotOwner { .. } => return ApiError::Forbidden(error.to_string()),
            StoreError::OwnedByLiveNode { .. } => return ApiError::Conflict(error.to_string()),
            StoreError::NodeQuota { .. } | StoreError::Quota { .. } => return ApiError::QuotaExceeded(error.to_string()),
            _ => {}
        }
        if error.is_unavailable() { ApiError::Unavailable(error.to_string()) } else { ApiError::Internal(error.to_string()) }
    }
}
