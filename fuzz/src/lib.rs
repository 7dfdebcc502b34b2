//! The fuzz targets' bodies: each takes the fuzzer's bytes, runs the code that reads that kind
//! of outside input, and asserts what must hold of whatever it accepts. `fuzz_targets/*.rs`
//! run them under libFuzzer (nightly); `agent/tests/fuzz_corpus.rs` replays every seed of
//! `corpus/` through them on stable, in every `cargo test`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::OnceLock;

use chitchat::{ChitchatEnvelope, ChitchatMessage};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use signpost_agent::cache::{self, RegistryView};
use signpost_agent::config::ServiceConfig;
use signpost_agent::gossip::{self, GossipView};
use signpost_agent::gossip_key::Keyring;
use signpost_agent::gossip_seal::{Opener, Refusal, Sealer};
use signpost_agent::gossip_transport::open_datagram;
use signpost_agent::local::{LocalError, LocalState};
use signpost_agent::persist;
use signpost_shared::gossip::{AgentValue, FORMAT_VERSION, GossipInstance, INSTANCE_PREFIX, MAX_VALUE_BYTES};
use signpost_shared::http::ReadQuery;
use signpost_shared::model::{MAX_TTL_S, MAX_WEIGHT, Registration};
use signpost_shared::validate::{self, ValidationErrors};
use signpost_shared::wire::{AgentAnnouncement, BodyError, Heartbeat, Maintenance, parse_json};

/// A target's body: it gets the fuzzer's bytes and panics on a finding.
pub type Target = fn(&[u8]);

/// Every target: its name (also the folder of its seeds under `corpus/`) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("registration", registration),
    ("api_bodies", api_bodies),
    ("gossip_value", gossip_value),
    ("persisted_cache", persisted_cache),
    ("gossip_datagram", gossip_datagram),
];

/// The gossip datagram target's cluster key (base64 of the bytes 1..=32).
pub const KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
/// The gossip datagram target's cluster id.
pub const CLUSTER: &str = "fuzz";
/// The address the target's datagrams are sealed to and its receiver listens on.
pub const RECIPIENT: std::net::SocketAddr = std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7302);
/// The gossip datagram target's clock (2026-01-01T00:00:00Z); a seed sealed a little before
/// it opens.
pub const NOW_MS: u64 = 1_767_225_600_000;

const NODE: &str = "node-1";
const ADDRESS: &str = "10.0.0.1";

// === registration ===

/// `POST /v1/instances`: JSON → [`Registration`] → `validate()`. A body refused as JSON of
/// the wrong shape names a problem; a valid registration, answered and sent again, parses
/// back equal and validates to the same spec.
pub fn registration(data: &[u8]) {
    let Some(registration) = parsed::<Registration>(data) else { return };
    let spec = match registration.validate() {
        Ok(spec) => spec,
        Err(errors) => return refused(&errors),
    };
    assert!(spec.port != 0 && (1..=MAX_WEIGHT).contains(&spec.weight) && (1..=MAX_TTL_S).contains(&spec.ttl_s), "{spec:?}");
    assert!(spec.tags.len() <= validate::MAX_TAGS && spec.meta.len() <= validate::MAX_META, "{spec:?}");
    let again = Registration::from(&spec);
    let json = serde_json::to_vec(&again).expect("a registration serializes");
    let reparsed: Registration = parse_json(&json).expect("a valid registration's JSON parses back");
    assert_eq!(reparsed, again);
    assert_eq!(reparsed.validate().expect("a valid registration validates again"), spec);
}

// === the other API bodies ===

/// The other bodies and strings the HTTP APIs take, each parsed from the same bytes:
/// heartbeat, maintenance and agent announcement (registry); a local service
/// (`POST /v1/agent/services`, then added to a [`LocalState`] as the agent does); a query
/// string; a duration. What validates re-serializes and parses back equal.
pub fn api_bodies(data: &[u8]) {
    round_trip::<Heartbeat>(data, Heartbeat::validate);
    round_trip::<Maintenance>(data, Maintenance::validate);
    round_trip::<AgentAnnouncement>(data, AgentAnnouncement::validate);
    local_service(data);
    if let Ok(text) = std::str::from_utf8(data) {
        read_query(text);
        duration(text);
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8], validate: fn(&T) -> Result<(), ValidationErrors>) {
    let Some(value) = parsed::<T>(data) else { return };
    if let Err(errors) = validate(&value) {
        return refused(&errors);
    }
    let json = serde_json::to_vec(&value).expect("a body serializes");
    let again: T = parse_json(&json).expect("a valid body's JSON parses back");
    assert_eq!(again, value);
    assert!(validate(&again).is_ok(), "{again:?} validated once");
}

/// What `POST /v1/agent/services` does with its body, and what the agent then gossips.
fn local_service(data: &[u8]) {
    let Some(service) = parsed::<ServiceConfig>(data) else { return };
    let mut errors = ValidationErrors::default();
    service.validate_into("service", NODE, ADDRESS, &mut errors);
    if !errors.is_empty() {
        return refused(&errors);
    }
    let spec = match service.registration(NODE, ADDRESS, Some("eu-1")).validate() {
        Ok(spec) => spec,
        Err(errors) => return refused(&errors),
    };
    let json = serde_json::to_vec(&service).expect("a service serializes");
    let again: ServiceConfig = parse_json(&json).expect("a valid service's JSON parses back");
    assert_eq!(again, service);
    let local = LocalState::default();
    match local.upsert(spec.clone(), &service.checks) {
        Ok(()) => assert_eq!(local.services().first().map(|s| &s.spec), Some(&spec)),
        Err(LocalError::DuplicateCheck(_)) => return,
        Err(other) => panic!("adding a valid service failed: {other}"),
    }
    // What this agent publishes, its peers accept (or it is too large to publish at all).
    let published = GossipInstance {
        v: FORMAT_VERSION,
        service: spec.service.clone(),
        address: spec.address.clone(),
        port: spec.port,
        tags: spec.tags.clone(),
        meta: spec.meta.clone(),
        weight: spec.weight,
        zone: spec.zone.clone(),
        health: signpost_shared::Health::Passing,
        output: Some(GossipInstance::clip_output("HTTP 200 OK\n")),
    };
    if let Ok(text) = signpost_shared::gossip::encode(&published) {
        assert_eq!(GossipInstance::decode(&spec.id, &text), Ok(published), "a peer refuses what a valid service publishes");
    }
}

fn read_query(text: &str) {
    const ALL: [&str; 5] = ["health", "tag", "zone", "index", "wait"];
    let Ok(query) = ReadQuery::parse(text, &ALL) else { return };
    assert!(query.tags.len() <= validate::MAX_TAGS, "{query:?}");
    assert!(query.tags.iter().all(|t| validate::text(t, validate::MAX_TAG_LEN, false).is_ok()), "{query:?}");
    assert!(query.zone.as_deref().is_none_or(|z| validate::dns_label(z).is_ok()), "{query:?}");
}

fn duration(text: &str) {
    use signpost_shared::duration::{format, parse};
    if let Ok(duration) = parse(text) {
        assert_eq!(parse(&format(duration)), Ok(duration), "{text:?} formats as {:?}", format(duration));
    }
}

// === gossip values ===

/// A peer's node state as the agent reads it ([`gossip::peer_from_values`]), from lines:
/// the node id, its `agent` value, then key and value lines (`inst:{id}` keys are read), each
/// value as it sits in the state (signature, dot, payload; or the payload alone).
/// Whatever decodes re-encodes within the size limit and decodes equal; a peer's instances
/// are exactly its values that decode on their own; merged into the cache, they stay the
/// peer's.
pub fn gossip_value(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let node = lines.next().unwrap_or_default();
    let agent = lines.next();
    let rest: Vec<&str> = lines.collect();
    // A node state holds each key once; the last value set wins.
    let values: BTreeMap<&str, &str> = rest.chunks(2).map(|kv| (kv[0], kv.get(1).copied().unwrap_or_default())).collect();

    if let Some(agent) = agent.and_then(gossip::stored_payload)
        && let Ok(value) = AgentValue::decode(agent)
    {
        let text = signpost_shared::gossip::encode(&value).expect("a decoded agent value re-encodes within the limit");
        assert_eq!(AgentValue::decode(&text), Ok(value));
    }
    let mut each = BTreeMap::new();
    for (key, value) in &values {
        let Some(id) = key.strip_prefix(INSTANCE_PREFIX) else { continue };
        let Some(value) = gossip::stored_payload(value) else { continue };
        if let Ok(instance) = GossipInstance::decode(id, value) {
            let text = signpost_shared::gossip::encode(&instance).expect("a decoded instance re-encodes within the limit");
            assert!(text.len() <= MAX_VALUE_BYTES);
            assert_eq!(GossipInstance::decode(id, &text).as_ref(), Ok(&instance));
            each.insert(id.to_string(), std::sync::Arc::new(instance));
        }
    }

    let mut refused = Vec::new();
    let peer = gossip::peer_from_values(node, agent, values.iter().map(|(k, v)| (*k, *v)), |key, _| refused.push(key.to_string()));
    let Some(peer) = peer else {
        assert!(refused.len() <= 1, "a refused node stops at its first problem: {refused:?}");
        return;
    };
    assert_eq!(peer.instances, each, "the peer's instances are the values that decode");
    let bad = values
        .iter()
        .filter(|(k, v)| {
            k.starts_with(INSTANCE_PREFIX) && gossip::stored_payload(v).is_some() && !each.contains_key(&k[INSTANCE_PREFIX.len()..])
        })
        .count();
    assert_eq!(refused.len(), bad, "every refused value is reported once: {refused:?}");

    let gossip_view = GossipView { live: [(node.to_string(), peer.clone())].into(), ..Default::default() };
    let merged = cache::merge(&RegistryView::default(), &gossip_view, &mut Default::default(), chrono::Utc::now(), &mut Default::default());
    let ids: Vec<&str> = merged.values().flatten().map(|i| i.id.as_str()).collect();
    assert_eq!(ids.len(), peer.instances.len());
    for instance in merged.values().flatten() {
        assert_eq!(instance.node.as_deref(), Some(node));
        assert!(peer.instances.contains_key(&instance.id));
    }
}

// === the saved cache ===

/// The agent's saved catalog file ([`persist::decode`]), as given and as the body of a
/// well-formed header (so that the fuzzer reaches bincode past the checksum). A file that
/// decodes re-encodes to the same view, and that encoding is stable.
pub fn persisted_cache(data: &[u8]) {
    for bytes in [data.to_vec(), framed(data)] {
        let Ok(view) = persist::decode(&bytes) else { continue };
        let at = DateTime::<Utc>::from_timestamp_millis(NOW_MS as i64).unwrap_or_default();
        let encoded = persist::encode(&view, at).expect("a decoded view encodes");
        let again = persist::decode(&encoded).expect("an encoded view decodes");
        assert_eq!(again.index, 0, "a loaded view starts the feed from scratch");
        assert_eq!(again.self_preservation, view.self_preservation);
        assert_eq!(again.confirmed_at, view.confirmed_at);
        assert_eq!(again.instances, view.instances);
        assert_eq!(again.agents, view.agents);
        assert_eq!(persist::encode(&again, at).expect("encodes"), encoded, "the encoding is stable");
    }
}

/// `body` behind a valid header of the saved-cache format.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = b"SPC\0".to_vec();
    bytes.extend_from_slice(&persist::FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

// === gossip datagrams ===

/// The target's keyring.
pub fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| Keyring::parse(&[KEY]).expect("the fuzz key parses"))
}

/// A datagram from the network, through the agent's transport ([`open_datagram`]): as
/// received by an agent with the cluster key and by one without, and sealed by a member.
/// An opened envelope re-serializes and reads back equal; a sealed datagram opens to exactly
/// its bytes, once, and not with a byte changed; sealed or not, the same bytes make the same
/// envelope.
pub fn gossip_datagram(data: &[u8]) {
    let keys = keyring();
    let mut opener = Opener::new(CLUSTER, &[RECIPIENT]);
    if let Ok(envelope) = open_datagram(Some((&mut opener, keys)), &mut data.to_vec(), NOW_MS) {
        reserializes(&envelope);
        let replay = open_datagram(Some((&mut opener, keys)), &mut data.to_vec(), NOW_MS);
        assert!(matches!(replay, Err(Refusal::Replayed)), "a datagram opened twice: {replay:?}");
    }
    let plain = open_datagram(None, &mut data.to_vec(), NOW_MS);
    if let Ok(envelope) = &plain {
        reserializes(envelope);
    }
    if data.len() > chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE {
        return;
    }
    let mut sealed = Vec::new();
    Sealer::new(CLUSTER).seal(keys, RECIPIENT, data, NOW_MS - 1, &mut sealed);
    let mut opener = Opener::new(CLUSTER, &[RECIPIENT]);
    assert_eq!(opener.open(keys, &mut sealed.clone(), NOW_MS), Ok(data));
    let through = open_datagram(Some((&mut Opener::new(CLUSTER, &[RECIPIENT]), keys)), &mut sealed.clone(), NOW_MS);
    match (&through, &plain) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(Refusal::Malformed), Err(Refusal::Malformed)) => {}
        other => panic!("sealed and plain disagree: {other:?}"),
    }
    let at = 1 + data.len() % (sealed.len() - 1);
    sealed[at] ^= 1 << (data.len() % 8);
    let changed = Opener::new(CLUSTER, &[RECIPIENT]).open(keys, &mut sealed, NOW_MS);
    assert_eq!(changed, Err(Refusal::Unauthenticated));
}

/// chitchat's delta encoding is not canonical: a delta keeps the length it was read with and
/// asserts it when written again, which a different (valid) encoding of the same operations
/// fails. chitchat never writes a received delta again (nor does Signpost), so only the
/// envelopes without one are written back; a delta is checked to read without panicking.
fn reserializes(envelope: &ChitchatEnvelope) {
    if matches!(envelope.message, ChitchatMessage::SynAck { .. } | ChitchatMessage::Ack { .. }) {
        return;
    }
    let mut bytes = Vec::new();
    envelope.serialize(&mut bytes);
    let again = ChitchatEnvelope::deserialize(&mut bytes.as_slice()).expect("a re-serialized envelope reads back");
    assert_eq!(&again, envelope);
}

// === shared ===

/// Parses a JSON body as the APIs do; a body refused for its shape names a problem.
fn parsed<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    match parse_json::<T>(data) {
        Ok(value) => Some(value),
        Err(BodyError::Invalid(errors)) => {
            refused(&errors);
            None
        }
        Err(BodyError::Malformed(message)) => {
            assert!(!message.is_empty());
            None
        }
    }
}

/// A refusal names at least one field and problem.
fn refused(errors: &ValidationErrors) {
    assert!(!errors.is_empty() && errors.0.iter().all(|e| !e.field.is_empty() && !e.problem.is_empty()), "{errors:?}");
}
