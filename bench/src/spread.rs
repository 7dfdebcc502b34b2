//! Heartbeats spread over several replicas of one registry (`heartbeat --also-url`): worker
//! `i` sends all its heartbeats to URL `i mod n`, so each replica gets an equal share of the
//! connections, as agents pinned to one replica each would give it.

use std::sync::Arc;

use anyhow::bail;

use crate::fleet::Fleet;
use crate::load::{Outcome, Session};

/// One worker's heartbeats, all to one replica.
pub struct Spread {
    client: reqwest::Client,
    /// The replica's base URL, without a trailing `/`.
    base: Arc<str>,
    fleet: Arc<Fleet>,
}

impl Session for Spread {
    fn send(&mut self, seq: u64) -> impl std::future::Future<Output = Outcome> + Send {
        let id = self.fleet.instance_id(seq % self.fleet.instances);
        crate::load::send(self.client.put(format!("{}/v1/instances/{id}/heartbeat", self.base)))
    }
}

/// A factory of heartbeat sessions sharing `client`: the first worker goes to `urls[0]`, the
/// second to `urls[1]`, and so on round-robin.
pub fn sessions(client: reqwest::Client, urls: &[String], fleet: Fleet) -> anyhow::Result<impl FnMut() -> Spread + use<>> {
    if urls.is_empty() {
        bail!("no URL to send heartbeats to");
    }
    let bases: Vec<Arc<str>> = urls.iter().map(|url| Arc::from(url.trim_end_matches('/'))).collect();
    let fleet = Arc::new(fleet);
    let mut next = bases.into_iter().cycle();
    Ok(move || {
        // The cycle over a non-empty list never ends.
        let base = next.next().unwrap_or_else(|| Arc::from(""));
        Spread { client: client.clone(), base, fleet: fleet.clone() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_take_the_urls_in_turn() {
        let fleet = Fleet { prefix: "bench".into(), instances: 10, per_service: 10 };
        let urls = ["http://a:1/".to_owned(), "http://b:2".to_owned()];
        let mut make = sessions(reqwest::Client::new(), &urls, fleet).expect("two urls");
        let bases: Vec<String> = (0..5).map(|_| make().base.to_string()).collect();
        assert_eq!(bases, ["http://a:1", "http://b:2", "http://a:1", "http://b:2", "http://a:1"]);
        let fleet = Fleet { prefix: "bench".into(), instances: 10, per_service: 10 };
        assert!(sessions(reqwest::Client::new(), &[], fleet).is_err());
    }
}
