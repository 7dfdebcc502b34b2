//! An attacker's toolkit: chitchat datagrams written byte by byte, as a hostile peer would,
//! without chitchat's own builders (which refuse to make what an attacker sends). The format
//! is chitchat 0.13's V0 wire format: an envelope (magic, protocol version, message type),
//! a digest (node count, then per node its id and heartbeat and versions), and a delta as a
//! stream of blocks (compressed or not) of operations (node, key-value, max version).

use std::net::{IpAddr, SocketAddr};

const MAGIC: u16 = 45_139;
const PROTOCOL_V0: u8 = 0;

/// Message types.
const SYN: u8 = 0;
const SYN_ACK: u8 = 1;
const ACK: u8 = 2;

/// Block types of a delta stream.
const NO_MORE_BLOCKS: u8 = 0;
const COMPRESSED: u8 = 1;
const UNCOMPRESSED: u8 = 2;

/// Delta operation tags.
const OP_NODE: u8 = 0;
const OP_KEY_VALUE: u8 = 1;
const OP_SET_MAX_VERSION: u8 = 2;

/// A chitchat node identity: name, generation, gossip address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    /// The node's name (Signpost's node name).
    pub name: String,
    /// Its generation (a restarted node has a higher one).
    pub generation: u64,
    /// Where it gossips.
    pub addr: SocketAddr,
}

/// One digest entry: a node and what the sender says it knows of it.
#[derive(Debug, Clone)]
pub struct DigestEntry {
    /// The node.
    pub node: NodeId,
    /// Its heartbeat.
    pub heartbeat: u64,
    /// The last version garbage-collected.
    pub last_gc_version: u64,
    /// The highest version known.
    pub max_version: u64,
}

/// One operation of a delta.
#[derive(Debug, Clone)]
pub enum Op {
    /// The operations after it are of this node, from `from_version` (excluded).
    Node { node: NodeId, last_gc_version: u64, from_version: u64 },
    /// A key set (or deleted) at a version.
    KeyValue { key: String, value: String, version: u64, deleted: bool },
    /// The node's max version.
    SetMaxVersion(u64),
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("a string of at most 65535 bytes");
    buf.extend(len.to_le_bytes());
    buf.extend(s.as_bytes());
}

fn put_node(buf: &mut Vec<u8>, node: &NodeId) {
    put_str(buf, &node.name);
    buf.extend(node.generation.to_le_bytes());
    match node.addr.ip() {
        IpAddr::V4(ip) => {
            buf.push(4);
            buf.extend(ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.push(6);
            buf.extend(ip.octets());
        }
    }
    buf.extend(node.addr.port().to_le_bytes());
}

fn put_digest(buf: &mut Vec<u8>, digest: &[DigestEntry]) {
    buf.extend(u16::try_from(digest.len()).expect("at most 65535 nodes").to_le_bytes());
    for entry in digest {
        put_node(buf, &entry.node);
        buf.extend(entry.heartbeat.to_le_bytes());
        buf.extend(entry.last_gc_version.to_le_bytes());
        buf.extend(entry.max_version.to_le_bytes());
    }
}

/// The bytes of `ops`, uncompressed.
pub fn ops_bytes(ops: &[Op]) -> Vec<u8> {
    let mut buf = Vec::new();
    for op in ops {
        match op {
            Op::Node { node, last_gc_version, from_version } => {
                buf.push(OP_NODE);
                put_node(&mut buf, node);
                buf.extend(last_gc_version.to_le_bytes());
                buf.extend(from_version.to_le_bytes());
            }
            Op::KeyValue { key, value, version, deleted } => {
                buf.push(OP_KEY_VALUE);
                put_str(&mut buf, key);
                put_str(&mut buf, value);
                buf.extend(version.to_le_bytes());
                buf.push(u8::from(*deleted));
            }
            Op::SetMaxVersion(version) => {
                buf.push(OP_SET_MAX_VERSION);
                buf.extend(version.to_le_bytes());
            }
        }
    }
    buf
}

/// A delta stream of `blocks`: each `(compressed, bytes)` is one block, its bytes already
/// compressed (zstd) when `compressed`.
pub fn delta_stream(blocks: &[(bool, Vec<u8>)]) -> Vec<u8> {
    let mut buf = Vec::new();
    for (compressed, bytes) in blocks {
        buf.push(if *compressed { COMPRESSED } else { UNCOMPRESSED });
        buf.extend(u16::try_from(bytes.len()).expect("a block of at most 65535 bytes").to_le_bytes());
        buf.extend(bytes);
    }
    buf.push(NO_MORE_BLOCKS);
    buf
}

/// The delta of `ops` in one uncompressed block.
pub fn delta(ops: &[Op]) -> Vec<u8> {
    delta_stream(&[(false, ops_bytes(ops))])
}

fn envelope(message_type: u8) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend(MAGIC.to_le_bytes());
    buf.push(PROTOCOL_V0);
    buf.push(message_type);
    buf
}

/// A Syn of cluster `cluster_id` with `digest`.
pub fn syn(cluster_id: &str, digest: &[DigestEntry]) -> Vec<u8> {
    let mut buf = envelope(SYN);
    put_digest(&mut buf, digest);
    put_str(&mut buf, cluster_id);
    buf
}

/// A SynAck with `digest` and a delta stream (as made by [`delta`] or [`delta_stream`]).
pub fn syn_ack(digest: &[DigestEntry], delta_stream: &[u8]) -> Vec<u8> {
    let mut buf = envelope(SYN_ACK);
    put_digest(&mut buf, digest);
    buf.extend(delta_stream);
    buf
}

/// An Ack with a delta stream.
pub fn ack(delta_stream: &[u8]) -> Vec<u8> {
    let mut buf = envelope(ACK);
    buf.extend(delta_stream);
    buf
}

/// The node ids of a received Syn's or SynAck's digest (V0), or None when it is not one.
pub fn digest_nodes(datagram: &[u8]) -> Option<Vec<NodeId>> {
    let mut r = Reader(datagram);
    if r.u16()? != MAGIC || r.u8()? != PROTOCOL_V0 || !matches!(r.u8()?, SYN | SYN_ACK) {
        return None;
    }
    let count = r.u16()?;
    let mut nodes = Vec::new();
    for _ in 0..count {
        let name = r.str()?;
        let generation = r.u64()?;
        let ip: IpAddr = match r.u8()? {
            4 => <[u8; 4]>::try_from(r.take(4)?).ok()?.into(),
            6 => <[u8; 16]>::try_from(r.take(16)?).ok()?.into(),
            _ => return None,
        };
        let port = r.u16()?;
        r.take(24)?;
        nodes.push(NodeId { name, generation, addr: SocketAddr::new(ip, port) });
    }
    Some(nodes)
}

/// Whether a datagram is a plain Syn.
pub fn is_syn(datagram: &[u8]) -> bool {
    datagram.len() > 3 && u16::from_le_bytes([datagram[0], datagram[1]]) == MAGIC && datagram[3] == SYN
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let len = usize::from(self.u16()?);
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use chitchat::{ChitchatEnvelope, ChitchatMessage};

    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId { name: name.into(), generation: 7, addr: SocketAddr::from(([10, 0, 0, 1], 7302)) }
    }

    /// What the toolkit writes is what chitchat reads.
    #[test]
    fn chitchat_reads_what_is_crafted() {
        let entry = DigestEntry { node: node("a"), heartbeat: 3, last_gc_version: 0, max_version: 2 };
        let syn_bytes = syn("signpost", std::slice::from_ref(&entry));
        let ChitchatMessage::Syn { cluster_id, .. } = ChitchatEnvelope::deserialize(&mut &syn_bytes[..]).expect("a Syn").message else {
            panic!("not a Syn")
        };
        assert_eq!(cluster_id, "signpost");
        assert!(is_syn(&syn_bytes));
        assert_eq!(digest_nodes(&syn_bytes), Some(vec![node("a")]));

        let ops = [
            Op::Node { node: node("a"), last_gc_version: 0, from_version: 0 },
            Op::KeyValue { key: "k".into(), value: "v".into(), version: 1, deleted: false },
            Op::SetMaxVersion(2),
        ];
        let syn_ack_bytes = syn_ack(&[entry], &delta(&ops));
        let message = ChitchatEnvelope::deserialize(&mut &syn_ack_bytes[..]).expect("a SynAck").message;
        assert!(matches!(message, ChitchatMessage::SynAck { .. }), "{message:?}");
        let compressed = zstd::bulk::compress(&ops_bytes(&ops), 3).expect("compress");
        let ack_bytes = ack(&delta_stream(&[(true, compressed)]));
        let message = ChitchatEnvelope::deserialize(&mut &ack_bytes[..]).expect("an Ack").message;
        assert!(matches!(message, ChitchatMessage::Ack { .. }), "{message:?}");
    }
}
