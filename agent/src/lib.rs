//! signpost-agent: the sidecar beside each service. It registers and health-checks its local
//! services, gossips with the other agents (chitchat over UDP), keeps the whole catalog in a
//! local cache (the registry's feed merged with live gossip) and answers lookups on
//! localhost, also while the registry is down.
//!
//! # Layout
//! - [`config`]: settings and the command line. [`local`]: the local services and checks.
//! - [`checks`]: runs HTTP/TCP probes and TTL deadlines. [`sync`]: keeps the registry in step.
//! - [`gossip`]: the chitchat adapter. [`feed`]: follows the registry's catalog feed;
//!   [`page`] reads its pages into the cache's shared instances.
//! - [`gossip_transport`]: chitchat's UDP socket, sealed by [`gossip_seal`] with the keys
//!   of [`gossip_key`].
//! - [`cache`]: the merge rule and the snapshot lookups read. [`persist`]: the saved cache.
//! - [`evidence`]: deaths seen in gossip and renewals at the registry, which the merge rule
//!   weighs for owners gossip does not show alive; [`liveness`] asks the registry for them.
//! - [`api`]: the local HTTP API. [`metrics`]: Prometheus text.

pub mod api;
pub mod cache;
pub mod checks;
pub mod config;
pub mod evidence;
pub mod feed;
pub mod gossip;
pub mod gossip_identity;
pub mod gossip_key;
pub mod gossip_replies;
pub mod gossip_seal;
pub mod gossip_transport;
pub mod liveness;
pub mod local;
pub mod metrics;
pub mod node_key;
pub mod page;
pub mod persist;
pub mod sync;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use signpost_shared::client::{ClientConfig, RegistryClient};
use signpost_shared::model::Health;
use signpost_shared::wire::AgentAnnouncement;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::AgentState;
use crate::cache::Cache;
use crate::config::AgentConfig;
use crate::gossip::{Gossip, GossipConfig};
use crate::gossip_key::SharedKeyring;
use crate::local::LocalState;
use crate::metrics::Metrics;
use crate::sync::{SyncConfig, Syncer};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Gossip cannot start (its UDP address cannot be bound).
    #[error("cannot start gossip on {addr}: {reason}")]
    Gossip {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A configured service is invalid.
    #[error("invalid local service: {0}")]
    Service(String),
    /// The registry client cannot be built.
    #[error(transparent)]
    Client(#[from] signpost_shared::client::ClientError),
    /// This node's signing key file cannot be read.
    #[error(transparent)]
    NodeKey(#[from] node_key::KeyFileError),
    /// A task ended before shutdown.
    #[error("task `{0}` stopped unexpectedly")]
    TaskDied(&'static str),
}

/// The address peers reach this host at: the configured one, the gossip listen IP, or the
/// IP this host would use to reach the first registry.
fn advertise_addr(config: &AgentConfig) -> SocketAddr {
    if let Some(addr) = config.gossip_advertise {
        return addr;
    }
    let listen = config.gossip_listen;
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let registry = config.registry.first().and_then(|u| u.socket_addrs(|| None).ok()).and_then(|a| a.into_iter().next());
    let ip = registry
        .and_then(|target| {
            let socket = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).ok()?;
            socket.connect(target).ok()?;
            socket.local_addr().ok().map(|a| a.ip())
        })
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, listen.port())
}

/// How often the gossip key file is checked for a change.
const KEY_FILE_POLL: Duration = Duration::from_secs(1);

/// Runs the agent until `shutdown` completes, then leaves cleanly within the grace period.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let node = config.node_name();
    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(Cache::new(liveness::settling_window(config.gossip_interval)));
    let cache_file = persist::path(&config.data_dir);
    match tokio::task::spawn_blocking({
        let file = cache_file.clone();
        move || persist::load(&file)
    })
    .await
    {
        Ok(Ok(Some(view))) => {
            tracing::info!(instances = view.instances.len(), confirmed_at = ?view.confirmed_at, "serving the saved catalog cache");
            cache.set_registry(view);
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "ignoring the saved catalog cache"),
        Err(e) => tracing::warn!(error = %e, "cannot read the saved catalog cache"),
    }

    let listener = TcpListener::bind(config.listen).await.map_err(|source| Error::Bind { addr: config.listen, source })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
    let advertise = advertise_addr(&config);
    let address = config.address.clone().unwrap_or_else(|| advertise.ip().to_string());

    let local = Arc::new(LocalState::new(config.max_local_services));
    for service in &config.services {
        let spec = service.registration(&node, &address, config.zone.as_deref()).validate().map_err(|e| Error::Service(e.to_string()))?;
        local.upsert(spec, &service.checks).map_err(|e| Error::Service(e.to_string()))?;
    }

    let keyring = config
        .gossip_keyring()
        .map_err(|e| Error::Gossip { addr: config.gossip_listen, reason: e.to_string() })?
        .map(|k| Arc::new(SharedKeyring::new(k)));
    match &keyring {
        Some(keys) => tracing::info!(keys = keys.current().len(), "gossip is encrypted and authenticated with the cluster key"),
        None if !config.gossip_listen.ip().is_loopback() => tracing::warn!(
            listen = %config.gossip_listen,
            "insecure_gossip: gossip is neither encrypted nor authenticated: anyone who can send UDP here can join the cluster and publish instances; set gossip_keys or gossip_key_file (signpost-agent keygen)"
        ),
        None => {}
    }
    let signing = Arc::new(node_key::load_or_create(&config.data_dir)?);
    let gossip_config = GossipConfig {
        node: node.clone(),
        cluster_id: config.cluster_id.clone(),
        listen: config.gossip_listen,
        advertise,
        seeds: config.seeds.clone(),
        interval: config.gossip_interval,
        phi_threshold: config.phi_threshold,
        dead_node_grace: config.dead_node_grace,
        http_addr: http_addr.to_string(),
        zone: config.zone.clone(),
        keyring: keyring.clone(),
        recv_buffer: config.gossip_recv_buffer,
        signing: signing.clone(),
        peer_keys: cache.peer_keys(),
    };
    let gossip = Arc::new(
        Gossip::start(gossip_config, &local, metrics.clone())
            .await
            .map_err(|e| Error::Gossip { addr: config.gossip_listen, reason: format!("{e:#}") })?,
    );

    let mut client_config = ClientConfig::new(config.registry.clone());
    client_config.token = config.token.clone();
    client_config.ca_file = config.registry_ca_file.clone();
    let client = RegistryClient::new(client_config)?;
    let syncer = Syncer::new(
        client.clone(),
        local.clone(),
        metrics.clone(),
        SyncConfig {
            node: node.clone(),
            announcement: AgentAnnouncement {
                gossip_addr: advertise.to_string(),
                http_addr: http_addr.to_string(),
                zone: config.zone.clone(),
                ttl_s: Some(i64::from(config.lease_ttl_s)),
                signing_key: Some(signing.public().to_string()),
            },
            lease_ttl_s: config.lease_ttl_s,
        },
    );

    let token = CancellationToken::new();
    let state = Arc::new(AgentState {
        local: local.clone(),
        cache: cache.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
        node: node.clone(),
        address: address.clone(),
        gossip_addr: advertise.to_string(),
        http_addr: http_addr.to_string(),
        protection: config.protection_thresholds.clone(),
        shutdown: token.clone(),
    });
    // Tasks that stop with the token; the syncer and gossip are stopped in order on leaving.
    let work = token.child_token();
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    let server = signpost_shared::http::serve(
        listener,
        warp::service(api::routes(state)),
        None,
        config.http_limits(),
        metrics.http_stats(),
        token.clone(),
    );
    tasks.spawn(named("http", server.instrument(tracing::info_span!("http"))));
    tasks.spawn(named("checks", checks::run(local.clone(), metrics.clone(), work.clone()).instrument(tracing::info_span!("checks"))));
    tasks.spawn(named(
        "gossip",
        gossip::run(gossip.clone(), local.clone(), cache.clone(), metrics.clone(), work.clone()).instrument(tracing::info_span!("gossip")),
    ));
    // Peers known from the saved catalog, so that gossip finds them also while the registry
    // is down.
    for agent in &cache.registry().agents {
        if let Ok(addr) = agent.gossip_addr.parse::<SocketAddr>() {
            gossip.introduce(addr);
        }
    }
    tasks.spawn(named("liveness", liveness::run(client.clone(), cache.clone(), work.clone()).instrument(tracing::info_span!("liveness"))));
    tasks.spawn(named(
        "feed",
        feed::follow(client.clone(), cache.clone(), gossip.clone(), config.catalog_wait, metrics.clone(), work.clone())
            .instrument(tracing::info_span!("feed")),
    ));
    if let (Some(path), Some(keys)) = (&config.gossip_key_file, &keyring) {
        tasks.spawn(named(
            "gossip keys",
            gossip_key::watch_file(path.clone(), keys.clone(), KEY_FILE_POLL, work.clone()).instrument(tracing::info_span!("gossip_keys")),
        ));
    }
    tasks.spawn(named(
        "persist",
        persist::run(cache.clone(), cache_file, metrics.clone(), token.clone()).instrument(tracing::info_span!("persist")),
    ));
    let sync_token = CancellationToken::new();
    let syncer_task = tokio::spawn(syncer.run(sync_token.clone()).instrument(tracing::info_span!("sync")));
    tracing::info!(node = %node, addr = %http_addr, gossip = %advertise, address = %address, "listening");

    let gossip_died = gossip.termination();
    let mut shutdown = std::pin::pin!(shutdown);
    let died = tokio::select! {
        _ = &mut shutdown => None,
        _ = gossip_died => Some("gossip"),
        done = tasks.join_next() => Some(match done {
            Some(Ok(name)) => name,
            _ => "a task (panicked)",
        }),
    };
    match died {
        Some(name) => tracing::error!(task = name, "a task stopped unexpectedly; leaving"),
        None => tracing::info!("leaving: marking local instances critical, deregistering"),
    }
    let leave = async {
        // Stop what could republish the real health, then say critical in gossip (there is no
        // leave message) and give it a few rounds.
        work.cancel();
        gossip.publish(&local, Some(Health::Critical)).await;
        tokio::time::sleep(config.gossip_interval * 3).await;
        sync_token.cancel();
        if let Ok(syncer) = syncer_task.await {
            syncer.leave(config.shutdown_grace / 2).await;
        }
        token.cancel();
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::warn!(error = %e, "a task failed while stopping");
            }
        }
    };
    if tokio::time::timeout(config.shutdown_grace, leave).await.is_err() {
        tracing::warn!(grace = ?config.shutdown_grace, "shutdown grace ran out; aborting what is left");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    token.cancel();
    match Arc::into_inner(gossip) {
        Some(gossip) => gossip.shutdown().await,
        None => tracing::warn!("gossip is still in use; it stops with the process"),
    }
    tracing::info!("stopped");
    match died {
        Some(name) => Err(Error::TaskDied(name)),
        None => Ok(()),
    }
}

async fn named(name: &'static str, task: impl Future<Output = ()>) -> &'static str {
    task.await;
    name
}

/// The default gossip interval, exposed for tests and tools.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(100);
