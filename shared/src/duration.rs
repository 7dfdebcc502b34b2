//! Durations written as `500ms`, `2s`, `1m` (humantime), for JSON bodies and configuration.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Parses `500ms`, `2s`, `1m`, `1h 30m`.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. 500ms, 2s, 1m"))
}

/// Formats a duration the way [`parse`] reads it back (`1m 30s`, `500ms`).
pub fn format(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// `#[serde(with = "signpost_shared::duration")]` for a `Duration` field.
pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*duration))
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// The same for an `Option<Duration>` field (use with `#[serde(default)]`).
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `Some(d)` as its text and `None` as null.
    pub fn serialize<S: Serializer>(value: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.serialize_str(&super::format(*duration)),
            None => serializer.serialize_none(),
        }
    }

    /// Reads a duration's text or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?.map(|text| super::parse(&text).map_err(serde::de::Error::custom)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_forms() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn format_round_trips() {
        for d in [Duration::from_millis(500), Duration::from_secs(90), Duration::from_secs(3600)] {
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
