//! Configuration loading, the same for every binary: defaults, then a TOML file (`--config`),
//! then `SIGNPOST_…` environment variables (nested with `__`), then command-line flags.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of every environment variable that configures Signpost.
pub const ENV_PREFIX: &str = "SIGNPOST_";

/// Exit code for an invalid configuration (`EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` names a file that cannot be read.
    #[error("cannot read config file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A value has the wrong type or an unknown key; figment names the key and its source.
    #[error("{0}")]
    Invalid(Box<figment::Error>),
    /// A value parsed but breaks a rule.
    #[error("{0}")]
    Rule(String),
}

/// Builds the layered configuration. `flags` should skip unset options (serialize `None` as
/// absent), so that a flag only overrides what it names.
pub fn figment<D: Serialize, F: Serialize>(defaults: &D, file: Option<&Path>, flags: &F) -> Result<Figment, ConfigError> {
    let known = top_level_keys(defaults);
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        // Toml::file ignores a missing file; a named file that is missing is an error.
        std::fs::metadata(path).map_err(|source| ConfigError::File { path: path.display().to_string(), source })?;
        figment = figment.merge(Toml::file(path));
    }
    // The filter sees the name as written (`LISTEN`, `A__B`); figment lower-cases it later.
    let env = Env::prefixed(ENV_PREFIX).split("__").filter(move |key| {
        let top = key.as_str().split("__").next().unwrap_or_default().split('.').next().unwrap_or_default();
        known.contains(&top.to_ascii_lowercase())
    });
    Ok(figment.merge(env).merge(Serialized::defaults(flags)))
}

/// Extracts the configuration, naming the key and source of a bad value.
pub fn extract<T: DeserializeOwned>(figment: &Figment) -> Result<T, ConfigError> {
    figment.extract().map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// The keys a configuration has, so that the environment layer only reads variables meant
/// for this binary (both binaries share the `SIGNPOST_` prefix).
fn top_level_keys<D: Serialize>(defaults: &D) -> BTreeSet<String> {
    match serde_json::to_value(defaults) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

/// A secret (a token): readable by the code, never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file, trimming the trailing newline.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File { path: path.display().to_string(), source })?;
        let value = text.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err(ConfigError::Rule(format!("secret file {} is empty", path.display())));
        }
        Ok(Secret(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        listen: String,
        #[serde(with = "crate::duration")]
        interval: std::time::Duration,
        token: Option<Secret>,
    }

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
    }

    fn defaults() -> Conf {
        Conf { listen: "127.0.0.1:1".into(), interval: std::time::Duration::from_secs(1), token: None }
    }

    #[test]
    fn layers_apply_in_order() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, "listen = \"0.0.0.0:2\"\ninterval = \"500ms\"").expect("write");
        let conf: Conf = extract(&figment(&defaults(), Some(file.path()), &Flags { listen: None }).expect("figment")).expect("valid");
        assert_eq!(conf.listen, "0.0.0.0:2");
        assert_eq!(conf.interval, std::time::Duration::from_millis(500));
        let flags = Flags { listen: Some("0.0.0.0:3".into()) };
        let conf: Conf = extract(&figment(&defaults(), Some(file.path()), &flags).expect("figment")).expect("valid");
        assert_eq!(conf.listen, "0.0.0.0:3");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, "interval = \"soon\"").expect("write");
        let err = extract::<Conf>(&figment(&defaults(), Some(file.path()), &Flags { listen: None }).expect("figment"))
            .expect_err("soon is not a duration");
        assert!(err.to_string().contains("interval"), "{err}");
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, "colour = 1").expect("write");
        let err =
            extract::<Conf>(&figment(&defaults(), Some(file.path()), &Flags { listen: None }).expect("figment")).expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let missing = Path::new("/nonexistent/signpost.toml");
        assert!(matches!(figment(&defaults(), Some(missing), &Flags { listen: None }), Err(ConfigError::File { .. })));
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
