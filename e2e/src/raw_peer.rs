//! A raw chitchat node run by a test over real UDP, outside any agent: to play a peer that
//! sends what no agent would. It can claim any chitchat id, and it signs its values as an
//! agent does ([`signpost_shared::gossip_sign`]) with a key of its own, which it may announce
//! to the registry under its node name (then agents believe what it signs for that name, as
//! for a compromised host) or keep to itself (then agents refuse it, as any stranger).

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::Transport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use signpost_shared::client::RegistryClient;
use signpost_shared::gossip_sign::{NodeSigningKey, Signer};
use signpost_shared::wire::AgentAnnouncement;

/// A raw chitchat node and its signing key.
pub struct RawPeer {
    handle: ChitchatHandle,
    key: NodeSigningKey,
    cluster_id: String,
}

/// The chitchat settings of a raw peer named `node` (generation `generation`) of `cluster`,
/// on a free loopback port, gossiping to `seed` every 100 ms.
pub fn raw_config(node: &str, generation: u64, cluster: &str, seed: SocketAddr) -> ChitchatConfig {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = udp.local_addr().expect("addr");
    drop(udp);
    ChitchatConfig {
        chitchat_id: ChitchatId::new(node.to_string(), generation, addr),
        cluster_id: cluster.to_string(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: addr,
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: FailureDetectorConfig { initial_interval: Duration::from_millis(100), ..Default::default() },
        marked_for_deletion_grace_period: Duration::from_secs(600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
        node_delta_gate: None,
    }
}

impl RawPeer {
    /// Starts chitchat with `config` over `transport`, with a new signing key and no values.
    pub async fn start(config: ChitchatConfig, transport: &dyn Transport) -> RawPeer {
        let cluster_id = config.cluster_id.clone();
        let handle = spawn_chitchat(config, Vec::new(), transport).await.expect("start chitchat");
        RawPeer { handle, key: NodeSigningKey::generate(), cluster_id }
    }

    /// Its chitchat id.
    pub fn id(&self) -> &ChitchatId {
        self.handle.chitchat_id()
    }

    /// Announces its node name to the registry with its key, as an agent holding a token
    /// would: agents then believe what it signs for that name.
    pub async fn announce(&self, registry: &RegistryClient) {
        let id = self.id();
        let announcement = AgentAnnouncement {
            gossip_addr: id.gossip_advertise_addr.to_string(),
            http_addr: "127.0.0.1:1".into(),
            zone: None,
            ttl_s: Some(600),
            signing_key: Some(self.key.public().to_string()),
        };
        registry.announce(&id.node_id, &announcement).await.expect("announce the raw peer");
    }

    /// Sets `key` to `payload`, signed with its key over the version chitchat gives it.
    pub async fn set(&self, key: &str, payload: &str) {
        self.set_raw(key, payload, true).await;
    }

    /// Sets `key` to `payload` as it is, without a signature.
    pub async fn set_unsigned(&self, key: &str, payload: &str) {
        self.set_raw(key, payload, false).await;
    }

    async fn set_raw(&self, key: &str, payload: &str, signed: bool) {
        let (signing, cluster_id) = (&self.key, self.cluster_id.as_str());
        self.handle
            .with_chitchat(|chitchat| {
                let id = chitchat.self_chitchat_id().clone();
                let addr = id.gossip_advertise_addr.to_string();
                let signer = Signer { cluster_id, node: &id.node_id, generation: id.generation_id, gossip_addr: &addr };
                chitchat.self_node_state().set_with_own_version(key, |version| match signed {
                    true => signing.sign_value(&signer, key, version, payload),
                    false => payload.to_string(),
                });
            })
            .await;
    }

    /// Deletes `key` (a tombstone at a new version, as chitchat gossips a deletion).
    pub async fn delete(&self, key: &str) {
        self.handle.with_chitchat(|chitchat| chitchat.self_node_state().delete(key)).await;
    }

    /// Stops it.
    pub async fn stop(self) {
        let _ = self.handle.shutdown().await;
    }
}
