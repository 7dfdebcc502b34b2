//! Reading requests: bodies (bounded, JSON only) and query strings (every parameter checked,
//! unknown ones refused), so handlers only see typed values.

use std::time::Duration;

use crate::model::Health;
use crate::validate;
use crate::wire::parse_json;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// How many times the limit a too-large body may be before it is refused without reading it.
const DRAIN_FACTOR: u64 = 16;

/// A request body read up to the limit, with its content type.
#[derive(Debug)]
pub struct Body {
    content_type: Option<String>,
    bytes: Bytes,
}

impl Body {
    /// Reads `stream`, refusing it (413) past `limit` bytes, declared or sent.
    pub async fn read<S, B>(content_type: Option<String>, content_length: Option<u64>, stream: S, limit: u64) -> Result<Body, ApiError>
    where
        S: Stream<Item = Result<B, warp::Error>>,
        B: Buf,
    {
        // A body somewhat over the limit is read and dropped before the 413, so that the
        // client gets the answer instead of a connection reset mid-upload; a far larger one
        // is refused at once.
        let drain_limit = limit.saturating_mul(DRAIN_FACTOR);
        if content_length.is_some_and(|n| n > drain_limit) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        let mut stream = std::pin::pin!(stream);
        let mut bytes = BytesMut::new();
        let mut seen: u64 = 0;
        let mut too_large = content_length.is_some_and(|n| n > limit);
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk.map_err(|e| ApiError::bad_request("body_read", format!("cannot read the body: {e}")))?;
            seen += chunk.remaining() as u64;
            if seen > limit {
                too_large = true;
            }
            if seen > drain_limit {
                break;
            }
            if too_large {
                chunk.advance(chunk.remaining());
                continue;
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                bytes.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        if too_large {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        Ok(Body { content_type, bytes: bytes.freeze() })
    }

    /// True when nothing was sent.
    pub fn is_empty(&self) -> bool {
        self.bytes.iter().all(u8::is_ascii_whitespace)
    }

    /// Parses the body as JSON of type `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let is_json = self.content_type.as_deref().is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json")
        });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the body must be sent as Content-Type: application/json (got {})",
                self.content_type.as_deref().map(validate::clip).unwrap_or_else(|| "none".into())
            )));
        }
        Ok(parse_json(&self.bytes)?)
    }

    /// Parses the body as JSON of type `T`, or `T::default()` when it is empty.
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> Result<T, ApiError> {
        if self.is_empty() { Ok(T::default()) } else { self.json() }
    }
}

/// Which health values a lookup returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthFilter {
    /// Passing or warning (the default).
    Healthy,
    /// Every instance.
    Any,
    /// Exactly this health.
    Only(Health),
}

impl HealthFilter {
    /// True when `health` passes the filter.
    pub fn accepts(self, health: Health) -> bool {
        match self {
            HealthFilter::Healthy => health.is_healthy(),
            HealthFilter::Any => true,
            HealthFilter::Only(h) => h == health,
        }
    }
}

/// The parameters a read may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadQuery {
    /// Block until the catalog's index passes this.
    pub index: Option<u64>,
    /// Longest time to block.
    pub wait: Option<Duration>,
    /// Which health values to return.
    pub health: HealthFilter,
    /// Tags every instance must carry.
    pub tags: Vec<String>,
    /// Only this zone.
    pub zone: Option<String>,
}

/// The values of `key`, the one parameter a query may carry, in order; any other parameter
/// is a 400 naming it.
pub fn only_param(raw: &str, key: &str) -> Result<Vec<String>, ApiError> {
    url::form_urlencoded::parse(raw.as_bytes())
        .map(|(name, value)| {
            if name == key {
                Ok(value.into_owned())
            } else {
                let message = format!("unknown query parameter `{}`; this endpoint takes: {key}", validate::clip(&name));
                Err(ApiError::bad_request("invalid_query", message))
            }
        })
        .collect()
}

impl ReadQuery {
    /// Parses a raw query string, accepting only the parameters in `allowed`.
    pub fn parse(raw: &str, allowed: &[&str]) -> Result<ReadQuery, ApiError> {
        let mut query = ReadQuery { index: None, wait: None, health: HealthFilter::Healthy, tags: vec![], zone: None };
        for (key, value) in url::form_urlencoded::parse(raw.as_bytes()) {
            if !allowed.contains(&key.as_ref()) {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter `{}`; this endpoint takes: {}", validate::clip(&key), allowed.join(", ")),
                ));
            }
            let bad = |problem: String| ApiError::bad_request("invalid_query", format!("{key}: {problem}"));
            match key.as_ref() {
                "index" => {
                    query.index =
                        Some(value.parse().map_err(|_| bad(format!("`{}` is not a non-negative integer", validate::clip(&value))))?)
                }
                "wait" => {
                    // Plain seconds ("30") are accepted as well as "30s".
                    let parsed = value.parse::<u64>().map(Duration::from_secs).or_else(|_| crate::duration::parse(&value));
                    query.wait = Some(parsed.map_err(bad)?);
                }
                "health" => {
                    query.health = match value.as_ref() {
                        "healthy" => HealthFilter::Healthy,
                        "any" => HealthFilter::Any,
                        other => HealthFilter::Only(other.parse().map_err(|e: String| bad(format!("{e}, or healthy or any")))?),
                    }
                }
                "tag" => {
                    validate::text(&value, validate::MAX_TAG_LEN, false).map_err(bad)?;
                    query.tags.push(value.into_owned());
                }
                "zone" => {
                    validate::dns_label(&value).map_err(bad)?;
                    query.zone = Some(value.into_owned());
                }
                _ => {}
            }
        }
        if query.tags.len() > validate::MAX_TAGS {
            return Err(ApiError::bad_request("invalid_query", format!("at most {} tag filters are allowed", validate::MAX_TAGS)));
        }
        Ok(query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters_and_blocking() {
        let q = ReadQuery::parse("health=any&tag=a&tag=b&zone=eu-1&index=7&wait=30s", &["health", "tag", "zone", "index", "wait"])
            .expect("valid");
        assert_eq!(q.health, HealthFilter::Any);
        assert_eq!(q.tags, ["a", "b"]);
        assert_eq!(q.zone.as_deref(), Some("eu-1"));
        assert_eq!(q.index, Some(7));
        assert_eq!(q.wait, Some(Duration::from_secs(30)));
    }

    #[test]
    fn refuses_unknown_and_bad_values() {
        let all = ["health", "tag", "zone", "index", "wait"];
        for bad in ["helth=any", "index=-1", "wait=soon", "health=ok", "zone=EU", "tag="] {
            assert!(ReadQuery::parse(bad, &all).is_err(), "{bad}");
        }
    }
}
