//! Gossip keys: the cluster's shared secrets that seal every gossip datagram
//! ([`crate::gossip_seal`]). A key is 32 random bytes written in base64 (`signpost-agent
//! keygen` prints one). An agent holds a [`Keyring`]: the first key seals what it sends,
//! every key opens what it receives, so a cluster rotates its key without downtime (add the
//! new key second everywhere, then first everywhere, then drop the old one). A key file is
//! read again when it changes ([`watch_file`]), so a rotation needs no restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{KeyInit, OsRng};
use chacha20poly1305::{Key, XChaCha20Poly1305};
use tokio_util::sync::CancellationToken;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;

/// Most keys one agent holds (a primary and the older ones still accepted).
pub const MAX_KEYS: usize = 8;

/// Why a key or a keyring is refused. The key itself is never part of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base64 of exactly 32 bytes.
    #[error("a gossip key must be 32 bytes in base64 (as `signpost-agent keygen` prints)")]
    Malformed,
    /// No key at all.
    #[error("no gossip key given")]
    Empty,
    /// More than [`MAX_KEYS`].
    #[error("at most {MAX_KEYS} gossip keys may be held at once")]
    TooMany,
    /// A key file that cannot be read.
    #[error("cannot read gossip key file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A line of a key file.
    #[error("gossip key file {path}, line {line}: {source}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        source: Box<KeyError>,
    },
}

/// One cluster key.
#[derive(Clone, PartialEq, Eq)]
pub struct GossipKey([u8; KEY_LEN]);

impl GossipKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        let mut key = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut key);
        GossipKey(key)
    }

    /// Reads a key written in base64.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Malformed)?;
        bytes.try_into().map(GossipKey).map_err(|_| KeyError::Malformed)
    }

    /// The key in base64, as `parse` reads it.
    pub fn encode(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The cipher of this key.
    pub(crate) fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::from(self.0))
    }
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GossipKey(<redacted>)")
    }
}

/// The keys one agent holds: the first seals, every one opens.
#[derive(Clone)]
pub struct Keyring {
    ciphers: Vec<XChaCha20Poly1305>,
}

impl Keyring {
    /// A keyring of `keys`, the first one primary.
    pub fn new(keys: &[GossipKey]) -> Result<Self, KeyError> {
        match keys.len() {
            0 => Err(KeyError::Empty),
            n if n > MAX_KEYS => Err(KeyError::TooMany),
            _ => Ok(Keyring { ciphers: keys.iter().map(GossipKey::cipher).collect() }),
        }
    }

    /// Parses keys written in base64, the first one primary.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Self, KeyError> {
        let keys = texts.iter().map(|t| GossipKey::parse(t.as_ref())).collect::<Result<Vec<_>, _>>()?;
        Keyring::new(&keys)
    }

    /// Parses a key file: one key per line, the first one primary; blank lines and lines
    /// starting with `#` are skipped.
    pub fn parse_file_text(path: &Path, text: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = GossipKey::parse(line).map_err(|source| KeyError::Line {
                path: path.display().to_string(),
                line: i + 1,
                source: Box::new(source),
            })?;
            keys.push(key);
        }
        Keyring::new(&keys)
    }

    /// Reads and parses a key file.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File { path: path.display().to_string(), reason: e.to_string() })?;
        Keyring::parse_file_text(path, &text)
    }

    /// The cipher that seals.
    pub(crate) fn primary(&self) -> &XChaCha20Poly1305 {
        // `new` refuses an empty keyring.
        &self.ciphers[0]
    }

    /// Every cipher that may open, the primary first.
    pub(crate) fn all(&self) -> &[XChaCha20Poly1305] {
        &self.ciphers
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.ciphers.len()
    }

    /// Always false: a keyring holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.ciphers.is_empty()
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keyring({} keys)", self.ciphers.len())
    }
}

/// A keyring the transport reads on every datagram and a key file watcher may replace.
#[derive(Debug)]
pub struct SharedKeyring(RwLock<Arc<Keyring>>);

impl SharedKeyring {
    /// Holds `keyring`.
    pub fn new(keyring: Keyring) -> Self {
        SharedKeyring(RwLock::new(Arc::new(keyring)))
    }

    /// The keyring now.
    pub fn current(&self) -> Arc<Keyring> {
        match self.0.read() {
            Ok(keyring) => keyring.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the keyring.
    pub fn replace(&self, keyring: Keyring) {
        match self.0.write() {
            Ok(mut current) => *current = Arc::new(keyring),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keyring),
        }
    }
}

/// Reads `path` again whenever its contents change (checked every `every`) and replaces the
/// keyring; a file that fails to parse is logged and the keys in use stay. Runs until
/// cancelled.
pub async fn watch_file(path: PathBuf, keyring: Arc<SharedKeyring>, every: Duration, shutdown: CancellationToken) {
    let mut last = std::fs::read(&path).ok();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                if last.take().is_some() {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the gossip key file; keeping the keys in use");
                }
                continue;
            }
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        let parsed = std::str::from_utf8(&now)
            .map_err(|_| KeyError::File { path: path.display().to_string(), reason: "not UTF-8".into() })
            .and_then(|text| Keyring::parse_file_text(&path, text));
        match parsed {
            Ok(new) => {
                tracing::info!(path = %path.display(), keys = new.len(), "gossip keys reloaded");
                keyring.replace(new);
            }
            Err(e) => tracing::warn!(error = %e, "ignoring the changed gossip key file; keeping the keys in use"),
        }
        last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_reads_back() {
        let key = GossipKey::generate();
        let text = key.encode();
        assert_eq!(text.len(), 44);
        assert_eq!(GossipKey::parse(&text).expect("parses"), key);
        assert_ne!(GossipKey::generate(), key);
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        for bad in ["", "not base64!", "c2hvcnQ=", &STANDARD.encode([7u8; 33])] {
            let error = GossipKey::parse(bad).expect_err("refused");
            assert_eq!(error, KeyError::Malformed);
        }
        let secret = STANDARD.encode([7u8; 31]);
        let error = Keyring::parse(&[secret.as_str()]).expect_err("refused").to_string();
        assert!(!error.contains(&secret), "{error}");
    }

    #[test]
    fn key_files_skip_comments_and_name_the_bad_line() {
        let (a, b) = (GossipKey::generate().encode(), GossipKey::generate().encode());
        let path = Path::new("keys");
        let ring = Keyring::parse_file_text(path, &format!("# primary\n{a}\n\n  {b}  \n")).expect("parses");
        assert_eq!(ring.len(), 2);
        let error = Keyring::parse_file_text(path, &format!("{a}\nnope\n")).expect_err("bad line");
        assert!(error.to_string().contains("line 2"), "{error}");
        assert_eq!(Keyring::parse_file_text(path, "# nothing\n").expect_err("empty"), KeyError::Empty);
        let many = vec![a; MAX_KEYS + 1].join("\n");
        assert_eq!(Keyring::parse_file_text(path, &many).expect_err("too many"), KeyError::TooMany);
    }
}
