//! The storage suite: the same tests against PostgreSQL (a fresh database each) and an
//! SQLite file (a fresh folder each). Times are passed in, so leases are tested without
//! waiting.

mod common;

use std::time::Duration;

use signpost_registry::store::{Deregistered, Registered, Store, StoreError, StoreOptions, SweepPolicy};
use signpost_shared::model::{Health, InstanceSpec, Registration};
use signpost_shared::wire::{AgentAnnouncement, Heartbeat, Maintenance};

const T0: i64 = 1_800_000_000_000;

fn options() -> StoreOptions {
    StoreOptions { max_connections: 4, acquire_timeout: Duration::from_secs(5), max_instances_per_node: 3, max_instances: 30 }
}

fn spec(id: &str, service: &str, ttl_s: i64) -> InstanceSpec {
    let registration: Registration = serde_json::from_value(serde_json::json!({
        "id": id, "service": service, "address": "10.0.0.1", "port": 8080, "ttl_s": ttl_s, "tags": ["a"]
    }))
    .expect("registration");
    registration.validate().expect("valid")
}

/// The policy of most tests: sweeps hours apart still count as sweeping without a gap.
fn policy() -> SweepPolicy {
    SweepPolicy {
        deregister_after: Duration::from_secs(10),
        self_preservation_threshold: 0.5,
        self_preservation_min_instances: 5,
        gap_after: Duration::from_secs(3600),
    }
}

/// A policy that takes more than 5 s between sweeps as a gap.
fn gap_policy() -> SweepPolicy {
    SweepPolicy { gap_after: Duration::from_secs(5), ..policy() }
}

/// Sweeps once a second from `from` to `to` (ms after T0), as a running sweeper does.
async fn sweep_each_second(store: &Store, policy: &SweepPolicy, from: i64, to: i64) -> Vec<String> {
    let mut removed = Vec::new();
    for at in (from..=to).step_by(1000) {
        let report = store.sweep(policy, T0 + at, true).await.expect("sweep");
        assert!(report.resumed.is_none(), "no gap at {at}");
        removed.extend(report.removed);
    }
    removed
}

async fn a_gap_in_sweeping_gives_every_lease_a_full_term(store: &Store) {
    store.register(&spec("short", "web", 2), T0, None, false).await.expect("register");
    store.register(&spec("long", "web", 300), T0, None, false).await.expect("register");
    store.register(&spec("other", "web", 300), T0, None, false).await.expect("register");
    let announcement = AgentAnnouncement {
        gossip_addr: "10.0.0.1:7302".into(),
        http_addr: "10.0.0.1:7301".into(),
        zone: None,
        ttl_s: Some(3),
        signing_key: None,
    };
    store.announce_agent("node-a", &announcement, T0).await.expect("announce");
    // node-gone's announcement lapsed at T0, before the last sweep: dead before the gap.
    let gone = AgentAnnouncement { ttl_s: Some(1), ..announcement.clone() };
    store.announce_agent("node-gone", &gone, T0 - 1000).await.expect("announce");
    sweep_each_second(store, &gap_policy(), 1000, 1000).await;
    // The registry is down from 1 s to 20 s: short's lease ran out at 2 s, unseen.
    let report = store.sweep(&gap_policy(), T0 + 20_000, true).await.expect("sweep");
    let resumed = report.resumed.expect("a gap");
    assert_eq!(resumed.gap, Duration::from_secs(19));
    assert!(report.expired.is_empty() && report.removed.is_empty(), "nothing expires on resuming");
    let short = store.instance("short").await.expect("get").expect("kept");
    assert_eq!((short.health, short.lease_expires_at.timestamp_millis()), (Health::Passing, T0 + 22_000), "a full term from now");
    let long = store.instance("long").await.expect("get").expect("kept");
    assert_eq!(long.lease_expires_at.timestamp_millis(), T0 + 320_000, "every live lease");
    let agents = store.agents(T0 + 20_000).await.expect("agents");
    let agent = agents.iter().find(|a| a.node == "node-a").expect("node-a");
    assert_eq!(agent.lease_expires_at.timestamp_millis(), T0 + 23_000, "an agent's lease too");
    let gone = agents.iter().find(|a| a.node == "node-gone").expect("node-gone");
    assert_eq!((gone.alive, gone.lease_expires_at.timestamp_millis()), (false, T0), "an agent dead before the gap stays dead");
    assert_eq!(agent.renewed_at.map(|t| t.timestamp_millis()), Some(T0), "a lease the sweeper gives is no renewal");
    // A heartbeat within the new term keeps it; without one it lapses as usual.
    assert!(sweep_each_second(store, &gap_policy(), 21_000, 21_000).await.is_empty());
    let report = store.sweep(&gap_policy(), T0 + 22_500, true).await.expect("sweep");
    assert_eq!(report.expired, ["short"]);
}

async fn quotas_hold_per_node_and_in_all(store: &Store) {
    let owned = |id: &str, node: &str| {
        let mut spec = spec(id, "web", 30);
        spec.node = Some(node.into());
        spec
    };
    for i in 0..3 {
        store.register(&owned(&format!("a-{i}"), "node-a"), T0, None, false).await.expect("within node-a's quota");
    }
    let index = store.load_catalog(T0).await.expect("catalog").index;
    let refused = store.register(&owned("a-3", "node-a"), T0, None, false).await;
    assert!(matches!(refused, Err(StoreError::NodeQuota { ref node, limit: 3 }) if node == "node-a"), "{refused:?}");
    assert_eq!(store.load_catalog(T0).await.expect("catalog").index, index, "a refused registration changes nothing");
    let mut moved = owned("a-0", "node-a");
    moved.port = 9999;
    store.register(&moved, T0, None, false).await.expect("an update is no new instance");
    store.register(&owned("b-0", "node-b"), T0, None, false).await.expect("another node has its own quota");
    // In all: 30.
    for i in 0..26 {
        store.register(&spec(&format!("free-{i}"), "web", 30), T0, None, false).await.expect("within the quota");
    }
    let refused = store.register(&spec("free-26", "web", 30), T0, None, false).await;
    assert!(matches!(refused, Err(StoreError::Quota { limit: 30 })), "{refused:?}");
    assert_eq!(store.deregister("free-0", None, T0, None).await.expect("deregister"), Deregistered::Removed);
    store.register(&spec("free-26", "web", 30), T0, None, false).await.expect("room again");
    assert_eq!(store.load_catalog(T0).await.expect("catalog").instances.len(), 30);
}

async fn critical_instances_restart_their_grace_after_a_gap(store: &Store) {
    store.register(&spec("short", "web", 1), T0, None, false).await.expect("register");
    store.register(&spec("long", "web", 300), T0, None, false).await.expect("register");
    store.register(&spec("other", "web", 300), T0, None, false).await.expect("register");
    let report = store.sweep(&gap_policy(), T0 + 2000, true).await.expect("sweep");
    assert_eq!(report.expired, ["short"]);
    // Down for longer than the grace period (10 s): nobody saw it critical meanwhile.
    let report = store.sweep(&gap_policy(), T0 + 60_000, true).await.expect("sweep");
    assert_eq!(report.resumed.map(|r| r.grace_restarted), Some(1));
    assert!(report.removed.is_empty());
    assert!(sweep_each_second(store, &gap_policy(), 61_000, 69_000).await.is_empty(), "critical for less than 10 s since");
    assert_eq!(store.instance("short").await.expect("get").expect("kept").health, Health::Critical);
    assert_eq!(sweep_each_second(store, &gap_policy(), 70_000, 71_000).await, ["short"]);
}

async fn register_get_deregister(store: &Store) {
    let (created, outcome) = store.register(&spec("web-1", "web", 30), T0, None, false).await.expect("register");
    assert_eq!(outcome, Registered::Created);
    assert_eq!(created.health, Health::Passing);
    assert_eq!(created.lease_expires_at.timestamp_millis(), T0 + 30_000);
    let fetched = store.instance("web-1").await.expect("get").expect("exists");
    assert_eq!(fetched, created);
    assert_eq!(store.deregister("web-1", None, T0, None).await.expect("deregister"), Deregistered::Removed);
    assert!(store.instance("web-1").await.expect("get").is_none());
    assert_eq!(store.deregister("web-1", None, T0, None).await.expect("deregister"), Deregistered::NotFound);
}

async fn repeated_registration_never_duplicates(store: &Store) {
    let (first, _) = store.register(&spec("web-1", "web", 30), T0, None, false).await.expect("register");
    let (again, outcome) = store.register(&spec("web-1", "web", 30), T0 + 1000, None, false).await.expect("register again");
    assert_eq!(outcome, Registered::Renewed);
    assert_eq!(again.index, first.index, "an identical registration must not move the index");
    assert_eq!(again.lease_expires_at.timestamp_millis(), T0 + 31_000);
    let mut moved = spec("web-1", "web", 30);
    moved.port = 9090;
    let (updated, outcome) = store.register(&moved, T0 + 2000, None, false).await.expect("update");
    assert_eq!(outcome, Registered::Updated);
    assert_eq!(updated.port, 9090);
    assert!(updated.index > first.index);
    assert_eq!(updated.registered_at, first.registered_at);
    let catalog = store.load_catalog(T0).await.expect("catalog");
    assert_eq!(catalog.instances.len(), 1);
    assert_eq!(catalog.index, updated.index);
    // A registration that names no health keeps the one a check reported.
    let critical = Heartbeat { health: Some(Health::Critical), output: Some("down".into()) };
    store.heartbeat("web-1", &critical, T0 + 3000, None).await.expect("heartbeat");
    let (again, outcome) = store.register(&moved, T0 + 4000, None, false).await.expect("register again");
    assert_eq!((again.health, outcome), (Health::Critical, Registered::Renewed));
}

async fn heartbeat_renews_and_reports_health(store: &Store) {
    let (first, _) = store.register(&spec("web-1", "web", 30), T0, None, false).await.expect("register");
    let beat = store.heartbeat("web-1", &Heartbeat::default(), T0 + 5000, None).await.expect("heartbeat").expect("exists");
    assert_eq!(beat.lease_expires_at.timestamp_millis(), T0 + 35_000);
    assert_eq!(beat.index, first.index, "a plain heartbeat does not move the index");
    let critical = Heartbeat { health: Some(Health::Critical), output: Some("connection refused".into()) };
    let beat = store.heartbeat("web-1", &critical, T0 + 6000, None).await.expect("heartbeat").expect("exists");
    assert_eq!(beat.health, Health::Critical);
    assert_eq!(beat.output.as_deref(), Some("connection refused"));
    assert!(beat.index > first.index, "a health change moves the index");
    assert!(store.heartbeat("nope", &Heartbeat::default(), T0, None).await.expect("heartbeat").is_none());
}

async fn maintenance_wins_over_checks(store: &Store) {
    store.register(&spec("web-1", "web", 30), T0, None, false).await.expect("register");
    let on = Maintenance { enabled: true, reason: Some("deploy".into()) };
    let instance = store.set_maintenance("web-1", &on, T0, None).await.expect("maintenance").expect("exists");
    assert_eq!(instance.health, Health::Maintenance);
    assert_eq!(instance.maintenance_reason.as_deref(), Some("deploy"));
    let instance = store.heartbeat("web-1", &Heartbeat::default(), T0 + 1, None).await.expect("hb").expect("exists");
    assert_eq!(instance.health, Health::Maintenance, "a heartbeat does not end maintenance");
    let off = Maintenance { enabled: false, reason: None };
    let instance = store.set_maintenance("web-1", &off, T0 + 2, None).await.expect("maintenance").expect("exists");
    assert_eq!(instance.health, Health::Passing);
    assert!(store.set_maintenance("nope", &off, T0, None).await.expect("maintenance").is_none());
}

async fn sweep_expires_then_removes(store: &Store) {
    for i in 0..5 {
        store.register(&spec(&format!("long-{i}"), "web", 300), T0, None, false).await.expect("register");
    }
    store.register(&spec("short", "web", 1), T0, None, false).await.expect("register");
    let report = store.sweep_now(&policy(), T0 + 500).await.expect("sweep");
    assert!(report.expired.is_empty() && report.removed.is_empty());
    let report = store.sweep_now(&policy(), T0 + 1500).await.expect("sweep");
    assert_eq!(report.expired, ["short"]);
    assert!(!report.self_preservation);
    assert_eq!(store.instance("short").await.expect("get").expect("still there").health, Health::Critical);
    let report = store.sweep_now(&policy(), T0 + 5000).await.expect("sweep");
    assert!(report.expired.is_empty() && report.removed.is_empty(), "not removed before the grace period");
    let report = store.sweep_now(&policy(), T0 + 11_000).await.expect("sweep");
    assert!(report.removed.is_empty(), "critical since 1.5 s: not yet 10 s");
    let report = store.sweep_now(&policy(), T0 + 11_600).await.expect("sweep");
    assert_eq!(report.removed, ["short"]);
    assert!(store.instance("short").await.expect("get").is_none());
    assert_eq!(store.load_catalog(T0).await.expect("catalog").instances.len(), 5);
}

async fn heartbeat_revives_an_expired_lease(store: &Store) {
    for i in 0..5 {
        store.register(&spec(&format!("long-{i}"), "web", 300), T0, None, false).await.expect("register");
    }
    store.register(&spec("short", "web", 1), T0, None, false).await.expect("register");
    store.sweep_now(&policy(), T0 + 2000).await.expect("sweep");
    assert_eq!(store.instance("short").await.expect("get").expect("exists").health, Health::Critical);
    let revived = store.heartbeat("short", &Heartbeat::default(), T0 + 2500, None).await.expect("hb").expect("exists");
    assert_eq!(revived.health, Health::Passing);
}

async fn self_preservation_holds_the_catalog(store: &Store) {
    for i in 0..8 {
        store.register(&spec(&format!("web-{i}"), "web", 1), T0, None, false).await.expect("register");
    }
    store.register(&spec("long", "web", 300), T0, None, false).await.expect("register");
    let report = store.sweep_now(&policy(), T0 + 2000).await.expect("sweep");
    assert!(report.self_preservation, "8 of 9 lapsed at once");
    assert!(report.expired.is_empty());
    let catalog = store.load_catalog(T0).await.expect("catalog");
    assert!(catalog.self_preservation);
    assert!(catalog.instances.iter().all(|i| i.health == Health::Passing), "nothing expired while holding");
    let report = store.sweep_now(&policy(), T0 + 60_000).await.expect("sweep");
    assert!(report.self_preservation && report.removed.is_empty(), "nothing removed while holding");
    for i in 0..8 {
        store.heartbeat(&format!("web-{i}"), &Heartbeat::default(), T0 + 60_000, None).await.expect("hb");
    }
    let report = store.sweep_now(&policy(), T0 + 60_100).await.expect("sweep");
    assert!(!report.self_preservation, "heartbeats resumed");
    // Held too long (the sweeper decides when): expiry goes on.
    for i in 0..8 {
        store.heartbeat(&format!("web-{i}"), &Heartbeat::default(), T0 + 60_000, None).await.expect("hb");
    }
    let report = store.sweep(&policy(), T0 + 62_000, false).await.expect("sweep");
    assert!(!report.self_preservation);
    assert_eq!(report.expired.len(), 8);
    assert!(!store.load_catalog(T0).await.expect("catalog").self_preservation);
}

async fn small_fleets_expire_normally(store: &Store) {
    store.register(&spec("only", "web", 1), T0, None, false).await.expect("register");
    let report = store.sweep_now(&policy(), T0 + 2000).await.expect("sweep");
    assert!(!report.self_preservation, "below the minimum fleet size");
    assert_eq!(report.expired, ["only"]);
}

async fn live_agent_owner_blocks_deregistration(store: &Store) {
    let mut owned = spec("web-1", "web", 30);
    owned.node = Some("node-a".into());
    store.register(&owned, T0, None, false).await.expect("register");
    let announcement = AgentAnnouncement {
        gossip_addr: "10.0.0.1:7302".into(),
        http_addr: "10.0.0.1:7301".into(),
        zone: None,
        ttl_s: Some(10),
        signing_key: None,
    };
    let agent = store.announce_agent("node-a", &announcement, T0).await.expect("announce");
    assert!(agent.alive);
    match store.deregister("web-1", None, T0 + 1000, None).await.expect("deregister") {
        Deregistered::OwnedByLiveAgent { node, http_addr } => {
            assert_eq!(node, "node-a");
            assert_eq!(http_addr, "10.0.0.1:7301");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let refused = store.deregister("web-1", Some("node-b"), T0 + 1000, None).await.expect("deregister");
    assert!(matches!(refused, Deregistered::OwnedByLiveAgent { .. }), "another node may not remove it");
    assert_eq!(
        store.deregister("web-1", Some("node-a"), T0 + 1000, None).await.expect("deregister"),
        Deregistered::Removed,
        "the owner may"
    );
    store.register(&owned, T0, None, false).await.expect("register");
    assert_eq!(
        store.deregister("web-1", None, T0 + 11_000, None).await.expect("deregister"),
        Deregistered::Removed,
        "the agent's announcement lapsed"
    );
}

async fn agents_announce_idempotently(store: &Store) {
    let announcement = AgentAnnouncement {
        gossip_addr: "10.0.0.1:7302".into(),
        http_addr: "10.0.0.1:7301".into(),
        zone: Some("z1".into()),
        ttl_s: None,
        signing_key: None,
    };
    store.announce_agent("node-a", &announcement, T0).await.expect("announce");
    let index = store.load_catalog(T0).await.expect("catalog").index;
    let again = store.announce_agent("node-a", &announcement, T0 + 1000).await.expect("announce");
    assert_eq!(again.lease_expires_at.timestamp_millis(), T0 + 31_000);
    assert_eq!(store.load_catalog(T0).await.expect("catalog").index, index, "a repeated announcement does not move the index");
    let agents = store.agents(T0 + 1000).await.expect("agents");
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].zone.as_deref(), Some("z1"));

    // A signing key is kept and published; a new one moves the index (agents must learn it).
    let key = signpost_shared::gossip_sign::NodeSigningKey::generate().public().to_string();
    let keyed = AgentAnnouncement { signing_key: Some(key.clone()), ..announcement };
    store.announce_agent("node-a", &keyed, T0 + 2000).await.expect("announce");
    let catalog = store.load_catalog(T0 + 2000).await.expect("catalog");
    assert!(catalog.index > index, "a new signing key moves the index");
    assert_eq!(catalog.agents[0].signing_key.as_deref(), Some(key.as_str()));
}

async fn catalog_is_ordered_and_indexed(store: &Store) {
    store.register(&spec("b-2", "beta", 30), T0, None, false).await.expect("register");
    store.register(&spec("a-1", "alpha", 30), T0, None, false).await.expect("register");
    store.register(&spec("b-1", "beta", 30), T0, None, false).await.expect("register");
    let catalog = store.load_catalog(T0).await.expect("catalog");
    let ids: Vec<&str> = catalog.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a-1", "b-1", "b-2"]);
    assert_eq!(catalog.index, catalog.instances.iter().map(|i| i.index).max().expect("some"));
    assert_eq!(store.known_index(), catalog.index);
}

async fn probe_failure_marks_critical_without_renewing(store: &Store) {
    let registration: Registration = serde_json::from_value(serde_json::json!({
        "id": "db-1", "service": "db", "address": "10.0.0.2", "port": 5432, "ttl_s": 30,
        "check": {"tcp": "10.0.0.2:5432", "interval": "1s", "timeout": "500ms"}
    }))
    .expect("registration");
    let (before, _) = store.register(&registration.validate().expect("valid"), T0, None, false).await.expect("register");
    let targets = store.probe_targets().await.expect("targets");
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].check.tcp.as_deref(), Some("10.0.0.2:5432"));
    store.record_probe_failure("db-1", "connection refused", T0 + 1000).await.expect("record");
    let after = store.instance("db-1").await.expect("get").expect("exists");
    assert_eq!(after.health, Health::Critical);
    assert_eq!(after.lease_expires_at, before.lease_expires_at, "a failed probe does not renew the lease");
    assert!(after.index > before.index);
}

async fn concurrent_writes_get_distinct_indexes(store: &Store) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.spawn(async move { store.register(&spec(&format!("w-{i}"), "web", 30), T0, None, false).await.expect("register").0.index });
    }
    let mut indexes = tasks.join_all().await;
    indexes.sort();
    indexes.dedup();
    assert_eq!(indexes.len(), 20, "every change has its own index");
}

/// Sweeps with self-preservation allowed.
trait SweepNow {
    async fn sweep_now(
        &self,
        policy: &SweepPolicy,
        now_ms: i64,
    ) -> Result<signpost_registry::store::SweepReport, signpost_registry::store::StoreError>;
}

impl SweepNow for Store {
    async fn sweep_now(
        &self,
        policy: &SweepPolicy,
        now_ms: i64,
    ) -> Result<signpost_registry::store::SweepReport, signpost_registry::store::StoreError> {
        self.sweep(policy, now_ms, true).await
    }
}

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::common::TestDb::create().await;
                    let store = super::Store::connect(&db.url, &super::options()).expect("connect");
                    store.migrate().await.expect("migrate");
                    // A sweeper has been running (the first sweep on a database only resumes).
                    let first = store.sweep(&super::policy(), super::T0 - 1000, true).await.expect("sweep");
                    assert!(first.resumed.is_some());
                    super::$name(&store).await;
                    store.close().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("temp dir");
                    let url = format!("sqlite://{}?mode=rwc", dir.path().join("registry.db").display());
                    let store = super::Store::connect(&url, &super::options()).expect("connect");
                    store.migrate().await.expect("migrate");
                    // A sweeper has been running (the first sweep on a database only resumes).
                    let first = store.sweep(&super::policy(), super::T0 - 1000, true).await.expect("sweep");
                    assert!(first.resumed.is_some());
                    super::$name(&store).await;
                    store.close().await;
                }
            )*
        }
    };
}

store_suite!(
    register_get_deregister,
    repeated_registration_never_duplicates,
    heartbeat_renews_and_reports_health,
    maintenance_wins_over_checks,
    sweep_expires_then_removes,
    heartbeat_revives_an_expired_lease,
    self_preservation_holds_the_catalog,
    small_fleets_expire_normally,
    live_agent_owner_blocks_deregistration,
    agents_announce_idempotently,
    catalog_is_ordered_and_indexed,
    probe_failure_marks_critical_without_renewing,
    concurrent_writes_get_distinct_indexes,
    a_gap_in_sweeping_gives_every_lease_a_full_term,
    critical_instances_restart_their_grace_after_a_gap,
    quotas_hold_per_node_and_in_all,
);
