//! The one record of open connections: how each was made ([`Path`]), which one a stream to a
//! peer should use, and the per-peer summary `mesh peers` shows.
//!
//! The stream behaviour writes it (a connection opens or closes, DCUtR upgrades one) and picks
//! connections from it; the swarm task adds what identify and ping learn and reads the
//! summaries; [`super::Client`] reads it to skip the swarm task for a peer already connected.
//! So the path `mesh peers` reports is the path a call takes: both come from [`PeerTable::best`].
//!
//! Shared as [`SharedPeerTable`], an `Arc<std::sync::RwLock<_>>`, rather than owned by the
//! stream behaviour and queried through the swarm task: the client needs a synchronous answer
//! from outside that task ("connected?") without a round trip, and every access is a short
//! synchronous section: no lock is held across an `.await`, and all writes come from the one
//! swarm task, so readers never wait long.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

use super::{Path, PeerSummary};

/// One open connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub id: ConnectionId,
    pub path: Path,
    pub remote: Multiaddr,
    /// When it was established.
    pub since: Instant,
    /// Mesh streams (calls, catalogs, stage sessions) opened on it, either way.
    pub streams: u64,
}

#[derive(Debug, Default)]
struct Peer {
    connections: Vec<Connection>,
    agent: Option<String>,
    rtt: Option<Duration>,
}

/// Open connections by peer, with what identify and ping said about each peer.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: HashMap<PeerId, Peer>,
}

/// The path policy, in one place: lower is better. A direct connection beats a hole-punched
/// one (both skip the relay), which beats a relayed one.
fn rank(path: Path) -> u8 {
    match path {
        Path::Direct => 0,
        Path::HolePunched => 1,
        Path::Relayed => 2,
        // Never recorded here: a call this node serves itself uses no connection.
        Path::Local => u8::MAX,
    }
}

impl PeerTable {
    /// How a new connection to `peer` was made. A direct connection that appears while a
    /// relayed one is open is DCUtR's: on the side whose dial lost the race no dcutr event
    /// says so.
    pub fn classify(&self, peer: &PeerId, relayed: bool) -> Path {
        if relayed {
            Path::Relayed
        } else if self
            .connections(peer)
            .iter()
            .any(|c| c.path == Path::Relayed)
        {
            Path::HolePunched
        } else {
            Path::Direct
        }
    }

    /// Records a new connection and returns its path.
    pub fn add(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        remote: Multiaddr,
        relayed: bool,
        now: Instant,
    ) -> Path {
        let path = self.classify(&peer, relayed);
        self.peers
            .entry(peer)
            .or_default()
            .connections
            .push(Connection {
                id,
                path,
                remote,
                since: now,
                streams: 0,
            });
        path
    }

    /// A mesh stream opened on connection `id` to `peer`.
    pub fn stream_opened(&mut self, peer: &PeerId, id: ConnectionId) {
        if let Some(c) = self
            .peers
            .get_mut(peer)
            .and_then(|p| p.connections.iter_mut().find(|c| c.id == id))
        {
            c.streams = c.streams.saturating_add(1);
        }
    }

    /// The mesh streams opened on connection `id` to `peer`, if it is open.
    pub fn streams_on(&self, peer: &PeerId, id: ConnectionId) -> Option<u64> {
        self.peers
            .get(peer)?
            .connections
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.streams)
    }

    /// Forgets a closed connection; true when it was the peer's last one (the peer, with its
    /// agent and round-trip time, is then forgotten too).
    pub fn remove(&mut self, peer: &PeerId, id: ConnectionId) -> bool {
        let Some(entry) = self.peers.get_mut(peer) else {
            return false;
        };
        entry.connections.retain(|c| c.id != id);
        if entry.connections.is_empty() {
            self.peers.remove(peer);
            return true;
        }
        false
    }

    /// Whether connection `id` to `peer` is a relayed one that stayed relayed: open for at
    /// least `long_enough` at `now` with no direct connection to the peer beside it. A hole
    /// punch that would work has done so by then; its peer sits behind a NAT that does not
    /// let it (the side that answers a punch gets no event when its dials fail).
    pub fn stayed_relayed(
        &self,
        peer: &PeerId,
        id: ConnectionId,
        now: Instant,
        long_enough: Duration,
    ) -> bool {
        let connections = self.connections(peer);
        let relayed_long = connections.iter().any(|c| {
            c.id == id
                && c.path == Path::Relayed
                && now.saturating_duration_since(c.since) >= long_enough
        });
        relayed_long && connections.iter().all(|c| c.path == Path::Relayed)
    }

    /// DCUtR upgraded a relayed connection to `peer`: `id` is the direct one.
    pub fn hole_punched(&mut self, peer: &PeerId, id: ConnectionId) {
        if let Some(c) = self
            .peers
            .get_mut(peer)
            .and_then(|p| p.connections.iter_mut().find(|c| c.id == id))
        {
            c.path = Path::HolePunched;
        }
    }

    /// The connection a stream to `peer` should use: the best [`Path`], and among equals the
    /// newest connection (then the highest id, so the answer never depends on map order).
    pub fn best(&self, peer: &PeerId) -> Option<&Connection> {
        self.connections(peer)
            .iter()
            .min_by_key(|c| (rank(c.path), std::cmp::Reverse((c.since, c.id))))
    }

    /// The path of the connection with `id`, if it is open.
    pub fn path_of(&self, peer: &PeerId, id: ConnectionId) -> Option<Path> {
        self.connections(peer)
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.path)
    }

    /// Every open connection, each with whether it is its peer's [`PeerTable::best`].
    pub fn every_connection(&self) -> Vec<(PeerId, &Connection, bool)> {
        self.peers
            .keys()
            .flat_map(|peer| {
                let best = self.best(peer).map(|c| c.id);
                self.connections(peer)
                    .iter()
                    .map(move |c| (*peer, c, Some(c.id) == best))
            })
            .collect()
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    pub fn connections(&self, peer: &PeerId) -> &[Connection] {
        self.peers
            .get(peer)
            .map_or(&[], |p| p.connections.as_slice())
    }

    /// What identify said the peer runs; ignored for a peer with no open connection.
    pub fn set_agent(&mut self, peer: &PeerId, agent: String) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.agent = Some(agent);
        }
    }

    /// The last ping round trip; ignored for a peer with no open connection.
    pub fn set_rtt(&mut self, peer: &PeerId, rtt: Duration) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.rtt = Some(rtt);
        }
    }

    /// The last round trip measured to `peer`.
    pub fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        self.peers.get(peer).and_then(|p| p.rtt)
    }

    /// The last round trip measured to every connected peer that has one, in milliseconds.
    pub fn round_trips_ms(&self) -> std::collections::HashMap<PeerId, f64> {
        self.peers
            .iter()
            .filter_map(|(peer, p)| Some((*peer, p.rtt?.as_secs_f64() * 1000.0)))
            .collect()
    }

    /// Every connected peer, sorted by peer id (as text), for `mesh peers`.
    pub fn summaries(&self) -> Vec<PeerSummary> {
        let mut out: Vec<PeerSummary> = self
            .peers
            .iter()
            .filter_map(|(peer, p)| {
                Some(PeerSummary {
                    peer_id: *peer,
                    path: self.best(peer)?.path,
                    addresses: p.connections.iter().map(|c| c.remote.to_string()).collect(),
                    connections: p.connections.len(),
                    agent: p.agent.clone(),
                    rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                })
            })
            .collect();
        out.sort_by_cached_key(|s| s.peer_id.to_string());
        out
    }
}

/// The [`PeerTable`], shared by the swarm task, its stream behaviour and every client.
#[derive(Debug, Clone, Default)]
pub struct SharedPeerTable(Arc<RwLock<PeerTable>>);

impl SharedPeerTable {
    pub fn read(&self) -> RwLockReadGuard<'_, PeerTable> {
        self.0.read().expect("never poisoned: no panics while held")
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, PeerTable> {
        self.0
            .write()
            .expect("never poisoned: no panics while held")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::random_peer as peer;

    fn conn(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    const DIRECT: &str = "/ip4/198.51.100.1/tcp/4001";
    const RELAYED: &str = "/ip4/198.51.100.9/tcp/4001/p2p-circuit";

    #[test]
    fn a_relayed_connection_stayed_relayed_only_when_old_and_alone() {
        let mut table = PeerTable::default();
        let (a, b) = (peer(), peer());
        let t = Instant::now();
        let later = t + Duration::from_secs(5);
        let long = Duration::from_secs(3);
        table.add(a, conn(1), addr(RELAYED), true, t);
        assert!(table.stayed_relayed(&a, conn(1), later, long));
        assert!(
            !table.stayed_relayed(&a, conn(1), t + Duration::from_secs(1), long),
            "too young"
        );
        assert!(
            !table.stayed_relayed(&a, conn(9), later, long),
            "unknown connection"
        );
        table.add(b, conn(2), addr(RELAYED), true, t);
        table.add(b, conn(3), addr(DIRECT), false, t);
        assert!(
            !table.stayed_relayed(&b, conn(2), later, long),
            "punched beside it"
        );
        assert!(
            !table.stayed_relayed(&b, conn(3), later, long),
            "not relayed"
        );
    }

    #[test]
    fn a_direct_connection_next_to_a_relayed_one_is_hole_punched() {
        let mut table = PeerTable::default();
        let (a, b) = (peer(), peer());
        let t = Instant::now();
        assert_eq!(table.add(a, conn(1), addr(DIRECT), false, t), Path::Direct);
        assert_eq!(table.add(b, conn(2), addr(RELAYED), true, t), Path::Relayed);
        assert_eq!(
            table.add(b, conn(3), addr(DIRECT), false, t),
            Path::HolePunched
        );
        assert_eq!(
            table.classify(&a, false),
            Path::Direct,
            "no relayed connection to a"
        );
    }

    #[test]
    fn best_prefers_direct_then_hole_punched_over_relayed() {
        let mut table = PeerTable::default();
        let p = peer();
        let t = Instant::now();
        table.add(p, conn(1), addr(RELAYED), true, t);
        assert_eq!(table.best(&p).unwrap().id, conn(1), "the relay, if alone");
        // A newer relayed connection does not beat an older direct one.
        table.add(p, conn(2), addr(DIRECT), false, t + Duration::from_secs(1));
        table.add(p, conn(3), addr(RELAYED), true, t + Duration::from_secs(2));
        assert_eq!(table.best(&p).unwrap().path, Path::HolePunched);
        assert_eq!(table.best(&p).unwrap().id, conn(2));
        assert_eq!(table.path_of(&p, conn(3)), Some(Path::Relayed));
    }

    #[test]
    fn equal_paths_tie_to_the_newest_connection() {
        let mut table = PeerTable::default();
        let p = peer();
        let t = Instant::now();
        table.add(p, conn(7), addr(DIRECT), false, t + Duration::from_secs(5));
        table.add(p, conn(8), addr(DIRECT), false, t);
        assert_eq!(table.best(&p).unwrap().id, conn(7));
        // Same instant: the higher id, whatever the insertion order.
        table.add(p, conn(9), addr(DIRECT), false, t + Duration::from_secs(5));
        assert_eq!(table.best(&p).unwrap().id, conn(9));
    }

    #[test]
    fn every_connection_is_listed_once_with_its_peers_best_marked() {
        let mut table = PeerTable::default();
        let (p, q) = (peer(), peer());
        let t = Instant::now();
        table.add(p, conn(1), addr(DIRECT), false, t);
        table.add(p, conn(2), addr(DIRECT), false, t + Duration::from_secs(1));
        table.add(q, conn(3), addr(RELAYED), true, t);
        let mut listed: Vec<(PeerId, ConnectionId, bool)> = table
            .every_connection()
            .into_iter()
            .map(|(peer, c, best)| (peer, c.id, best))
            .collect();
        listed.sort_by_key(|(_, id, _)| *id);
        assert_eq!(
            listed,
            [(p, conn(1), false), (p, conn(2), true), (q, conn(3), true)]
        );
        assert!(PeerTable::default().every_connection().is_empty());
    }

    #[test]
    fn a_dcutr_upgrade_changes_the_path_in_place() {
        let mut table = PeerTable::default();
        let p = peer();
        let t = Instant::now();
        // Here only the dcutr event tells that this direct connection is a hole punch.
        table.add(p, conn(1), addr(DIRECT), false, t);
        table.hole_punched(&p, conn(1));
        assert_eq!(table.path_of(&p, conn(1)), Some(Path::HolePunched));
        table.hole_punched(&p, conn(99));
        assert_eq!(
            table.connections(&p).len(),
            1,
            "an unknown id changes nothing"
        );
    }

    #[test]
    fn the_last_close_forgets_the_peer_and_what_was_learnt() {
        let mut table = PeerTable::default();
        let p = peer();
        let t = Instant::now();
        table.add(p, conn(1), addr(RELAYED), true, t);
        table.add(p, conn(2), addr(DIRECT), false, t);
        table.set_agent(&p, "mesh/1".into());
        table.set_rtt(&p, Duration::from_millis(3));
        assert!(!table.remove(&p, conn(2)));
        assert!(table.is_connected(&p));
        assert_eq!(table.best(&p).unwrap().path, Path::Relayed);
        assert!(table.remove(&p, conn(1)));
        assert!(!table.is_connected(&p));
        assert!(!table.remove(&p, conn(1)), "already gone");
        table.set_agent(&p, "ignored".into());
        assert!(table.summaries().is_empty());
        // Back again: a fresh start, and no longer hole-punched.
        assert_eq!(table.add(p, conn(3), addr(DIRECT), false, t), Path::Direct);
        assert_eq!(table.summaries()[0].agent, None);
    }

    #[test]
    fn summaries_show_the_best_path_sorted_by_peer_id() {
        let mut table = PeerTable::default();
        let (a, b) = (peer(), peer());
        let t = Instant::now();
        table.add(a, conn(1), addr(RELAYED), true, t);
        table.add(a, conn(2), addr(DIRECT), false, t);
        table.add(b, conn(3), addr(DIRECT), false, t);
        table.set_agent(&a, "mesh/0.1.0".into());
        table.set_rtt(&a, Duration::from_micros(1500));
        let summaries = table.summaries();
        let mut ids = vec![a.to_string(), b.to_string()];
        ids.sort();
        let got: Vec<String> = summaries.iter().map(|s| s.peer_id.to_string()).collect();
        assert_eq!(got, ids);
        let sa = summaries.iter().find(|s| s.peer_id == a).unwrap();
        assert_eq!(sa.path, Path::HolePunched);
        assert_eq!(sa.connections, 2);
        assert_eq!(sa.addresses, vec![RELAYED.to_string(), DIRECT.to_string()]);
        assert_eq!(sa.agent.as_deref(), Some("mesh/0.1.0"));
        assert_eq!(sa.rtt_ms, Some(1.5));
        let sb = summaries.iter().find(|s| s.peer_id == b).unwrap();
        assert_eq!(
            (sb.path, sb.agent.as_deref(), sb.rtt_ms),
            (Path::Direct, None, None)
        );
    }

    #[test]
    fn a_summary_serializes_its_peer_id_as_text() {
        let mut table = PeerTable::default();
        let p = peer();
        table.add(p, conn(1), addr(DIRECT), false, Instant::now());
        let json = serde_json::to_value(&table.summaries()[0]).unwrap();
        assert_eq!(json["peer_id"], serde_json::json!(p.to_string()));
        assert_eq!(json["path"], "direct");
        assert_eq!(json["connections"], 1);
    }
}
