//! Which replies this agent waits for. A SynAck answers a Syn this agent sent to that
//! address, an Ack answers a SynAck it sent there; chitchat's SynAck and Ack carry no cluster
//! id and no reference to a Syn, so without this any sender could push a delta (or a
//! `BadCluster`) at an agent unasked. Each expected reply is taken once, within
//! [`REPLY_WINDOW`]; everything else is refused as `unsolicited` before chitchat sees it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chitchat::ChitchatMessage;

/// How long after a Syn (or a SynAck) its reply is taken.
pub const REPLY_WINDOW: Duration = Duration::from_secs(10);

/// The most replies waited for at once (a round sends a few Syns; a SynAck goes to every
/// peer that sent a Syn). Past it, the oldest are forgotten first.
const MAX_WAITING: usize = 4096;

/// Which kind of reply is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Awaited {
    /// A SynAck (or a BadCluster) to a Syn sent.
    SynAck,
    /// An Ack to a SynAck sent.
    Ack,
}

/// What a chitchat message is, as far as a conversation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Opens a conversation.
    Syn,
    /// Answers a Syn.
    SynAck,
    /// Answers a SynAck.
    Ack,
    /// Answers a Syn of another cluster.
    BadCluster,
}

impl Kind {
    /// The kind of `message`.
    pub fn of(message: &ChitchatMessage) -> Kind {
        match message {
            ChitchatMessage::Syn { .. } => Kind::Syn,
            ChitchatMessage::SynAck { .. } => Kind::SynAck,
            ChitchatMessage::Ack { .. } => Kind::Ack,
            ChitchatMessage::BadCluster => Kind::BadCluster,
        }
    }
}

/// The replies waited for, by peer address.
#[derive(Debug, Default)]
pub struct Replies {
    waiting: HashMap<(SocketAddr, Awaited), Instant>,
}

impl Replies {
    /// Notes a message sent to `to` at `now`.
    pub fn sent(&mut self, to: SocketAddr, kind: Kind, now: Instant) {
        let awaited = match kind {
            Kind::Syn => Awaited::SynAck,
            Kind::SynAck => Awaited::Ack,
            Kind::Ack | Kind::BadCluster => return,
        };
        if self.waiting.len() >= MAX_WAITING {
            self.waiting.retain(|_, at| now.duration_since(*at) < REPLY_WINDOW);
        }
        if self.waiting.len() >= MAX_WAITING
            && let Some(oldest) = self.waiting.iter().min_by_key(|(_, at)| **at).map(|(key, _)| *key)
        {
            self.waiting.remove(&oldest);
        }
        self.waiting.insert((to, awaited), now);
    }

    /// Whether a message received from `from` at `now` may go to chitchat: a Syn always; a
    /// reply only if it was awaited from there (and then no second time).
    pub fn admit(&mut self, from: SocketAddr, kind: Kind, now: Instant) -> bool {
        let awaited = match kind {
            Kind::Syn => return true,
            Kind::SynAck | Kind::BadCluster => Awaited::SynAck,
            Kind::Ack => Awaited::Ack,
        };
        self.waiting.remove(&(from, awaited)).is_some_and(|at| now.duration_since(at) < REPLY_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_taken_once_from_the_peer_asked_within_the_window() {
        let (peer, stranger) = (SocketAddr::from(([10, 0, 0, 1], 7302)), SocketAddr::from(([10, 0, 0, 2], 7302)));
        let t0 = Instant::now();
        let mut replies = Replies::default();
        assert!(replies.admit(stranger, Kind::Syn, t0), "anyone may start a conversation");
        assert!(!replies.admit(peer, Kind::SynAck, t0), "not asked");
        assert!(!replies.admit(peer, Kind::Ack, t0), "not asked");
        assert!(!replies.admit(peer, Kind::BadCluster, t0), "not asked");

        replies.sent(peer, Kind::Syn, t0);
        assert!(!replies.admit(stranger, Kind::SynAck, t0), "asked another peer");
        assert!(!replies.admit(peer, Kind::Ack, t0), "a Syn awaits a SynAck, not an Ack");
        assert!(replies.admit(peer, Kind::SynAck, t0 + Duration::from_millis(5)));
        assert!(!replies.admit(peer, Kind::SynAck, t0 + Duration::from_millis(6)), "a second time");

        replies.sent(peer, Kind::SynAck, t0);
        assert!(!replies.admit(peer, Kind::Ack, t0 + REPLY_WINDOW), "too late");
        replies.sent(peer, Kind::SynAck, t0);
        assert!(replies.admit(peer, Kind::Ack, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn the_replies_waited_for_are_bounded() {
        let t0 = Instant::now();
        let mut replies = Replies::default();
        for i in 0..(MAX_WAITING as u32 + 100) {
            replies.sent(SocketAddr::from((i.to_be_bytes(), 7302)), Kind::Syn, t0 + Duration::from_micros(u64::from(i)));
        }
        assert_eq!(replies.waiting.len(), MAX_WAITING);
        let newest = SocketAddr::from(((MAX_WAITING as u32 + 99).to_be_bytes(), 7302));
        assert!(replies.admit(newest, Kind::SynAck, t0 + Duration::from_secs(1)), "the newest are kept");
    }
}
