//! Evidence that an owner agent lives, for the merge rule's instances whose owner is not live
//! in this agent's gossip: when gossip saw it die (remembered after gossip forgets it), and
//! when it last renewed its announcement at the registry. Pure: no I/O, the time is passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use signpost_shared::wire::{AgentsPage, renewal_window};

/// What the evidence says of an owner that is not live in gossip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Believe the registry: a fresh renewal vouches for it (newer than its death, if it
    /// died), or gossip has not had time to find it since this agent started.
    Believe,
    /// Gossip saw it die at this time and nothing fresher says it lives.
    Dead(DateTime<Utc>),
    /// Gossip never saw it alive and the registry has no fresh renewal of it.
    Unconfirmed,
}

/// Deaths seen in gossip and renewals reported by the registry, by node.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// Until when owners gossip has not found yet are believed on the registry's word.
    settled_at: DateTime<Utc>,
    /// When gossip saw each node die (left the live set, or found dead), kept after gossip
    /// forgets the node, until it is alive again or owns nothing.
    deaths: HashMap<String, DateTime<Utc>>,
    /// When each node last renewed at the registry, in this agent's clock, as last asked.
    renewals: HashMap<String, DateTime<Utc>>,
}

impl Evidence {
    /// Evidence of an agent started at `started`, which gives gossip `settle` to find the
    /// live owners before it asks the registry to vouch for the others.
    pub fn new(started: DateTime<Utc>, settle: Duration) -> Self {
        let settle = TimeDelta::from_std(settle).unwrap_or(TimeDelta::MAX);
        Evidence { settled_at: started.checked_add_signed(settle).unwrap_or(started), deaths: HashMap::new(), renewals: HashMap::new() }
    }

    /// Records what gossip says now: nodes that left the live set since `was_live`, or that
    /// the failure detector holds dead, died now (unless already recorded); live ones are not
    /// dead. Deaths of nodes that own nothing (`owners`) and are no longer dead in gossip are
    /// forgotten, so that the memory follows the catalog.
    pub fn observe_gossip<'a>(
        &mut self,
        was_live: impl IntoIterator<Item = &'a String>,
        live: &BTreeMap<String, impl Sized>,
        dead: &'a BTreeSet<String>,
        now: DateTime<Utc>,
    ) {
        for node in was_live.into_iter().filter(|n| !live.contains_key(*n)).chain(dead) {
            self.deaths.entry(node.clone()).or_insert(now);
        }
        self.deaths.retain(|node, _| !live.contains_key(node));
    }

    /// Forgets the deaths of nodes that own no instance (in `owners`) and gossip no longer
    /// holds dead.
    pub fn forget_unowned(&mut self, owners: &BTreeSet<&str>, dead: &BTreeSet<String>) {
        self.deaths.retain(|node, _| owners.contains(node.as_str()) || dead.contains(node));
    }

    /// Replaces the renewals with what the registry answered (`pages`) at `local_now` (this
    /// agent's clock): each page's own clock says how long ago each renewal was, so the two
    /// clocks need not agree.
    pub fn set_renewals(&mut self, pages: &[AgentsPage], local_now: DateTime<Utc>) {
        self.renewals = pages
            .iter()
            .flat_map(|page| page.agents.iter().map(move |agent| (page.now, agent)))
            .filter_map(|(registry_now, agent)| {
                let renewed = agent.renewed_at?;
                let ago = registry_now.map_or(TimeDelta::zero(), |now| (now - renewed).max(TimeDelta::zero()));
                Some((agent.node.clone(), local_now - ago))
            })
            .collect();
    }

    /// Whether owners gossip has not found are still believed on the registry's word alone.
    pub fn settling(&self, now: DateTime<Utc>) -> bool {
        now < self.settled_at
    }

    /// The verdict on `node`, an owner not live in gossip, whose instances have a lease of
    /// `lease_ttl_s` (its agent renews at the period that lease implies).
    pub fn verdict(&self, node: &str, lease_ttl_s: u32, now: DateTime<Utc>) -> Verdict {
        let window = TimeDelta::from_std(renewal_window(lease_ttl_s)).unwrap_or(TimeDelta::MAX);
        let fresh = self.renewals.get(node).filter(|renewed| now - **renewed <= window);
        match self.deaths.get(node) {
            Some(death) if fresh.is_some_and(|renewed| renewed > death) => Verdict::Believe,
            Some(death) => Verdict::Dead(*death),
            None if self.settling(now) || fresh.is_some() => Verdict::Believe,
            None => Verdict::Unconfirmed,
        }
    }
}

impl Default for Evidence {
    fn default() -> Self {
        Evidence::new(Utc::now(), Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_shared::wire::AgentInfo;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    fn page(registry_now: DateTime<Utc>, renewals: &[(&str, DateTime<Utc>)]) -> AgentsPage {
        let agent = |node: &str, renewed: DateTime<Utc>| AgentInfo {
            node: node.into(),
            gossip_addr: "10.0.0.1:7302".into(),
            http_addr: "10.0.0.1:7301".into(),
            zone: None,
            alive: true,
            updated_at: renewed,
            lease_expires_at: renewed,
            renewed_at: Some(renewed),
            signing_key: None,
        };
        AgentsPage { index: 1, agents: renewals.iter().map(|(n, r)| agent(n, *r)).collect(), now: Some(registry_now) }
    }

    const LEASE: u32 = 30; // renews every 5 s: a renewal is fresh for 15 s

    #[test]
    fn a_dead_owner_stays_dead_after_gossip_forgets_it_until_it_renews() {
        let mut evidence = Evidence::new(at(0), Duration::from_secs(3));
        let live: BTreeMap<String, ()> = BTreeMap::new();
        let was_live = ["n1".to_string()];
        evidence.set_renewals(&[page(at(9), &[("n1", at(9))])], at(9));
        evidence.observe_gossip(&was_live, &live, &BTreeSet::new(), at(10));
        assert_eq!(evidence.verdict("n1", LEASE, at(11)), Verdict::Dead(at(10)), "a renewal before the death is no evidence");
        // Gossip forgot it: still dead.
        evidence.observe_gossip(&[], &live, &BTreeSet::new(), at(100));
        assert_eq!(evidence.verdict("n1", LEASE, at(100)), Verdict::Dead(at(10)));
        // A renewal after the death heals it while it is fresh.
        evidence.set_renewals(&[page(at(101), &[("n1", at(101))])], at(101));
        assert_eq!(evidence.verdict("n1", LEASE, at(102)), Verdict::Believe);
        assert_eq!(evidence.verdict("n1", LEASE, at(130)), Verdict::Dead(at(10)), "evidence ages");
        // Alive in gossip again: no longer dead.
        evidence.observe_gossip(&[], &BTreeMap::from([("n1".to_string(), ())]), &BTreeSet::new(), at(131));
        evidence.set_renewals(&[page(at(131), &[])], at(131));
        assert_eq!(evidence.verdict("n1", LEASE, at(132)), Verdict::Unconfirmed);
    }

    #[test]
    fn an_owner_gossip_never_saw_is_believed_only_while_settling_or_on_a_fresh_renewal() {
        let mut evidence = Evidence::new(at(0), Duration::from_secs(3));
        assert_eq!(evidence.verdict("far", LEASE, at(2)), Verdict::Believe, "gossip is still finding its peers");
        assert_eq!(evidence.verdict("far", LEASE, at(4)), Verdict::Unconfirmed, "a lease that has not run out is no evidence");
        evidence.set_renewals(&[page(at(10), &[("far", at(8))])], at(10));
        assert_eq!(evidence.verdict("far", LEASE, at(10)), Verdict::Believe);
        assert_eq!(evidence.verdict("far", LEASE, at(24)), Verdict::Unconfirmed, "15 s after its renewal");
    }

    #[test]
    fn renewals_are_read_in_the_local_clock() {
        let mut evidence = Evidence::new(at(0), Duration::ZERO);
        // This agent's clock is an hour behind the registry's; the renewal was 4 s ago.
        let registry_now = at(3600);
        evidence.set_renewals(&[page(registry_now, &[("a", registry_now - TimeDelta::seconds(4))])], at(0));
        assert_eq!(evidence.renewals["a"], at(-4));
        assert_eq!(evidence.verdict("a", LEASE, at(1)), Verdict::Believe);
    }

    #[test]
    fn deaths_of_nodes_that_own_nothing_are_forgotten() {
        let mut evidence = Evidence::new(at(0), Duration::ZERO);
        evidence.observe_gossip(&[], &BTreeMap::<String, ()>::new(), &BTreeSet::from(["gone".to_string(), "owner".to_string()]), at(1));
        evidence.forget_unowned(&BTreeSet::from(["owner"]), &BTreeSet::new());
        assert_eq!(evidence.verdict("owner", LEASE, at(2)), Verdict::Dead(at(1)));
        assert_eq!(evidence.verdict("gone", LEASE, at(2)), Verdict::Unconfirmed);
    }
}
