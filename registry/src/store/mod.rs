//! The registry's storage: one [`Store`] over PostgreSQL or an SQLite file. Both run the same
//! SQL (numbered `$n` parameters, `ON CONFLICT`, `RETURNING`; times as unix milliseconds), so
//! one code path serves both, written once and expanded per backend by `with_pool!`.
//!
//! Every change bumps the catalog's change index inside its own transaction (one row,
//! `catalog_state`, so commits happen in index order). On PostgreSQL a trigger on that row
//! notifies `signpost_catalog`, which wakes the waiters of every replica.

mod rows;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use signpost_shared::model::{CheckSpec, Health, Instance, InstanceSpec};
use signpost_shared::wire::{AgentAnnouncement, AgentInfo, Heartbeat, Maintenance};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::watch;

pub use rows::{AgentRow, InstanceRow, time};

/// The PostgreSQL migrations, applied on start and by `signpost-registry migrate`.
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");
/// The SQLite migrations.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Epochs stay below 2^53, so that JSON readers that hold numbers as doubles read them exactly.
const MAX_EPOCH: u64 = (1 << 53) - 1;

/// The NOTIFY channel a change of the catalog index is announced on.
pub const NOTIFY_CHANNEL: &str = "signpost_catalog";

macro_rules! instance_columns {
    () => {
        "id, service, address, port, tags, meta, weight, zone, health, output, maintenance, \
         maintenance_reason, node, check_spec, ttl_s, lease_expired, change_index, registered_at, \
         updated_at, lease_expires_at"
    };
}

macro_rules! agent_columns {
    () => {
        "node, gossip_addr, http_addr, zone, ttl_s, change_index, updated_at, lease_expires_at, renewed_at, signing_key"
    };
}

/// Runs the same body against whichever pool the store has.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Postgres($pool) => $body,
            Backend::Sqlite($pool) => $body,
        }
    };
}

const BUMP_INDEX: &str = "UPDATE catalog_state SET change_index = change_index + 1 WHERE id = 1 RETURNING change_index";
const READ_STATE: &str = "SELECT change_index, self_preservation FROM catalog_state WHERE id = 1";
/// The database's clock, in unix milliseconds (PostgreSQL; SQLite runs in this process).
const PG_CLOCK: &str = "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded: answer 503 and retry later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database error (a defect, not bad input).
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A stored value cannot be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Another node registered an id that a live node owns (409): ids belong to one node
    /// at a time; the admin moves one explicitly (`?move=true`).
    #[error(
        "instance `{id}` belongs to node `{node}`, whose agent is alive; another node may not take it over (the admin may move it with ?move=true)"
    )]
    OwnedByLiveNode {
        /// The instance.
        id: String,
        /// Its live owner.
        node: String,
    },
    /// A node-bound agent token tried to write an instance of another node.
    #[error("instance `{id}` belongs to {}; this token may only write instances of node `{owner}`", node.as_deref().map(|n| format!("node `{n}`")).unwrap_or_else(|| "no node".into()))]
    NotOwner {
        /// The instance.
        id: String,
        /// Its node.
        node: Option<String>,
        /// The node the token is bound to.
        owner: String,
    },
    /// A node already owns as many instances as it may.
    #[error("node `{node}` already has {limit} instances, the most one node may register (max_instances_per_node)")]
    NodeQuota {
        /// The node.
        node: String,
        /// The limit.
        limit: u64,
    },
    /// The registry holds as many instances as it may.
    #[error("the registry already holds {limit} instances, the most it may (max_instances); deregister some or raise the limit")]
    Quota {
        /// The limit.
        limit: u64,
    },
    /// A row kept changing under a write: retry later (503).
    #[error("{0}")]
    Contended(String),
    /// The migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL or options are wrong.
    #[error("invalid database settings: {0}")]
    Config(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if is_connection_error(&error) || is_schema_missing(&error) { StoreError::Unavailable(error) } else { StoreError::Database(error) }
    }
}

/// Errors after which a retry later may succeed: the database is unreachable, shutting down,
/// overloaded, or gave up on a lock or a stuck session (`lock_timeout`, `statement_timeout`,
/// `idle_in_transaction_session_timeout`: another replica holds the index row too long).
fn is_connection_error(error: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match error {
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => true,
        E::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: 08 connection, 53 resources, 57 operator intervention (shutdown,
            // statement_timeout); 55P03 lock_timeout; 25P03 idle_in_transaction_session_timeout;
            // 40001/40P01 serialization failure and deadlock; 3D000 no such database (dropped,
            // not yet created again).
            // SQLite: primary code 5 busy or 6 locked (sqlx reports extended codes, e.g. 517).
            let sqlite_busy = code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || matches!(code.as_ref(), "55P03" | "25P03" | "40001" | "40P01" | "3D000")
                || sqlite_busy
        }
        _ => false,
    }
}

/// The schema is not (or no longer) all there: a table or a column is missing (the database
/// was dropped and created again under the registry and its migrations are still being
/// applied, one transaction each, or it was emptied by hand) or the one `catalog_state` row is
/// (every `fetch_one` of the store reads that row, an aggregate or an `INSERT … RETURNING`, so
/// "no rows" can only mean it). Requests answer 503 and the poller migrates again.
fn is_schema_missing(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::RowNotFound => true,
        sqlx::Error::Database(db) => {
            // PostgreSQL: 42P01 undefined_table, 42703 undefined_column.
            matches!(db.code().as_deref(), Some("42P01" | "42703"))
                || db.message().starts_with("no such table")
                || db.message().starts_with("no such column")
        }
        _ => false,
    }
}

impl StoreError {
    /// True when the schema or the `catalog_state` row is missing: running the migrations
    /// again (which also recreates the row) repairs it.
    pub fn needs_migration(&self) -> bool {
        match self {
            StoreError::Unavailable(e) | StoreError::Database(e) => is_schema_missing(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => is_schema_missing(e),
            _ => false,
        }
    }

    /// True when the database is down or busy, so a retry later may succeed.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::Contended(_) => true,
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => is_connection_error(e),
            _ => false,
        }
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most connections.
    pub max_connections: u32,
    /// Longest wait for a connection.
    pub acquire_timeout: Duration,
    /// Most instances one node may own (a registration beyond it is refused).
    pub max_instances_per_node: u64,
    /// Most instances in all.
    pub max_instances: u64,
}

/// Limits every PostgreSQL session of the pool (and of the leader lock and the change listener,
/// which copy its settings) is opened with. Every write takes the `catalog_state` row lock and
/// holds it to its commit: without these, one replica frozen (SIGSTOP, a stalled VM) or cut off
/// from the database while holding it would block every replica's writes for good. Zero turns
/// one off. Ignored on SQLite (one process; its lock waits are bounded by `busy_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// `lock_timeout`: longest wait for a lock (the index row) before the write fails (503).
    /// Kept below `idle_in_transaction_timeout`, so that the waiting writes of a frozen replica
    /// give up before its lock holder is ended, and none of them takes the lock next.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: PostgreSQL ends a session that sits inside a
    /// transaction this long without sending anything, and so releases its locks.
    pub idle_in_transaction_timeout: Duration,
    /// `statement_timeout`: longest run of one statement (a backstop; migrations have none).
    pub statement_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            lock_timeout: Duration::from_secs(2),
            idle_in_transaction_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

impl SessionLimits {
    /// The startup options that set them, plus server-side TCP keepalives (probe after 5 s idle,
    /// every 2 s, give up after 2: a vanished replica's session ends within about 9 s even when
    /// it holds no transaction). sqlx 0.9 cannot set SO_KEEPALIVE on its own side.
    fn pg_options(&self) -> Vec<(&'static str, String)> {
        let ms = |d: Duration| d.as_millis().to_string();
        vec![
            ("lock_timeout", ms(self.lock_timeout)),
            ("idle_in_transaction_session_timeout", ms(self.idle_in_transaction_timeout)),
            ("statement_timeout", ms(self.statement_timeout)),
            ("tcp_keepalives_idle", "5".into()),
            ("tcp_keepalives_interval", "2".into()),
            ("tcp_keepalives_count", "2".into()),
        ]
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new instance.
    Created,
    /// An existing instance, described differently.
    Updated,
    /// An existing instance, described the same: only its lease was renewed.
    Renewed,
}

/// What a deregistration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deregistered {
    /// Removed.
    Removed,
    /// No such instance.
    NotFound,
    /// Refused: its owner agent is alive and would register it again.
    OwnedByLiveAgent {
        /// The owner.
        node: String,
        /// Where the owner's HTTP API listens.
        http_addr: String,
    },
}

/// The whole catalog at one change index.
#[derive(Debug, Clone)]
pub struct CatalogData {
    /// The change index.
    pub index: u64,
    /// The database's catalog epoch (see [`Store::new_epoch`]).
    pub epoch: u64,
    /// Whether the sweeper holds expiry back.
    pub self_preservation: bool,
    /// Every instance, by service then id.
    pub instances: Vec<Instance>,
    /// Every agent, by node.
    pub agents: Vec<AgentInfo>,
}

/// The rules a sweep follows.
#[derive(Debug, Clone)]
pub struct SweepPolicy {
    /// How long an expired instance stays before it is removed.
    pub deregister_after: Duration,
    /// Share of lapsed leases above which nothing expires.
    pub self_preservation_threshold: f64,
    /// Fewest instances for self-preservation to apply.
    pub self_preservation_min_instances: u64,
    /// The longest time between two sweeps that still counts as sweeping without a gap.
    pub gap_after: Duration,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Registered instances.
    pub total: u64,
    /// Instances whose lease has lapsed (marked or not).
    pub lapsed: u64,
    /// True when self-preservation held expiry back.
    pub self_preservation: bool,
    /// Instances newly marked critical because their lease lapsed.
    pub expired: Vec<String>,
    /// Instances deregistered after the grace period.
    pub removed: Vec<String>,
    /// Agents forgotten after their announcement lapsed beyond the grace period.
    pub agents_removed: u64,
    /// Set when this sweep found a gap since the last one and only resumed sweeping.
    pub resumed: Option<Resumed>,
}

/// What the first sweep after a gap in sweeping did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// Time since the last sweep (zero: none had run on this database).
    pub gap: Duration,
    /// Live leases given a full term from now.
    pub leases_extended: u64,
    /// Critical instances whose grace period starts again.
    pub grace_restarted: u64,
}

/// An agentless instance the registry probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The instance.
    pub id: String,
    /// Its check.
    pub check: CheckSpec,
}

/// The registry's storage; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    changes: watch::Sender<u64>,
    /// Whether the last read of the change index reached the database.
    reachable: watch::Sender<bool>,
    /// The database's clock as last read, and when (this process's monotonic clock).
    clock: Arc<std::sync::Mutex<Option<(i64, std::time::Instant)>>>,
    /// Most instances one node may own, and in all.
    limits: (u64, u64),
}

// === impl Store ===

impl Store {
    /// Opens a pool for `url` (`postgres://…` or `sqlite:…`) with the default
    /// [`SessionLimits`]. It connects lazily: a database that is down now makes calls answer
    /// [`StoreError::Unavailable`] until it is back.
    pub fn connect(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
        Self::connect_with(url, options, &SessionLimits::default())
    }

    /// As [`Store::connect`], every PostgreSQL session opened with `limits`.
    pub fn connect_with(url: &str, options: &StoreOptions, limits: &SessionLimits) -> Result<Store, StoreError> {
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let connect = PgConnectOptions::from_str(url).map_err(|e| StoreError::Config(e.to_string()))?.options(limits.pg_options());
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                .connect_lazy_with(connect);
            Backend::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            let connect = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Config(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                .connect_lazy_with(connect);
            Backend::Sqlite(pool)
        } else {
            return Err(StoreError::Config(format!("unsupported database URL scheme in `{}`", url.split(':').next().unwrap_or(""))));
        };
        let (changes, _) = watch::channel(0);
        let (reachable, _) = watch::channel(true);
        Ok(Store { backend, changes, reachable, clock: Arc::default(), limits: (options.max_instances_per_node, options.max_instances) })
    }

    /// True on PostgreSQL (several replicas possible), false on SQLite.
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The PostgreSQL pool, for the leader lock and the change listener.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres(pool) => Some(pool),
            Backend::Sqlite(_) => None,
        }
    }

    /// Connections open and idle, for `/metrics`.
    pub fn pool_stats(&self) -> (u32, usize) {
        with_pool!(self, pool => (pool.size(), pool.num_idle()))
    }

    /// Applies the migrations of this backend, recreates the `catalog_state` row if it is
    /// missing, then reads the change index.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                // On a connection of its own without statement_timeout: a migration may
                // rightly take longer than a request's statement may.
                let options = (*pool.connect_options()).clone().options([("statement_timeout", "0")]);
                let own = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(pool.options().get_acquire_timeout())
                    .connect_lazy_with(options);
                let ran = PG_MIGRATOR.run(&own).await;
                own.close().await;
                ran?;
            }
            Backend::Sqlite(pool) => SQLITE_MIGRATOR.run(pool).await?,
        }
        self.ensure_state_row().await?;
        self.refresh_index().await.map(|_| ())
    }

    /// Inserts the `catalog_state` row when it is missing (deleted by hand, a partial restore),
    /// at an index above every stored change, so that the feed never goes back below a change
    /// a client may have seen. Logged at `warn`: it should not happen.
    async fn ensure_state_row(&self) -> Result<(), StoreError> {
        // `WHERE TRUE` keeps SQLite's parser from reading ON CONFLICT as part of the SELECT.
        // It gets a new epoch (its clients' copies are of another history) and the count of
        // the instances there are.
        const RECREATE: &str = "INSERT INTO catalog_state (id, change_index, self_preservation, epoch, instance_count) \
             SELECT 1, COALESCE(MAX(known), 0) + 1, FALSE, $1, (SELECT COUNT(*) FROM instances) FROM \
             (SELECT MAX(change_index) AS known FROM instances UNION ALL SELECT MAX(change_index) FROM agents) AS stored \
             WHERE TRUE ON CONFLICT (id) DO NOTHING RETURNING change_index";
        let epoch = random_epoch();
        let recreated: Option<i64> = with_pool!(self, pool => sqlx::query_scalar(RECREATE).bind(epoch).fetch_optional(pool).await)?;
        if let Some(index) = recreated {
            tracing::warn!(index, "the catalog_state row was missing; recreated it at an index above every stored change");
            self.reset_index(to_u64(index));
        }
        // The sweeper's row: without it the next sweep takes the time since as a gap.
        with_pool!(self, pool => sqlx::query("INSERT INTO sweeper_state (id, swept_at) VALUES (1, NULL) ON CONFLICT (id) DO NOTHING")
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }

    /// Runs `SELECT 1`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()).map_err(StoreError::from))
    }

    /// The change index as last seen; waiters use [`Store::subscribe`].
    pub fn known_index(&self) -> u64 {
        *self.changes.borrow()
    }

    /// A receiver that changes whenever the known change index does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records an index seen elsewhere (a notification, a read); only moves forward.
    pub fn observe_index(&self, index: u64) {
        self.changes.send_if_modified(|current| {
            let newer = index > *current;
            if newer {
                *current = index;
            }
            newer
        });
    }

    /// Reads the index from the database and records it if it is newer, and whether the
    /// database could be reached.
    pub async fn refresh_index(&self) -> Result<u64, StoreError> {
        let read = self.read_state().await;
        let reachable = match &read {
            Ok(_) => true,
            Err(e) => !e.is_unavailable(),
        };
        self.reachable.send_if_modified(|current| std::mem::replace(current, reachable) != reachable);
        let (index, _) = read?;
        self.observe_index(index);
        Ok(index)
    }

    /// A receiver of whether the database answered the last read of the change index (the
    /// poller reads it every `index_poll_interval`): while it does not, this replica cannot see
    /// changes, so blocking queries must not wait for one.
    pub fn reachability(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    /// Takes `index` as the truth even when it is lower than what was seen (the database
    /// was restored or emptied), so waiters do not wait for an index that will never come.
    pub fn reset_index(&self, index: u64) {
        self.changes.send_replace(index);
    }

    /// Now, in unix milliseconds, by the database's clock: every lease is stamped and swept
    /// by one clock, whatever each replica's own says. PostgreSQL's clock is read with the
    /// change index (every `index_poll_interval`) and advanced by this process's monotonic
    /// clock in between, so a replica whose wall clock is off or jumps stamps correctly.
    /// SQLite runs in this process: its clock is this host's.
    pub fn now_ms(&self) -> i64 {
        let read = match &self.backend {
            Backend::Postgres(_) => self.clock.lock().ok().and_then(|c| *c),
            Backend::Sqlite(_) => None,
        };
        match read {
            Some((db_ms, at)) => db_ms.saturating_add(i64::try_from(at.elapsed().as_millis()).unwrap_or(i64::MAX)),
            None => chrono::Utc::now().timestamp_millis(),
        }
    }

    /// Reads PostgreSQL's clock, taking the middle of the round trip as when it was read.
    async fn read_clock(&self) -> Result<(), StoreError> {
        let Backend::Postgres(pool) = &self.backend else { return Ok(()) };
        let sent = std::time::Instant::now();
        let db_ms: i64 = sqlx::query_scalar(PG_CLOCK).fetch_one(pool).await?;
        let at = sent + sent.elapsed() / 2;
        if let Ok(mut clock) = self.clock.lock() {
            *clock = Some((db_ms, at));
        }
        Ok(())
    }

    async fn read_state(&self) -> Result<(u64, bool), StoreError> {
        self.read_clock().await?;
        let (index, sp): (i64, bool) = with_pool!(self, pool => sqlx::query_as(READ_STATE).fetch_one(pool).await)?;
        Ok((to_u64(index), sp))
    }

    /// Registers or updates an instance (upsert by id).
    ///
    /// `owner`, the node a node-bound agent token speaks for, may only write its own node's
    /// instances. An id owned by a node whose agent is alive is not taken over by a
    /// registration naming another node (or none), unless `move_allowed` (the admin's
    /// explicit move): both rules are checked inside the write, so no race lets one through.
    pub async fn register(
        &self,
        spec: &InstanceSpec,
        now_ms: i64,
        owner: Option<&str>,
        move_allowed: bool,
    ) -> Result<(Instance, Registered), StoreError> {
        // A write that finds the id changed hands since it was read starts over.
        for _ in 0..3 {
            if let Some(done) = self.try_register(spec, now_ms, owner, move_allowed).await? {
                return Ok(done);
            }
        }
        Err(StoreError::Contended(format!("instance `{}` kept changing while being registered; retry", spec.id)))
    }

    async fn try_register(
        &self,
        spec: &InstanceSpec,
        now_ms: i64,
        owner: Option<&str>,
        move_allowed: bool,
    ) -> Result<Option<(Instance, Registered)>, StoreError> {
        let existing = self.instance_row(&spec.id).await?;
        if let Some(row) = &existing {
            self.check_takeover(row, spec, now_ms, owner, move_allowed).await?;
            if row.describes(spec)?
                && let Some(renewed) = self.renew_lease(&spec.id, now_ms).await?
            {
                return Ok(Some((renewed.into_instance()?, Registered::Renewed)));
            }
        }
        let tags = serde_json::to_string(&spec.tags).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let meta = serde_json::to_string(&spec.meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let check = spec.check.as_ref().map(serde_json::to_string).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let lease = now_ms + i64::from(spec.ttl_s) * 1000;
        // A node taking on an instance (a new one, or one moving to it) must have room for it:
        // counted under the index lock, so that concurrent registrations cannot overshoot.
        let joins_node = spec.node.as_deref().filter(|node| existing.as_ref().is_none_or(|row| row.node.as_deref() != Some(*node)));
        let (row, index) = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let index: i64 = sqlx::query_scalar(BUMP_INDEX).fetch_one(&mut *tx).await?;
            let (per_node, in_all) = self.limits;
            if let Some(node) = joins_node {
                let owned: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE node = $1").bind(node).fetch_one(&mut *tx).await?;
                if to_u64(owned) >= per_node {
                    return Err(StoreError::NodeQuota { node: node.to_string(), limit: per_node });
                }
            }
            if existing.is_none() {
                let held: i64 = sqlx::query_scalar("SELECT instance_count FROM catalog_state WHERE id = 1").fetch_one(&mut *tx).await?;
                if to_u64(held) >= in_all {
                    return Err(StoreError::Quota { limit: in_all });
                }
            }
            let row: Option<InstanceRow> = sqlx::query_as(concat!(
                "INSERT INTO instances (id, service, address, port, tags, meta, weight, zone, health, node, check_spec, \
                 ttl_s, lease_expired, maintenance, change_index, registered_at, updated_at, lease_expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $14, $15, $15, $16) \
                 ON CONFLICT (id) DO UPDATE SET service = excluded.service, address = excluded.address, \
                 port = excluded.port, tags = excluded.tags, meta = excluded.meta, weight = excluded.weight, \
                 zone = excluded.zone, health = COALESCE($17, instances.health), node = excluded.node, check_spec = excluded.check_spec, \
                 ttl_s = excluded.ttl_s, lease_expired = excluded.lease_expired, expired_at = NULL, change_index = excluded.change_index, \
                 updated_at = excluded.updated_at, lease_expires_at = excluded.lease_expires_at \
                 WHERE ($18 IS NULL OR instances.node = $18) \
                 AND ($19 OR instances.node IS NULL OR instances.node = excluded.node \
                      OR NOT EXISTS (SELECT 1 FROM agents WHERE agents.node = instances.node AND agents.lease_expires_at > $15)) \
                 RETURNING ", instance_columns!()))
                .bind(&spec.id)
                .bind(&spec.service)
                .bind(&spec.address)
                .bind(i64::from(spec.port))
                .bind(&tags)
                .bind(&meta)
                .bind(i64::from(spec.weight))
                .bind(&spec.zone)
                .bind(spec.health.unwrap_or(Health::Passing).as_str())
                .bind(&spec.node)
                .bind(&check)
                .bind(i64::from(spec.ttl_s))
                .bind(false)
                .bind(index)
                .bind(now_ms)
                .bind(lease)
                .bind(spec.health.map(Health::as_str))
                .bind(owner)
                .bind(move_allowed)
                .fetch_optional(&mut *tx)
                .await?;
            // None: the id changed hands since it was read (rolled back with the bump).
            if row.is_some() {
                tx.commit().await?;
            }
            (row, index)
        });
        let Some(row) = row else {
            return Ok(None);
        };
        self.observe_index(to_u64(index));
        let outcome = if existing.is_some() { Registered::Updated } else { Registered::Created };
        Ok(Some((row.into_instance()?, outcome)))
    }

    /// Refuses a registration of `row`'s id by someone who may not write it: a node-bound
    /// token of another node (403), or another node (or none) while the owner's agent is
    /// alive, unless the admin moves it (409).
    async fn check_takeover(
        &self,
        row: &InstanceRow,
        spec: &InstanceSpec,
        now_ms: i64,
        owner: Option<&str>,
        move_allowed: bool,
    ) -> Result<(), StoreError> {
        ensure_owner(&spec.id, row.node.as_deref(), owner)?;
        match &row.node {
            Some(node) if !move_allowed && spec.node.as_deref() != Some(node.as_str()) => {
                let alive = self.agent_row(node).await?.is_some_and(|agent| agent.alive(now_ms));
                if alive { Err(StoreError::OwnedByLiveNode { id: spec.id.clone(), node: node.clone() }) } else { Ok(()) }
            }
            _ => Ok(()),
        }
    }

    async fn renew_lease(&self, id: &str, now_ms: i64) -> Result<Option<InstanceRow>, StoreError> {
        let row = with_pool!(self, pool => sqlx::query_as(concat!(
            "UPDATE instances SET lease_expires_at = $2 + ttl_s * 1000 WHERE id = $1 AND NOT lease_expired RETURNING ",
            instance_columns!()))
            .bind(id)
            .bind(now_ms)
            .fetch_optional(pool)
            .await)?;
        Ok(row)
    }

    async fn instance_row(&self, id: &str) -> Result<Option<InstanceRow>, StoreError> {
        let row = with_pool!(self, pool => sqlx::query_as(concat!("SELECT ", instance_columns!(), " FROM instances WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        Ok(row)
    }

    /// One instance, read from the database (never from a cache).
    pub async fn instance(&self, id: &str) -> Result<Option<Instance>, StoreError> {
        self.instance_row(id).await?.map(InstanceRow::into_instance).transpose()
    }

    /// Renews an instance's lease and records what its owner (or the prober) saw. Only a
    /// change of health, or a lease that had lapsed, moves the change index.
    pub async fn heartbeat(
        &self,
        id: &str,
        heartbeat: &Heartbeat,
        now_ms: i64,
        owner: Option<&str>,
    ) -> Result<Option<Instance>, StoreError> {
        let health = heartbeat.health.map(Health::as_str);
        let fast: Option<InstanceRow> = with_pool!(self, pool => sqlx::query_as(concat!(
            "UPDATE instances SET lease_expires_at = $2 + ttl_s * 1000, output = COALESCE($4, output) \
             WHERE id = $1 AND NOT lease_expired AND ($3 IS NULL OR health = $3) AND ($5 IS NULL OR node = $5) RETURNING ", instance_columns!()))
            .bind(id)
            .bind(now_ms)
            .bind(health)
            .bind(&heartbeat.output)
            .bind(owner)
            .fetch_optional(pool)
            .await)?;
        if let Some(row) = fast {
            return row.into_instance().map(Some);
        }
        let exists: Option<(String, Option<String>)> =
            with_pool!(self, pool => sqlx::query_as("SELECT id, node FROM instances WHERE id = $1").bind(id).fetch_optional(pool).await)?;
        let Some((_, node)) = exists else {
            return Ok(None); // do not take the index lock for an unknown id
        };
        ensure_owner(id, node.as_deref(), owner)?;
        let changed: Option<(InstanceRow, i64)> = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let index: i64 = sqlx::query_scalar(BUMP_INDEX).fetch_one(&mut *tx).await?;
            let row: Option<InstanceRow> = sqlx::query_as(concat!(
                "UPDATE instances SET lease_expires_at = $2 + ttl_s * 1000, output = COALESCE($4, output), \
                 health = COALESCE($3, health), lease_expired = $5, expired_at = NULL, change_index = $6, updated_at = $2 \
                 WHERE id = $1 AND ($7 IS NULL OR node = $7) RETURNING ", instance_columns!()))
                .bind(id)
                .bind(now_ms)
                .bind(health)
                .bind(&heartbeat.output)
                .bind(false)
                .bind(index)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                Some(row) => {
                    tx.commit().await?;
                    Some((row, index))
                }
                None => None, // dropping the transaction rolls the bump back
            }
        });
        match changed {
            Some((row, index)) => {
                self.observe_index(to_u64(index));
                row.into_instance().map(Some)
            }
            None => Ok(None),
        }
    }

    /// Records a failed registry-run probe: the instance becomes critical (moving the index
    /// only if it was not already) and its lease is left to run out.
    pub async fn record_probe_failure(&self, id: &str, output: &str, now_ms: i64) -> Result<(), StoreError> {
        let critical = Health::Critical.as_str();
        let unchanged = with_pool!(self, pool => sqlx::query("UPDATE instances SET output = $2 WHERE id = $1 AND health = $3")
            .bind(id)
            .bind(output)
            .bind(critical)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        if unchanged > 0 {
            return Ok(());
        }
        let index: Option<i64> = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let index: i64 = sqlx::query_scalar(BUMP_INDEX).fetch_one(&mut *tx).await?;
            let done = sqlx::query("UPDATE instances SET health = $2, output = $3, change_index = $4, updated_at = $5 WHERE id = $1")
                .bind(id)
                .bind(critical)
                .bind(output)
                .bind(index)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 1 {
                tx.commit().await?;
                Some(index)
            } else {
                None
            }
        });
        if let Some(index) = index {
            self.observe_index(to_u64(index));
        }
        Ok(())
    }

    /// Turns maintenance on or off; the index moves only when that changes something.
    /// `owner`, the node a node-bound agent token speaks for, may only set its own node's.
    pub async fn set_maintenance(
        &self,
        id: &str,
        maintenance: &Maintenance,
        now_ms: i64,
        owner: Option<&str>,
    ) -> Result<Option<Instance>, StoreError> {
        let Some(existing) = self.instance_row(id).await? else {
            return Ok(None);
        };
        ensure_owner(id, existing.node.as_deref(), owner)?;
        let reason = if maintenance.enabled { maintenance.reason.clone() } else { None };
        if existing.maintenance == maintenance.enabled && existing.maintenance_reason == reason {
            return existing.into_instance().map(Some);
        }
        let changed: Option<(InstanceRow, i64)> = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let index: i64 = sqlx::query_scalar(BUMP_INDEX).fetch_one(&mut *tx).await?;
            let row: Option<InstanceRow> = sqlx::query_as(concat!(
                "UPDATE instances SET maintenance = $2, maintenance_reason = $3, change_index = $4, updated_at = $5 \
                 WHERE id = $1 AND ($6 IS NULL OR node = $6) RETURNING ", instance_columns!()))
                .bind(id)
                .bind(maintenance.enabled)
                .bind(&reason)
                .bind(index)
                .bind(now_ms)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                Some(row) => {
                    tx.commit().await?;
                    Some((row, index))
                }
                None => None,
            }
        });
        match changed {
            Some((row, index)) => {
                self.observe_index(to_u64(index));
                row.into_instance().map(Some)
            }
            None => Ok(None),
        }
    }

    /// Deregisters an instance, unless its owner agent is alive (it would register it again)
    /// and is not the caller (`caller_node`, the agent removing its own instance).
    ///
    /// `owner`, the node a node-bound agent token speaks for, may only remove its own.
    pub async fn deregister(
        &self,
        id: &str,
        caller_node: Option<&str>,
        now_ms: i64,
        owner: Option<&str>,
    ) -> Result<Deregistered, StoreError> {
        let Some(row) = self.instance_row(id).await? else {
            return Ok(Deregistered::NotFound);
        };
        ensure_owner(id, row.node.as_deref(), owner)?;
        if let Some(node) = &row.node
            && caller_node != Some(node.as_str())
            && let Some(agent) = self.agent_row(node).await?
            && agent.alive(now_ms)
        {
            return Ok(Deregistered::OwnedByLiveAgent { node: node.clone(), http_addr: agent.http_addr });
        }
        let removed: Option<i64> = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let index: i64 = sqlx::query_scalar(BUMP_INDEX).fetch_one(&mut *tx).await?;
            let done = sqlx::query("DELETE FROM instances WHERE id = $1 AND ($2 IS NULL OR node = $2)")
                .bind(id)
                .bind(owner)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 1 {
                tx.commit().await?;
                Some(index)
            } else {
                None
            }
        });
        match removed {
            Some(index) => {
                self.observe_index(to_u64(index));
                Ok(Deregistered::Removed)
            }
            None => Ok(Deregistered::NotFound),
        }
    }

    async fn agent_row(&self, node: &str) -> Result<Option<AgentRow>, StoreError> {
        let row = with_pool!(self, pool => sqlx::query_as(concat!("SELECT ", agent_columns!(), " FROM agents WHERE node = $1"))
            .bind(node)
            .fetch_optional(pool)
            .await)?;
        Ok(row)
    }

    /// Records an agent's announcement; only a new agent, a changed address or a changed
    /// signing key moves the index.
    pub async fn announce_agent(&self, node: &str, announcement: &AgentAnnouncement, now_ms: i64) -> Result<AgentInfo, StoreError> {
        let ttl_s = announcement.ttl_s.unwrap_or(i64::from(signpost_shared::model::DEFAULT_TTL_S));
        let lease = now_ms + ttl_s * 1000;
        let existing = self.agent_row(node).await?;
        let same = existing.as_ref().is_some_and(|a| {
            a.alive(now_ms)
                && a.gossip_addr == announcement.gossip_addr
                && a.http_addr == announcement.http_addr
                && a.zone == announcement.zone
                && a.ttl_s == ttl_s
                && a.signing_key == announcement.signing_key
        });
        if same {
            let row: Option<AgentRow> = with_pool!(self, pool => sqlx::query_as(concat!(
                "UPDATE agents SET lease_expires_at = $2, renewed_at = $3 WHERE node = $1 RETURNING ", agent_columns!()))
                .bind(node)
                .bind(lease)
                .bind(now_ms)
                .fetch_optional(pool)
                .await)?;
            if let Some(row) = row {
                return Ok(row.into_info(now_ms));
            }
        }
        let (row, index): (AgentRow, i64) = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let index: i64 = sqlx::query_scalar(BUMP_INDEX).fetch_one(&mut *tx).await?;
            let row: AgentRow = sqlx::query_as(concat!(
                "INSERT INTO agents (node, gossip_addr, http_addr, zone, ttl_s, change_index, updated_at, lease_expires_at, renewed_at, signing_key) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $9) \
                 ON CONFLICT (node) DO UPDATE SET gossip_addr = excluded.gossip_addr, http_addr = excluded.http_addr, \
                 zone = excluded.zone, ttl_s = excluded.ttl_s, change_index = excluded.change_index, \
                 updated_at = excluded.updated_at, lease_expires_at = excluded.lease_expires_at, \
                 renewed_at = excluded.renewed_at, signing_key = excluded.signing_key RETURNING ", agent_columns!()))
                .bind(node)
                .bind(&announcement.gossip_addr)
                .bind(&announcement.http_addr)
                .bind(&announcement.zone)
                .bind(ttl_s)
                .bind(index)
                .bind(now_ms)
                .bind(lease)
                .bind(&announcement.signing_key)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            (row, index)
        });
        self.observe_index(to_u64(index));
        Ok(row.into_info(now_ms))
    }

    /// Every agent, by node.
    pub async fn agents(&self, now_ms: i64) -> Result<Vec<AgentInfo>, StoreError> {
        let rows: Vec<AgentRow> = with_pool!(self, pool => sqlx::query_as(concat!("SELECT ", agent_columns!(), " FROM agents ORDER BY node"))
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(|r| r.into_info(now_ms)).collect())
    }

    /// The agents of `nodes` (those that exist), by node.
    pub async fn agents_named(&self, nodes: &[String], now_ms: i64) -> Result<Vec<AgentInfo>, StoreError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=nodes.len()).map(|i| format!("${i}")).collect();
        // Only placeholders are written into the statement; the names are bound.
        let sql = format!("SELECT {} FROM agents WHERE node IN ({}) ORDER BY node", agent_columns!(), placeholders.join(", "));
        let rows: Vec<AgentRow> = with_pool!(self, pool => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
            for node in nodes {
                query = query.bind(node);
            }
            query.fetch_all(pool).await
        })?;
        Ok(rows.into_iter().map(|r| r.into_info(now_ms)).collect())
    }

    /// The whole catalog. The index is read first, so the rows are at least as new as it:
    /// a waiter never misses a change.
    pub async fn load_catalog(&self, now_ms: i64) -> Result<CatalogData, StoreError> {
        let (state, rows, agents): ((i64, bool, i64), Vec<InstanceRow>, Vec<AgentRow>) = with_pool!(self, pool => {
            let mut conn = pool.acquire().await?;
            let state = sqlx::query_as("SELECT change_index, self_preservation, epoch FROM catalog_state WHERE id = 1")
                .fetch_one(&mut *conn)
                .await?;
            let rows = sqlx::query_as(concat!("SELECT ", instance_columns!(), " FROM instances ORDER BY service, id"))
                .fetch_all(&mut *conn)
                .await?;
            let agents = sqlx::query_as(concat!("SELECT ", agent_columns!(), " FROM agents ORDER BY node"))
                .fetch_all(&mut *conn)
                .await?;
            (state, rows, agents)
        });
        let index = to_u64(state.0);
        self.observe_index(index);
        Ok(CatalogData {
            index,
            epoch: to_u64(state.2),
            self_preservation: state.1,
            instances: rows.into_iter().map(InstanceRow::into_instance).collect::<Result<_, _>>()?,
            agents: agents.into_iter().map(|a| a.into_info(now_ms)).collect(),
        })
    }

    /// Gives the catalog a new random epoch and moves the index past everything any client
    /// may hold: the database was restored or replaced under a running registry, so clients'
    /// copies are of another history and must be taken again whole.
    pub async fn new_epoch(&self) -> Result<u64, StoreError> {
        let epoch = random_epoch();
        let index: i64 = with_pool!(self, pool => sqlx::query_scalar(
            "UPDATE catalog_state SET epoch = $1, change_index = change_index + 1 WHERE id = 1 RETURNING change_index")
            .bind(epoch)
            .fetch_one(pool)
            .await)?;
        self.reset_index(to_u64(index));
        Ok(to_u64(epoch))
    }

    /// Agentless instances that declare a check.
    pub async fn probe_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        let rows: Vec<(String, String)> = with_pool!(self, pool => sqlx::query_as(
            "SELECT id, check_spec FROM instances WHERE node IS NULL AND check_spec IS NOT NULL")
            .fetch_all(pool)
            .await)?;
        let mut targets = Vec::with_capacity(rows.len());
        for (id, spec) in rows {
            match serde_json::from_str(&spec) {
                Ok(check) => targets.push(ProbeTarget { id, check }),
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "skipping an unreadable stored check")
                }
            }
        }
        Ok(targets)
    }

    /// One sweep: marks lapsed leases critical and removes instances that have been critical
    /// for the grace period, unless too many lapsed at once (self-preservation).
    /// `hold_allowed` false makes it expire even when self-preservation would hold (it has
    /// held too long already).
    ///
    /// A sweep that finds the last one longer ago than `policy.gap_after` (the registry or
    /// its database was down, or no replica led) expires and removes nothing: it gives every
    /// live lease a full term from now, so that heartbeats and probes can come back first,
    /// and restarts the grace period of the instances already critical, since nobody saw
    /// them critical meanwhile.
    pub async fn sweep(&self, policy: &SweepPolicy, now_ms: i64, hold_allowed: bool) -> Result<SweepReport, StoreError> {
        let row: Option<Option<i64>> =
            with_pool!(self, pool => sqlx::query_scalar("SELECT swept_at FROM sweeper_state WHERE id = 1").fetch_optional(pool).await)?;
        let swept_at = match row {
            Some(swept_at) => swept_at,
            None => {
                // Deleted by hand or lost in a partial restore: recreated, and taken as a gap.
                tracing::warn!("the sweeper_state row was missing; recreated it and resuming as after a gap");
                self.ensure_state_row().await?;
                None
            }
        };
        let gap_ms = i64::try_from(policy.gap_after.as_millis()).unwrap_or(i64::MAX);
        let gap = match swept_at {
            Some(at) if now_ms.saturating_sub(at) <= gap_ms => None,
            Some(at) => Some(Duration::from_millis(u64::try_from(now_ms.saturating_sub(at)).unwrap_or_default())),
            None => Some(Duration::ZERO),
        };
        if let Some(gap) = gap {
            return self.resume_after_gap(now_ms, gap, swept_at).await;
        }
        with_pool!(self, pool => sqlx::query("UPDATE sweeper_state SET swept_at = $1 WHERE id = 1")
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;

        let grace_ms = i64::try_from(policy.deregister_after.as_millis()).unwrap_or(i64::MAX);
        let remove_before = now_ms.saturating_sub(grace_ms);
        let (total, lapsed, unmarked, removable, agents_removable, sp_was): (i64, i64, i64, i64, i64, bool) = with_pool!(self, pool => {
            let mut conn = pool.acquire().await?;
            let (total, lapsed, unmarked, removable): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), \
                 COALESCE(SUM(CASE WHEN lease_expires_at < $1 THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN lease_expires_at < $1 AND NOT lease_expired THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN lease_expired AND expired_at < $2 THEN 1 ELSE 0 END), 0) \
                 FROM instances")
                .bind(now_ms)
                .bind(remove_before)
                .fetch_one(&mut *conn)
                .await?;
            let agents: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM agents WHERE lease_expires_at < $1")
                .bind(remove_before)
                .fetch_one(&mut *conn)
                .await?;
            let (_, sp): (i64, bool) = sqlx::query_as(READ_STATE).fetch_one(&mut *conn).await?;
            (total, lapsed, unmarked, removable, agents, sp)
        });
        let total = to_u64(total);
        let lapsed = to_u64(lapsed);
        let hold = hold_allowed
            && total >= policy.self_preservation_min_instances
            && total > 0
            && (lapsed as f64) > policy.self_preservation_threshold * (total as f64);
        let mut report = SweepReport { total, lapsed, self_preservation: hold, ..SweepReport::default() };
        let nothing_to_do = sp_was == hold && (hold || (unmarked == 0 && removable == 0 && agents_removable == 0));
        if nothing_to_do {
            return Ok(report);
        }
        let index: Option<i64> = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let index: i64 = sqlx::query_scalar(BUMP_INDEX).fetch_one(&mut *tx).await?;
            let sp_now: bool = sqlx::query_scalar("SELECT self_preservation FROM catalog_state WHERE id = 1").fetch_one(&mut *tx).await?;
            sqlx::query("UPDATE catalog_state SET self_preservation = $1 WHERE id = 1").bind(hold).execute(&mut *tx).await?;
            if !hold {
                report.expired = sqlx::query_scalar(
                    "UPDATE instances SET lease_expired = $1, expired_at = $3, change_index = $2, updated_at = $3 \
                     WHERE lease_expires_at < $3 AND NOT lease_expired RETURNING id")
                    .bind(true)
                    .bind(index)
                    .bind(now_ms)
                    .fetch_all(&mut *tx)
                    .await?;
                report.removed = sqlx::query_scalar("DELETE FROM instances WHERE lease_expired AND expired_at < $1 RETURNING id")
                    .bind(remove_before)
                    .fetch_all(&mut *tx)
                    .await?;
                report.agents_removed = sqlx::query("DELETE FROM agents WHERE lease_expires_at < $1")
                    .bind(remove_before)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            // The counts above were read outside the transaction: if another replica's sweep
            // got there first, nothing changed, and the bump is rolled back with the rest.
            let changed = sp_now != hold || !report.expired.is_empty() || !report.removed.is_empty() || report.agents_removed > 0;
            if changed {
                tx.commit().await?;
                Some(index)
            } else {
                None
            }
        });
        if let Some(index) = index {
            self.observe_index(to_u64(index));
        }
        Ok(report)
    }

    /// The first sweep after a gap of `gap` (zero: no sweep ever ran) since the last one at
    /// `last_swept` (if any): every live lease, of instances and of agents, runs at least a
    /// full term from now; instances already critical start their grace period again.
    /// Nothing is expired or removed. An agent whose lease had already lapsed at the last
    /// sweep was dead before the gap and stays so.
    async fn resume_after_gap(&self, now_ms: i64, gap: Duration, last_swept: Option<i64>) -> Result<SweepReport, StoreError> {
        let (extended, restarted): (u64, u64) = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let extended = sqlx::query(
                "UPDATE instances SET lease_expires_at = $1 + ttl_s * 1000 \
                 WHERE NOT lease_expired AND lease_expires_at < $1 + ttl_s * 1000")
                .bind(now_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let restarted = sqlx::query("UPDATE instances SET expired_at = $1 WHERE lease_expired")
                .bind(now_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "UPDATE agents SET lease_expires_at = $1 + ttl_s * 1000 \
                 WHERE lease_expires_at < $1 + ttl_s * 1000 AND lease_expires_at >= $2")
                .bind(now_ms)
                .bind(last_swept.unwrap_or(i64::MIN))
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE sweeper_state SET swept_at = $1 WHERE id = 1").bind(now_ms).execute(&mut *tx).await?;
            tx.commit().await?;
            (extended, restarted)
        });
        let (total, sp): (i64, bool) = with_pool!(self, pool => sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM instances), self_preservation FROM catalog_state WHERE id = 1")
            .fetch_one(pool)
            .await)?;
        Ok(SweepReport {
            total: to_u64(total),
            self_preservation: sp,
            resumed: Some(Resumed { gap, leases_extended: extended, grace_restarted: restarted }),
            ..SweepReport::default()
        })
    }
}

/// Refuses a write of instance `id`, of `node`, by a caller bound to node `owner` (if any)
/// that is not its node.
fn ensure_owner(id: &str, node: Option<&str>, owner: Option<&str>) -> Result<(), StoreError> {
    match owner {
        Some(owner) if node != Some(owner) => {
            Err(StoreError::NotOwner { id: id.to_string(), node: node.map(str::to_string), owner: owner.to_string() })
        }
        _ => Ok(()),
    }
}

/// A new epoch: random, and exact as a JSON number (53 bits).
fn random_epoch() -> i64 {
    i64::try_from(rand::random::<u64>() & MAX_EPOCH).unwrap_or_default()
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}
