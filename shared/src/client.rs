//! `RegistryClient`: the registry's HTTP API for agents, tools and tests. It keeps one
//! connection pool, fails over between the configured URLs in order, and retries a call
//! that could not reach any of them (or got 503) with exponential back-off and jitter.
//! Every call of the API is idempotent, so a retry never does a thing twice.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::{DeserializeOwned, DeserializeSeed};
use url::Url;

use crate::config::Secret;
use crate::model::{Instance, Registration};
use crate::wire::{
    AgentAnnouncement, AgentInfo, AgentsPage, CatalogPage, ErrorBody, Heartbeat, Maintenance, ServiceInstances, ServicesPage,
};

/// How a [`RegistryClient`] talks to the registry.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Registry base URLs, tried in order.
    pub urls: Vec<Url>,
    /// Bearer token sent with every call.
    pub token: Option<Secret>,
    /// Longest time one request may take (a blocking catalog call adds its wait to this).
    pub timeout: Duration,
    /// Longest time to open a connection.
    pub connect_timeout: Duration,
    /// How many times a call is retried after every URL failed.
    pub retries: usize,
    /// First back-off delay; it doubles up to `max_backoff`, with jitter.
    pub min_backoff: Duration,
    /// Longest back-off delay.
    pub max_backoff: Duration,
    /// PEM bundle of CA certificates trusted for `https://` registries besides the
    /// platform's roots (a private CA). Certificates are always verified.
    pub ca_file: Option<PathBuf>,
}

impl ClientConfig {
    /// Defaults for `urls`: 5 s timeout, 2 s to connect, 3 retries from 100 ms up to 2 s.
    pub fn new(urls: Vec<Url>) -> Self {
        ClientConfig {
            urls,
            token: None,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            retries: 3,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            ca_file: None,
        }
    }
}

/// The longest `Retry-After` the client honours (a larger one is taken as this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registry answered with an error status and the contract's body.
    #[error("registry answered {status}: {} ({})", .body.message, .body.error)]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The error body.
        body: ErrorBody,
        /// How long the registry asked the caller to wait before trying again (its
        /// `Retry-After`, in seconds, at most [`MAX_RETRY_AFTER`]).
        retry_after: Option<Duration>,
    },
    /// No configured registry could be reached (the message carries every cause, e.g. a
    /// certificate that does not verify).
    #[error("no registry reachable (last tried {url}): {}", causes(.source))]
    Unreachable {
        /// The last URL tried.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The answer was not the expected JSON.
    #[error("registry at {url} sent an unreadable answer: {reason}")]
    Decode {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The client could not be built.
    #[error("cannot build the registry client: {0}")]
    Build(String),
    /// The caller's deadline for a call passed before the registry answered.
    #[error("the registry did not answer {call} within {after:?}")]
    Deadline {
        /// Which call.
        call: String,
        /// The deadline.
        after: Duration,
    },
}

impl ClientError {
    /// The status the registry answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the registry asked the caller to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True for a 404: the caller should register again.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    /// True when another try (elsewhere or later) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            _ => false,
        }
    }
}

/// Which instances `GET /v1/services/{name}` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceQuery {
    /// Every instance, not only the healthy ones.
    pub any_health: bool,
    /// Tags every instance must carry.
    pub tags: Vec<String>,
    /// Only this zone.
    pub zone: Option<String>,
}

/// A client of the registry's HTTP API; cheap to clone.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
    /// Index into `urls` of the last registry that answered: calls start there.
    preferred: Arc<AtomicUsize>,
}

/// One request, before it is sent to a URL.
struct Call<'a> {
    method: Method,
    segments: &'a [&'a str],
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    timeout: Duration,
    /// The catalog the caller already holds: an answer with its tag (or, when it has none,
    /// at its index) is read off the connection and dropped, not kept.
    held: Option<HeldCatalog<'a>>,
    /// Whether a call that fails everywhere is tried again here (with back-off, and at
    /// least the `Retry-After` asked for); a blocking query is not: its caller follows the
    /// catalog in a loop of its own, and learns at once that the registry does not answer.
    retry: bool,
}

/// The catalog a caller of the feed holds: its index, and the `ETag` the registry sent with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldCatalog<'a> {
    /// Its change index.
    pub index: u64,
    /// The registry's tag for it (epoch, index and digest), when it sent one.
    pub etag: Option<&'a str>,
}

/// A new page of the catalog feed and its `ETag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogChange<T> {
    /// The page.
    pub page: T,
    /// The registry's tag for it, to present with the next call.
    pub etag: Option<String>,
}

/// What one request got back.
struct Answer {
    url: String,
    status: StatusCode,
    /// The body as it arrived, in chunks (a multi-MB catalog is never one allocation);
    /// `None` when it was at the caller's known index and dropped unread.
    body: Option<Vec<bytes::Bytes>>,
    /// Its `ETag` header.
    etag: Option<String>,
}

impl RegistryClient {
    /// Builds a client; fails when no URL is given or TLS cannot be set up (the CA file is
    /// unreadable or holds no certificate).
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        if config.urls.is_empty() {
            return Err(ClientError::Build("no registry URL given".into()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Shorter than the servers' idle limit (75 s by default), so that it is the client
            // that drops an idle connection, never the server under a request being sent.
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(path) = &config.ca_file {
            builder = builder.tls_certs_merge(read_ca_file(path)?);
        }
        let http = builder.build().map_err(|e| ClientError::Build(causes(&e)))?;
        Ok(RegistryClient { http, config: Arc::new(config), preferred: Arc::new(AtomicUsize::new(0)) })
    }

    /// The URL of the registry that answered last.
    pub fn current_url(&self) -> &Url {
        let urls = &self.config.urls;
        &urls[self.preferred.load(Ordering::Relaxed) % urls.len()]
    }

    /// `POST /v1/instances`: returns the instance and whether it was new.
    pub async fn register(&self, registration: &Registration) -> Result<(Instance, bool), ClientError> {
        let (status, instance) = self.json(Method::POST, &["v1", "instances"], vec![], Some(registration)).await?;
        Ok((instance, status == StatusCode::CREATED))
    }

    /// `GET /v1/instances/{id}`.
    pub async fn instance(&self, id: &str) -> Result<Instance, ClientError> {
        self.json(Method::GET, &["v1", "instances", id], vec![], None::<&()>).await.map(|(_, i)| i)
    }

    /// `PUT /v1/instances/{id}/heartbeat`; a 404 means: register again.
    /// `owner` names the calling agent: an instance that is another node's now (it was moved)
    /// is then not found, and the agent registers it again (and learns of the move).
    pub async fn heartbeat(&self, id: &str, heartbeat: &Heartbeat, owner: Option<&str>) -> Result<Instance, ClientError> {
        self.json(Method::PUT, &["v1", "instances", id, "heartbeat"], node_query(owner), Some(heartbeat)).await.map(|(_, i)| i)
    }

    /// `PUT /v1/instances/{id}/maintenance`.
    /// `owner` names the calling agent, which may only change its own instances.
    pub async fn maintenance(&self, id: &str, maintenance: &Maintenance, owner: Option<&str>) -> Result<Instance, ClientError> {
        self.json(Method::PUT, &["v1", "instances", id, "maintenance"], node_query(owner), Some(maintenance)).await.map(|(_, i)| i)
    }

    /// `DELETE /v1/instances/{id}`.
    /// `owner` names the calling agent, which may remove its own instances while it is alive.
    pub async fn deregister(&self, id: &str, owner: Option<&str>) -> Result<(), ClientError> {
        let query = node_query(owner);
        let call = Call {
            method: Method::DELETE,
            segments: &["v1", "instances", id],
            query,
            body: None,
            timeout: self.config.timeout,
            held: None,
            retry: true,
        };
        self.send(call).await.map(|_| ())
    }

    /// `GET /v1/services`.
    pub async fn services(&self) -> Result<ServicesPage, ClientError> {
        self.json(Method::GET, &["v1", "services"], vec![], None::<&()>).await.map(|(_, p)| p)
    }

    /// `GET /v1/services/{name}` with filters.
    pub async fn service(&self, name: &str, query: &ServiceQuery) -> Result<ServiceInstances, ClientError> {
        let mut params = vec![("health", if query.any_health { "any" } else { "healthy" }.to_string())];
        params.extend(query.tags.iter().map(|t| ("tag", t.clone())));
        if let Some(zone) = &query.zone {
            params.push(("zone", zone.clone()));
        }
        self.json(Method::GET, &["v1", "services", name], params, None::<&()>).await.map(|(_, p)| p)
    }

    /// `GET /v1/catalog`, blocking until the index passes `index` or `wait` ends.
    pub async fn catalog(&self, index: Option<u64>, wait: Option<Duration>) -> Result<CatalogPage, ClientError> {
        let call = self.catalog_call(index, wait, None);
        let answer = self.send(call).await?;
        decode(&answer.url, &answer.body.unwrap_or_default(), PhantomData)
    }

    /// `GET /v1/catalog?index=N&wait=…` for a caller that holds the catalog `held`: `None`
    /// when the wait ended with the catalog still the one held (the registry answers 304 to
    /// its tag), else the new page, decoded as `T` (e.g. [`CatalogPage`]), with its tag. A
    /// catalog at the held index but with another tag (the registry's database was restored
    /// and climbed back to that index) is a new page. With nothing held, always the page.
    pub async fn catalog_changed<T: DeserializeOwned>(
        &self,
        held: Option<HeldCatalog<'_>>,
        wait: Option<Duration>,
    ) -> Result<Option<CatalogChange<T>>, ClientError> {
        self.catalog_changed_seed(held, wait, PhantomData::<T>).await
    }

    /// [`RegistryClient::catalog_changed`], decoding the page with `seed` (which may, for
    /// example, take unchanged instances from the copy the caller already holds).
    pub async fn catalog_changed_seed<S>(
        &self,
        held: Option<HeldCatalog<'_>>,
        wait: Option<Duration>,
        seed: S,
    ) -> Result<Option<CatalogChange<S::Value>>, ClientError>
    where
        S: DeserializeSeed<'static>,
    {
        let call = self.catalog_call(held.map(|h| h.index), wait, held);
        let answer = self.send(call).await?;
        let Some(body) = answer.body else { return Ok(None) };
        Ok(Some(CatalogChange { page: decode(&answer.url, &body, seed)?, etag: answer.etag }))
    }

    fn catalog_call<'a>(&self, index: Option<u64>, wait: Option<Duration>, held: Option<HeldCatalog<'a>>) -> Call<'a> {
        let mut query = Vec::new();
        if let Some(index) = index {
            query.push(("index", index.to_string()));
        }
        let mut timeout = self.config.timeout;
        if let Some(wait) = wait {
            query.push(("wait", format!("{}ms", wait.as_millis())));
            timeout += wait;
        }
        Call { method: Method::GET, segments: &["v1", "catalog"], query, body: None, timeout, held, retry: wait.is_none() }
    }

    /// `PUT /v1/agents/{node}`.
    pub async fn announce(&self, node: &str, announcement: &AgentAnnouncement) -> Result<AgentInfo, ClientError> {
        self.json(Method::PUT, &["v1", "agents", node], vec![], Some(announcement)).await.map(|(_, a)| a)
    }

    /// `GET /v1/agents`.
    pub async fn agents(&self) -> Result<AgentsPage, ClientError> {
        self.json(Method::GET, &["v1", "agents"], vec![], None::<&()>).await.map(|(_, p)| p)
    }

    /// `GET /v1/agents?node=…`: the agents of `nodes` only (at most 100 per call), with the
    /// registry's clock.
    pub async fn agents_named(&self, nodes: &[String]) -> Result<AgentsPage, ClientError> {
        let query = nodes.iter().map(|node| ("node", node.clone())).collect();
        self.json(Method::GET, &["v1", "agents"], query, None::<&()>).await.map(|(_, p)| p)
    }

    async fn json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: Vec<(&'static str, String)>,
        body: Option<&B>,
    ) -> Result<(StatusCode, T), ClientError> {
        let body =
            body.map(serde_json::to_vec).transpose().map_err(|e| ClientError::Build(format!("cannot encode the request body: {e}")))?;
        let call = Call { method, segments, query, body, timeout: self.config.timeout, held: None, retry: true };
        let answer = self.send(call).await?;
        Ok((answer.status, decode(&answer.url, &answer.body.unwrap_or_default(), PhantomData)?))
    }

    /// Sends `call`, failing over between URLs and retrying with back-off.
    async fn send(&self, call: Call<'_>) -> Result<Answer, ClientError> {
        if !call.retry {
            return self.send_once_everywhere(&call).await;
        }
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.min_backoff)
            .with_max_delay(self.config.max_backoff)
            .with_max_times(self.config.retries)
            .with_jitter();
        (|| self.send_once_everywhere(&call))
            .retry(backoff)
            .when(ClientError::is_retryable)
            // A registry that asked for a pause (`Retry-After`, e.g. at its blocking-query cap)
            // gets at least that: callers refused together do not come back as a herd.
            .adjust(|e, delay| delay.map(|delay| delay.max(e.retry_after().unwrap_or_default())))
            .await
    }

    /// One try at every URL, starting with the preferred one.
    async fn send_once_everywhere(&self, call: &Call<'_>) -> Result<Answer, ClientError> {
        let urls = &self.config.urls;
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        for offset in 0..urls.len() {
            let i = (start + offset) % urls.len();
            match self.send_to(&urls[i], call).await {
                Ok(answer) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(e) if e.is_retryable() => {
                    tracing::debug!(url = %urls[i], error = %e, "registry call failed, trying the next registry");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Build("no registry URL given".into())))
    }

    async fn send_to(&self, base: &Url, call: &Call<'_>) -> Result<Answer, ClientError> {
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::Build(format!("{base} cannot be a base URL")))?
            .pop_if_empty()
            .extend(call.segments);
        let mut request = self.http.request(call.method.clone(), url.clone()).timeout(call.timeout);
        if !call.query.is_empty() {
            request = request.query(&call.query);
        }
        if let Some(token) = &self.config.token {
            request = request.bearer_auth(token.expose());
        }
        if let Some(body) = &call.body {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone());
        }
        if let Some(etag) = call.held.and_then(|h| h.etag) {
            // The registry answers 304 without the catalog while it is still the one held.
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let url_text = url.to_string();
        let unreachable = |source| ClientError::Unreachable { url: url_text.clone(), source };
        let mut response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let etag = response.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
        if status == StatusCode::NOT_MODIFIED && call.held.is_some() {
            return Ok(Answer { url: url_text, status, body: None, etag });
        }
        let unchanged = call.held.is_some_and(|held| match (held.etag, etag.as_deref()) {
            (Some(held), Some(now)) => held == now,
            _ => answer_index(&response) == Some(held.index),
        });
        if status.is_success() && unchanged {
            // A registry that ignores `If-None-Match` sent the catalog anyway: read it to the
            // end, a chunk at a time, so that the connection can be used again.
            while response.chunk().await.map_err(unreachable)?.is_some() {}
            return Ok(Answer { url: url_text, status, body: None, etag });
        }
        if status.is_success() {
            let mut chunks = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
                chunks.push(chunk);
            }
            return Ok(Answer { url: url_text, status, body: Some(chunks), etag });
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(|seconds| Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
        let bytes = response.bytes().await.map_err(unreachable)?;
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            error: "unexpected_answer".into(),
            message: String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
            problems: vec![],
        });
        Err(ClientError::Status { status, body, retry_after })
    }
}

/// `node=owner`, when an agent acts for its own node.
fn node_query(owner: Option<&str>) -> Vec<(&'static str, String)> {
    owner.map(|node| vec![("node", node.to_string())]).unwrap_or_default()
}

/// The answer's `X-Signpost-Index` header.
fn answer_index(response: &reqwest::Response) -> Option<u64> {
    response.headers().get(crate::wire::INDEX_HEADER)?.to_str().ok()?.parse().ok()
}

fn decode<S: DeserializeSeed<'static>>(url: &str, chunks: &[bytes::Bytes], seed: S) -> Result<S::Value, ClientError> {
    let failed = |e: serde_json::Error| ClientError::Decode { url: url.to_string(), reason: e.to_string() };
    let reader = std::io::BufReader::new(Chunks { rest: chunks, at: 0 });
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let value = seed.deserialize(&mut deserializer).map_err(failed)?;
    deserializer.end().map_err(failed)?;
    Ok(value)
}

/// Reads a body's chunks in order, as if they were one slice.
struct Chunks<'a> {
    rest: &'a [bytes::Bytes],
    /// Bytes of `rest[0]` already read.
    at: usize,
}

impl std::io::Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some((first, later)) = self.rest.split_first() {
            let left = first.get(self.at..).unwrap_or_default();
            if !left.is_empty() {
                let n = left.len().min(buf.len());
                buf[..n].copy_from_slice(&left[..n]);
                self.at += n;
                return Ok(n);
            }
            self.rest = later;
            self.at = 0;
        }
        Ok(0)
    }
}

/// The certificates of a PEM bundle, for the trust roots.
pub fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let pem = std::fs::read(path).map_err(|e| ClientError::Build(format!("cannot read the CA file {}: {e}", path.display())))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| ClientError::Build(format!("the CA file {} is not a PEM bundle: {}", path.display(), causes(&e))))?;
    if certs.is_empty() {
        return Err(ClientError::Build(format!("the CA file {} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// An error and its causes on one line: reqwest's own message says only "error sending
/// request"; the reason (refused, timed out, certificate not trusted) is further down.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use warp::Filter;

    use super::*;
    use crate::wire::INDEX_HEADER;

    /// A registry whose catalog stays at index 5. Its answer to a blocking query at 5 (the
    /// wait ended, nothing changed) is not JSON: a client that read it would fail.
    async fn registry_at_5() -> RegistryClient {
        let catalog = warp::path!("v1" / "catalog").and(warp::query::<HashMap<String, String>>()).map(|query: HashMap<String, String>| {
            let body = match query.get("index").map(String::as_str) {
                Some("5") => "the whole catalog again".to_string(),
                _ => serde_json::json!({"index": 5, "self_preservation": false, "instances": [], "agents": []}).to_string(),
            };
            warp::reply::with_header(body, INDEX_HEADER, "5")
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = Url::parse(&format!("http://{}", listener.local_addr().expect("addr"))).expect("url");
        tokio::spawn(warp::serve(catalog).incoming(listener).run());
        RegistryClient::new(ClientConfig::new(vec![url])).expect("client")
    }

    #[tokio::test]
    async fn test_a_catalog_answer_at_the_known_index_is_not_read() {
        let client = registry_at_5().await;
        let held = |index| Some(HeldCatalog { index, etag: None });
        let first: Option<CatalogChange<CatalogPage>> = client.catalog_changed(None, None).await.expect("first page");
        assert_eq!(first.map(|c| c.page.index), Some(5), "with no index, always the page");
        let later: Option<CatalogChange<CatalogPage>> =
            client.catalog_changed(held(5), Some(Duration::from_millis(10))).await.expect("wait ended");
        assert_eq!(later, None, "still at 5: nothing to decode");
        let newer: Result<Option<CatalogChange<CatalogPage>>, _> = client.catalog_changed(held(4), Some(Duration::from_millis(10))).await;
        assert_eq!(newer.expect("moved on").map(|c| c.page.index), Some(5), "at another index: the page");
        assert!(client.catalog(Some(5), Some(Duration::from_millis(10))).await.is_err(), "the plain call reads every answer");
    }
}
