//! Choosing relays while this node is not reachable.
//!
//! rust-libp2p has no automatic relay selection. A member node that has no confirmed external
//! address picks relays among the peers it knows that offer circuit relay v2 (identify lists
//! the hop protocol, which a mesh relay advertises only while it is itself reachable), listens
//! on their `/p2p-circuit` address to reserve a slot, and replaces a relay that goes away or
//! refuses. No relay is hard-coded. The swarm task acts on what [`Relays`] decides; this module
//! holds only the bookkeeping, so it is tested without a network.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::addr::{circuit_addr, is_relayed, strip_p2p};

/// How long a relay that failed or went away is left alone.
pub const RELAY_BACKOFF: Duration = Duration::from_secs(30);

/// The least a relay must allow per circuit for mesh to use it: the longest call deadline
/// (10 minutes), and room for a long answer. libp2p's default relay (2 minutes, 128 KiB) would
/// cut calls off midway, so such relays are not used.
pub const MIN_CIRCUIT_DURATION: Duration = Duration::from_secs(600);
pub const MIN_CIRCUIT_BYTES: u64 = 4 * 1024 * 1024;

/// Whether circuits limited to `duration` and `bytes` can carry mesh calls (`None`: no limit).
pub fn fits_calls(duration: Option<Duration>, bytes: Option<u64>) -> bool {
    duration.is_none_or(|d| d >= MIN_CIRCUIT_DURATION)
        && bytes.is_none_or(|b| b >= MIN_CIRCUIT_BYTES)
}

#[derive(Debug)]
struct Reservation {
    listener: ListenerId,
    accepted: bool,
}

#[derive(Debug, Default)]
pub struct Relays {
    max: usize,
    /// Peers offering a relay, with an address others can reach them at.
    candidates: HashMap<PeerId, Multiaddr>,
    reservations: HashMap<PeerId, Reservation>,
    backoff: HashMap<PeerId, Instant>,
    /// Circuits through each relay that opened, as this node saw them.
    worked: HashMap<PeerId, u32>,
}

/// Round trip assumed for a relay not measured yet, in milliseconds.
const UNMEASURED_RELAY_RTT_MS: f64 = 500.0;
/// Circuits that worked count towards a relay's weight up to this many.
const WORKED_CAP: u32 = 8;

/// How likely a relay is to be picked: nearer ones, and ones whose circuits worked, more. Never
/// zero, so every candidate has a chance: a peer id cannot be ground to win, and a relay
/// cannot capture the reservations by claiming anything about itself.
fn weight(rtt_ms: Option<f64>, worked: u32) -> f64 {
    let rtt = rtt_ms.unwrap_or(UNMEASURED_RELAY_RTT_MS).max(0.0);
    f64::from(1 + worked.min(WORKED_CAP)) / (rtt + 20.0)
}

impl Relays {
    pub fn new(max: usize) -> Self {
        Relays {
            max,
            ..Default::default()
        }
    }

    /// `peer` offers a relay and can be reached at `addrs` (its confirmed addresses).
    pub fn offer(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        let usable = |a: &&Multiaddr| !is_relayed(a);
        // TCP first: every libp2p relay speaks it; QUIC otherwise.
        let best = addrs
            .iter()
            .filter(usable)
            .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
            .or_else(|| addrs.iter().find(usable));
        if let Some(addr) = best {
            self.candidates.insert(peer, strip_p2p(addr));
        }
    }

    /// `peer` no longer offers a relay, or is gone.
    pub fn withdraw(&mut self, peer: &PeerId) {
        self.candidates.remove(peer);
    }

    /// The circuit addresses to listen on now, one per new relay, up to the maximum: drawn at
    /// random among the candidates, weighted by the round trip this node measured to each
    /// (`rtt_ms`) and the circuits through it that worked ([`weight`]).
    pub fn to_reserve(
        &self,
        now: Instant,
        rtt_ms: &HashMap<PeerId, f64>,
    ) -> Vec<(PeerId, Multiaddr)> {
        use rand::seq::SliceRandom;
        let room = self.max.saturating_sub(self.reservations.len());
        let picks: Vec<(&PeerId, &Multiaddr)> = self
            .candidates
            .iter()
            .filter(|(peer, _)| !self.reservations.contains_key(peer))
            .filter(|(peer, _)| self.backoff.get(peer).is_none_or(|until| *until <= now))
            .collect();
        let weight_of = |(peer, _): &(&PeerId, &Multiaddr)| {
            weight(
                rtt_ms.get(*peer).copied(),
                self.worked.get(*peer).copied().unwrap_or(0),
            )
        };
        picks
            .choose_multiple_weighted(&mut rand::thread_rng(), room, weight_of)
            .map(|chosen| chosen.cloned().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|(peer, addr)| (*peer, circuit_addr(addr, peer)))
            .collect()
    }

    /// A circuit through `relay` opened.
    pub fn circuit_worked(&mut self, relay: &PeerId) {
        if self.candidates.contains_key(relay) {
            let n = self.worked.entry(*relay).or_default();
            *n = n.saturating_add(1);
        }
    }

    /// A reservation with `relay` was requested through `listener`.
    pub fn requested(&mut self, relay: PeerId, listener: ListenerId) {
        self.reservations.insert(
            relay,
            Reservation {
                listener,
                accepted: false,
            },
        );
    }

    /// `relay` accepted (or renewed) the reservation; true the first time.
    pub fn accepted(&mut self, relay: &PeerId) -> bool {
        match self.reservations.get_mut(relay) {
            Some(r) if !r.accepted => {
                r.accepted = true;
                true
            }
            _ => false,
        }
    }

    /// The listener of a reservation closed (refused, relay gone): returns the relay, which
    /// is left alone for [`RELAY_BACKOFF`].
    pub fn closed(&mut self, listener: ListenerId, now: Instant) -> Option<PeerId> {
        let relay = *self
            .reservations
            .iter()
            .find(|(_, r)| r.listener == listener)?
            .0;
        self.reservations.remove(&relay);
        self.backoff.insert(relay, now + RELAY_BACKOFF);
        Some(relay)
    }

    /// Drops `relay` for good (until it offers itself again): its limits do not fit calls.
    pub fn reject(&mut self, relay: &PeerId) -> Option<ListenerId> {
        self.candidates.remove(relay);
        self.reservations.remove(relay).map(|r| r.listener)
    }

    /// Every reservation's listener, to close them when the node becomes reachable.
    pub fn drain(&mut self) -> Vec<ListenerId> {
        self.reservations.drain().map(|(_, r)| r.listener).collect()
    }

    /// Whether this node asked `relay` for a reservation, or holds one there.
    pub fn holds(&self, relay: &PeerId) -> bool {
        self.reservations.contains_key(relay)
    }

    /// Relays holding an accepted reservation.
    pub fn active(&self) -> Vec<PeerId> {
        let mut out: Vec<PeerId> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.accepted)
            .map(|(p, _)| *p)
            .collect();
        out.sort_by_key(|p| p.to_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::random_peer as peer;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn picks_up_to_the_maximum_and_prefers_tcp() {
        let mut relays = Relays::new(2);
        let (a, b, c) = (peer(), peer(), peer());
        relays.offer(
            a,
            &[
                addr("/ip4/198.51.100.10/udp/4001/quic-v1"),
                addr("/ip4/198.51.100.10/tcp/4001"),
            ],
        );
        relays.offer(b, &[addr("/ip4/198.51.100.11/udp/4001/quic-v1")]);
        relays.offer(c, &[addr("/ip4/198.51.100.12/tcp/4001")]);
        let picks = relays.to_reserve(Instant::now(), &HashMap::new());
        assert_eq!(picks.len(), 2);
        let for_a = circuit_addr(&addr("/ip4/198.51.100.10/tcp/4001"), &a);
        if let Some((_, circuit)) = picks.iter().find(|(p, _)| *p == a) {
            assert_eq!(circuit, &for_a);
        }
        for (p, circuit) in &picks {
            assert!(is_relayed(circuit));
            assert!(circuit.to_string().contains(&p.to_string()));
        }
    }

    #[test]
    fn a_relay_that_closes_is_replaced_and_backed_off() {
        let mut relays = Relays::new(1);
        let (a, b) = (peer(), peer());
        relays.offer(a, &[addr("/ip4/198.51.100.10/tcp/4001")]);
        relays.offer(b, &[addr("/ip4/198.51.100.11/tcp/4001")]);
        let now = Instant::now();
        let (first, _) = relays.to_reserve(now, &HashMap::new())[0];
        let listener = ListenerId::next();
        relays.requested(first, listener);
        assert!(
            relays.to_reserve(now, &HashMap::new()).is_empty(),
            "one relay is enough"
        );
        assert!(relays.accepted(&first));
        assert!(!relays.accepted(&first), "a renewal is not news");
        assert_eq!(relays.active(), vec![first]);

        assert_eq!(relays.closed(listener, now), Some(first));
        let next = relays.to_reserve(now, &HashMap::new());
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].0, first, "the relay that went away waits");
        let later = now + RELAY_BACKOFF + Duration::from_secs(1);
        relays.withdraw(&next[0].0);
        assert_eq!(
            relays.to_reserve(later, &HashMap::new())[0].0,
            first,
            "and comes back after the backoff"
        );
    }

    #[test]
    fn the_choice_is_random_weighted_by_round_trip_and_circuits_that_worked() {
        // 2,000 draws of one relay among a near one, a far one and a far one whose circuits
        // worked: every one is drawn sometimes (a peer id cannot be ground to win), the near
        // one most, and circuits that worked lift the far one above its twin.
        let (near, far, proven) = (peer(), peer(), peer());
        let mut relays = Relays::new(1);
        for (p, ip) in [(near, 10), (far, 11), (proven, 12)] {
            relays.offer(p, &[addr(&format!("/ip4/198.51.100.{ip}/tcp/4001"))]);
        }
        for _ in 0..3 {
            relays.circuit_worked(&proven);
        }
        let rtts: HashMap<PeerId, f64> = [(near, 5.0), (far, 200.0), (proven, 200.0)]
            .into_iter()
            .collect();
        let mut drawn: HashMap<PeerId, u32> = HashMap::new();
        for _ in 0..2000 {
            let picks = relays.to_reserve(Instant::now(), &rtts);
            assert_eq!(picks.len(), 1);
            *drawn.entry(picks[0].0).or_default() += 1;
        }
        let count = |p| drawn.get(&p).copied().unwrap_or(0);
        assert!(count(far) > 0, "{drawn:?}");
        assert!(count(near) > count(proven), "{drawn:?}");
        assert!(count(proven) > count(far) * 2, "{drawn:?}");
        assert!(weight(None, 0) > 0.0 && weight(Some(1e9), 0) > 0.0);
    }

    #[test]
    fn relays_with_libp2p_default_limits_do_not_fit_calls() {
        assert!(!fits_calls(
            Some(Duration::from_secs(120)),
            Some(128 * 1024)
        ));
        assert!(!fits_calls(None, Some(128 * 1024)));
        assert!(!fits_calls(Some(Duration::from_secs(120)), None));
        let mesh = crate::network::RelayLimits::default();
        assert!(fits_calls(
            Some(mesh.max_circuit_duration),
            Some(mesh.max_circuit_bytes)
        ));
        assert!(fits_calls(None, None));
    }

    #[test]
    fn a_rejected_relay_is_not_picked_again() {
        let mut relays = Relays::new(2);
        let a = peer();
        relays.offer(a, &[addr("/ip4/198.51.100.10/tcp/4001")]);
        let listener = ListenerId::next();
        relays.requested(a, listener);
        assert_eq!(relays.reject(&a), Some(listener));
        assert!(relays
            .to_reserve(Instant::now(), &HashMap::new())
            .is_empty());
        assert!(relays.active().is_empty());
    }

    #[test]
    fn relayed_addresses_are_not_relays() {
        let mut relays = Relays::new(2);
        let a = peer();
        let relayed = format!("/ip4/198.51.100.10/tcp/4001/p2p/{}/p2p-circuit", peer());
        relays.offer(a, &[addr(&relayed)]);
        assert!(relays
            .to_reserve(Instant::now(), &HashMap::new())
            .is_empty());
    }
}
