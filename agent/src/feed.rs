//! Anti-entropy with the registry: follows its catalog feed (a blocking query on the change
//! index) into the cache and introduces the agents it lists to gossip ([`crate::persist::run`]
//! saves the registry's word to disk for the next start). A blocking query whose wait ends
//! with no change still carries the whole catalog: that answer is recognised by its index
//! header and dropped unread, so an idle agent never parses or merges the catalog.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use signpost_shared::client::{CatalogChange, HeldCatalog, RegistryClient};
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::gossip::Gossip;
use crate::metrics::Metrics;
use crate::page::PageSeed;

/// Follows the feed until cancelled.
pub async fn follow(
    client: RegistryClient,
    cache: Arc<Cache>,
    gossip: Arc<Gossip>,
    wait: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut index: Option<u64> = None;
    // The registry's tag for the catalog held: the registry answers 304 to it while nothing
    // changed, and a new page when the catalog at this index is of another history.
    let mut etag: Option<String> = None;
    let mut introduced: HashSet<SocketAddr> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let fetched = {
            // Unchanged instances of a new page are taken from what the cache holds.
            let held = cache.registry();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                fetched = client.catalog_changed_seed(
                    index.map(|index| HeldCatalog { index, etag: etag.as_deref() }),
                    index.map(|_| wait),
                    PageSeed { held: &held },
                ) => fetched,
            }
        };
        match fetched {
            Ok(answer) => {
                if failing {
                    tracing::info!(url = %client.current_url(), "the registry answers again");
                    failing = false;
                }
                backoff = Duration::from_millis(100);
                let Some(CatalogChange { page, etag: tag }) = answer else {
                    // The wait ended and the catalog is still the one held.
                    cache.confirm_registry();
                    continue;
                };
                etag = tag;
                let held_epoch = cache.registry().epoch;
                if index.is_some() && held_epoch != page.epoch {
                    tracing::warn!(
                        was = held_epoch,
                        now = page.epoch,
                        "the registry's catalog has a new epoch (its database was restored or replaced); taking it whole"
                    );
                } else if index == Some(page.index) {
                    tracing::warn!(
                        index = page.index,
                        "the registry's catalog at this index is another one (its database was restored); taking it whole"
                    );
                } else if index.is_some_and(|i| page.index < i) {
                    tracing::warn!(
                        was = index,
                        now = page.index,
                        "the registry's index went back (its database was reset); following from there"
                    );
                }
                index = Some(page.index);
                for agent in page.agents.iter().filter(|a| a.alive) {
                    if let Ok(addr) = agent.gossip_addr.parse::<SocketAddr>()
                        && introduced.insert(addr)
                    {
                        gossip.introduce(addr);
                    }
                }
                cache.set_registry_page(page);
            }
            Err(e) => {
                metrics.registry_error();
                cache.set_feed_live(false);
                if !failing {
                    tracing::warn!(error = %e, "cannot follow the registry's catalog; answering from the cache and gossip");
                    failing = true;
                }
                // At least what the registry asked for (`Retry-After`, e.g. at its cap of
                // blocking queries).
                let pause = backoff.max(e.retry_after().unwrap_or_default());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
