//! Keeping the number of open connections in a band.
//!
//! A node connects to every peer it asks anything: each step of a Kademlia walk, the peers
//! that ask it, every provider whose catalog it fetches. libp2p closes a connection only once
//! it has been idle for the swarm's idle timeout, and every open connection is pinged. In a
//! mesh of a few hundred nodes a node touches most of the others within that timeout, so
//! without a bound it holds a connection to nearly every node, up to the hard cap
//! (`max_connections`), where it refuses new ones, its own dials included (docs/scale.md).
//!
//! So, as other DHT nodes do, the swarm task checks the count every 10 s; past the
//! [`Watermarks::high`] mark it closes connections down to [`Watermarks::low`], before the cap
//! is reached. Only those that carried nothing but libp2p's own protocols (Kademlia, identify,
//! ping) are closed: not one that carried a mesh stream (a call, a catalog, a stage), one made
//! through or upgraded from a relay, one to a relay this node reserves with, or one to a peer
//! that holds a reservation or a circuit on this node. Among the rest, a spare (a second
//! connection to a peer) goes first, then peers outside the routing table, then the oldest. A
//! connection younger than [`Watermarks::grace`] is left alone: it was opened for something
//! still under way.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::PeerId;

/// The band the connection count is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// Down to this many when trimming.
    pub low: usize,
    /// Trimming starts past this many.
    pub high: usize,
    /// A connection this young is never closed here.
    pub grace: Duration,
}

impl Default for Watermarks {
    /// A guard just under the default cap of 256, not a working size: trimming below the set
    /// of peers a node talks to within the idle timeout only makes it dial them again (at 200
    /// simulated nodes, marks of 96 and 128 raised identify exchanges tenfold and slowed calls;
    /// docs/scale.md).
    fn default() -> Self {
        Watermarks {
            low: 192,
            high: 224,
            grace: Duration::from_secs(30),
        }
    }
}

/// How often the swarm task compares the count with the marks.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// One open connection, as the trimming sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub peer: PeerId,
    pub id: ConnectionId,
    /// When it was established.
    pub since: Instant,
    /// Never closed here (see the module's comment for what counts).
    pub protected: bool,
    /// Another connection to the same peer is the one its streams use.
    pub spare: bool,
    /// The peer is in this node's Kademlia routing table.
    pub in_routing_table: bool,
}

/// The connections to close now, at most `open.len() - low` of them, none when the count is
/// at or below `high`.
pub fn to_close(marks: &Watermarks, open: &[Open], now: Instant) -> Vec<(PeerId, ConnectionId)> {
    if open.len() <= marks.high {
        return Vec::new();
    }
    let excess = open.len() - marks.low.min(marks.high);
    let mut eligible: Vec<&Open> = open
        .iter()
        .filter(|c| !c.protected && now.saturating_duration_since(c.since) >= marks.grace)
        .collect();
    eligible.sort_by_key(|c| (!c.spare, c.in_routing_table, c.since, c.id));
    eligible
        .into_iter()
        .take(excess)
        .map(|c| (c.peer, c.id))
        .collect()
}

/// The peers that use this node as their relay: reservations held here and circuits open
/// through here (either end). Bounded by the relay's own limits.
#[derive(Debug, Default)]
pub struct RelayUsers {
    reserved: HashSet<PeerId>,
    circuits: HashMap<PeerId, u32>,
}

impl RelayUsers {
    pub fn reservation(&mut self, peer: PeerId, held: bool) {
        if held {
            self.reserved.insert(peer);
        } else {
            self.reserved.remove(&peer);
        }
    }

    pub fn circuit_opened(&mut self, src: PeerId, dst: PeerId) {
        for peer in [src, dst] {
            *self.circuits.entry(peer).or_default() += 1;
        }
    }

    pub fn circuit_closed(&mut self, src: &PeerId, dst: &PeerId) {
        for peer in [src, dst] {
            if let Some(n) = self.circuits.get_mut(peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.circuits.remove(peer);
                }
            }
        }
    }

    pub fn uses(&self, peer: &PeerId) -> bool {
        self.reserved.contains(peer) || self.circuits.contains_key(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks() -> Watermarks {
        Watermarks {
            low: 2,
            high: 4,
            grace: Duration::from_secs(30),
        }
    }

    /// `n` plain connections, the i-th established `100 - i` seconds before `now`.
    fn plain(n: usize, now: Instant) -> Vec<Open> {
        (0..n)
            .map(|i| Open {
                peer: PeerId::random(),
                id: ConnectionId::new_unchecked(i),
                since: now - Duration::from_secs(100 - i as u64),
                protected: false,
                spare: false,
                in_routing_table: false,
            })
            .collect()
    }

    fn ids(closed: &[(PeerId, ConnectionId)]) -> Vec<ConnectionId> {
        closed.iter().map(|(_, id)| *id).collect()
    }

    #[test]
    fn nothing_closes_at_or_below_the_high_mark() {
        let now = Instant::now();
        assert!(to_close(&marks(), &plain(4, now), now).is_empty());
        assert!(to_close(&marks(), &[], now).is_empty());
    }

    #[test]
    fn past_the_high_mark_the_oldest_close_down_to_the_low_mark() {
        let now = Instant::now();
        let closed = to_close(&marks(), &plain(5, now), now);
        let expected: Vec<ConnectionId> = (0..3).map(ConnectionId::new_unchecked).collect();
        assert_eq!(ids(&closed), expected);
    }

    #[test]
    fn protected_and_young_connections_stay_even_if_the_count_stays_high() {
        let now = Instant::now();
        let mut open = plain(6, now);
        for c in &mut open[..4] {
            c.protected = true;
        }
        // The fifth is younger than the grace period.
        open[4].since = now - Duration::from_secs(10);
        let closed = to_close(&marks(), &open, now);
        assert_eq!(ids(&closed), [ConnectionId::new_unchecked(5)]);
    }

    #[test]
    fn spares_go_first_then_peers_outside_the_routing_table() {
        let now = Instant::now();
        let mut open = plain(6, now);
        // Oldest first would take 0, 1, 2, 3; these rank them otherwise.
        for c in &mut open[..3] {
            c.in_routing_table = true;
        }
        open[5].spare = true;
        let closed = to_close(&marks(), &open, now);
        let expected: Vec<ConnectionId> = [5, 3, 4, 0]
            .into_iter()
            .map(ConnectionId::new_unchecked)
            .collect();
        assert_eq!(ids(&closed), expected);
    }

    #[test]
    fn relay_users_are_counted_until_their_last_use_ends() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut users = RelayUsers::default();
        users.reservation(a, true);
        users.circuit_opened(b, a);
        users.circuit_opened(b, c);
        assert!(users.uses(&a) && users.uses(&b) && users.uses(&c));
        users.circuit_closed(&b, &c);
        assert!(users.uses(&b) && !users.uses(&c));
        users.circuit_closed(&b, &a);
        users.reservation(a, false);
        assert!(!users.uses(&a) && !users.uses(&b));
        // A close never seen opened is ignored.
        users.circuit_closed(&c, &a);
        assert!(!users.uses(&c));
    }

    #[test]
    fn a_low_mark_above_the_high_one_trims_to_the_high_one() {
        let now = Instant::now();
        let odd = Watermarks {
            low: 10,
            high: 4,
            grace: Duration::ZERO,
        };
        assert_eq!(to_close(&odd, &plain(6, now), now).len(), 2);
    }
}
