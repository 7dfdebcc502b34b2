//! signpost-registry: the central registry of Signpost. It keeps instances, their leases
//! and the agents in PostgreSQL (or an SQLite file), expires lapsed leases, probes
//! agentless instances, and serves the admin API and the catalog feed.
//!
//! # Layout
//! - [`config`]: settings and the command line.
//! - [`store`]: SQL on PostgreSQL or SQLite; every change moves the catalog's change index.
//! - [`changes`]: follows the index across replicas (LISTEN/NOTIFY, plus a periodic read).
//! - [`snapshot`]: the in-memory catalog snapshot that answers reads.
//! - [`leader`], [`sweeper`], [`prober`]: the background work one replica at a time does.
//! - [`api`]: the HTTP routes. [`metrics`]: Prometheus text.

pub mod api;
pub mod changes;
pub mod config;
pub mod leader;
pub mod metrics;
pub mod prober;
pub mod snapshot;
pub mod store;
pub mod sweeper;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::AppState;
use crate::api::auth::Auth;
use crate::config::RegistryConfig;
use crate::metrics::Metrics;
use crate::prober::ProberConfig;
use crate::snapshot::CatalogCache;
use crate::store::{Store, StoreError, StoreOptions, SweepPolicy};
use signpost_shared::http::ServerTls;
use signpost_shared::http::tls::RELOAD_POLL as TLS_RELOAD_POLL;

/// Why the registry stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data folder cannot be created.
    #[error("cannot create the data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A background task ended before shutdown.
    #[error("task `{0}` stopped unexpectedly")]
    TaskDied(&'static str),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] signpost_shared::http::tls::TlsError),
}

/// Opens the store of `config`, creating the data folder for the default SQLite file.
pub fn open_store(config: &RegistryConfig) -> Result<Store, Error> {
    if config.database_url.is_none() {
        config::ensure_data_dir(&config.data_dir)
            .map_err(|source| Error::DataDir { path: config.data_dir.display().to_string(), source })?;
    }
    let options = StoreOptions {
        max_connections: config.db_max_connections,
        acquire_timeout: config.db_acquire_timeout,
        max_instances_per_node: config.max_instances_per_node,
        max_instances: config.max_instances,
    };
    Ok(Store::connect_with(&config.database_url(), &options, &config.session_limits())?)
}

/// Applies the migrations, retrying while the database is unreachable. Returns false when
/// `shutdown` came first.
pub async fn migrate(store: &Store, shutdown: &CancellationToken) -> Result<bool, Error> {
    let mut delay = Duration::from_millis(200);
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(true),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, retry_in = ?delay, "waiting for the database");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the registry until `shutdown` completes, then drains within the grace period.
pub async fn run(config: RegistryConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let tls = config.tls_files().map(|(cert, key)| ServerTls::load(cert, key)).transpose()?;
    let listener = TcpListener::bind(config.listen).await.map_err(|source| Error::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
    let store = open_store(&config)?;
    let token = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let metrics = Arc::new(Metrics::new());
    let http_stats = metrics.http_stats();
    let state = Arc::new(AppState {
        store: store.clone(),
        cache: CatalogCache::new(store.clone(), config.read_cache_max_age),
        metrics: metrics.clone(),
        auth: Auth::new(config.admin_token.clone(), config.agent_token.clone(), config.read_token.clone(), config.node_tokens.clone()),
        max_body_bytes: config.max_body_bytes,
        max_wait: config.max_wait,
        shutdown: token.clone(),
        started: AtomicBool::new(false),
        blocking: tokio::sync::Semaphore::new(config.blocking_query_cap()),
        readiness: api::ops::Readiness::default(),
    });

    // Serve at once: while the database is not there yet, /healthz answers (the process is
    // alive) and everything else answers 503, rather than leaving connections hanging.
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    let server = signpost_shared::http::serve(
        listener,
        warp::service(api::routes(state.clone())),
        tls.as_ref().map(ServerTls::acceptor),
        config.http_limits(),
        http_stats.clone(),
        token.clone(),
    );
    tasks.spawn(server.instrument(tracing::info_span!("http")).map_name("http"));
    if let Some(tls) = tls {
        tasks.spawn(tls.watch(TLS_RELOAD_POLL, token.clone()).instrument(tracing::info_span!("tls")).map_name("tls reload"));
    }
    tracing::debug!(addr = %addr, "accepting connections; waiting for the database and its migrations");
    let migrated = tokio::select! {
        migrated = migrate(&store, &token) => migrated?,
        _ = &mut shutdown => false,
    };
    if !migrated {
        token.cancel();
        let _ = tokio::time::timeout(config.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
        store.close().await;
        return Ok(());
    }
    state.started.store(true, Ordering::Release);

    let (role_tx, role_rx) = watch::channel(false);
    let policy = SweepPolicy {
        deregister_after: config.deregister_after,
        self_preservation_threshold: config.self_preservation_threshold,
        self_preservation_min_instances: config.self_preservation_min_instances,
        gap_after: sweeper::gap_after(config.sweep_interval),
    };
    let prober_config =
        ProberConfig { concurrency: config.probe_concurrency, failures_before_critical: config.probe_failures_before_critical.max(1) };

    tasks.spawn(
        leader::run(store.clone(), config.leader_check_interval, role_tx, metrics.clone(), token.clone())
            .instrument(tracing::info_span!("leader"))
            .map_name("leader"),
    );
    tasks.spawn(
        sweeper::run(
            store.clone(),
            policy,
            config.sweep_interval,
            config.self_preservation_max_hold,
            role_rx.clone(),
            metrics.clone(),
            token.clone(),
        )
        .instrument(tracing::info_span!("sweeper"))
        .map_name("sweeper"),
    );
    tasks.spawn(
        prober::run(store.clone(), prober_config, role_rx, metrics, token.clone())
            .instrument(tracing::info_span!("prober"))
            .map_name("prober"),
    );
    tasks.spawn(changes::listen(store.clone(), token.clone()).instrument(tracing::info_span!("listener")).map_name("listener"));
    tasks.spawn(
        changes::poll(store.clone(), config.index_poll_interval, token.clone())
            .instrument(tracing::info_span!("poller"))
            .map_name("poller"),
    );
    tracing::info!(
        addr = %addr,
        database = if store.is_postgres() { "postgres" } else { "sqlite" },
        tls = config.tls_files().is_some(),
        "listening"
    );

    let died = tokio::select! {
        _ = &mut shutdown => None,
        done = tasks.join_next() => Some(match done {
            Some(Ok(name)) => name,
            Some(Err(e)) if e.is_panic() => "a task (panicked)",
            _ => "a task",
        }),
    };
    if let Some(name) = died {
        tracing::error!(task = name, "a task stopped unexpectedly; shutting down");
    } else {
        tracing::info!("shutting down: finishing requests in flight");
    }
    token.cancel();
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::warn!(error = %e, "a task failed while stopping");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?config.shutdown_grace, "shutdown grace ran out; aborting what is left");
        tasks.abort_all();
    }
    store.close().await;
    tracing::info!("stopped");
    match died {
        Some(name) => Err(Error::TaskDied(name)),
        None => Ok(()),
    }
}

/// Names a task's future so the supervisor can say which one ended.
trait MapName: Future<Output = ()> + Sized {
    fn map_name(self, name: &'static str) -> impl Future<Output = &'static str> {
        async move {
            self.await;
            name
        }
    }
}

impl<F: Future<Output = ()>> MapName for F {}
