//! TLS for an HTTP server (rustls on aws-lc-rs, the provider reqwest uses): a certificate
//! chain and private key read from PEM files, checked to match, and reloaded when the files
//! change (polled) or on SIGHUP. A new pair serves new handshakes; open connections keep the
//! one they started with; a broken new pair is logged and the old one kept. Key material is
//! never logged: the logs name the files and the certificate's SHA-256 fingerprint.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the certificate and key files are read to see whether they changed.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Why a certificate/key pair cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("{path} holds no PEM certificate{reason}")]
    NoCertificate {
        /// The file.
        path: String,
        /// Detail, empty or starting with ": ".
        reason: String,
    },
    /// The key file holds no usable PEM private key. The detail is left out on purpose: it
    /// could quote the file.
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// The file.
        path: String,
    },
    /// The key or certificate is not usable, or they do not belong together.
    #[error("the certificate in {cert} and the key in {key} cannot be used together: {reason}")]
    Pair {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// Why (rustls' words: no key material).
        reason: String,
    },
    /// rustls refused the server configuration.
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// A loaded certificate chain and key, with what may be logged about it.
#[derive(Clone)]
pub struct LoadedPair {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the leaf certificate's DER, hex (as `openssl x509 -fingerprint -sha256`).
    pub fingerprint: String,
    /// Certificates in the chain.
    pub chain_len: usize,
    /// When the leaf certificate expires.
    pub not_after: DateTime<Utc>,
}

impl fmt::Debug for LoadedPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPair").field("fingerprint", &self.fingerprint).field("chain_len", &self.chain_len).finish_non_exhaustive()
    }
}

/// The crypto provider every server config here uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads and checks the pair in `cert` and `key`.
pub fn load_pair(cert: &Path, key: &Path) -> Result<LoadedPair, TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source });
    parse_pair(&read(cert)?, &read(key)?, cert, key)
}

/// Checks a pair given as PEM text; `cert_path` and `key_path` name it in errors.
pub fn parse_pair(cert_pem: &[u8], key_pem: &[u8], cert_path: &Path, key_path: &Path) -> Result<LoadedPair, TlsError> {
    let no_cert = |reason: String| TlsError::NoCertificate { path: cert_path.display().to_string(), reason };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().map_err(|e| no_cert(format!(": {e}")))?;
    let Some(leaf) = chain.first() else { return Err(no_cert(String::new())) };
    let fingerprint = hex(&Sha256::digest(leaf.as_ref()));
    let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
        .ok()
        .and_then(|(_, parsed)| DateTime::from_timestamp(parsed.validity().not_after.timestamp(), 0))
        .ok_or_else(|| no_cert(": the first certificate is not a readable X.509 certificate".into()))?;
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey { path: key_path.display().to_string() })?;
    let chain_len = chain.len();
    let key = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| TlsError::Pair {
        cert: cert_path.display().to_string(),
        key: key_path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(LoadedPair { key: Arc::new(key), fingerprint, chain_len, not_after })
}

/// Warn this long before a certificate expires.
pub const EXPIRY_WARNING: chrono::TimeDelta = chrono::TimeDelta::days(14);

/// How a certificate's expiry looks at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// More than `EXPIRY_WARNING` left.
    Fine,
    /// Expires within `EXPIRY_WARNING`: whole days left.
    Soon(i64),
    /// Expired.
    Expired,
}

impl Expiry {
    /// The state of a certificate valid until `not_after`.
    pub fn at(not_after: DateTime<Utc>, now: DateTime<Utc>) -> Expiry {
        let left = not_after - now;
        if left <= chrono::TimeDelta::zero() {
            Expiry::Expired
        } else if left <= EXPIRY_WARNING {
            Expiry::Soon(left.num_days())
        } else {
            Expiry::Fine
        }
    }
}

/// Logs a warning (an error once expired) when the certificate in `cert` expires within
/// `EXPIRY_WARNING`.
fn warn_expiry(cert: &Path, pair: &LoadedPair) {
    match Expiry::at(pair.not_after, Utc::now()) {
        Expiry::Fine => {}
        Expiry::Soon(days) => {
            tracing::warn!(cert = %cert.display(), not_after = %pair.not_after, days_left = days, "the TLS certificate expires soon; replace the files");
        }
        Expiry::Expired => {
            tracing::error!(cert = %cert.display(), not_after = %pair.not_after, "the TLS certificate has expired; clients refuse it; replace the files");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pair in use, swapped in place on reload; rustls asks it for every handshake.
#[derive(Debug)]
struct CurrentPair(RwLock<LoadedPair>);

impl ResolvesServerCert for CurrentPair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).key.clone())
    }
}

/// A server's TLS: the acceptor its connections go through and the files it reloads.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    current: Arc<CurrentPair>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("cert_file", &self.cert_file).field("key_file", &self.key_file).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the pair in `cert_file` and `key_file` (TLS 1.2 and 1.3, HTTP/1.1 by ALPN).
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let pair = load_pair(cert_file, key_file)?;
        tracing::info!(
            cert = %cert_file.display(),
            fingerprint = %pair.fingerprint,
            chain = pair.chain_len,
            not_after = %pair.not_after,
            "TLS certificate loaded"
        );
        warn_expiry(cert_file, &pair);
        let current = Arc::new(CurrentPair(RwLock::new(pair)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
        })
    }

    /// What new connections go through.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The fingerprint of the certificate new handshakes get.
    pub fn fingerprint(&self) -> String {
        self.current.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).fingerprint.clone()
    }

    /// Reads both files again; uses them if they changed and are a good pair. Returns
    /// whether a new pair is in use; `last` holds the contents tried last, so a broken pair
    /// is reported once, not at every poll.
    fn reload(&self, last: &mut Option<(Vec<u8>, Vec<u8>)>) -> bool {
        let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source });
        let contents = match read(&self.cert_file).and_then(|cert| Ok((cert, read(&self.key_file)?))) {
            Ok(contents) => contents,
            Err(e) => {
                if last.take().is_some() {
                    tracing::warn!(error = %e, "cannot read the TLS files; keeping the certificate in use");
                }
                return false;
            }
        };
        if last.as_ref() == Some(&contents) {
            return false;
        }
        let parsed = parse_pair(&contents.0, &contents.1, &self.cert_file, &self.key_file);
        *last = Some(contents);
        match parsed {
            Ok(pair) => {
                let mut current = self.current.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                if current.fingerprint == pair.fingerprint {
                    // Same certificate (the key file was rewritten, or touched): swap anyway,
                    // the key may be new in form.
                    *current = pair;
                    return false;
                }
                tracing::info!(
                    cert = %self.cert_file.display(),
                    fingerprint = %pair.fingerprint,
                    was = %current.fingerprint,
                    chain = pair.chain_len,
                    not_after = %pair.not_after,
                    "TLS certificate reloaded; new connections get it"
                );
                warn_expiry(&self.cert_file, &pair);
                *current = pair;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "the changed TLS files are not a usable pair; keeping the certificate in use");
                false
            }
        }
    }

    /// Reloads the files when their contents change (read every `every`) or on SIGHUP,
    /// until `shutdown`.
    pub async fn watch(self, every: Duration, shutdown: CancellationToken) {
        let read = |path: &Path| std::fs::read(path).ok();
        let mut last = read(&self.cert_file).zip(read(&self.key_file));
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still reloaded when they change");
                None
            }
        };
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The load warned already; then once a day while the certificate in use is near its end.
        let mut warned_at = tokio::time::Instant::now();
        loop {
            let hangup_received = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                _ = hangup_received => {
                    tracing::info!("SIGHUP: reading the TLS files again");
                    // Try the files even if unchanged since a failed attempt.
                    last = None;
                }
            }
            if self.reload(&mut last) {
                warned_at = tokio::time::Instant::now();
            } else if warned_at.elapsed() >= Duration::from_secs(24 * 60 * 60) {
                let pair = self.current.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
                warn_expiry(&self.cert_file, &pair);
                warned_at = tokio::time::Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_fine_then_soon_then_expired() {
        let now = Utc::now();
        let days = chrono::TimeDelta::days;
        assert_eq!(Expiry::at(now + days(15), now), Expiry::Fine);
        assert_eq!(Expiry::at(now + days(14), now), Expiry::Soon(14));
        assert_eq!(Expiry::at(now + chrono::TimeDelta::hours(30), now), Expiry::Soon(1));
        assert_eq!(Expiry::at(now, now), Expiry::Expired);
        assert_eq!(Expiry::at(now - days(3), now), Expiry::Expired);
    }

    #[test]
    fn garbage_is_refused_without_quoting_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, "not a certificate").expect("write");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n").expect("write");
        let err = load_pair(&cert, &key).expect_err("no certificate");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let missing = dir.path().join("missing.pem");
        assert!(matches!(load_pair(&missing, &key), Err(TlsError::Read { .. })));
    }
}
