//! Watches what every agent answers, ten times a second, so that a fault test can check
//! afterwards what each agent said at every moment of the fault: that no healthy answer named
//! a dead instance past the bound, and that no live instance ever went missing.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

/// How often every agent is asked.
const ROUND: Duration = Duration::from_millis(100);
/// How long one answer may take before it counts as no answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// One healthy answer: which instance ids agent `agent` answered, asked at `at`.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request was sent.
    pub at: Instant,
    /// The agent's index.
    pub agent: usize,
    /// The ids in its healthy answer.
    pub healthy: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    targets: Vec<Option<String>>,
    samples: Vec<Sample>,
    failures: Vec<(Instant, usize, String)>,
}

/// Asks every watched agent for the healthy instances of one service, in the background,
/// until dropped.
pub struct Watcher {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts asking `GET {base}/v1/services/{service}` of every base URL in `targets`.
    pub fn start(service: &str, targets: Vec<String>) -> Watcher {
        Self::start_with_token(service, targets, None)
    }

    /// As [`Watcher::start`], presenting the agents' API token.
    pub fn start_with_token(service: &str, targets: Vec<String>, api_token: Option<&str>) -> Watcher {
        let state = Arc::new(Mutex::new(State { targets: targets.into_iter().map(Some).collect(), ..State::default() }));
        let client = crate::process::http_client(api_token, ANSWER_TIMEOUT);
        let task = tokio::spawn(poll(service.to_string(), client, state.clone()));
        Watcher { state, task }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks agent `agent` at `base` from now on, or not at all (None: killed or paused).
    pub fn set_target(&self, agent: usize, base: Option<String>) {
        self.state().targets[agent] = base;
    }

    /// The samples of `agent` asked at or after `from`.
    pub fn samples(&self, agent: usize, from: Instant) -> Vec<Sample> {
        self.state().samples.iter().filter(|s| s.agent == agent && s.at >= from).cloned().collect()
    }

    /// Panics unless every request to `agents` sent in `[from, to]` was answered, and every
    /// answer named all of `ids`: no live instance went missing, no live agent stopped answering.
    pub fn assert_kept(&self, what: &str, ids: &[String], agents: &[usize], from: Instant, to: Instant) {
        let state = self.state();
        let in_window = |at: Instant| at >= from && at <= to;
        if let Some((at, agent, error)) = state.failures.iter().find(|(at, a, _)| agents.contains(a) && in_window(*at)) {
            panic!("{what}: agent {agent} did not answer {:?} into the window: {error}", at.duration_since(from));
        }
        for sample in state.samples.iter().filter(|s| agents.contains(&s.agent) && in_window(s.at)) {
            let missing: Vec<&String> = ids.iter().filter(|id| !sample.healthy.contains(*id)).collect();
            assert!(
                missing.is_empty(),
                "{what}: agent {} left live instances {missing:?} out of its healthy answer {:?} into the window ({:?})",
                sample.agent,
                sample.at.duration_since(from),
                sample.healthy
            );
        }
        // The watch itself must have run: a window of a second or more holds answers of every agent.
        if to.saturating_duration_since(from) >= Duration::from_secs(1) {
            for agent in agents {
                assert!(
                    state.samples.iter().any(|s| s.agent == *agent && in_window(s.at)),
                    "{what}: no answer of agent {agent} was watched"
                );
            }
        }
    }

    /// Panics if an answer of `agents` asked in `[from, to]` named `id` as healthy.
    pub fn assert_absent(&self, what: &str, id: &str, agents: &[usize], from: Instant, to: Instant) {
        let state = self.state();
        for sample in state.samples.iter().filter(|s| agents.contains(&s.agent) && s.at >= from && s.at <= to) {
            assert!(
                !sample.healthy.contains(id),
                "{what}: agent {} still named {id} healthy {:?} into the window",
                sample.agent,
                sample.at.duration_since(from)
            );
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll(service: String, client: reqwest::Client, state: Arc<Mutex<State>>) {
    let mut ticks = tokio::time::interval(ROUND);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let targets = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).targets.clone();
        let mut round = JoinSet::new();
        for (agent, base) in targets.into_iter().enumerate() {
            let Some(base) = base else { continue };
            let (client, url) = (client.clone(), format!("{base}/v1/services/{service}"));
            round.spawn(async move {
                let at = Instant::now();
                (at, agent, base, ask(&client, &url).await)
            });
        }
        while let Some(Ok((at, agent, base, answer))) = round.join_next().await {
            let mut state = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // An answer from an address the agent no longer has (killed, paused, restarted) is not its.
            if state.targets.get(agent).and_then(Option::as_ref) != Some(&base) {
                continue;
            }
            match answer {
                Ok(healthy) => state.samples.push(Sample { at, agent, healthy }),
                Err(error) => state.failures.push((at, agent, error)),
            }
        }
    }
}

async fn ask(client: &reqwest::Client, url: &str) -> Result<BTreeSet<String>, String> {
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    let instances = body["instances"].as_array().ok_or("no instances list")?;
    Ok(instances.iter().filter_map(|i| i["id"].as_str().map(str::to_string)).collect())
}
