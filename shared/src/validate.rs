//! The rules every field of the model obeys, on every path (HTTP body, config file, gossip).
//! Each rule is a pure function returning the problem as text; [`ValidationErrors`] collects
//! every problem of a value with its field's name, not only the first.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Most tags an instance may carry.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;
/// Most meta pairs an instance may carry.
pub const MAX_META: usize = 32;
/// Longest meta key, in bytes.
pub const MAX_META_KEY_LEN: usize = 128;
/// Longest meta value, in bytes.
pub const MAX_META_VALUE_LEN: usize = 512;
/// Longest instance id or node name.
pub const MAX_ID_LEN: usize = 128;
/// Longest check output or maintenance reason kept, in bytes.
pub const MAX_OUTPUT_LEN: usize = 4096;
/// Longest address (a DNS name is at most 253 characters).
pub const MAX_ADDRESS_LEN: usize = 253;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field's path, e.g. `port` or `tags[3]`.
    pub field: String,
    /// What is wrong and what would be right.
    pub problem: String,
}

/// Every problem found in one value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// Records a problem with `field`.
    pub fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), problem: problem.into() });
    }

    /// Records the outcome of a rule for `field`.
    pub fn check(&mut self, field: impl Into<String>, outcome: Result<(), String>) {
        if let Err(problem) = outcome {
            self.add(field, problem);
        }
    }

    /// `Ok(value)` when nothing was recorded.
    pub fn into_result<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.0.is_empty() { Ok(value) } else { Err(self) }
    }

    /// True when no problem was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|e| format!("{}: {}", e.field, e.problem)).collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for ValidationErrors {}

/// A service name is a DNS label: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn dns_label(value: &str) -> Result<(), String> {
    let bytes = value.as_bytes();
    let ok_char = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(ok_char)
        && bytes.last().is_some_and(ok_char)
        && bytes.iter().all(|b| ok_char(b) || *b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a DNS label: 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit",
            clip(value)
        ))
    }
}

/// An instance id: 1-128 characters of `[A-Za-z0-9._:-]`.
pub fn instance_id(value: &str) -> Result<(), String> {
    id_like(value, true)
}

/// A node (agent) name: 1-128 characters of `[A-Za-z0-9._-]`.
pub fn node_name(value: &str) -> Result<(), String> {
    id_like(value, false)
}

fn id_like(value: &str, colon: bool) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (colon && c == ':');
    if value.is_empty() || value.len() > MAX_ID_LEN || !value.chars().all(allowed) {
        let set = if colon { "[A-Za-z0-9._:-]" } else { "[A-Za-z0-9._-]" };
        return Err(format!("`{}` must be 1-{MAX_ID_LEN} characters of {set}", clip(value)));
    }
    Ok(())
}

/// An address others reach an instance at: an IP address or a DNS host name.
pub fn address(value: &str) -> Result<(), String> {
    if value.parse::<IpAddr>().is_ok() || host_name(value) {
        Ok(())
    } else {
        Err(format!("`{}` is neither an IP address nor a host name", clip(value)))
    }
}

/// True for a DNS host name: dot-separated labels of letters, digits and '-', ≤ 253 chars.
pub fn host_name(value: &str) -> bool {
    let value = value.strip_suffix('.').unwrap_or(value);
    !value.is_empty()
        && value.len() <= MAX_ADDRESS_LEN
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A TCP port, 1-65535.
pub fn port(value: i64) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{value} is not a port: it must be 1-65535")),
    }
}

/// An integer within `min..=max`.
pub fn in_range(value: i64, min: i64, max: i64) -> Result<(), String> {
    if (min..=max).contains(&value) { Ok(()) } else { Err(format!("{value} is out of range: it must be {min}-{max}")) }
}

/// Free text (a tag, a meta value, a check's output): bounded, no control characters.
pub fn text(value: &str, max: usize, allow_empty: bool) -> Result<(), String> {
    if !allow_empty && value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > max {
        return Err(format!("is {} bytes long; at most {max} are allowed", value.len()));
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// A meta key: 1-128 characters of `[A-Za-z0-9._/-]`.
pub fn meta_key(value: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    if value.is_empty() || value.len() > MAX_META_KEY_LEN || !value.chars().all(allowed) {
        return Err(format!("`{}` must be 1-{MAX_META_KEY_LEN} characters of [A-Za-z0-9._/-]", clip(value)));
    }
    Ok(())
}

/// Shortens a refused value before it is echoed in an error message.
pub fn clip(value: &str) -> String {
    const KEEP: usize = 64;
    if value.len() <= KEEP {
        return value.escape_debug().to_string();
    }
    let mut end = KEEP;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", value[..end].escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web", "web-1", "0", &"a".repeat(63)] {
            assert!(dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"a".repeat(64), "é"] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_and_nodes() {
        assert!(instance_id("web-1:8080").is_ok());
        assert!(node_name("web-1:8080").is_err());
        assert!(instance_id("").is_err());
        assert!(instance_id(&"x".repeat(129)).is_err());
        assert!(instance_id("a b").is_err());
    }

    #[test]
    fn addresses() {
        for ok in ["10.0.0.1", "::1", "db.internal", "localhost", "host-1.example.com."] {
            assert!(address(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", "-a.com", "a b", "http://x", "10.0.0.1:80"] {
            assert!(address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(port(1), Ok(1));
        assert_eq!(port(65535), Ok(65535));
        assert!(port(0).is_err());
        assert!(port(70000).is_err());
        assert!(port(-1).is_err());
    }

    #[test]
    fn clip_keeps_char_boundaries() {
        let long = "é".repeat(100);
        assert!(clip(&long).ends_with('…'));
    }
}
