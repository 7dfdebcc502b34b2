//! The accept loop both HTTP servers (registry and agent) run under their warp routes, with
//! optional TLS and the request limits that keep a slow or hostile client from starving
//! everyone else: a cap on open connections (past which only `/healthz` is answered), a
//! deadline for a request's headers and for its body, a header size limit (431) and an idle
//! keep-alive limit. HTTP/1.1 only: every limit here is an HTTP/1 one, and neither our clients
//! nor the contract need HTTP/2.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::Instrument;

/// The limits one HTTP server applies to its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once. Past it, [`OVER_CAP_CONNECTIONS`] more are accepted for
    /// one request each (`/healthz` answered, anything else 503); past those, new connections
    /// wait in the kernel's listen backlog until a slot frees.
    pub max_connections: usize,
    /// Largest request line plus headers, in bytes; more gets 431 and the connection closed.
    pub max_header_bytes: usize,
    /// Longest time from a connection's first byte of a request (or from accepting it, or from
    /// the start of the TLS handshake) to the end of that request's headers.
    pub header_read_timeout: Duration,
    /// Longest time from the end of a request's headers to the end of its body; a body that
    /// is not in by then fails the request (400) and closes the connection.
    pub body_read_timeout: Duration,
    /// Longest time a keep-alive connection may sit with no request in flight and no byte of
    /// a new one received.
    pub idle_timeout: Duration,
}

/// How often the warning that the connection cap was reached may repeat.
const CAP_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Connections accepted past `max_connections` at once. Each serves one request: `GET
/// /healthz` is answered (liveness must not fail because the server is busy, or the
/// supervisor would restart a busy but healthy process), anything else gets 503 with
/// `Retry-After` (the client learns at once and can ask another replica); then it closes.
/// Past these too, new connections wait in the listen backlog.
pub const OVER_CAP_CONNECTIONS: usize = 16;

/// Longest wait for the request headers of a connection past the cap (a probe sends them at
/// once), so that silent clients cannot keep the over-cap slots for long.
pub const OVER_CAP_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The liveness path, answered past the connection cap.
const LIVENESS_PATH: &str = "/healthz";

/// The smallest read buffer hyper accepts (`max_buf_size` panics below it).
const MIN_BUF_SIZE: usize = 8192;

impl Limits {
    /// The registry's defaults: 1024 connections, 16 KiB of headers, 10 s for headers and
    /// for a body, 75 s idle (longer than the 60 s our client keeps an idle connection, so
    /// the client, not the server, closes it and never sends on a closing connection).
    pub fn registry_defaults() -> Self {
        Limits {
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
        }
    }

    /// The agent's defaults: as the registry's, with 256 connections (its clients are the
    /// applications of one host).
    pub fn agent_defaults() -> Self {
        Limits { max_connections: 256, ..Self::registry_defaults() }
    }

    /// Every rule the values break, as `(setting, problem)`.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut problems = Vec::new();
        if !(1..=1_000_000).contains(&self.max_connections) {
            problems.push(("max_connections", "must be between 1 and 1000000"));
        }
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            problems.push(("max_header_bytes", "must be between 1024 and 1048576"));
        }
        let (short, long) = (Duration::from_millis(100), Duration::from_secs(3600));
        for (name, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value < short || value > long {
                problems.push((name, "must be between 100ms and 1h"));
            }
        }
        problems
    }
}

/// The remote address of a request's connection, as a request extension (warp's own
/// `warp::addr::remote()` only works under `warp::serve`); read it with [`peer_addr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The remote address of the request's connection, when it came through [`serve`].
pub fn peer_addr() -> impl warp::Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Clone {
    use warp::Filter;
    warp::ext::optional::<PeerAddr>().map(|peer: Option<PeerAddr>| peer.map(|p| p.0))
}

/// Counters of what the limits did, exported on `/metrics` (`register`).
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections accepted.
    pub accepted: Counter,
    /// Connections open now.
    pub open: Gauge,
    /// Times a connection arrived with `max_connections` open (served past the cap, or left
    /// waiting in the backlog).
    pub at_capacity: Counter,
    /// Connections accepted past `max_connections`: `/healthz` answered, anything else 503.
    pub over_cap: Counter,
    /// Connections closed because a request's headers were not in within the timeout.
    pub header_timeouts: Counter,
    /// Connections closed after `idle_timeout` with nothing to do.
    pub idle_closed: Counter,
    /// TLS handshakes that failed or timed out.
    pub tls_failures: Counter,
}

impl ServeStats {
    /// Adds the counters to a metrics registry (they stay shared with this one).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("http_connections_accepted", "HTTP connections accepted", self.accepted.clone());
        registry.register("http_connections_open", "HTTP connections open now", self.open.clone());
        registry.register(
            "http_connection_cap_reached",
            "Times a connection arrived with max_connections open (answered past the cap, or waiting in the backlog)",
            self.at_capacity.clone(),
        );
        registry.register(
            "http_over_cap_connections",
            "Connections accepted past max_connections: /healthz answered, anything else 503 with Retry-After",
            self.over_cap.clone(),
        );
        registry.register(
            "http_header_timeouts",
            "Connections closed because a request's headers did not arrive within header_read_timeout",
            self.header_timeouts.clone(),
        );
        registry.register("http_idle_closed", "Keep-alive connections closed after idle_timeout", self.idle_closed.clone());
        registry.register("http_tls_failures", "TLS handshakes that failed or timed out", self.tls_failures.clone());
    }
}

/// The request body handed to the routes: hyper's, with the body deadline.
pub type RequestBody = TimedBody<Incoming>;

/// Serves `service` (e.g. `warp::service(routes)`) on `listener` until `shutdown` is
/// cancelled, then stops accepting, lets requests in flight finish (each connection closes
/// after its current request) and returns once every connection is closed. With `tls`, every
/// connection starts with a TLS handshake, bounded by `header_read_timeout`. Past
/// `max_connections`, up to [`OVER_CAP_CONNECTIONS`] more are accepted for one request each:
/// `/healthz` is answered, anything else gets 503.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    stats: Arc<ServeStats>,
    shutdown: CancellationToken,
) where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let over_cap_limits =
        Arc::new(Limits { header_read_timeout: limits.header_read_timeout.min(OVER_CAP_HEADER_TIMEOUT), ..limits.clone() });
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let over_cap_permits = Arc::new(Semaphore::new(OVER_CAP_CONNECTIONS));
    let mut connections = JoinSet::new();
    let mut accept_errors = 0u32;
    let mut last_cap_warning = None;
    loop {
        // Reap finished connections first, so the set does not grow with every one served.
        while connections.try_join_next().is_some() {}
        let mut waited = false;
        let slot = match permits.clone().try_acquire_owned() {
            Ok(permit) => Slot::Regular(permit),
            Err(_) => {
                // Once a minute at most: under a flood this happens for every connection.
                if last_cap_warning.is_none_or(|at: Instant| at.elapsed() >= CAP_WARNING_EVERY) {
                    last_cap_warning = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        over_cap = OVER_CAP_CONNECTIONS,
                        "connection cap reached; connections past it are answered /healthz only (anything else 503), \
                         and past those they wait in the listen backlog until one closes"
                    );
                }
                match over_cap_permits.clone().try_acquire_owned() {
                    Ok(permit) => Slot::OverCap(permit),
                    Err(_) => {
                        waited = true;
                        let acquired = tokio::select! {
                            _ = shutdown.cancelled() => break,
                            permit = permits.clone().acquire_owned() => permit.map(Slot::Regular),
                            permit = over_cap_permits.clone().acquire_owned() => permit.map(Slot::OverCap),
                        };
                        match acquired {
                            Ok(slot) => slot,
                            // The semaphores are never closed.
                            Err(_) => break,
                        }
                    }
                }
            }
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    accept_errors = 0;
                    pair
                }
                Err(e) => {
                    // A connection that died before we took it is nothing; anything else
                    // (EMFILE) is the process' problem: say so and back off, as hyper 0.14 did.
                    if !is_connection_error(&e) {
                        accept_errors = accept_errors.saturating_add(1);
                        let pause = Duration::from_millis(10 << accept_errors.min(7));
                        tracing::error!(error = %e, retry_in = ?pause, "cannot accept connections");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        stats.accepted.inc();
        // A slot may have freed while this one waited in accept: a regular one is preferred.
        let slot = match slot {
            Slot::OverCap(over) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    drop(over);
                    Slot::Regular(permit)
                }
                Err(_) => Slot::OverCap(over),
            },
            regular => regular,
        };
        let over_cap = matches!(slot, Slot::OverCap(_));
        if over_cap || waited {
            stats.at_capacity.inc();
        }
        if over_cap {
            stats.over_cap.inc();
        }
        let connection = Connection {
            peer,
            service: service.clone(),
            limits: if over_cap { over_cap_limits.clone() } else { limits.clone() },
            stats: stats.clone(),
            shutdown: shutdown.clone(),
            over_cap,
            _slot: slot,
        };
        connections.spawn(connection.run(stream, tls.clone()).instrument(tracing::debug_span!("connection", peer = %peer)));
    }
    drop(listener);
    tracing::debug!(open = connections.len(), "no longer accepting; waiting for open connections to finish");
    while connections.join_next().await.is_some() {}
}

/// Errors of `accept` that concern one connection only.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset)
}

/// A boxed error, as hyper takes a body's.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The slot a connection holds: one of `max_connections`, or one past the cap.
enum Slot {
    Regular(#[allow(dead_code)] OwnedSemaphorePermit),
    OverCap(#[allow(dead_code)] OwnedSemaphorePermit),
}

// === impl Connection ===

/// One accepted connection and what it needs; dropping it releases its slot.
struct Connection<S> {
    peer: SocketAddr,
    service: S,
    limits: Arc<Limits>,
    stats: Arc<ServeStats>,
    shutdown: CancellationToken,
    /// Accepted past the cap: one request, `/healthz` only.
    over_cap: bool,
    _slot: Slot,
}

/// Why the server closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    HeaderTimeout,
    Idle,
}

impl<S, B> Connection<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    async fn run(self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        self.stats.open.inc();
        let activity = Arc::new(Activity::new());
        match tls {
            None => self.http(stream, activity).await,
            Some(acceptor) => {
                let handshake = tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream));
                let done = tokio::select! {
                    _ = self.shutdown.cancelled() => None,
                    done = handshake => Some(done),
                };
                match done {
                    Some(Ok(Ok(stream))) => {
                        // The headers' clock starts after the handshake.
                        activity.restart_reading();
                        self.http(stream, activity).await;
                    }
                    Some(Ok(Err(e))) => {
                        self.stats.tls_failures.inc();
                        tracing::debug!(error = %e, "TLS handshake failed");
                    }
                    Some(Err(_)) => {
                        self.stats.tls_failures.inc();
                        tracing::debug!(timeout = ?self.limits.header_read_timeout, "TLS handshake timed out");
                    }
                    None => {}
                }
            }
        }
        self.stats.open.dec();
    }

    /// Serves HTTP/1.1 on `io` until the client leaves, a limit cuts it, or shutdown.
    async fn http<I>(&self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &self.limits;
        let io = TokioIo::new(Tracked { inner: io, activity: activity.clone() });
        let service = {
            let (service, activity, peer, body_timeout) = (self.service.clone(), activity.clone(), self.peer, limits.body_read_timeout);
            let over_cap = self.over_cap;
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut service = service.clone();
                let guard = activity.request_started();
                let refused = over_cap && !is_liveness(&request);
                let mut request = request.map(|body| TimedBody::new(body, body_timeout));
                request.extensions_mut().insert(PeerAddr(peer));
                async move {
                    if refused {
                        drop(guard);
                        return Ok(over_cap_refusal());
                    }
                    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                    let response = service.call(request).await;
                    drop(guard);
                    response.map(|r| r.map(ServeBody::Routes))
                }
            })
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            // Our own clock (below) tells headers from idle time and cuts (and counts) first.
            // Hyper's starts whenever it waits for a request, so it covers an idle spell and
            // the next request's headers: a backstop at their sum, never at the same instant
            // as ours (a tie would let either end the connection, uncounted).
            .header_read_timeout(limits.header_read_timeout.saturating_add(limits.idle_timeout))
            .max_header_size(limits.max_header_bytes)
            .max_buf_size(limits.max_header_bytes.max(MIN_BUF_SIZE))
            // One request only past the cap: the slot is for the next prober.
            .keep_alive(!self.over_cap);
        let connection = http.serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let mut draining = false;
        loop {
            let changed = activity.changed.notified();
            let deadline = activity.deadline(limits);
            tokio::select! {
                // Our deadline first: should the task wake late enough for hyper's backstop to
                // have fired too, the cut is still ours, and counted.
                biased;
                _ = sleep_until(deadline) => {
                    match activity.expired(limits) {
                        Some(Cut::HeaderTimeout) => {
                            self.stats.header_timeouts.inc();
                            tracing::info!(
                                peer = %self.peer,
                                timeout = ?limits.header_read_timeout,
                                "closing a connection whose request headers did not arrive in time"
                            );
                            return;
                        }
                        Some(Cut::Idle) => {
                            self.stats.idle_closed.inc();
                            tracing::debug!(idle = ?limits.idle_timeout, "closing an idle connection");
                            return;
                        }
                        None => {}
                    }
                }
                done = connection.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.cancelled(), if !draining => {
                    // Finish the request in flight, answer it with `Connection: close`.
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
                _ = changed => {}
            }
        }
    }
}

/// A liveness probe: `GET` or `HEAD /healthz`.
fn is_liveness<T>(request: &Request<T>) -> bool {
    matches!(*request.method(), hyper::Method::GET | hyper::Method::HEAD) && request.uri().path() == LIVENESS_PATH
}

/// The answer to anything but `/healthz` past the connection cap: 503, `Retry-After: 1`, the
/// contract's error body, and the connection closed.
fn over_cap_refusal<B>() -> Response<ServeBody<B>> {
    let body = serde_json::json!({
        "error": "busy",
        "message": "too many connections are open; only /healthz is answered past the cap: retry shortly, or ask another server",
    });
    let bytes = Bytes::from(body.to_string());
    let mut response = Response::new(ServeBody::Own(Some(bytes)));
    *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    headers.insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
    headers.insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    response
}

// === impl ServeBody ===

/// A response body: the routes' own, or one the server makes itself (the 503 past the cap).
#[derive(Debug)]
pub enum ServeBody<B> {
    /// From the routes.
    Routes(B),
    /// The server's own, sent in one frame.
    Own(Option<Bytes>),
}

impl<B> HttpBody for ServeBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ServeBody::Routes(body) => Pin::new(body).poll_frame(cx).map(|frame| frame.map(|f| f.map_err(Into::into))),
            ServeBody::Own(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ServeBody::Routes(body) => body.is_end_stream(),
            ServeBody::Own(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ServeBody::Routes(body) => body.size_hint(),
            ServeBody::Own(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<(Instant, Cut)>) {
    match deadline {
        Some((at, _)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// === impl Activity ===

/// What one connection is doing, for its deadlines: requests in flight (no deadline of
/// ours), reading a request (the header deadline) or idle (the idle deadline).
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

#[derive(Debug)]
struct Phase {
    in_flight: usize,
    /// Bytes of a request arrived since the connection went idle (or it is new).
    reading: bool,
    /// When the current phase began.
    since: Instant,
}

impl Activity {
    /// A new connection counts as reading: its first request's headers are due.
    fn new() -> Self {
        Activity { phase: Mutex::new(Phase { in_flight: 0, reading: true, since: Instant::now() }), changed: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        // The lock guards plain counters: a panic while holding it leaves them usable.
        self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn restart_reading(&self) {
        let mut phase = self.lock();
        phase.reading = true;
        phase.since = Instant::now();
    }

    /// Bytes came in: when idle, a new request has begun.
    fn received(&self) {
        let mut phase = self.lock();
        if phase.in_flight == 0 && !phase.reading {
            phase.reading = true;
            phase.since = Instant::now();
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        let mut phase = self.lock();
        phase.in_flight += 1;
        phase.reading = false;
        drop(phase);
        self.changed.notify_one();
        RequestGuard(self.clone())
    }

    fn request_done(&self) {
        let mut phase = self.lock();
        phase.in_flight = phase.in_flight.saturating_sub(1);
        if phase.in_flight == 0 {
            phase.reading = false;
            phase.since = Instant::now();
        }
        drop(phase);
        self.changed.notify_one();
    }

    fn deadline(&self, limits: &Limits) -> Option<(Instant, Cut)> {
        let phase = self.lock();
        match (phase.in_flight, phase.reading) {
            (0, true) => Some((phase.since + limits.header_read_timeout, Cut::HeaderTimeout)),
            (0, false) => Some((phase.since + limits.idle_timeout, Cut::Idle)),
            _ => None,
        }
    }

    fn expired(&self, limits: &Limits) -> Option<Cut> {
        self.deadline(limits).filter(|(at, _)| *at <= Instant::now()).map(|(_, cut)| cut)
    }
}

/// Marks a request in flight until dropped (also when its future is dropped unfinished).
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

// === impl Tracked ===

/// The connection's byte stream, telling [`Activity`] when request bytes arrive.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.received();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// === impl TimedBody ===

/// A request body that fails once its deadline passes with the body still incomplete.
#[derive(Debug)]
pub struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    deadline: Instant,
    /// Made on the first wait only: most requests (GETs) have no body to wait for.
    sleep: Option<Pin<Box<Sleep>>>,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    /// The body did not arrive in time.
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    /// The connection failed while reading it.
    #[error("{0}")]
    Read(#[from] hyper::Error),
}

impl<B> TimedBody<B> {
    /// `inner`, due within `timeout` from now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        TimedBody { inner, timeout, deadline: Instant::now() + timeout, sleep: None }
    }
}

impl<B> HttpBody for TimedBody<B>
where
    B: HttpBody<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(BodyReadError::from))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyReadError::TimedOut(this.timeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keep_the_rules() {
        assert!(Limits::registry_defaults().problems().is_empty());
        assert!(Limits::agent_defaults().problems().is_empty());
        let bad = Limits { max_connections: 0, max_header_bytes: 10, idle_timeout: Duration::ZERO, ..Limits::agent_defaults() };
        let names: Vec<_> = bad.problems().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["max_connections", "max_header_bytes", "idle_timeout"]);
    }

    #[test]
    fn a_connection_moves_between_reading_in_flight_and_idle() {
        let limits = Limits::agent_defaults();
        let kind = |activity: &Activity| activity.deadline(&limits).map(|(_, cut)| cut);
        let activity = Arc::new(Activity::new());
        assert_eq!(kind(&activity), Some(Cut::HeaderTimeout), "a new connection owes its first request's headers");
        let guard = activity.request_started();
        assert_eq!(kind(&activity), None, "no deadline of ours while a request is in flight (a long blocking query)");
        activity.received();
        assert_eq!(kind(&activity), None, "bytes during a request (pipelining) do not start a clock");
        drop(guard);
        assert_eq!(kind(&activity), Some(Cut::Idle));
        activity.received();
        assert_eq!(kind(&activity), Some(Cut::HeaderTimeout), "the first byte of the next request starts the header clock");
        let now = Limits { header_read_timeout: Duration::ZERO, ..limits.clone() };
        assert_eq!(activity.expired(&now), Some(Cut::HeaderTimeout));
        assert_eq!(activity.expired(&limits), None);
    }
}
