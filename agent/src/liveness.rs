//! Evidence of life from the registry: while some owner of a registered instance is not live
//! in this agent's gossip (dead, forgotten, or never reached), asks `GET /v1/agents?node=…`
//! when those agents last renewed, and hands that to the cache's merge rule, which believes
//! the registry for such an owner only on a fresh renewal (newer than its death, if gossip
//! saw it die). While every owner is live in gossip it asks nothing.

use std::sync::Arc;
use std::time::Duration;

use signpost_shared::client::RegistryClient;
use signpost_shared::wire::{AgentsPage, announce_period};
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;

/// How often the doubted owners are looked at (and evidence re-judged as it ages).
const TICK: Duration = Duration::from_secs(1);
/// Most nodes named in one request (the registry's limit).
const NODES_PER_CALL: usize = 100;

/// How long gossip is given after the agent starts to reach every live peer, before an owner
/// it has not seen alive needs the registry's evidence: the merge rule's settling window.
pub fn settling_window(gossip_interval: Duration) -> Duration {
    (gossip_interval * 20).max(Duration::from_secs(3))
}

/// Re-judges the evidence every second while an owner is doubted or the agent settles, and
/// asks the registry about the doubted owners once per announcement period of the shortest
/// lease among their instances (the period at which a live owner renews), until cancelled.
pub async fn run(client: RegistryClient, cache: Arc<Cache>, shutdown: CancellationToken) {
    let mut failing = false;
    let mut asked_at: Option<tokio::time::Instant> = None;
    loop {
        let doubted = cache.doubted_owners();
        if !doubted.nodes.is_empty() {
            let period = doubted.shortest_ttl_s.map_or(TICK, announce_period);
            if asked_at.is_none_or(|at| at.elapsed() >= period) {
                asked_at = Some(tokio::time::Instant::now());
                let nodes: Vec<String> = doubted.nodes.into_iter().collect();
                let asked = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    asked = ask(&client, &nodes) => asked,
                };
                match asked {
                    Ok(pages) => {
                        if failing {
                            tracing::info!("the registry answers again: owners gossip does not show alive are judged by their renewals");
                            failing = false;
                        }
                        let known: usize = pages.iter().map(|p| p.agents.len()).sum();
                        tracing::debug!(doubted = nodes.len(), known, "asked the registry when doubted owners last renewed");
                        cache.set_renewals(&pages);
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, doubted = nodes.len(), "cannot ask the registry whether owners gossip does not show alive live; their evidence ages");
                            failing = true;
                        }
                        cache.recheck();
                    }
                }
            } else {
                cache.recheck();
            }
        } else if doubted.settling {
            // The settling window ends without any other change: merge again when it does.
            cache.recheck();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// Asks about `nodes` in calls of at most [`NODES_PER_CALL`].
async fn ask(client: &RegistryClient, nodes: &[String]) -> Result<Vec<AgentsPage>, signpost_shared::client::ClientError> {
    let mut pages = Vec::new();
    for chunk in nodes.chunks(NODES_PER_CALL) {
        pages.push(client.agents_named(chunk).await?);
    }
    Ok(pages)
}
