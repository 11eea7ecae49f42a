//! Whether others can dial this node, and what it does about it: AutoNAT's verdict, relay
//! reservations while not directly reachable (released once it is), identify pushes after an
//! address change, and the status `/v1/mesh/status` shows.
//!
//! Plain bookkeeping with no swarm, like [`super::relays`] (which it drives): the swarm task
//! passes in what happened and performs what the methods return. DCUtR's outcomes go to the
//! [`super::peer_table`] through the stream behaviour; the relay server hides itself while the
//! node is not directly reachable ([`super::relay_server`]).

use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::{autonat, Multiaddr, PeerId};

use super::addr::{circuit_addr, is_relayed, strip_p2p};
use super::relays::{fits_calls, Relays};
use super::{NetworkStatus, Reachability};

/// How long after an address change connected peers are told (see [`Reach::push_due`]).
pub const IDENTIFY_PUSH_DELAY: Duration = Duration::from_millis(300);

/// What to do with a relay's answer to a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// The first acceptance: others can reach this node through the relay now.
    New,
    /// A renewal: nothing changes.
    Renewed,
    /// Its circuits are too short or too small for calls: close this listener (if any) and
    /// reserve elsewhere.
    Unfit(Option<ListenerId>),
}

#[derive(Debug)]
pub struct Reach {
    relays: Relays,
    /// What AutoNAT concluded last.
    nat_status: Reachability,
    push_at: Option<Instant>,
}

/// Whether one of `external` reaches this node without a relay.
pub fn directly_reachable<'a>(mut external: impl Iterator<Item = &'a Multiaddr>) -> bool {
    external.any(|a| !is_relayed(a))
}

/// The addresses a peer holding a reservation with this relay is reachable at: its circuit
/// through each of this node's direct external addresses.
pub fn circuits_through<'a>(
    me: &PeerId,
    external: impl Iterator<Item = &'a Multiaddr>,
) -> Vec<Multiaddr> {
    external
        .filter(|a| !is_relayed(a))
        .map(|a| circuit_addr(&strip_p2p(a), me))
        .collect()
}

impl Reach {
    /// Whether `peer` is one of this node's relays (a reservation asked for or held).
    pub fn reserves_with(&self, peer: &PeerId) -> bool {
        self.relays.holds(peer)
    }

    /// Holding at most `max_relays` reservations (0 for a short-lived client).
    pub fn new(max_relays: usize) -> Self {
        Reach {
            relays: Relays::new(max_relays),
            nat_status: Reachability::Unknown,
            push_at: None,
        }
    }

    /// The relays to listen through now: none while the node is directly reachable.
    /// Relays are drawn weighted by the round trips measured to them (`rtt_ms`).
    pub fn to_reserve(
        &self,
        directly_reachable: bool,
        now: Instant,
        rtt_ms: &std::collections::HashMap<PeerId, f64>,
    ) -> Vec<(PeerId, Multiaddr)> {
        if directly_reachable {
            return Vec::new();
        }
        self.relays.to_reserve(now, rtt_ms)
    }

    /// A circuit through `relay` opened: it counts for the relay when relays are drawn.
    pub fn circuit_worked(&mut self, relay: &PeerId) {
        self.relays.circuit_worked(relay);
    }

    /// Listening through `relay` as `listener` asks it for a reservation.
    pub fn reserving(&mut self, relay: PeerId, listener: ListenerId) {
        self.relays.requested(relay, listener);
    }

    /// A listener closed: the relay whose reservation ended, if it was one (the caller
    /// reserves again).
    pub fn on_listener_closed(&mut self, listener: ListenerId, now: Instant) -> Option<PeerId> {
        self.relays.closed(listener, now)
    }

    /// A peer identified itself on a connection. `relayed`: that connection is relayed (then
    /// its addresses say nothing about it as a relay). True when there may be a new relay to
    /// reserve.
    pub fn on_identified(
        &mut self,
        peer: PeerId,
        relayed: bool,
        offers_relay: bool,
        listen_addrs: &[Multiaddr],
    ) -> bool {
        if relayed {
            return false;
        }
        if offers_relay {
            self.relays.offer(peer, listen_addrs);
            true
        } else {
            self.relays.withdraw(&peer);
            false
        }
    }

    /// The last connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: &PeerId) {
        self.relays.withdraw(peer);
    }

    /// An external address was confirmed: tell peers soon, and when it is direct, release
    /// every relay (the listeners returned are to be removed).
    pub fn on_external_confirmed(&mut self, addr: &Multiaddr, now: Instant) -> Vec<ListenerId> {
        self.push_soon(now);
        if is_relayed(addr) {
            return Vec::new();
        }
        self.relays.drain()
    }

    /// An external address expired: tell peers soon.
    pub fn on_external_expired(&mut self, now: Instant) {
        self.push_soon(now);
    }

    /// A relay accepted (or renewed) a reservation whose circuits are limited to `duration`
    /// and `bytes` (`None`: no limit).
    pub fn on_reservation_accepted(
        &mut self,
        relay: &PeerId,
        duration: Option<Duration>,
        bytes: Option<u64>,
    ) -> Reserved {
        if !fits_calls(duration, bytes) {
            Reserved::Unfit(self.relays.reject(relay))
        } else if self.relays.accepted(relay) {
            Reserved::New
        } else {
            Reserved::Renewed
        }
    }

    pub fn on_nat_status(&mut self, status: &autonat::NatStatus) {
        self.nat_status = match status {
            autonat::NatStatus::Public(_) => Reachability::Public,
            autonat::NatStatus::Private => Reachability::Private,
            autonat::NatStatus::Unknown => Reachability::Unknown,
        };
    }

    /// Connected peers learn new addresses and protocols by an identify push. A new external
    /// address also turns Kademlia to server mode; identify pushes such a change by itself
    /// only on connections whose first identify exchange has finished, so a node that got its
    /// relay reservation in its first milliseconds would stay unknown to the DHT. The short
    /// delay lets the protocol change reach every connection before the push.
    fn push_soon(&mut self, now: Instant) {
        if self.push_at.is_none() {
            self.push_at = Some(now + IDENTIFY_PUSH_DELAY);
        }
    }

    /// When to push identify to every connected peer, if a push is due.
    pub fn push_due(&self) -> Option<Instant> {
        self.push_at
    }

    /// The push went out.
    pub fn pushed(&mut self) {
        self.push_at = None;
    }

    /// `external`: the swarm's confirmed external addresses; `relay_server`: whether this node
    /// runs a relay server (it relays only while directly reachable).
    pub fn status(&self, external: &[Multiaddr], relay_server: bool) -> NetworkStatus {
        let direct = directly_reachable(external.iter());
        NetworkStatus {
            // AutoNAT's "public" counts once its address holds its quorum and is confirmed.
            reachability: match (direct, self.nat_status) {
                (true, _) => Reachability::Public,
                (false, Reachability::Public) => Reachability::Unknown,
                (false, status) => status,
            },
            autonat: self.nat_status,
            external_addrs: external.iter().map(|a| a.to_string()).collect(),
            relays: self.relays.active().iter().map(|p| p.to_string()).collect(),
            relaying: relay_server && direct,
            dht: Default::default(),
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

    const RELAY_ADDR: &str = "/ip4/198.51.100.10/tcp/4001";

    /// A node holding an accepted reservation with a fresh relay.
    fn reserved(reach: &mut Reach, now: Instant) -> (PeerId, ListenerId) {
        let relay = peer();
        assert!(reach.on_identified(relay, false, true, &[addr(RELAY_ADDR)]));
        let picks = reach.to_reserve(false, now, &Default::default());
        assert_eq!(picks.len(), 1);
        assert_eq!(picks[0].0, relay);
        let listener = ListenerId::next();
        reach.reserving(relay, listener);
        assert_eq!(
            reach.on_reservation_accepted(&relay, None, None),
            Reserved::New
        );
        (relay, listener)
    }

    #[test]
    fn reserves_only_while_not_directly_reachable() {
        let mut reach = Reach::new(2);
        let relay = peer();
        reach.on_identified(relay, false, true, &[addr(RELAY_ADDR)]);
        assert!(reach
            .to_reserve(true, Instant::now(), &Default::default())
            .is_empty());
        assert_eq!(
            reach
                .to_reserve(false, Instant::now(), &Default::default())
                .len(),
            1
        );
    }

    #[test]
    fn what_a_relayed_connection_says_is_ignored() {
        let mut reach = Reach::new(2);
        assert!(!reach.on_identified(peer(), true, true, &[addr(RELAY_ADDR)]));
        assert!(reach
            .to_reserve(false, Instant::now(), &Default::default())
            .is_empty());
    }

    #[test]
    fn a_direct_address_releases_the_relays_and_schedules_a_push() {
        let now = Instant::now();
        let mut reach = Reach::new(2);
        let (relay, listener) = reserved(&mut reach, now);
        let status = reach.status(&[], true);
        assert_eq!(status.relays, vec![relay.to_string()]);
        assert!(!status.relaying);

        let circuit = circuit_addr(&addr(RELAY_ADDR), &relay);
        assert!(reach.on_external_confirmed(&circuit, now).is_empty());
        assert_eq!(reach.push_due(), Some(now + IDENTIFY_PUSH_DELAY));
        let direct = addr("/ip4/203.0.113.5/tcp/4001");
        let later = now + Duration::from_millis(100);
        assert_eq!(reach.on_external_confirmed(&direct, later), vec![listener]);
        assert_eq!(
            reach.push_due(),
            Some(now + IDENTIFY_PUSH_DELAY),
            "one push for both"
        );
        reach.pushed();
        assert_eq!(reach.push_due(), None);
        reach.on_external_expired(later);
        assert!(reach.push_due().is_some());

        let status = reach.status(&[direct], true);
        assert_eq!(status.reachability, Reachability::Public);
        assert!(status.relays.is_empty());
        assert!(status.relaying);
    }

    #[test]
    fn unfit_relays_are_dropped_and_renewals_are_not_news() {
        let now = Instant::now();
        let mut reach = Reach::new(2);
        let (relay, _) = reserved(&mut reach, now);
        assert_eq!(
            reach.on_reservation_accepted(&relay, None, None),
            Reserved::Renewed
        );
        let small = peer();
        reach.on_identified(small, false, true, &[addr("/ip4/198.51.100.11/tcp/4001")]);
        let listener = ListenerId::next();
        reach.reserving(small, listener);
        assert_eq!(
            reach.on_reservation_accepted(&small, Some(Duration::from_secs(120)), None),
            Reserved::Unfit(Some(listener))
        );
        assert!(
            reach.to_reserve(false, now, &Default::default()).is_empty(),
            "not picked again"
        );
    }

    #[test]
    fn a_closed_reservation_names_its_relay() {
        let now = Instant::now();
        let mut reach = Reach::new(1);
        let (relay, listener) = reserved(&mut reach, now);
        assert_eq!(reach.on_listener_closed(ListenerId::next(), now), None);
        assert_eq!(reach.on_listener_closed(listener, now), Some(relay));
        assert!(reach.status(&[], false).relays.is_empty());
    }

    #[test]
    fn autonat_decides_until_a_direct_address_is_confirmed() {
        let mut reach = Reach::new(0);
        assert_eq!(reach.status(&[], false).reachability, Reachability::Unknown);
        reach.on_nat_status(&autonat::NatStatus::Private);
        let relayed = addr(&format!("{RELAY_ADDR}/p2p/{}/p2p-circuit", peer()));
        let status = reach.status(std::slice::from_ref(&relayed), false);
        assert_eq!(status.reachability, Reachability::Private);
        assert_eq!(status.external_addrs, vec![relayed.to_string()]);
        // One peer's word (AutoNAT's status before the quorum confirmed an address) is not
        // enough to say public.
        reach.on_nat_status(&autonat::NatStatus::Public(addr(
            "/ip4/203.0.113.5/tcp/4001",
        )));
        let status = reach.status(&[], false);
        assert_eq!(status.reachability, Reachability::Unknown);
        assert_eq!(status.autonat, Reachability::Public);
    }

    #[test]
    fn peers_reserving_here_are_reachable_through_every_direct_address() {
        let me = peer();
        let external = [
            addr(&format!("/ip4/203.0.113.5/tcp/4001/p2p/{me}")),
            addr(&format!("{RELAY_ADDR}/p2p/{}/p2p-circuit", peer())),
        ];
        assert_eq!(
            circuits_through(&me, external.iter()),
            vec![circuit_addr(&addr("/ip4/203.0.113.5/tcp/4001"), &me)]
        );
    }
}
