//! Who may hold an inbound connection, beyond libp2p's global counts
//! (`connection_limits`, which still caps pending and established connections overall):
//!
//! - **Per IP.** One address may have at most [`InboundLimits::pending_per_ip`] connections
//!   in their handshake and [`InboundLimits::established_per_ip`] established. A flood of
//!   half-open sockets, or of throwaway peer ids, from one machine cannot take every slot.
//!   Relayed connections carry the relay's IP, not the peer's, and are not counted per IP
//!   (the relay bounds its own circuits).
//! - **An inbound share.** Inbound connections may take at most [`InboundLimits::inbound`] of
//!   the established slots, so outbound dials (bootstrap, providers, relays) always have room.
//!   When the share is full, a new inbound connection takes the place of the oldest inbound
//!   connection that has carried no mesh stream in [`IDLE_BEFORE_EVICTION`] or more (throwaway
//!   identities that only hold a connection are the first to go); with none such, it is
//!   refused.
//!
//! A handshake that never completes is cut by the transport's timeout (the swarm's connection
//! timeout, `NetworkConfig::dial_timeout`, applies to inbound upgrades too).
//!
//! [`InboundLedger`] is the bookkeeping, tested without a network; [`InboundGuard`] is the
//! behaviour that applies it.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    dummy, CloseConnection, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm,
    ListenFailure, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::PeerId;

use super::addr::{ip_of, is_relayed};
use super::peer_table::SharedPeerTable;

/// An inbound connection open this long with no mesh stream on it may give its place to a new
/// one when the inbound share is full.
pub const IDLE_BEFORE_EVICTION: Duration = Duration::from_secs(10);

/// The bounds on inbound connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimits {
    /// Connections from one IP still in their handshake.
    pub pending_per_ip: u32,
    /// Established inbound connections from one IP.
    pub established_per_ip: u32,
    /// Established inbound connections in all.
    pub inbound: u32,
}

impl InboundLimits {
    /// The limits that go with `max_pending` handshakes and `max_established` connections in
    /// all: half the handshakes for one IP, a quarter of the connections for one IP (a NATed
    /// office shares one), and three quarters of them inbound.
    pub fn for_totals(max_pending: u32, max_established: u32) -> InboundLimits {
        InboundLimits {
            pending_per_ip: (max_pending / 2).max(1),
            established_per_ip: (max_established / 4).max(1),
            inbound: (max_established / 4 * 3).max(1),
        }
    }
}

/// Why an inbound connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{ip} has {count} connections in their handshake already")]
    PendingPerIp { ip: IpAddr, count: u32 },
    #[error("{ip} has {count} connections established already")]
    EstablishedPerIp { ip: IpAddr, count: u32 },
    #[error(
        "inbound connections take their whole share ({count}); the rest is kept for dialling out"
    )]
    InboundShare { count: u32 },
}

/// One established inbound connection.
#[derive(Debug, Clone, Copy)]
struct Established {
    peer: PeerId,
    ip: Option<IpAddr>,
    since: Instant,
}

/// What to do with a new inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// It fits.
    Yes,
    /// It takes the place of this idle one, which is to be closed.
    InPlaceOf(PeerId, ConnectionId),
}

/// The inbound connections in their handshake and established, by IP.
#[derive(Debug, Default)]
pub struct InboundLedger {
    limits: Option<InboundLimits>,
    pending: HashMap<ConnectionId, Option<IpAddr>>,
    established: HashMap<ConnectionId, Established>,
    pending_by_ip: HashMap<IpAddr, u32>,
    established_by_ip: HashMap<IpAddr, u32>,
}

fn count_up(counts: &mut HashMap<IpAddr, u32>, ip: Option<IpAddr>) {
    if let Some(ip) = ip {
        *counts.entry(ip).or_default() += 1;
    }
}

fn count_down(counts: &mut HashMap<IpAddr, u32>, ip: Option<IpAddr>) {
    let Some(ip) = ip else { return };
    if let Some(n) = counts.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&ip);
        }
    }
}

impl InboundLedger {
    pub fn new(limits: InboundLimits) -> InboundLedger {
        InboundLedger {
            limits: Some(limits),
            ..InboundLedger::default()
        }
    }

    fn limits(&self) -> InboundLimits {
        self.limits.unwrap_or(InboundLimits {
            pending_per_ip: u32::MAX,
            established_per_ip: u32::MAX,
            inbound: u32::MAX,
        })
    }

    /// A connection from `ip` (none for a relayed one) begins its handshake.
    pub fn begin(&mut self, id: ConnectionId, ip: Option<IpAddr>) -> Result<(), Refused> {
        if let Some(ip) = ip {
            let count = self.pending_by_ip.get(&ip).copied().unwrap_or(0);
            if count >= self.limits().pending_per_ip {
                return Err(Refused::PendingPerIp { ip, count });
            }
        }
        count_up(&mut self.pending_by_ip, ip);
        self.pending.insert(id, ip);
        Ok(())
    }

    /// The connection's handshake completed: it becomes established, if there is room. When
    /// the inbound share is full, the oldest connection idle for [`IDLE_BEFORE_EVICTION`]
    /// (`streams_on` says how many mesh streams a connection carried; `None`: unknown) gives
    /// its place, and is to be closed.
    pub fn establish(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        ip: Option<IpAddr>,
        now: Instant,
        streams_on: impl Fn(&PeerId, ConnectionId) -> Option<u64>,
    ) -> Result<Admit, Refused> {
        if let Some(pending_ip) = self.pending.remove(&id) {
            count_down(&mut self.pending_by_ip, pending_ip);
        }
        let limits = self.limits();
        if let Some(ip) = ip {
            let count = self.established_by_ip.get(&ip).copied().unwrap_or(0);
            if count >= limits.established_per_ip {
                return Err(Refused::EstablishedPerIp { ip, count });
            }
        }
        let mut admit = Admit::Yes;
        let inbound = self.established.len() as u32;
        if inbound >= limits.inbound {
            let idle = self
                .established
                .iter()
                .filter(|(_, e)| now.saturating_duration_since(e.since) >= IDLE_BEFORE_EVICTION)
                .filter(|(victim, e)| streams_on(&e.peer, **victim) == Some(0))
                .min_by_key(|(_, e)| e.since)
                .map(|(victim, e)| (*victim, e.peer));
            let Some((victim, victim_peer)) = idle else {
                return Err(Refused::InboundShare { count: inbound });
            };
            self.forget(victim);
            admit = Admit::InPlaceOf(victim_peer, victim);
        }
        count_up(&mut self.established_by_ip, ip);
        self.established.insert(
            id,
            Established {
                peer,
                ip,
                since: now,
            },
        );
        Ok(admit)
    }

    /// The connection is gone, wherever it was.
    pub fn forget(&mut self, id: ConnectionId) {
        if let Some(ip) = self.pending.remove(&id) {
            count_down(&mut self.pending_by_ip, ip);
        }
        if let Some(e) = self.established.remove(&id) {
            count_down(&mut self.established_by_ip, e.ip);
        }
    }

    /// Established inbound connections, and those in their handshake.
    pub fn counts(&self) -> (usize, usize) {
        (self.established.len(), self.pending.len())
    }
}

/// The behaviour applying an [`InboundLedger`] to the swarm's inbound connections, reading
/// from the peer table which connections carried mesh streams.
pub struct InboundGuard {
    ledger: InboundLedger,
    table: SharedPeerTable,
    /// Idle connections that gave their place, to close.
    evict: VecDeque<(PeerId, ConnectionId)>,
}

impl InboundGuard {
    pub fn new(limits: InboundLimits, table: SharedPeerTable) -> InboundGuard {
        InboundGuard {
            ledger: InboundLedger::new(limits),
            table,
            evict: VecDeque::new(),
        }
    }
}

/// The IP a connection comes from, unless it comes through a relay.
fn source_ip(local: &Multiaddr, remote: &Multiaddr) -> Option<IpAddr> {
    if is_relayed(local) || is_relayed(remote) {
        return None;
    }
    ip_of(remote)
}

fn denied(refused: Refused) -> ConnectionDenied {
    tracing::debug!("inbound connection refused: {refused}");
    ConnectionDenied::new(refused)
}

impl NetworkBehaviour for InboundGuard {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.ledger
            .begin(id, source_ip(local_addr, remote_addr))
            .map_err(denied)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let table = self.table.read();
        let admit = self
            .ledger
            .establish(
                id,
                peer,
                source_ip(local_addr, remote_addr),
                Instant::now(),
                |peer, id| table.streams_on(peer, id),
            )
            .map_err(denied)?;
        drop(table);
        if let Admit::InPlaceOf(victim_peer, victim) = admit {
            tracing::debug!(peer = %victim_peer, "an idle inbound connection gives its place to a new one");
            self.evict.push_back((victim_peer, victim));
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.ledger.forget(connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.evict.pop_front() {
            Some((peer_id, id)) => Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::One(id),
            }),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InboundLimits = InboundLimits {
        pending_per_ip: 2,
        established_per_ip: 2,
        inbound: 3,
    };

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn handshakes_from_one_ip_are_capped_and_others_go_on() {
        let mut ledger = InboundLedger::new(LIMITS);
        let (a, b, c, d) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
            ConnectionId::new_unchecked(4),
        );
        ledger.begin(a, ip(1)).unwrap();
        ledger.begin(b, ip(1)).unwrap();
        assert_eq!(
            ledger.begin(c, ip(1)),
            Err(Refused::PendingPerIp {
                ip: ip(1).unwrap(),
                count: 2
            })
        );
        ledger.begin(d, ip(2)).unwrap();
        // A relayed connection has no IP of its own to count.
        ledger.begin(c, None).unwrap();
        // A handshake that fails gives its place back.
        ledger.forget(a);
        ledger.begin(ConnectionId::new_unchecked(5), ip(1)).unwrap();
    }

    /// Establishes `id` from `ip` at `now`, every connection having carried `streams`.
    fn establish(
        ledger: &mut InboundLedger,
        id: ConnectionId,
        ip: Option<IpAddr>,
        now: Instant,
        streams: u64,
    ) -> Result<Admit, Refused> {
        let peer = crate::test_support::random_peer();
        ledger.establish(id, peer, ip, now, |_, _| Some(streams))
    }

    #[test]
    fn established_connections_are_capped_per_ip_and_in_all() {
        let mut ledger = InboundLedger::new(LIMITS);
        let id = ConnectionId::new_unchecked;
        let now = Instant::now();
        for n in 1..=2 {
            ledger.begin(id(n), ip(1)).unwrap();
            assert_eq!(establish(&mut ledger, id(n), ip(1), now, 1), Ok(Admit::Yes));
        }
        ledger.begin(id(3), ip(1)).unwrap();
        assert!(matches!(
            establish(&mut ledger, id(3), ip(1), now, 1),
            Err(Refused::EstablishedPerIp { count: 2, .. })
        ));
        // The refused one's handshake place was given back: two more may begin.
        ledger.begin(id(4), ip(1)).unwrap();
        ledger.begin(id(5), ip(1)).unwrap();
        ledger.forget(id(4));
        ledger.forget(id(5));
        establish(&mut ledger, id(6), ip(2), now, 1).unwrap();
        // Three inbound in all, each carrying streams: a fourth is refused whatever its IP.
        assert_eq!(
            establish(&mut ledger, id(7), ip(3), now, 1),
            Err(Refused::InboundShare { count: 3 })
        );
        ledger.forget(id(1));
        establish(&mut ledger, id(7), ip(3), now, 1).unwrap();
        assert_eq!(ledger.counts(), (3, 0));
    }

    #[test]
    fn a_full_share_gives_the_oldest_idle_connections_place_to_a_new_one() {
        let mut ledger = InboundLedger::new(LIMITS);
        let id = ConnectionId::new_unchecked;
        let start = Instant::now();
        let busy = crate::test_support::random_peer();
        // Three connections: the first carries streams, the two others never did.
        ledger
            .establish(id(1), busy, ip(1), start, |_, _| Some(0))
            .unwrap();
        let idle_old = crate::test_support::random_peer();
        ledger
            .establish(id(2), idle_old, ip(2), start, |_, _| Some(0))
            .unwrap();
        let idle_new = crate::test_support::random_peer();
        let later = start + Duration::from_secs(1);
        ledger
            .establish(id(3), idle_new, ip(3), later, |_, _| Some(0))
            .unwrap();
        let streams = |peer: &PeerId, _| Some(if *peer == busy { 5 } else { 0 });

        // Too soon: nobody has been idle long enough.
        let soon = start + IDLE_BEFORE_EVICTION / 2;
        let newcomer = crate::test_support::random_peer();
        assert_eq!(
            ledger.establish(id(4), newcomer, ip(4), soon, streams),
            Err(Refused::InboundShare { count: 3 })
        );
        // Later: the oldest idle one gives its place; the busy one, older still, stays.
        let late = start + IDLE_BEFORE_EVICTION * 2;
        assert_eq!(
            ledger.establish(id(5), newcomer, ip(4), late, streams),
            Ok(Admit::InPlaceOf(idle_old, id(2)))
        );
        assert_eq!(ledger.counts(), (3, 0));
        // A connection the table does not know is not evicted on a guess.
        let unknown = |peer: &PeerId, _| (*peer == busy).then_some(5);
        assert_eq!(
            ledger.establish(
                id(6),
                crate::test_support::random_peer(),
                ip(5),
                late,
                unknown
            ),
            Err(Refused::InboundShare { count: 3 })
        );
    }

    #[test]
    fn limits_follow_the_totals() {
        let limits = InboundLimits::for_totals(64, 256);
        assert_eq!(
            limits,
            InboundLimits {
                pending_per_ip: 32,
                established_per_ip: 64,
                inbound: 192
            }
        );
        assert_eq!(InboundLimits::for_totals(0, 0).inbound, 1);
    }
}
