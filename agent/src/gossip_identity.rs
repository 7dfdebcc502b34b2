//! A node speaks only for itself in gossip. Each agent signs every value it gossips with its
//! own key ([`signpost_shared::gossip_sign`]); the registry publishes each agent's public key
//! with its announcement; and before chitchat applies anything a peer sends about a node, the
//! gate here checks it against that node's key. A delta is refused whole (and nothing of it
//! applied) when the node's key is unknown, when a value does not verify for that node, its
//! generation, its address, its key and its version, when it deletes anything (agents never
//! delete a key: a gone instance is a signed empty value, since a deletion carries no
//! signature), or when it would move the node's version past every signed value (which would
//! make every agent ignore the node's next real values).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chitchat::{GatedNodeDelta, NodeDeltaGate};
use signpost_shared::gossip_sign::{NodePublicKey, SignError, Signer};
use signpost_shared::wire::AgentInfo;

use crate::metrics::Metrics;

/// Why a peer's node delta was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The registry has published no key for the node (yet).
    UnknownNode,
    /// A value carries no signature, or one that does not verify.
    BadSignature,
    /// It deletes a key, or says the node collected deleted keys.
    Deletion,
    /// It moves the node's version above every value it carries.
    Version,
}

impl Refusal {
    /// The `reason` label on `signpost_agent_gossip_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownNode => "unknown_node_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::Deletion => "deletion",
            Refusal::Version => "version",
        }
    }
}

/// Checks one peer's node delta against the node's key (`None`: none published).
pub fn check(delta: &GatedNodeDelta<'_>, cluster_id: &str, key: Option<&NodePublicKey>) -> Result<(), Refusal> {
    let key = key.ok_or(Refusal::UnknownNode)?;
    if delta.last_gc_version != 0 || delta.key_values.iter().any(|kv| kv.deleted) {
        return Err(Refusal::Deletion);
    }
    let addr = delta.chitchat_id.gossip_advertise_addr.to_string();
    let signer = Signer { cluster_id, node: &delta.chitchat_id.node_id, generation: delta.chitchat_id.generation_id, gossip_addr: &addr };
    let mut highest = delta.known_max_version;
    for kv in &delta.key_values {
        match key.open_value(&signer, kv.key, kv.version, kv.value) {
            Ok(_) => highest = highest.max(kv.version),
            Err(SignError::Unsigned | SignError::BadSignature | SignError::BadKey(_)) => return Err(Refusal::BadSignature),
        }
    }
    if delta.max_version > highest {
        return Err(Refusal::Version);
    }
    Ok(())
}

/// The public keys of the agents the registry lists, by node.
#[derive(Debug, Default)]
pub struct PeerKeys {
    keys: RwLock<HashMap<String, (String, NodePublicKey)>>,
}

impl PeerKeys {
    /// Takes the keys of `agents`; a key that does not parse is left out (its node's gossip is
    /// refused), one unchanged is not parsed again.
    pub fn update(&self, agents: &[AgentInfo]) {
        let mut keys = match self.keys.write() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next = HashMap::with_capacity(agents.len());
        for agent in agents {
            let Some(text) = &agent.signing_key else { continue };
            match keys.remove(&agent.node) {
                Some((known, key)) if known == *text => {
                    next.insert(agent.node.clone(), (known, key));
                }
                _ => match NodePublicKey::parse(text) {
                    Ok(key) => {
                        next.insert(agent.node.clone(), (text.clone(), key));
                    }
                    Err(e) => tracing::warn!(node = %agent.node, error = %e, "the registry lists a signing key that does not parse"),
                },
            }
        }
        *keys = next;
    }

    /// The key of `node`, if the registry published one.
    pub fn get(&self, node: &str) -> Option<NodePublicKey> {
        let keys = match self.keys.read() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        keys.get(node).map(|(_, key)| *key)
    }
}

/// The gate chitchat runs on every peer's node delta: [`check`] with the node's key from
/// `keys`; each refusal counted by reason.
pub fn gate(cluster_id: String, keys: Arc<PeerKeys>, metrics: Arc<Metrics>) -> NodeDeltaGate {
    Box::new(move |delta: &GatedNodeDelta<'_>| match check(delta, &cluster_id, keys.get(&delta.chitchat_id.node_id).as_ref()) {
        Ok(()) => true,
        Err(refusal) => {
            metrics.gossip_identity_refused(refusal.label());
            tracing::debug!(node = %delta.chitchat_id.node_id, generation = delta.chitchat_id.generation_id, reason = refusal.label(), "refused a peer's gossip about a node");
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use chitchat::{ChitchatId, GatedKeyValue};
    use signpost_shared::gossip_sign::NodeSigningKey;

    use super::*;

    const CLUSTER: &str = "signpost";

    fn id(generation: u64, addr: &str) -> ChitchatId {
        ChitchatId::new("node-a".to_string(), generation, addr.parse::<SocketAddr>().expect("an address"))
    }

    fn signed(key: &NodeSigningKey, id: &ChitchatId, k: &str, version: u64, payload: &str) -> String {
        let addr = id.gossip_advertise_addr.to_string();
        key.sign_value(
            &Signer { cluster_id: CLUSTER, node: &id.node_id, generation: id.generation_id, gossip_addr: &addr },
            k,
            version,
            payload,
        )
    }

    fn delta<'a>(id: &'a ChitchatId, max_version: u64, known: u64, kvs: &'a [(String, String, u64)]) -> GatedNodeDelta<'a> {
        GatedNodeDelta {
            chitchat_id: id,
            last_gc_version: 0,
            max_version,
            known_max_version: known,
            key_values: kvs.iter().map(|(k, v, version)| GatedKeyValue { key: k, value: v, version: *version, deleted: false }).collect(),
        }
    }

    #[test]
    fn only_the_nodes_own_signed_values_pass() {
        let key = NodeSigningKey::generate();
        let public = key.public();
        let genuine = id(7, "10.0.0.1:7302");
        let kvs = vec![("inst:web-1".to_string(), signed(&key, &genuine, "inst:web-1", 3, "{}"), 3)];
        assert_eq!(check(&delta(&genuine, 3, 2, &kvs), CLUSTER, Some(&public)), Ok(()));
        assert_eq!(check(&delta(&genuine, 3, 2, &kvs), CLUSTER, None), Err(Refusal::UnknownNode));

        // The same values under another generation or address (an impersonator), at another
        // version (a replay), or signed by another key: refused.
        let impersonator = id(u64::MAX, "6.6.6.6:7302");
        assert_eq!(check(&delta(&impersonator, 3, 0, &kvs), CLUSTER, Some(&public)), Err(Refusal::BadSignature));
        let replayed = vec![(kvs[0].0.clone(), kvs[0].1.clone(), 9)];
        assert_eq!(check(&delta(&genuine, 9, 3, &replayed), CLUSTER, Some(&public)), Err(Refusal::BadSignature));
        let forged = vec![("inst:web-1".to_string(), signed(&NodeSigningKey::generate(), &genuine, "inst:web-1", 4, "{}"), 4)];
        assert_eq!(check(&delta(&genuine, 4, 3, &forged), CLUSTER, Some(&public)), Err(Refusal::BadSignature));
        let unsigned = vec![("inst:web-1".to_string(), "{}".to_string(), 4)];
        assert_eq!(check(&delta(&genuine, 4, 3, &unsigned), CLUSTER, Some(&public)), Err(Refusal::BadSignature));

        // A version moved past every signed value, a deletion, a collected-deletions mark.
        assert_eq!(check(&delta(&genuine, 1_000, 2, &kvs), CLUSTER, Some(&public)), Err(Refusal::Version));
        assert_eq!(check(&delta(&genuine, 1_000, 2, &[]), CLUSTER, Some(&public)), Err(Refusal::Version));
        let mut deleting = delta(&genuine, 3, 2, &kvs);
        deleting.key_values[0].deleted = true;
        assert_eq!(check(&deleting, CLUSTER, Some(&public)), Err(Refusal::Deletion));
        let collected = GatedNodeDelta { last_gc_version: 2, ..delta(&genuine, 3, 2, &kvs) };
        assert_eq!(check(&collected, CLUSTER, Some(&public)), Err(Refusal::Deletion));
        // Nothing new at the version already known: nothing to refuse.
        assert_eq!(check(&delta(&genuine, 2, 2, &[]), CLUSTER, Some(&public)), Ok(()));
    }

    #[test]
    fn keys_follow_the_registrys_agent_list() {
        let agent = |node: &str, key: Option<String>| AgentInfo {
            node: node.into(),
            gossip_addr: "10.0.0.1:7302".into(),
            http_addr: "10.0.0.1:7301".into(),
            zone: None,
            alive: true,
            updated_at: Default::default(),
            lease_expires_at: Default::default(),
            renewed_at: None,
            signing_key: key,
        };
        let (a, b) = (NodeSigningKey::generate().public(), NodeSigningKey::generate().public());
        let keys = PeerKeys::default();
        keys.update(&[agent("node-a", Some(a.to_string())), agent("node-b", Some("not a key".into())), agent("node-c", None)]);
        assert_eq!((keys.get("node-a"), keys.get("node-b"), keys.get("node-c")), (Some(a), None, None));
        keys.update(&[agent("node-a", Some(b.to_string()))]);
        assert_eq!(keys.get("node-a"), Some(b), "a new key replaces the old one");
        keys.update(&[]);
        assert_eq!(keys.get("node-a"), None, "an agent gone from the list is forgotten");
    }
}
