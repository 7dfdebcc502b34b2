//! Sealing gossip datagrams: every chitchat envelope an agent sends is encrypted and
//! authenticated with the cluster key (XChaCha20-Poly1305, a fresh random 24-byte nonce per
//! datagram), bound to the cluster id, and stamped with the sender's clock, so that a
//! datagram that was not sealed by a member of this cluster, was changed, or was captured and
//! sent again is dropped before chitchat sees it.
//!
//! A sealed datagram is `[version = 1][nonce: 24][ciphertext of (unix ms: u64 LE ‖ envelope)
//! + tag: 16]`, with `"signpost-gossip/1" ‖ cluster id` as associated data.
//!
//! Replays: a receiver accepts a datagram stamped within [`MAX_CLOCK_SKEW`] of its own clock
//! and remembers (stamp, nonce) of each one it accepted until the stamp is older than that;
//! the same datagram again is refused. The memory is bounded ([`MAX_REMEMBERED`]): when full,
//! the oldest entry is forgotten and nothing stamped at or before it is accepted any more.
//! The memory does not outlive the process, so an agent's transport opens with a floor at its
//! start ([`Opener::starting_at`]): a datagram captured before a restart is refused after it
//! (a peer whose clock is behind by some seconds is heard that much later after a restart).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadCore, AeadInPlace, OsRng};
use chacha20poly1305::{Tag, XNonce};

use crate::gossip_key::Keyring;

/// Format version, the first byte of every sealed datagram.
pub const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const STAMP_LEN: usize = 8;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + NONCE_LEN;

/// Bytes sealing adds to an envelope.
pub const OVERHEAD: usize = HEADER_LEN + STAMP_LEN + TAG_LEN;

/// Largest sealed datagram: the largest envelope chitchat builds, sealed.
pub const MAX_SEALED_LEN: usize = chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE + OVERHEAD;

/// How far a sender's clock may be from the receiver's (agents' clocks must be kept in sync
/// within this, as NTP does).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Most (stamp, nonce) pairs remembered against replays.
pub const MAX_REMEMBERED: usize = 200_000;

const AAD_PREFIX: &[u8] = b"signpost-gossip/1";

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
    pub const ALL: [Refusal; 7] = [
        Refusal::Truncated,
        Refusal::Oversized,
        Refusal::Unauthenticated,
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

fn aad(cluster_id: &str) -> Vec<u8> {
    [AAD_PREFIX, cluster_id.as_bytes()].concat()
}

/// Seals envelopes of one cluster.
pub struct Sealer {
    aad: Vec<u8>,
}

impl Sealer {
    /// For `cluster_id`.
    pub fn new(cluster_id: &str) -> Self {
        Sealer { aad: aad(cluster_id) }
    }

    /// Seals `envelope` (chitchat's bytes) with the keyring's primary key, stamped `stamp_ms`,
    /// into `out` (cleared first).
    pub fn seal(&self, keyring: &Keyring, envelope: &[u8], stamp_ms: u64, out: &mut Vec<u8>) {
        let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
        out.clear();
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&stamp_ms.to_le_bytes());
        out.extend_from_slice(envelope);
        match keyring.primary().encrypt_in_place_detached(&nonce, &self.aad, &mut out[HEADER_LEN..]) {
            Ok(tag) => out.extend_from_slice(&tag),
            // Only a message beyond 256 GiB fails to encrypt; send nothing rather than plaintext.
            Err(_) => out.clear(),
        }
    }
}

/// Opens datagrams of one cluster and refuses replays.
pub struct Opener {
    aad: Vec<u8>,
    seen: BTreeSet<(u64, [u8; NONCE_LEN])>,
    /// Nothing stamped at or before this is accepted (raised when the memory is full).
    floor_ms: u64,
    capacity: usize,
}

impl Opener {
    /// For `cluster_id`, remembering at most [`MAX_REMEMBERED`] datagrams.
    pub fn new(cluster_id: &str) -> Self {
        Self::with_capacity(cluster_id, MAX_REMEMBERED)
    }

    /// For `cluster_id`, refusing what is stamped at or before `start_ms` (this process's
    /// start: what was sealed before it may have been received by an earlier run already).
    pub fn starting_at(cluster_id: &str, start_ms: u64) -> Self {
        Opener { floor_ms: start_ms, ..Self::new(cluster_id) }
    }

    /// For `cluster_id`, remembering at most `capacity` datagrams.
    pub fn with_capacity(cluster_id: &str, capacity: usize) -> Self {
        Opener { aad: aad(cluster_id), seen: BTreeSet::new(), floor_ms: 0, capacity: capacity.max(1) }
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
        let nonce: [u8; NONCE_LEN] = header[1..].try_into().map_err(|_| Refusal::Truncated)?;
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| Refusal::Truncated)?;
        let tag = Tag::from(tag);
        let xnonce = XNonce::from(nonce);
        // A failed attempt leaves `body` as it was, so the next key sees the ciphertext.
        let opened = keyring.all().iter().any(|cipher| cipher.decrypt_in_place_detached(&xnonce, &self.aad, body, &tag).is_ok());
        if !opened {
            return Err(Refusal::Unauthenticated);
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

    fn sealed(keyring: &Keyring, cluster: &str, envelope: &[u8], stamp: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Sealer::new(cluster).seal(keyring, envelope, stamp, &mut out);
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
        let mut opener = Opener::new("prod");
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
        let mut opener = Opener::new("prod");
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
    fn older_keys_open_and_the_primary_seals() {
        let (old, new) = (GossipKey::generate(), GossipKey::generate());
        let now = now_ms();
        let mut opener = Opener::new("prod");
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
        let mut opener = Opener::starting_at("prod", start);
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
        let mut opener = Opener::new("prod");
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
        let mut opener = Opener::with_capacity("prod", 3);
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
