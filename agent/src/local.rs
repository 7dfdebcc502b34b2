//! `LocalState`: the services this agent runs, their checks' results and maintenance. It is
//! the truth for these services: gossip publishes it, the registry is kept in step with it.
//! Every change bumps a version on a watch channel, which the publishers wait on.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use serde::Serialize;
use signpost_shared::model::{Health, InstanceSpec};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CheckConfig;

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// An HTTP GET.
    Http(String),
    /// A TCP connect.
    Tcp(String),
    /// The application reports; silence for this long is critical.
    Ttl(#[serde(with = "signpost_shared::duration")] Duration),
}

/// One check of a local service and its last result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckState {
    /// The check's id.
    pub id: String,
    /// The instance it checks.
    pub instance: String,
    /// What it probes.
    pub kind: CheckKind,
    /// Time between probes.
    #[serde(with = "signpost_shared::duration")]
    pub interval: Duration,
    /// Longest probe.
    #[serde(with = "signpost_shared::duration")]
    pub timeout: Duration,
    /// Successes in a row that make it passing.
    pub successes_before_passing: u32,
    /// Failures in a row that make it critical.
    pub failures_before_critical: u32,
    /// Its current status.
    pub status: Health,
    /// The last output.
    pub output: String,
    /// Successes in a row so far.
    pub successes: u32,
    /// Failures in a row so far.
    pub failures: u32,
    /// For a TTL check: when it turns critical unless reported.
    #[serde(skip)]
    pub deadline: Option<Instant>,
}

impl CheckState {
    /// A new check, critical until it first passes (as Consul's checks start).
    pub fn new(id: String, instance: String, config: &CheckConfig) -> Self {
        let kind = match (&config.http, &config.tcp, config.ttl) {
            (Some(url), _, _) => CheckKind::Http(url.clone()),
            (None, Some(addr), _) => CheckKind::Tcp(addr.clone()),
            (None, None, Some(ttl)) => CheckKind::Ttl(ttl),
            (None, None, None) => CheckKind::Ttl(config.interval),
        };
        let deadline = match kind {
            CheckKind::Ttl(ttl) => Some(Instant::now() + ttl),
            _ => None,
        };
        CheckState {
            id,
            instance,
            kind,
            interval: config.interval,
            timeout: config.timeout,
            successes_before_passing: config.successes_before_passing.max(1),
            failures_before_critical: config.failures_before_critical.max(1),
            status: Health::Critical,
            output: "not checked yet".into(),
            successes: 0,
            failures: 0,
            deadline,
        }
    }

    /// Applies one probe result with the thresholds; returns true when the status changed.
    /// A warning counts as a success that reports warning.
    pub fn record(&mut self, observed: Health, output: String) -> bool {
        self.output = output;
        let before = self.status;
        if observed == Health::Critical {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.failures_before_critical {
                self.status = Health::Critical;
            }
        } else {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= self.successes_before_passing || self.status != Health::Critical {
                self.status = observed;
            }
        }
        self.status != before
    }
}

/// A local service: what is registered, its checks and maintenance.
#[derive(Debug, Clone)]
pub struct LocalService {
    /// The instance as registered (node set to this agent).
    pub spec: InstanceSpec,
    /// Its checks, in order.
    pub checks: Vec<CheckState>,
    /// Why it is in maintenance, when it is.
    pub maintenance: Option<String>,
}

impl LocalService {
    /// Maintenance wins; otherwise the worst check; no check is passing.
    pub fn health(&self) -> Health {
        if self.maintenance.is_some() {
            return Health::Maintenance;
        }
        let rank = |h: Health| match h {
            Health::Passing => 0,
            Health::Warning => 1,
            Health::Maintenance => 2,
            Health::Critical => 3,
        };
        self.checks.iter().map(|c| c.status).max_by_key(|h| rank(*h)).unwrap_or(Health::Passing)
    }

    /// The output of the worst check, or the maintenance reason.
    pub fn output(&self) -> Option<String> {
        if let Some(reason) = &self.maintenance {
            return Some(reason.clone());
        }
        let health = self.health();
        self.checks.iter().find(|c| c.status == health).map(|c| c.output.clone())
    }
}

/// Why a local change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    /// No such service.
    #[error("no local service `{0}`")]
    NoService(String),
    /// No such check.
    #[error("no local check `{0}`")]
    NoCheck(String),
    /// The check is not a TTL check.
    #[error("check `{0}` is not a TTL check; only TTL checks take reports")]
    NotTtl(String),
    /// A check id is already used.
    #[error("check id `{0}` is already used")]
    DuplicateCheck(String),
    /// As many services as allowed run already.
    #[error("this agent already runs {0} local services, the most it may (max_local_services)")]
    TooMany(usize),
}

/// The services this agent runs.
#[derive(Debug)]
pub struct LocalState {
    services: RwLock<BTreeMap<String, LocalService>>,
    /// Most services at once.
    max_services: usize,
    version: watch::Sender<u64>,
    /// The latest version this agent's own answers show (set by the gossip task).
    answered: watch::Sender<u64>,
}

impl Default for LocalState {
    fn default() -> Self {
        LocalState::new(usize::MAX)
    }
}

impl LocalState {
    /// No services yet; at most `max_services` at once.
    pub fn new(max_services: usize) -> Self {
        LocalState { services: RwLock::new(BTreeMap::new()), max_services, version: watch::channel(0).0, answered: watch::channel(0).0 }
    }

    /// Waits on this for any change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// The number of changes made so far.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Records that this agent's answers now show every change up to `version`.
    pub fn answered(&self, version: u64) {
        self.answered.send_if_modified(|v| {
            let newer = version > *v;
            if newer {
                *v = version;
            }
            newer
        });
    }

    /// Waits, at most `within`, until this agent's answers show every change made so far, so
    /// that a caller who changed something reads it back from its next lookup. False when the
    /// deadline passed first.
    pub async fn until_answered(&self, within: Duration) -> bool {
        let version = self.version();
        let mut answered = self.answered.subscribe();
        matches!(tokio::time::timeout(within, answered.wait_for(|v| *v >= version)).await, Ok(Ok(_)))
    }

    fn read<T>(&self, f: impl FnOnce(&BTreeMap<String, LocalService>) -> T) -> T {
        match self.services.read() {
            Ok(services) => f(&services),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    fn write<T>(&self, f: impl FnOnce(&mut BTreeMap<String, LocalService>) -> T) -> T {
        match self.services.write() {
            Ok(mut services) => f(&mut services),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Adds or replaces a service with its checks (checks keep no result from before).
    pub fn upsert(&self, spec: InstanceSpec, checks: &[CheckConfig]) -> Result<(), LocalError> {
        let states: Vec<CheckState> = checks
            .iter()
            .enumerate()
            .map(|(i, c)| CheckState::new(c.id.clone().unwrap_or_else(|| format!("{}:{}", spec.id, i + 1)), spec.id.clone(), c))
            .collect();
        for (i, state) in states.iter().enumerate() {
            if states[..i].iter().any(|other| other.id == state.id) {
                return Err(LocalError::DuplicateCheck(state.id.clone()));
            }
        }
        self.write(|services| {
            for state in &states {
                let taken = services.values().filter(|s| s.spec.id != spec.id).flat_map(|s| &s.checks).any(|c| c.id == state.id);
                if taken {
                    return Err(LocalError::DuplicateCheck(state.id.clone()));
                }
            }
            if !services.contains_key(&spec.id) && services.len() >= self.max_services {
                return Err(LocalError::TooMany(self.max_services));
            }
            let maintenance = services.get(&spec.id).and_then(|s| s.maintenance.clone());
            services.insert(spec.id.clone(), LocalService { spec, checks: states, maintenance });
            Ok(())
        })?;
        self.changed();
        Ok(())
    }

    /// Removes a service; returns it.
    pub fn remove(&self, id: &str) -> Result<LocalService, LocalError> {
        let removed = self.write(|services| services.remove(id)).ok_or_else(|| LocalError::NoService(id.to_string()))?;
        self.changed();
        Ok(removed)
    }

    /// Every service, by id.
    pub fn services(&self) -> Vec<LocalService> {
        self.read(|services| services.values().cloned().collect())
    }

    /// One service.
    pub fn service(&self, id: &str) -> Option<LocalService> {
        self.read(|services| services.get(id).cloned())
    }

    /// Every check, by instance then order.
    pub fn checks(&self) -> Vec<CheckState> {
        self.read(|services| services.values().flat_map(|s| s.checks.clone()).collect())
    }

    /// Records a probe result of check `check_id` of instance `instance`.
    pub fn record(&self, instance: &str, check_id: &str, observed: Health, output: String) -> Result<bool, LocalError> {
        let changed = self.write(|services| {
            let service = services.get_mut(instance).ok_or_else(|| LocalError::NoService(instance.to_string()))?;
            let check = service.checks.iter_mut().find(|c| c.id == check_id).ok_or_else(|| LocalError::NoCheck(check_id.to_string()))?;
            Ok(check.record(observed, output))
        })?;
        if changed {
            self.changed();
        }
        Ok(changed)
    }

    /// A report from the application for a TTL check: it holds for the check's TTL.
    pub fn report(&self, check_id: &str, observed: Health, output: String) -> Result<(), LocalError> {
        let changed = self.write(|services| {
            let check = services
                .values_mut()
                .flat_map(|s| s.checks.iter_mut())
                .find(|c| c.id == check_id)
                .ok_or_else(|| LocalError::NoCheck(check_id.to_string()))?;
            let CheckKind::Ttl(ttl) = check.kind else {
                return Err(LocalError::NotTtl(check_id.to_string()));
            };
            check.deadline = Some(Instant::now() + ttl);
            // The application's word counts at once: no thresholds for TTL reports.
            let before = check.status;
            check.status = observed;
            check.output = output;
            Ok(before != observed)
        })?;
        if changed {
            self.changed();
        }
        Ok(())
    }

    /// Turns TTL checks whose report is overdue critical; returns when the next one is due.
    pub fn expire_ttls(&self, now: Instant) -> Option<Instant> {
        let (changed, next) = self.write(|services| {
            let mut changed = false;
            let mut next: Option<Instant> = None;
            for check in services.values_mut().flat_map(|s| s.checks.iter_mut()) {
                let Some(deadline) = check.deadline else { continue };
                if deadline <= now {
                    if check.status != Health::Critical {
                        check.status = Health::Critical;
                        check.output = "TTL expired: the application did not report in time".into();
                        changed = true;
                    }
                } else {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                }
            }
            (changed, next)
        });
        if changed {
            self.changed();
        }
        next
    }

    /// Turns maintenance on (with a reason) or off for one service.
    pub fn set_maintenance(&self, id: &str, reason: Option<String>) -> Result<(), LocalError> {
        self.write(|services| {
            let service = services.get_mut(id).ok_or_else(|| LocalError::NoService(id.to_string()))?;
            service.maintenance = reason;
            Ok(())
        })?;
        self.changed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn check(successes: u32, failures: u32) -> CheckConfig {
        CheckConfig {
            id: None,
            http: Some("http://127.0.0.1:1/".into()),
            tcp: None,
            ttl: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            successes_before_passing: successes,
            failures_before_critical: failures,
        }
    }

    #[test]
    fn thresholds_hold_the_status_until_reached() {
        let mut state = CheckState::new("c".into(), "i".into(), &check(2, 3));
        assert_eq!(state.status, Health::Critical);
        assert!(!state.record(Health::Passing, "ok".into()), "one success of two");
        assert!(state.record(Health::Passing, "ok".into()));
        assert_eq!(state.status, Health::Passing);
        assert!(!state.record(Health::Critical, "down".into()));
        assert!(!state.record(Health::Critical, "down".into()));
        assert!(state.record(Health::Critical, "down".into()), "third failure");
        assert_eq!(state.status, Health::Critical);
        assert_eq!(state.output, "down");
    }

    #[test]
    fn a_warning_passes_through_once_passing() {
        let mut state = CheckState::new("c".into(), "i".into(), &check(1, 1));
        state.record(Health::Passing, "ok".into());
        assert!(state.record(Health::Warning, "429".into()));
        assert_eq!(state.status, Health::Warning);
    }

    #[tokio::test]
    async fn a_change_waits_until_the_answers_show_it() {
        let local = Arc::new(LocalState::default());
        assert!(local.until_answered(Duration::from_secs(1)).await, "nothing changed yet");
        local.changed();
        assert!(!local.until_answered(Duration::from_millis(20)).await, "no answer shows the change");
        let waiter = tokio::spawn({
            let local = local.clone();
            async move { local.until_answered(Duration::from_secs(60)).await }
        });
        local.answered(local.version() - 1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "an older version does not wake it");
        local.answered(local.version());
        assert!(waiter.await.expect("joins"));
    }
}
