//! Watching every agent for one change: one task per agent holds a blocking lookup
//! (`?index=N&wait=…`) on the agent's answer and notes the moment the answer first shows the
//! change. The agent answers a blocking lookup as soon as its merged catalog moves, so the
//! resolution is one loopback HTTP round trip (well under a millisecond when the machine is
//! not saturated), not a polling interval.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::load::error_chain;

/// One instance of a lookup answer, as far as the benchmark cares.
#[derive(Debug, Clone, Deserialize)]
pub struct Seen {
    /// Instance id.
    pub id: String,
    /// Its health.
    pub health: String,
}

/// A lookup answer: the agent's index and the instances.
#[derive(Debug, Clone)]
pub struct Answer {
    /// `X-Signpost-Index`.
    pub index: Option<u64>,
    /// The instances of the service.
    pub instances: Vec<Seen>,
}

#[derive(Debug, Deserialize)]
struct Body {
    instances: Vec<Seen>,
}

/// What the answer must show.
#[derive(Debug, Clone)]
pub enum Want {
    /// The instance is in the answer.
    Present(String),
    /// The instance is in the answer with this health.
    Health(String, &'static str),
    /// The instance is not in the answer (of a healthy-only lookup: it is not healthy).
    Absent(String),
}

impl Want {
    /// Whether `answer` shows it.
    pub fn met(&self, answer: &Answer) -> bool {
        match self {
            Want::Present(id) => answer.instances.iter().any(|i| &i.id == id),
            Want::Health(id, health) => answer.instances.iter().any(|i| &i.id == id && i.health == *health),
            Want::Absent(id) => !answer.instances.iter().any(|i| &i.id == id),
        }
    }
}

/// Which lookup to watch on every agent.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The service.
    pub service: String,
    /// `health=any` (every instance) rather than the default healthy ones.
    pub any: bool,
    /// What must show.
    pub want: Want,
}

/// `GET {base}/v1/services/{service}`, blocking on `index` for at most `wait` when given.
pub async fn lookup(client: &reqwest::Client, base: &str, watch: &Watch, block: Option<(u64, Duration)>) -> anyhow::Result<Answer> {
    let mut url = format!("{base}/v1/services/{}?health={}", watch.service, if watch.any { "any" } else { "healthy" });
    if let Some((index, wait)) = block {
        url.push_str(&format!("&index={index}&wait={}ms", wait.as_millis().max(1)));
    }
    let response = client.get(&url).send().await.map_err(|e| anyhow::anyhow!("{url}: {}", error_chain(&e)))?;
    let status = response.status();
    let index = response.headers().get("x-signpost-index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let text = response.text().await.map_err(|e| anyhow::anyhow!("{url}: {}", error_chain(&e)))?;
    if !status.is_success() {
        bail!("{url}: HTTP {status}: {}", text.chars().take(200).collect::<String>());
    }
    let body: Body = serde_json::from_str(&text).with_context(|| format!("{url}: not a lookup answer"))?;
    Ok(Answer { index, instances: body.instances })
}

/// Watches one agent: reads its answer once (then says `ready`), then follows its blocking
/// lookups until the answer shows `watch.want` or `deadline` passes. Returns when it saw it.
async fn watch_one(client: reqwest::Client, base: String, watch: Watch, ready: oneshot::Sender<()>, deadline: Instant) -> Option<Instant> {
    let first = lookup(&client, &base, &watch, None).await;
    let _ = ready.send(());
    let mut index = match first {
        Ok(answer) if watch.want.met(&answer) => return Some(Instant::now()),
        Ok(answer) => answer.index.unwrap_or(0),
        Err(_) => 0,
    };
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match lookup(&client, &base, &watch, Some((index, left.min(Duration::from_secs(10))))).await {
            Ok(answer) if watch.want.met(&answer) => return Some(Instant::now()),
            Ok(answer) => index = answer.index.unwrap_or(index),
            // An agent that is busy or briefly unreachable: ask again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Starts a watcher on every agent of `bases`, waits until each has read its first answer,
/// then runs `trigger` (the change) and waits until every agent shows the change or
/// `timeout` passes. Returns, per agent, the seconds from just before the trigger until its
/// answer showed the change (`None`: not within the timeout).
pub async fn measure<F>(
    client: &reqwest::Client,
    bases: &[String],
    watch: &Watch,
    trigger: F,
    timeout: Duration,
) -> anyhow::Result<Vec<Option<f64>>>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + timeout + Duration::from_secs(5);
    let mut handles = Vec::with_capacity(bases.len());
    let mut readies = Vec::with_capacity(bases.len());
    for base in bases {
        let (tx, rx) = oneshot::channel();
        readies.push(rx);
        handles.push(tokio::spawn(watch_one(client.clone(), base.clone(), watch.clone(), tx, deadline)));
    }
    for ready in readies {
        let _ = ready.await;
    }
    let start = Instant::now();
    trigger.await?;
    let stop = start + timeout;
    let mut seen = Vec::with_capacity(handles.len());
    for handle in handles {
        let at = handle.await.context("a watcher task failed")?;
        seen.push(at.filter(|at| *at <= stop).map(|at| at.duration_since(start).as_secs_f64()));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(instances: &[(&str, &str)]) -> Answer {
        Answer { index: Some(1), instances: instances.iter().map(|(id, h)| Seen { id: id.to_string(), health: h.to_string() }).collect() }
    }

    #[test]
    fn wants() {
        let a = answer(&[("x", "critical")]);
        assert!(Want::Present("x".into()).met(&a));
        assert!(!Want::Health("x".into(), "passing").met(&a));
        assert!(Want::Health("x".into(), "critical").met(&a));
        assert!(Want::Absent("y".into()).met(&a));
        assert!(!Want::Absent("x".into()).met(&a));
    }
}
