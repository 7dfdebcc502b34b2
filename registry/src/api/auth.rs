//! Bearer tokens and what each may do. With no token configured the registry is open
//! (development). Once any token is configured, every call but `/healthz`, `/readyz` and
//! `/metrics` needs `Authorization: Bearer <token>` (401 without one, 403 with one that may not
//! do this):
//!
//! | token | may |
//! |---|---|
//! | admin | everything |
//! | agent of node N (`agent_tokens_file`) | read; register, heartbeat, set maintenance of and deregister instances whose `node` is N; announce agent N |
//! | fleet agent (`agent_token`) | what an agent may, for any node |
//! | read-only | read |
//!
//! Tokens are kept as SHA-256 digests and looked up by the digest of the presented token, so
//! neither the comparison's time nor a log tells anything about a configured token; tokens are
//! never logged.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use signpost_shared::config::{ConfigError, Secret};
use signpost_shared::validate;

use super::error::ApiError;

/// Least length of a token.
pub const MIN_TOKEN_LEN: usize = 16;

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// An agent: `Some(node)` writes only that node's instances, `None` any node's.
    Agent(Option<String>),
    /// Reads only.
    Reader,
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No token is configured: everything is open.
    Open,
    /// A token of this role.
    Token(Role),
}

impl Caller {
    /// The node an agent token is bound to (None: any node may be written).
    pub fn bound_node(&self) -> Option<&str> {
        match self {
            Caller::Token(Role::Agent(node)) => node.as_deref(),
            _ => None,
        }
    }

    fn may_write_instances(&self) -> bool {
        matches!(self, Caller::Open | Caller::Token(Role::Admin | Role::Agent(_)))
    }
}

/// The configured tokens, by the SHA-256 digest of each.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: HashMap<[u8; 32], Role>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    /// Tokens for the admin API, for agents of any node, for reads, and for agents of one node
    /// each. A token given twice keeps the role given first in that order.
    pub fn new(admin: Option<Secret>, fleet_agent: Option<Secret>, reader: Option<Secret>, nodes: Vec<(String, Secret)>) -> Self {
        let mut tokens = HashMap::new();
        let roles = [(admin, Role::Admin), (fleet_agent, Role::Agent(None)), (reader, Role::Reader)];
        for (secret, role) in roles.into_iter().filter_map(|(s, r)| Some((s?, r))) {
            tokens.entry(digest(secret.expose())).or_insert(role);
        }
        for (node, secret) in nodes {
            tokens.entry(digest(secret.expose())).or_insert(Role::Agent(Some(node)));
        }
        Auth { tokens }
    }

    /// Whether any token is configured (when none is, everything is open).
    pub fn is_secured(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Who presents `header` (the `Authorization` header): 401 without a well-formed bearer
    /// token when tokens are configured, 403 for a token that is not one of them.
    pub fn identify(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        if !self.is_secured() {
            return Ok(Caller::Open);
        }
        let header = header.ok_or_else(|| ApiError::Unauthorized("this call needs `Authorization: Bearer <token>`".into()))?;
        let presented = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
        match self.tokens.get(&digest(presented)) {
            Some(role) => Ok(Caller::Token(role.clone())),
            None => Err(ApiError::Forbidden("the token is not valid here".into())),
        }
    }

    /// A read: any valid token.
    pub fn check_read(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        self.identify(header)
    }

    /// An admin action.
    pub fn check_admin(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        let caller = self.identify(header)?;
        match caller {
            Caller::Open | Caller::Token(Role::Admin) => Ok(caller),
            _ => Err(ApiError::Forbidden("only the admin token may do this".into())),
        }
    }

    /// A write of instances that are named by id (a heartbeat, a deregistration): any token
    /// that may write instances; the store then holds a node-bound agent to its own node's.
    pub fn check_instance_writer(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        let caller = self.identify(header)?;
        if caller.may_write_instances() { Ok(caller) } else { Err(ApiError::Forbidden("a read-only token may not write".into())) }
    }

    /// A write of instances (or of agent) of `node` (None: an agentless instance): the admin,
    /// a fleet agent, or the agent of that node.
    pub fn check_node_write(&self, header: Option<&str>, node: Option<&str>) -> Result<Caller, ApiError> {
        let caller = self.identify(header)?;
        if !caller.may_write_instances() {
            return Err(ApiError::Forbidden("a read-only token may not write".into()));
        }
        match (caller.bound_node(), node) {
            (Some(own), Some(node)) if own != node => Err(ApiError::Forbidden(format!(
                "this agent token belongs to node `{own}` and may not write for node `{}`",
                validate::clip(node)
            ))),
            (Some(own), None) => {
                Err(ApiError::Forbidden(format!("this agent token belongs to node `{own}`; name it as the instance's `node`")))
            }
            _ => Ok(caller),
        }
    }
}

/// Reads a file of agent tokens: one `NODE TOKEN` pair per line (blank lines and `#` comments
/// skipped). Each node name is validated and each token must be at least
/// [`MIN_TOKEN_LEN`] characters; a bad line is named, its token never shown.
pub fn read_agent_tokens(path: &Path) -> Result<Vec<(String, Secret)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File { path: path.display().to_string(), source })?;
    parse_agent_tokens(&path.display().to_string(), &text)
}

fn parse_agent_tokens(name: &str, text: &str) -> Result<Vec<(String, Secret)>, ConfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| ConfigError::Rule(format!("agent tokens file {name}, line {}: {why}", i + 1));
        let mut fields = line.split_whitespace();
        let (Some(node), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("must be `NODE TOKEN`"));
        };
        validate::node_name(node).map_err(|p| bad(&format!("node: {p}")))?;
        if token.len() < MIN_TOKEN_LEN {
            return Err(bad(&format!("the token must be at least {MIN_TOKEN_LEN} characters long")));
        }
        out.push((node.to_string(), Secret::new(token)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(
            Some(Secret::new("admin-token-0123456789")),
            Some(Secret::new("fleet-token-0123456789")),
            Some(Secret::new("read-token-0123456789")),
            vec![("node-a".into(), Secret::new("node-a-token-0123456789"))],
        )
    }

    fn bearer(token: &str) -> Option<String> {
        Some(format!("Bearer {token}"))
    }

    #[test]
    fn open_without_tokens() {
        let open = Auth::default();
        assert_eq!(open.check_read(None).expect("open"), Caller::Open);
        assert!(open.check_admin(None).is_ok());
        assert!(open.check_node_write(None, Some("x")).is_ok());
    }

    #[test]
    fn missing_malformed_and_unknown_tokens() {
        let auth = auth();
        assert!(matches!(auth.check_read(None), Err(ApiError::Unauthorized(_))));
        assert!(matches!(auth.check_read(Some("Basic abc")), Err(ApiError::Unauthorized(_))));
        assert!(matches!(auth.check_read(Some("Bearer ")), Err(ApiError::Unauthorized(_))));
        assert!(matches!(auth.check_read(bearer("nope").as_deref()), Err(ApiError::Forbidden(_))));
    }

    #[test]
    fn each_role_may_do_what_it_is_for() {
        let auth = auth();
        let (admin, fleet, read, node_a) = (
            bearer("admin-token-0123456789"),
            bearer("fleet-token-0123456789"),
            bearer("read-token-0123456789"),
            bearer("node-a-token-0123456789"),
        );
        for token in [&admin, &fleet, &read, &node_a] {
            assert!(auth.check_read(token.as_deref()).is_ok());
        }
        assert!(auth.check_admin(admin.as_deref()).is_ok());
        for token in [&fleet, &read, &node_a] {
            assert!(matches!(auth.check_admin(token.as_deref()), Err(ApiError::Forbidden(_))));
        }
        assert!(auth.check_node_write(admin.as_deref(), None).is_ok());
        assert!(auth.check_node_write(fleet.as_deref(), Some("node-b")).is_ok());
        assert!(matches!(auth.check_node_write(read.as_deref(), Some("node-a")), Err(ApiError::Forbidden(_))));
        assert!(auth.check_node_write(node_a.as_deref(), Some("node-a")).is_ok());
        let other = auth.check_node_write(node_a.as_deref(), Some("node-b")).expect_err("another node");
        assert!(matches!(&other, ApiError::Forbidden(m) if m.contains("node-a") && !m.contains("0123456789")), "{other:?}");
        assert!(matches!(auth.check_node_write(node_a.as_deref(), None), Err(ApiError::Forbidden(_))));
    }

    #[test]
    fn agent_token_files_name_the_bad_line_without_the_token() {
        let good = parse_agent_tokens("f", "# node token\nnode-a  aaaaaaaaaaaaaaaaaaaa\n\nnode-b bbbbbbbbbbbbbbbbbbbb\n").expect("parses");
        assert_eq!(good.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["node-a", "node-b"]);
        for (text, line) in [("node-a short\n", 1), ("ok-node cccccccccccccccccccc\nbad/node cccccccccccccccccccc\n", 2), ("lonely\n", 1)] {
            let error = parse_agent_tokens("f", text).expect_err("refused").to_string();
            assert!(error.contains(&format!("line {line}")), "{error}");
            assert!(!error.contains("cccc"), "{error}");
        }
    }
}
