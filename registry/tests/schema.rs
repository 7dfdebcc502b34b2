//! The store when its schema, its `catalog_state` row or its `sweeper_state` row goes missing (503 and a repair by
//! migrating again, on both backends), and the session limits every PostgreSQL connection of
//! the pool is opened with.

mod common;

use std::time::Duration;

use signpost_registry::store::{SessionLimits, Store, StoreOptions, SweepPolicy};
use signpost_shared::model::{InstanceSpec, Registration};

fn options() -> StoreOptions {
    StoreOptions { max_connections: 4, acquire_timeout: Duration::from_secs(5), max_instances_per_node: 1_000, max_instances: 100_000 }
}

/// Runs `sql` on the store's database (SQLite: on its file at `url`).
async fn execute(store: &Store, url: &str, sql: &'static str) {
    let done = match store.pg_pool() {
        Some(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
        None => {
            let pool = sqlx::sqlite::SqlitePool::connect(url).await.expect("open the file");
            let done = sqlx::query(sql).execute(&pool).await.map(|_| ());
            pool.close().await;
            done
        }
    };
    done.expect(sql);
}

fn spec(id: &str) -> InstanceSpec {
    let registration: Registration =
        serde_json::from_value(serde_json::json!({"id": id, "service": "web", "address": "10.0.0.1", "port": 80})).expect("a registration");
    registration.validate().expect("valid")
}

/// A missing table answers "unavailable" (503) and says that migrating repairs it; with the
/// whole schema gone (a database created again), migrating does.
async fn a_missing_table_is_unavailable_until_migrated_again(store: &Store, url: &str) {
    store.instance("web-1").await.expect("a table that is there");
    execute(store, url, "DROP TABLE instances").await;
    let error = store.instance("web-1").await.expect_err("the table is gone");
    assert!(error.is_unavailable(), "{error}: 503, not 500");
    assert!(error.needs_migration(), "{error}");
    // The rest of the schema goes too, as when the database is dropped and created again
    // (one table dropped by hand while the migrations stay recorded cannot be migrated back).
    if store.is_postgres() {
        execute(store, url, "DROP SCHEMA public CASCADE").await;
        execute(store, url, "CREATE SCHEMA public").await;
    } else {
        for sql in ["DROP TABLE agents", "DROP TABLE catalog_state", "DROP TABLE sweeper_state", "DROP TABLE _sqlx_migrations"] {
            execute(store, url, sql).await;
        }
    }
    store.migrate().await.expect("migrate again");
    assert!(store.instance("web-1").await.expect("the table is back").is_none());
}

/// A missing `catalog_state` row is recreated above every stored change.
async fn a_missing_state_row_is_recreated_above_every_change(store: &Store, url: &str) {
    store.register(&spec("web-1"), 1_000, None, false).await.expect("register");
    let index = store.refresh_index().await.expect("the index");
    execute(store, url, "DELETE FROM catalog_state").await;
    let error = store.refresh_index().await.expect_err("the row is gone");
    assert!(error.is_unavailable() && error.needs_migration(), "{error}");
    store.migrate().await.expect("migrate again");
    let recreated = store.refresh_index().await.expect("the index");
    assert!(recreated > index, "recreated at {recreated}, the last change was at {index}");
}

/// A missing `sweeper_state` row is recreated by the next sweep, which resumes as after a gap
/// (nothing expires), and sweeping goes on from there.
async fn a_missing_sweeper_row_is_recreated_by_the_sweep(store: &Store, url: &str) {
    let policy = SweepPolicy {
        deregister_after: Duration::from_secs(10),
        self_preservation_threshold: 0.5,
        self_preservation_min_instances: 5,
        gap_after: Duration::from_secs(5),
    };
    store.register(&spec("web-1"), 1_000, None, false).await.expect("register");
    assert!(store.sweep(&policy, 1_000, true).await.expect("the first sweep").resumed.is_some());
    assert!(store.sweep(&policy, 2_000, true).await.expect("a sweep").resumed.is_none());
    execute(store, url, "DELETE FROM sweeper_state").await;
    let resumed = store.sweep(&policy, 3_000, true).await.expect("a sweep without its row");
    assert!(resumed.resumed.is_some() && resumed.expired.is_empty(), "{resumed:?}");
    assert!(store.sweep(&policy, 4_000, true).await.expect("the next sweep").resumed.is_none(), "the row is back");
}

/// A schema that is only partly there (the first migration applied, the next not yet, as
/// while a database created again under the registry is being migrated) answers
/// "unavailable" (503, not 500) and says that migrating repairs it.
async fn a_half_migrated_schema_is_unavailable_until_migrated(store: &Store, url: &str) {
    match store.pg_pool() {
        Some(pool) => signpost_registry::store::PG_MIGRATOR.run_to(1, pool).await,
        None => {
            let pool = sqlx::sqlite::SqlitePool::connect(url).await.expect("open the file");
            let done = signpost_registry::store::SQLITE_MIGRATOR.run_to(1, &pool).await;
            pool.close().await;
            done
        }
    }
    .expect("the first migration");
    let error = store.register(&spec("web-1"), 1_000, None, false).await.expect_err("a column is missing");
    assert!(error.is_unavailable(), "{error}: 503, not 500");
    assert!(error.needs_migration(), "{error}");
    store.migrate().await.expect("migrate the rest");
    store.register(&spec("web-1"), 1_000, None, false).await.expect("register once migrated");
}

/// Runs schema test `test` (0 to 3).
async fn schema_test(test: u8, store: &Store, url: &str) {
    match test {
        0 => a_missing_table_is_unavailable_until_migrated_again(store, url).await,
        1 => a_missing_state_row_is_recreated_above_every_change(store, url).await,
        2 => a_missing_sweeper_row_is_recreated_by_the_sweep(store, url).await,
        _ => a_half_migrated_schema_is_unavailable_until_migrated(store, url).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_repairs() {
    for test in [0, 1, 2, 3] {
        let db = common::TestDb::create().await;
        let store = Store::connect(&db.url, &options()).expect("connect");
        if test != 3 {
            store.migrate().await.expect("migrate");
        }
        schema_test(test, &store, &db.url).await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_schema_repairs() {
    for test in [0, 1, 2, 3] {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("registry.db").display());
        let store = Store::connect(&url, &options()).expect("connect");
        if test != 3 {
            store.migrate().await.expect("migrate");
        }
        schema_test(test, &store, &url).await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_postgres_session_carries_the_limits() {
    let db = common::TestDb::create().await;
    let limits = SessionLimits {
        lock_timeout: Duration::from_millis(1500),
        idle_in_transaction_timeout: Duration::from_secs(4),
        statement_timeout: Duration::from_secs(20),
    };
    let store = Store::connect_with(&db.url, &options(), &limits).expect("connect");
    store.migrate().await.expect("migrate");
    let pool = store.pg_pool().expect("PostgreSQL");
    for (setting, expected) in [
        ("lock_timeout", "1500ms"),
        ("idle_in_transaction_session_timeout", "4s"),
        ("statement_timeout", "20s"),
        ("tcp_keepalives_idle", "5"),
    ] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {setting}"))).fetch_one(pool).await.expect("SHOW");
        assert_eq!(value, expected, "{setting}");
    }
    // A write that waits for the index row longer than lock_timeout fails as unavailable (503).
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("UPDATE catalog_state SET change_index = change_index + 1 WHERE id = 1")
        .execute(&mut *holder)
        .await
        .expect("take the lock");
    let error = store.register(&spec("web-1"), 1_000, None, false).await.expect_err("the row is locked");
    assert!(error.is_unavailable(), "a lock timeout is 503, not 500: {error}");
    holder.rollback().await.expect("rollback");
    store.close().await;
}
