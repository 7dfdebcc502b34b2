//! Bearer tokens for writes. With no token configured, writes are open (development); with
//! one, a write needs `Authorization: Bearer <admin or agent token>`: 401 without it, 403
//! with another. Tokens are compared in constant time and never logged.

use signpost_shared::config::Secret;
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    admin: Option<Secret>,
    agent: Option<Secret>,
}

impl Auth {
    /// Tokens for the admin API and for agents.
    pub fn new(admin: Option<Secret>, agent: Option<Secret>) -> Self {
        Auth { admin, agent }
    }

    /// Checks the `Authorization` header of a write.
    pub fn check_write(&self, header: Option<&str>) -> Result<(), ApiError> {
        if self.admin.is_none() && self.agent.is_none() {
            return Ok(());
        }
        let header = header.ok_or_else(|| ApiError::Unauthorized("this write needs `Authorization: Bearer <token>`".into()))?;
        let presented = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
        let matches =
            |secret: &Option<Secret>| secret.as_ref().is_some_and(|s| bool::from(s.expose().as_bytes().ct_eq(presented.as_bytes())));
        // Evaluate both so the time taken does not tell which token was close.
        let admin = matches(&self.admin);
        let agent = matches(&self.agent);
        if admin | agent { Ok(()) } else { Err(ApiError::Forbidden("the token is not allowed to write here".into())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_tokens() {
        assert!(Auth::default().check_write(None).is_ok());
    }

    #[test]
    fn missing_wrong_and_right_tokens() {
        let auth = Auth::new(Some(Secret::new("admin-token-0123456789")), Some(Secret::new("agent-token-0123456789")));
        assert!(matches!(auth.check_write(None), Err(ApiError::Unauthorized(_))));
        assert!(matches!(auth.check_write(Some("Basic abc")), Err(ApiError::Unauthorized(_))));
        assert!(matches!(auth.check_write(Some("Bearer nope")), Err(ApiError::Forbidden(_))));
        assert!(auth.check_write(Some("Bearer admin-token-0123456789")).is_ok());
        assert!(auth.check_write(Some("Bearer agent-token-0123456789")).is_ok());
    }
}
