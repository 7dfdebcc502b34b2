//! Sealing gossip datagrams: every chitchat envelope an agent sends is encrypted and
//! authenticated with the cluster key (XChaCha20-Poly1305, a fresh random 24-byte nonce per
//! datagram), bound to the cluster id and to the address it is sent to, and stamped with the
//! sender's clock, so that a datagram that was not sealed by a member of this cluster, was
//! changed, or was captured and sent again (to the same member or to another) is dropped
//! before chitchat sees it.
//!
//! A sealed datagram is `[version = 2][recipient: 18][nonce: 24][ciphertext of (unix ms: u64
//! LE ‖ envelope) + tag: 16]`, with `"signpost-gossip/2" ‖ cluster id ‖ 0 ‖ recipient` as
//! associated data. The recipient is the address the sender sent it to (IPv6, or IPv4 mapped
//! into IPv6, 16 bytes, then the port big-endian); a receiver takes only what is addressed to
//! one of its own addresses (its gossip advertise and listen addresses), so a datagram
//! captured on its way to one member means nothing to another.
//!
//! Replays: a receiver accepts a datagram stamped within [`MAX_CLOCK_SKEW`] of its own clock
//! and remembers (stamp, nonce) of each one it accepted until the stamp is older than that;
//! the same datagram again is refused. The memory is bounded ([`MAX_REMEMBERED`]): when full,
//! the oldest entry is forgotten and nothing stamped at or before it is accepted any more.
//! The memory does not outlive the process, so an agent's transport opens with a floor at its
//! start ([`Opener::starting_at`]): a datagram captured before a restart is refused after it
//! (a peer whose clock is behind by some seconds is heard that much later after a restart).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadCore, AeadInPlace, OsRng};
use chacha20poly1305::{Tag, XNonce};

use crate::gossip_key::Keyring;

/// Format version, the first byte of every sealed datagram.
pub const VERSION: u8 = 2;
const RECIPIENT_LEN: usize = 18;
const NONCE_LEN: usize = 24;
const STAMP_LEN: usize = 8;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + RECIPIENT_LEN + NONCE_LEN;

/// Bytes sealing adds to an envelope.
pub const OVERHEAD: usize = HEADER_LEN + STAMP_LEN + TAG_LEN;

/// Largest sealed datagram: the largest envelope chitchat builds, sealed.
pub const MAX_SEALED_LEN: usize = chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE + OVERHEAD;

/// How far a sender's clock may be from the receiver's (agents' clocks must be kept in sync
/// within this, as NTP does).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Most (stamp, nonce) pairs remembered against replays.
pub const MAX_REMEMBERED: usize = 200_000;

const AAD_PREFIX: &[u8] = b"signpost-gossip/2";

// The transport relies on chitchat leaving room for the seal in every datagram.
const _: () = assert!(OVERHEAD <= chitchat::TRANSPORT_RESERVED_LEN);

/// Why a datagram was dropped; each is counted under its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    /// Shorter than the smallest sealed datagram.
    #[error("truncated")]
    Truncated,
    /// Longer than the largest datagram a member sends.
    #[error("oversized")]
    Oversized,
    /// No key of this agent opens it for this cluster: another cluster, another key, a
    /// changed byte, or not sealed at all.
    #[error("unauthenticated")]
    Unauthenticated,
    /// Sealed by a member, but stamped too far from this agent's clock (an old capture, or a
    /// sender whose clock is off).
    #[error("stale")]
    Stale,
    /// Already received once.
    #[error("replayed")]
    Replayed,
    /// Addressed to another address than this agent's own: a datagram captured on its way to
    /// another member (or a peer that reaches this agent at an address it does not advertise).
    #[error("misaddressed")]
    Misaddressed,
    /// Authentic, but not a chitchat envelope this agent can read.
    #[error("malformed")]
    Malformed,
    /// A reply (SynAck, Ack, BadCluster) to nothing this agent sent to that address, or a
    /// second one: see [`crate::gossip_replies`].
    #[error("unsolicited")]
    Unsolicited,
}

impl Refusal {
    /// Every reason, for metrics.
    pub const ALL: [Refusal; 8] = [
        Refusal::Truncated,
        Refusal::Oversized,
        Refusal::Unauthenticated,
        Refusal::Misaddressed,
        Refusal::Stale,
        Refusal::Replayed,
        Refusal::Malformed,
        Refusal::Unsolicited,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Truncated => "truncated",
            Refusal::Oversized => "oversized",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Misaddressed => "misaddressed",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
            Refusal::Malformed => "malformed",
            Refusal::Unsolicited => "unsolicited",
        }
    }
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// An address as the recipient field holds it.
fn recipient_bytes(addr: SocketAddr) -> [u8; RECIPIENT_LEN] {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    };
    let mut out = [0u8; RECIPIENT_LEN];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&addr.port().to_be_bytes());
    out
}

/// The associated data of a datagram to `recipient` (its field) in cluster `cluster_id`.
fn aad(cluster_id: &[u8], recipient: &[u8]) -> Vec<u8> {
    [AAD_PREFIX, cluster_id, &[0], recipient].concat()
}

/// Seals envelopes of one cluster.
pub struct Sealer {
    cluster_id: Vec<u8>,
}

impl Sealer {
    /// For `cluster_id`.
    pub fn new(cluster_id: &str) -> Self {
        Sealer { cluster_id: cluster_id.as_bytes().to_vec() }
    }

    /// Seals `envelope` (chitchat's bytes) to `to` with the keyring's primary key, stamped
    /// `stamp_ms`, into `out` (cleared first).
    pub fn seal(&self, keyring: &Keyring, to: SocketAddr, envelope: &[u8], stamp_ms: u64, out: &mut Vec<u8>) {
        let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let recipient = recipient_bytes(to);
        out.clear();
        out.push(VERSION);
        out.extend_from_slice(&recipient);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&stamp_ms.to_le_bytes());
        out.extend_from_slice(envelope);
        let aad = aad(&self.cluster_id, &recipient);
        match keyring.primary().encrypt_in_place_detached(&nonce, &aad, &mut out[HEADER_LEN..]) {
            Ok(tag) => out.extend_from_slice(&tag),
            // Only a message beyond 256 GiB fails to encrypt; send nothing rather than plaintext.
            Err(_) => out.clear(),
        }
    }
}

/// Opens datagrams of one cluster addressed to this agent, and refuses replays.
pub struct Opener {
    cluster_id: Vec<u8>,
    /// This agent's own addresses, as the recipient field holds them.
    own: Vec<[u8; RECIPIENT_LEN]>,
    seen: BTreeSet<(u64, [u8; NONCE_LEN])>,
    /// Nothing stamped at or before this is accepted (raised when the memory is full).
    floor_ms: u64,
    capacity: usize,
}

impl Opener {
    /// For `cluster_id`, taking what is addressed to one of `own` addresses, remembering at
    /// most [`MAX_REMEMBERED`] datagrams.
    pub fn new(cluster_id: &str, own: &[SocketAddr]) -> Self {
        Self::with_capacity(cluster_id, own, MAX_REMEMBERED)
    }

    /// As [`Opener::new`], refusing what is stamped at or before `start_ms` (this process's
    /// start: what was sealed before it may have been received by an earlier run already).
    pub fn starting_at(cluster_id: &str, own: &[SocketAddr], start_ms: u64) -> Self {
        Opener { floor_ms: start_ms, ..Self::new(cluster_id, own) }
    }

    /// As [`Opener::new`], remembering at most `capacity` datagrams.
    pub fn with_capacity(cluster_id: &str, own: &[SocketAddr], capacity: usize) -> Self {
        Opener {
            cluster_id: cluster_id.as_bytes().to_vec(),
            own: own.iter().map(|a| recipient_bytes(*a)).collect(),
            seen: BTreeSet::new(),
            floor_ms: 0,
            capacity: capacity.max(1),
        }
    }

    /// Opens `datagram` in place and returns the envelope's bytes, at `now_ms` on this
    /// agent's clock.
    pub fn open<'a>(&mut self, keyring: &Keyring, datagram: &'a mut [u8], now_ms: u64) -> Result<&'a [u8], Refusal> {
        if datagram.len() < OVERHEAD {
            return Err(Refusal::Truncated);
        }
        if datagram.len() > MAX_SEALED_LEN {
            return Err(Refusal::Oversized);
        }
        if datagram[0] != VERSION {
            return Err(Refusal::Unauthenticated);
        }
        let (header, rest) = datagram.split_at_mut(HEADER_LEN);
        let recipient = &header[1..1 + RECIPIENT_LEN];
        let nonce: [u8; NONCE_LEN] = header[1 + RECIPIENT_LEN..].try_into().map_err(|_| Refusal::Truncated)?;
        let aad = aad(&self.cluster_id, recipient);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| Refusal::Truncated)?;
        let tag = Tag::from(tag);
        let xnonce = XNonce::from(nonce);
        // A failed attempt leaves `body` as it was, so the next key sees the ciphertext.
        let opened = keyring.all().iter().any(|cipher| cipher.decrypt_in_place_detached(&xnonce, &aad, body, &tag).is_ok());
        if !opened {
            return Err(Refusal::Unauthenticated);
        }
        // Checked once authentic, so that the count says what it was: a member's datagram
        // meant for another address.
        if !self.own.iter().any(|own| own.as_slice() == recipient) {
            return Err(Refusal::Misaddressed);
        }
        let (stamp, envelope) = body.split_at(STAMP_LEN);
        let stamp_ms = u64::from_le_bytes(stamp.try_into().map_err(|_| Refusal::Truncated)?);
        self.admit(stamp_ms, nonce, now_ms)?;
        Ok(envelope)
    }

    /// Checks the stamp and the replay memory, and remembers the datagram.
    fn admit(&mut self, stamp_ms: u64, nonce: [u8; NONCE_LEN], now_ms: u64) -> Result<(), Refusal> {
        let skew = MAX_CLOCK_SKEW.as_millis() as u64;
        let oldest = now_ms.saturating_sub(skew);
        if stamp_ms < oldest || stamp_ms > now_ms.saturating_add(skew) || stamp_ms <= self.floor_ms {
            return Err(Refusal::Stale);
        }
        while self.seen.first().is_some_and(|(stamp, _)| *stamp < oldest) {
            self.seen.pop_first();
        }
        if !self.seen.insert((stamp_ms, nonce)) {
            return Err(Refusal::Replayed);
        }
        while self.seen.len() > self.capacity {
            if let Some((stamp, _)) = self.seen.pop_first() {
                self.floor_ms = self.floor_ms.max(stamp);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip_key::GossipKey;

    fn ring(keys: &[&GossipKey]) -> Keyring {
        Keyring::new(&keys.iter().map(|k| (*k).clone()).collect::<Vec<_>>()).expect("keyring")
    }

    /// The receiving agent's address.
    const ME: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)), 7302);

    fn sealed(keyring: &Keyring, cluster: &str, envelope: &[u8], stamp: u64) -> Vec<u8> {
        sealed_to(keyring, cluster, ME, envelope, stamp)
    }

    fn sealed_to(keyring: &Keyring, cluster: &str, to: SocketAddr, envelope: &[u8], stamp: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Sealer::new(cluster).seal(keyring, to, envelope, stamp, &mut out);
        out
    }

    #[test]
    fn a_sealed_envelope_opens_once_and_hides_its_bytes() {
        let key = GossipKey::generate();
        let keys = ring(&[&key]);
        let now = now_ms();
        let envelope = b"chitchat envelope bytes".to_vec();
        let datagram = sealed(&keys, "prod", &envelope, now);
        assert_eq!(datagram.len(), envelope.len() + OVERHEAD);
        assert!(!datagram.windows(8).any(|w| w == b"chitchat"), "the envelope must not be readable");
        let mut opener = Opener::new("prod", &[ME]);
        assert_eq!(opener.open(&keys, &mut datagram.clone(), now).expect("opens"), envelope.as_slice());
        assert_eq!(opener.open(&keys, &mut datagram.clone(), now + 5), Err(Refusal::Replayed));
        // Two seals of the same envelope differ (fresh nonce) and both open.
        let again = sealed(&keys, "prod", &envelope, now);
        assert_ne!(again, datagram);
        assert!(opener.open(&keys, &mut again.clone(), now).is_ok());
    }

    #[test]
    fn other_keys_clusters_and_changed_bytes_do_not_open() {
        let (key, other) = (GossipKey::generate(), GossipKey::generate());
        let keys = ring(&[&key]);
        let now = now_ms();
        let mut opener = Opener::new("prod", &[ME]);
        let foreign = sealed(&ring(&[&other]), "prod", b"x", now);
        assert_eq!(opener.open(&keys, &mut foreign.clone(), now), Err(Refusal::Unauthenticated));
        let other_cluster = sealed(&keys, "staging", b"x", now);
        assert_eq!(opener.open(&keys, &mut other_cluster.clone(), now), Err(Refusal::Unauthenticated));
        let mut flipped = sealed(&keys, "prod", b"hello", now);
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(opener.open(&keys, &mut flipped, now), Err(Refusal::Unauthenticated));
        let whole = sealed(&keys, "prod", b"hello", now);
        assert_eq!(opener.open(&keys, &mut whole[..whole.len() - 3].to_vec(), now), Err(Refusal::Unauthenticated));
        assert_eq!(opener.open(&keys, &mut whole[..OVERHEAD - 1].to_vec(), now), Err(Refusal::Truncated));
        assert_eq!(opener.open(&keys, &mut vec![1u8; MAX_SEALED_LEN + 1], now), Err(Refusal::Oversized));
        // What did open nothing and was not remembered: the genuine datagram still opens.
        assert!(opener.open(&keys, &mut whole.clone(), now).is_ok());
    }

    #[test]
    fn a_datagram_opens_only_at_the_address_it_was_sent_to() {
        let key = GossipKey::generate();
        let keys = ring(&[&key]);
        let now = now_ms();
        let other: SocketAddr = "10.0.0.2:7302".parse().expect("an address");
        // Captured on its way to another member, it means nothing here, nor there twice.
        let to_other = sealed_to(&keys, "prod", other, b"syn", now);
        assert_eq!(Opener::new("prod", &[ME]).open(&keys, &mut to_other.clone(), now), Err(Refusal::Misaddressed));
        assert!(Opener::new("prod", &[other]).open(&keys, &mut to_other.clone(), now).is_ok());
        // Another port of the same host is another address.
        let other_port = SocketAddr::new(ME.ip(), 7303);
        assert_eq!(
            Opener::new("prod", &[ME]).open(&keys, &mut sealed_to(&keys, "prod", other_port, b"x", now), now),
            Err(Refusal::Misaddressed)
        );
        // Any of the agent's own addresses (advertised, listened on) will do; IPv4 and its
        // IPv6-mapped form are one address.
        let mut opener = Opener::new("prod", &[other, ME]);
        assert!(opener.open(&keys, &mut sealed(&keys, "prod", b"a", now), now).is_ok());
        let mapped = SocketAddr::new(IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()), 7302);
        assert!(opener.open(&keys, &mut sealed_to(&keys, "prod", mapped, b"b", now), now).is_ok());
        // The recipient is authenticated: rewritten to this agent's address, it does not open.
        let mut rewritten = to_other.clone();
        rewritten[1..1 + RECIPIENT_LEN].copy_from_slice(&recipient_bytes(ME));
        assert_eq!(Opener::new("prod", &[ME]).open(&keys, &mut rewritten, now), Err(Refusal::Unauthenticated));
    }

    #[test]
    fn older_keys_open_and_the_primary_seals() {
        let (old, new) = (GossipKey::generate(), GossipKey::generate());
        let now = now_ms();
        let mut opener = Opener::new("prod", &[ME]);
        let rotated = ring(&[&new, &old]);
        let from_old = sealed(&ring(&[&old]), "prod", b"a", now);
        assert!(opener.open(&rotated, &mut from_old.clone(), now).is_ok());
        let from_rotated = sealed(&rotated, "prod", b"b", now);
        assert!(opener.open(&ring(&[&new]), &mut from_rotated.clone(), now).is_ok());
        assert_eq!(opener.open(&ring(&[&old]), &mut from_rotated.clone(), now), Err(Refusal::Unauthenticated));
    }

    #[test]
    fn what_was_sealed_before_the_start_is_stale() {
        let key = GossipKey::generate();
        let keys = ring(&[&key]);
        let start = now_ms();
        let mut opener = Opener::starting_at("prod", &[ME], start);
        assert_eq!(opener.open(&keys, &mut sealed(&keys, "prod", b"x", start - 1_000), start + 10), Err(Refusal::Stale));
        assert_eq!(opener.open(&keys, &mut sealed(&keys, "prod", b"x", start), start + 10), Err(Refusal::Stale));
        assert!(opener.open(&keys, &mut sealed(&keys, "prod", b"x", start + 1), start + 10).is_ok());
    }

    #[test]
    fn stamps_far_from_the_clock_are_stale() {
        let key = GossipKey::generate();
        let keys = ring(&[&key]);
        let now = now_ms();
        let skew = MAX_CLOCK_SKEW.as_millis() as u64;
        let mut opener = Opener::new("prod", &[ME]);
        for stamp in [now - skew - 1, now + skew + 1] {
            assert_eq!(opener.open(&keys, &mut sealed(&keys, "prod", b"x", stamp), now), Err(Refusal::Stale));
        }
        assert!(opener.open(&keys, &mut sealed(&keys, "prod", b"x", now - skew + 10), now).is_ok());
    }

    #[test]
    fn a_full_memory_forgets_the_oldest_and_refuses_anything_as_old() {
        let key = GossipKey::generate();
        let keys = ring(&[&key]);
        let now = now_ms();
        let mut opener = Opener::with_capacity("prod", &[ME], 3);
        let datagrams: Vec<Vec<u8>> = (0..5).map(|i| sealed(&keys, "prod", b"x", now - 100 + i)).collect();
        for d in &datagrams {
            assert!(opener.open(&keys, &mut d.clone(), now).is_ok());
        }
        assert_eq!(opener.seen.len(), 3);
        // The forgotten ones cannot come back as new.
        assert_eq!(opener.open(&keys, &mut datagrams[0].clone(), now), Err(Refusal::Stale));
        assert_eq!(opener.open(&keys, &mut datagrams[1].clone(), now), Err(Refusal::Stale));
        assert_eq!(opener.open(&keys, &mut datagrams[4].clone(), now), Err(Refusal::Replayed));
        assert!(opener.open(&keys, &mut sealed(&keys, "prod", b"x", now), now).is_ok());
    }
}
