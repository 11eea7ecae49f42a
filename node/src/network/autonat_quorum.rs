//! AutoNAT, believed only when peers at two IPs agree.
//!
//! libp2p's AutoNAT (v1) confirms an external address on the first dial-back that succeeds,
//! and takes the address from the answer of the peer that dialled. One hostile peer could
//! then make this node believe it is public (it would drop its relay reservations and become
//! unreachable), or announce an address of the peer's choosing. This wrapper passes AutoNAT's
//! confirmation on to the swarm only once [`QUORUM_PEERS`] peers, reached over direct
//! connections from [`QUORUM_IPS`] different IPs, have confirmed the same address
//! ([`Quorum`], plain bookkeeping tested without a network). Everything else AutoNAT does is
//! unchanged.
//!
//! A cost: a node with a wildcard listener in a mesh whose other nodes all sit at one IP never
//! confirms an address this way; its operator gives the address (`--external`) or listens on
//! a chosen IP, which is announced as it is.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::autonat;
use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use super::addr::{ip_of, is_relayed};

/// Distinct peers that must confirm an address.
pub const QUORUM_PEERS: usize = 2;
/// Distinct IPs those peers must be connected from.
pub const QUORUM_IPS: usize = 2;
/// How long a confirmation counts towards the quorum.
pub const CONFIRMATION_TTL: Duration = Duration::from_secs(30 * 60);
/// Most addresses with confirmations kept, and most confirmations kept per address.
const MAX_ADDRESSES: usize = 16;
const MAX_CONFIRMATIONS: usize = 8;

/// Which peers, from which IPs, confirmed each external address.
#[derive(Debug, Default)]
pub struct Quorum {
    confirmations: HashMap<Multiaddr, Vec<(PeerId, IpAddr, Instant)>>,
}

impl Quorum {
    /// `peer`, connected from `ip`, dialled this node back at `addr`. True when `addr` has its
    /// quorum (now or before).
    pub fn confirm(&mut self, addr: &Multiaddr, peer: PeerId, ip: IpAddr, now: Instant) -> bool {
        let fresh = |at: &Instant| now.duration_since(*at) < CONFIRMATION_TTL;
        if !self.confirmations.contains_key(addr) && self.confirmations.len() >= MAX_ADDRESSES {
            self.confirmations
                .retain(|_, seen| seen.iter().any(|(_, _, at)| fresh(at)));
            if self.confirmations.len() >= MAX_ADDRESSES {
                return false;
            }
        }
        let seen = self.confirmations.entry(addr.clone()).or_default();
        seen.retain(|(p, _, at)| *p != peer && fresh(at));
        if seen.len() >= MAX_CONFIRMATIONS {
            seen.remove(0);
        }
        seen.push((peer, ip, now));
        self.holds(addr, now)
    }

    /// Whether enough peers at enough IPs confirmed `addr` within [`CONFIRMATION_TTL`].
    pub fn holds(&self, addr: &Multiaddr, now: Instant) -> bool {
        let Some(seen) = self.confirmations.get(addr) else {
            return false;
        };
        let live = seen
            .iter()
            .filter(|(_, _, at)| now.duration_since(*at) < CONFIRMATION_TTL);
        let peers: HashSet<PeerId> = live.clone().map(|(p, _, _)| *p).collect();
        let ips: HashSet<IpAddr> = live.map(|(_, ip, _)| *ip).collect();
        peers.len() >= QUORUM_PEERS && ips.len() >= QUORUM_IPS
    }
}

/// libp2p's AutoNAT behaviour whose address confirmations wait for a [`Quorum`].
pub struct AutonatQuorum {
    inner: autonat::Behaviour,
    quorum: Quorum,
    /// The remote IP of each direct connection (relayed ones are not listed), and whether this
    /// node dialled it.
    ips: HashMap<ConnectionId, (PeerId, IpAddr, bool)>,
}

impl AutonatQuorum {
    pub fn new(inner: autonat::Behaviour) -> Self {
        AutonatQuorum {
            inner,
            quorum: Quorum::default(),
            ips: HashMap::new(),
        }
    }

    /// The IP `peer` is at: of a connection this node dialled if there is one (the address
    /// it chose), else of one the peer dialled (the source of its packets); none when every
    /// connection to it is relayed.
    fn ip_of_peer(&self, peer: &PeerId) -> Option<IpAddr> {
        let mut of_peer = self.ips.values().filter(|(p, _, _)| p == peer);
        of_peer
            .clone()
            .find(|(_, _, dialled)| *dialled)
            .or_else(|| of_peer.next())
            .map(|(_, ip, _)| *ip)
    }
}

/// The IP a connection's remote end is at, unless it goes through a relay.
fn remote_ip(endpoint: &ConnectedPoint) -> Option<IpAddr> {
    let remote = endpoint.get_remote_address();
    (!is_relayed(remote)).then(|| ip_of(remote)).flatten()
}

impl NetworkBehaviour for AutonatQuorum {
    type ConnectionHandler = THandler<autonat::Behaviour>;
    type ToSwarm = autonat::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_inbound_connection(id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match &event {
            FromSwarm::ConnectionEstablished(e) => {
                if let Some(ip) = remote_ip(e.endpoint) {
                    let dialled = e.endpoint.is_dialer();
                    self.ips.insert(e.connection_id, (e.peer_id, ip, dialled));
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                self.ips.remove(&e.connection_id);
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            let action = match self.inner.poll(cx) {
                Poll::Ready(action) => action,
                Poll::Pending => return Poll::Pending,
            };
            match &action {
                // AutoNAT reports the probe's answer before it confirms the address.
                ToSwarm::GenerateEvent(autonat::Event::OutboundProbe(
                    autonat::OutboundProbeEvent::Response { peer, address, .. },
                )) => match self.ip_of_peer(peer) {
                    Some(ip) => {
                        let held = self.quorum.confirm(address, *peer, ip, Instant::now());
                        tracing::debug!(%peer, %ip, %address, held, "AutoNAT dial-back");
                    }
                    None => {
                        tracing::debug!(%peer, %address, "AutoNAT dial-back over a relay: not counted")
                    }
                },
                ToSwarm::ExternalAddrConfirmed(address)
                    if !self.quorum.holds(address, Instant::now()) =>
                {
                    tracing::debug!(%address, "AutoNAT confirmed an address: waiting for a second peer at another IP");
                    continue;
                }
                _ => {}
            }
            return Poll::Ready(action);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::random_peer as peer;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_peers_at_two_ips_make_a_quorum_and_one_ip_never_does() {
        let now = Instant::now();
        let mut quorum = Quorum::default();
        let me = addr("/ip4/203.0.113.7/tcp/4001");
        let (a, b, c) = (peer(), peer(), peer());
        assert!(!quorum.confirm(&me, a, ip("198.51.100.1"), now));
        assert!(
            !quorum.confirm(&me, a, ip("198.51.100.2"), now),
            "one peer twice, even from two IPs"
        );
        assert!(
            !quorum.confirm(&me, b, ip("198.51.100.2"), now),
            "two peers, one IP (a's second IP replaced its first)"
        );
        assert!(quorum.confirm(&me, c, ip("198.51.100.3"), now));
        assert!(quorum.holds(&me, now));
        assert!(!quorum.holds(&addr("/ip4/203.0.113.8/tcp/4001"), now));

        // Sybils: many peers at one IP are one IP.
        let mut sybils = Quorum::default();
        for _ in 0..20 {
            assert!(!sybils.confirm(&me, peer(), ip("198.51.100.9"), now));
        }
    }

    #[test]
    fn confirmations_expire_and_are_bounded() {
        let now = Instant::now();
        let mut quorum = Quorum::default();
        let me = addr("/ip4/203.0.113.7/tcp/4001");
        quorum.confirm(&me, peer(), ip("198.51.100.1"), now);
        let later = now + CONFIRMATION_TTL + Duration::from_secs(1);
        assert!(
            !quorum.confirm(&me, peer(), ip("198.51.100.2"), later),
            "the first confirmation is too old to count"
        );
        assert!(quorum.confirm(&me, peer(), ip("198.51.100.3"), later));
        assert!(!quorum.holds(&me, later + CONFIRMATION_TTL));

        // Addresses a peer makes up do not grow the table past its bound.
        let mut quorum = Quorum::default();
        for port in 0..100u16 {
            let made_up = addr(&format!("/ip4/203.0.113.7/tcp/{port}"));
            quorum.confirm(&made_up, peer(), ip("198.51.100.1"), now);
        }
        assert_eq!(quorum.confirmations.len(), MAX_ADDRESSES);
        for _ in 0..100 {
            quorum.confirm(&me, peer(), ip("198.51.100.1"), later);
        }
        assert!(quorum
            .confirmations
            .values()
            .all(|seen| seen.len() <= MAX_CONFIRMATIONS));
    }
}
