//! The UDP transport under chitchat: a socket with a receive buffer large enough for
//! chitchat's bursts of large datagrams (the kernel's default drops them, and dropped
//! datagrams make live peers look dead), and, when the cluster has a key, every datagram
//! sealed and opened by [`crate::gossip_seal`]. Whatever does not open, and any reply that
//! answers nothing this agent sent ([`crate::gossip_replies`]), is dropped, counted by reason
//! and never reaches chitchat.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use socket2::{Domain, Protocol, Type};

use crate::gossip_key::{Keyring, SharedKeyring};
use crate::gossip_replies::{Kind, Replies};
use crate::gossip_seal::{self, Opener, Refusal, Sealer};
use crate::metrics::Metrics;

/// Bytes of the buffer one datagram is read into: more than any UDP payload, so a datagram
/// too long for chitchat is seen whole and refused as oversized.
const RECV_LEN: usize = 65_536;

/// Least time between two warnings about dropped datagrams of one reason.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The transport chitchat opens its socket with.
pub struct GossipTransport {
    /// The cluster's keys; `None` sends and accepts plain chitchat datagrams.
    pub keyring: Option<Arc<SharedKeyring>>,
    /// The cluster id sealed datagrams are bound to.
    pub cluster_id: String,
    /// The address peers send to (besides the listen address): a sealed datagram is taken
    /// only when addressed to one of the two.
    pub advertise: SocketAddr,
    /// Receive buffer to ask the kernel for, in bytes.
    pub recv_buffer: usize,
    /// Where datagrams and drops are counted.
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl Transport for GossipTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let (socket, granted) =
            bind(listen_addr, self.recv_buffer).with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        self.metrics.gossip_recv_buffer(granted);
        if granted < self.recv_buffer {
            tracing::warn!(
                asked = self.recv_buffer,
                granted,
                "the kernel granted a smaller gossip receive buffer; raise net.core.rmem_max (or run with CAP_NET_ADMIN) so bursts of gossip are not dropped"
            );
        }
        let mode = match &self.keyring {
            Some(keyring) => Mode::Sealed {
                keyring: keyring.clone(),
                sealer: Sealer::new(&self.cluster_id),
                opener: Opener::starting_at(&self.cluster_id, &own_addresses(self.advertise, listen_addr), gossip_seal::now_ms()),
            },
            None => Mode::Plain,
        };
        Ok(Box::new(GossipSocket {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            mode,
            plain: Vec::with_capacity(chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE),
            sealed: Vec::with_capacity(gossip_seal::MAX_SEALED_LEN),
            recv: vec![0; RECV_LEN].into_boxed_slice(),
            metrics: self.metrics.clone(),
            warned: Vec::new(),
            replies: Replies::default(),
        }))
    }
}

/// The addresses sealed datagrams may be addressed to: the advertised one and the one listened
/// on (unless that is the unspecified address).
fn own_addresses(advertise: SocketAddr, listen: SocketAddr) -> Vec<SocketAddr> {
    let mut own = vec![advertise];
    if !listen.ip().is_unspecified() && listen != advertise {
        own.push(listen);
    }
    own
}

/// Binds a non-blocking UDP socket with a receive buffer of `recv_buffer` bytes, forced past
/// `net.core.rmem_max` where the process may; returns it with the usable bytes granted.
fn bind(addr: SocketAddr, recv_buffer: usize) -> io::Result<(std::net::UdpSocket, usize)> {
    let socket = socket2::Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(recv_buffer)?;
    if usable(socket.recv_buffer_size()?) < recv_buffer {
        force_recv_buffer(&socket, recv_buffer);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let granted = usable(socket.recv_buffer_size()?);
    Ok((socket.into(), granted))
}

/// Linux reports twice the size set (the other half is its own bookkeeping).
fn usable(reported: usize) -> usize {
    if cfg!(target_os = "linux") { reported / 2 } else { reported }
}

#[cfg(target_os = "linux")]
fn force_recv_buffer(socket: &socket2::Socket, bytes: usize) {
    // SO_RCVBUFFORCE needs CAP_NET_ADMIN; without it the capped size stays.
    let _ = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::RcvBufForce, &bytes);
}

#[cfg(not(target_os = "linux"))]
fn force_recv_buffer(_socket: &socket2::Socket, _bytes: usize) {}

enum Mode {
    Plain,
    Sealed { keyring: Arc<SharedKeyring>, sealer: Sealer, opener: Opener },
}

struct GossipSocket {
    socket: tokio::net::UdpSocket,
    mode: Mode,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    recv: Box<[u8]>,
    metrics: Arc<Metrics>,
    warned: Vec<(Refusal, Instant)>,
    replies: Replies,
}

/// Errors after which the socket still works (e.g. an ICMP error from a peer that left).
fn is_transient(err: &io::Error) -> bool {
    matches!(err.kind(), io::ErrorKind::OutOfMemory | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused)
}

/// Opens one datagram into an envelope.
fn open(mode: &mut Mode, datagram: &mut [u8]) -> Result<ChitchatEnvelope, Refusal> {
    match mode {
        Mode::Plain => open_datagram(None, datagram, gossip_seal::now_ms()),
        Mode::Sealed { keyring, opener, .. } => open_datagram(Some((opener, &keyring.current())), datagram, gossip_seal::now_ms()),
    }
}

/// Opens one received datagram into chitchat's envelope at `now_ms`: with `sealed`, it must
/// open with the keyring first; without, it is a plain envelope. What every datagram from
/// the network goes through, so the fuzz target `gossip_datagram` calls it.
pub fn open_datagram(sealed: Option<(&mut Opener, &Keyring)>, datagram: &mut [u8], now_ms: u64) -> Result<ChitchatEnvelope, Refusal> {
    let mut bytes: &[u8] = match sealed {
        None if datagram.len() > chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE => return Err(Refusal::Oversized),
        None => datagram,
        Some((opener, keyring)) => opener.open(keyring, datagram, now_ms)?,
    };
    ChitchatEnvelope::deserialize(&mut bytes).map_err(|_| Refusal::Malformed)
}

impl GossipSocket {
    fn refused(&mut self, from: SocketAddr, len: usize, refusal: Refusal) {
        self.metrics.gossip_dropped(refusal);
        let now = Instant::now();
        let last = self.warned.iter_mut().find(|(r, _)| *r == refusal);
        let due = last.as_ref().is_none_or(|(_, at)| now.duration_since(*at) >= WARN_EVERY);
        if due {
            tracing::warn!(%from, len, reason = %refusal, "dropped a gossip datagram (further drops of this reason are counted in signpost_agent_gossip_dropped_total, logged at most every 10s)");
            match last {
                Some((_, at)) => *at = now,
                None => self.warned.push((refusal, now)),
            }
        } else {
            tracing::debug!(%from, len, reason = %refusal, "dropped a gossip datagram");
        }
    }
}

#[async_trait]
impl Socket for GossipSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket.local_addr().context("failed to get the gossip socket's address")
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        self.plain.clear();
        envelope.serialize(&mut self.plain);
        let datagram: &[u8] = match &self.mode {
            Mode::Plain => &self.plain,
            Mode::Sealed { keyring, sealer, .. } => {
                sealer.seal(&keyring.current(), to, &self.plain, gossip_seal::now_ms(), &mut self.sealed);
                &self.sealed
            }
        };
        anyhow::ensure!(!datagram.is_empty(), "a gossip datagram could not be sealed");
        self.replies.sent(to, Kind::of(&envelope.message), Instant::now());
        let num_bytes_sent = self.socket.send_to(datagram, to).await.context("failed to send a gossip datagram")?;
        self.metrics.gossip_sent(num_bytes_sent);
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancellable: nothing is kept across an await but the socket.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (len, from_addr) = match self.socket.recv_from(&mut self.recv).await {
                Ok(received) => received,
                Err(err) if is_transient(&err) => {
                    tracing::debug!(error = %err, "transient gossip receive error");
                    continue;
                }
                Err(err) => return Err(err).context("the gossip socket failed"),
            };
            self.metrics.gossip_received(len);
            match open(&mut self.mode, &mut self.recv[..len]) {
                Ok(envelope) if self.replies.admit(from_addr, Kind::of(&envelope.message), Instant::now()) => {
                    return Ok(RecvOutcome { from_addr, envelope, num_bytes_received: len });
                }
                Ok(_) => self.refused(from_addr, len, Refusal::Unsolicited),
                Err(refusal) => self.refused(from_addr, len, refusal),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receive_buffer_is_raised_as_far_as_the_kernel_allows() {
        let asked = 4 << 20;
        let (socket, granted) = bind(SocketAddr::from(([127, 0, 0, 1], 0)), asked).expect("binds");
        assert!(socket.local_addr().expect("bound").port() > 0);
        // rmem_max caps an unprivileged process; CAP_NET_ADMIN forces past it.
        let rmem_max: usize =
            std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().and_then(|t| t.trim().parse().ok()).unwrap_or(asked);
        assert!(granted >= asked.min(rmem_max), "granted {granted}, rmem_max {rmem_max}");
        assert!(granted <= asked, "granted {granted}");
    }
}
