//! What the node has seen of its own network, for `mesh doctor`: the addresses peers observe
//! it at (identify's `observed_addr`), and how the last hole punch with each peer went.
//!
//! Whether a NAT maps ports consistently is judged from the observations, as the NAT lab
//! taught (testnet/natlab.sh): a node whose outgoing connections leave from one port (TCP with
//! port reuse, QUIC's one socket) and whose peers see that port translated to one and the same
//! public port has an endpoint-independent ("cone") mapping, and hole punching can work; peers
//! seeing different ports means a symmetric NAT, behind which direct connections do not form.
//!
//! Plain bookkeeping, bounded ([`MAX_OBSERVERS`], [`MAX_PUNCHES`]), tested without a swarm.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// Peers whose observation of this node is kept, per transport (the latest ones).
pub const MAX_OBSERVERS: usize = 32;

/// Peers whose last hole punch is kept (the latest ones).
pub const MAX_PUNCHES: usize = 256;

/// How a NAT maps this node's port, by transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingVerdict {
    /// At least two peers see the same address and port: the NAT kept one public port for
    /// several destinations (endpoint-independent), so punching can work. (A connection that
    /// left from another local port, seen at another public port, does not disprove it.)
    Consistent,
    /// Every peer sees a port of its own: endpoint-dependent (symmetric), punching cannot work.
    Varies,
    /// Fewer than two peers observed this transport.
    Unknown,
}

/// The mapping of one transport, as `GET /v1/mesh/diagnosis` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// `tcp` or `quic`.
    pub transport: String,
    pub verdict: MappingVerdict,
    /// How many peers observed it.
    pub observers: usize,
    /// The distinct addresses they saw (`IP:PORT`), the most seen first.
    pub seen: Vec<String>,
    /// How many peers saw the most seen address.
    #[serde(default)]
    pub agreeing: usize,
}

/// One peer's observation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub peer: String,
    pub observed: String,
    pub secs_ago: u64,
}

/// How the last hole punch with a peer went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Punch {
    pub peer: String,
    pub succeeded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub secs_ago: u64,
}

/// What `GET /v1/mesh/diagnosis` returns of the network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDiagnosis {
    pub mappings: Vec<Mapping>,
    pub observations: Vec<Observation>,
    pub punches: Vec<Punch>,
}

#[derive(Debug, Default)]
pub struct Diagnosis {
    /// What each peer observed last, per transport (a peer may be connected over both).
    observed: HashMap<(PeerId, &'static str), (Multiaddr, Instant)>,
    punches: HashMap<PeerId, (Result<(), String>, Instant)>,
}

impl Diagnosis {
    /// `peer` saw this node at `addr`, over a connection that is not relayed (a relayed
    /// connection's observed address is the relay's view of the relay). Only transports the
    /// node listens on count: without a listener every dial leaves from a port of its own, and
    /// different ports would prove nothing about the NAT (the caller checks).
    pub fn observed(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) {
        let Some((transport, _)) = ip_port(addr) else {
            return;
        };
        self.observed.insert((peer, transport), (addr.clone(), now));
        if self.observed.len() > 2 * MAX_OBSERVERS {
            forget_oldest(&mut self.observed, |(_, at)| *at);
        }
    }

    /// A hole punch with `peer` ended.
    pub fn punched(&mut self, peer: PeerId, result: Result<(), String>, now: Instant) {
        self.punches.insert(peer, (result, now));
        if self.punches.len() > MAX_PUNCHES {
            forget_oldest(&mut self.punches, |(_, at)| *at);
        }
    }

    /// The last hole punch with `peer`.
    pub fn punch_of(&self, peer: &PeerId, now: Instant) -> Option<Punch> {
        let (result, at) = self.punches.get(peer)?;
        Some(Punch {
            peer: peer.to_string(),
            succeeded: result.is_ok(),
            error: result.clone().err(),
            secs_ago: now.saturating_duration_since(*at).as_secs(),
        })
    }

    /// Everything, as the API reports it.
    pub fn report(&self, now: Instant) -> NetworkDiagnosis {
        let ago = |at: &Instant| now.saturating_duration_since(*at).as_secs();
        let mut observations: Vec<Observation> = self
            .observed
            .iter()
            .map(|((peer, _), (addr, at))| Observation {
                peer: peer.to_string(),
                observed: addr.to_string(),
                secs_ago: ago(at),
            })
            .collect();
        observations.sort_by_key(|o| o.secs_ago);
        let mut punches: Vec<Punch> = self
            .punches
            .keys()
            .filter_map(|peer| self.punch_of(peer, now))
            .collect();
        punches.sort_by_key(|p| p.secs_ago);
        NetworkDiagnosis {
            mappings: self.mappings(),
            observations,
            punches,
        }
    }

    /// The mapping of each transport observed.
    pub fn mappings(&self) -> Vec<Mapping> {
        let mut by_transport: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for (addr, _) in self.observed.values() {
            if let Some((transport, seen)) = ip_port(addr) {
                by_transport.entry(transport).or_default().push(seen);
            }
        }
        ["quic", "tcp"]
            .iter()
            .filter_map(|transport| {
                let all = by_transport.remove(transport)?;
                let observers = all.len();
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for addr in all {
                    *counts.entry(addr).or_default() += 1;
                }
                let mut seen: Vec<(String, usize)> = counts.into_iter().collect();
                seen.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                let agreeing = seen.first().map_or(0, |(_, n)| *n);
                let verdict = match observers {
                    0 | 1 => MappingVerdict::Unknown,
                    _ if agreeing >= 2 => MappingVerdict::Consistent,
                    _ => MappingVerdict::Varies,
                };
                Some(Mapping {
                    transport: transport.to_string(),
                    verdict,
                    observers,
                    seen: seen.into_iter().map(|(addr, _)| addr).collect(),
                    agreeing,
                })
            })
            .collect()
    }
}

/// `tcp` or `quic` for a direct address (`None` for a circuit or another transport).
pub fn transport(addr: &Multiaddr) -> Option<&'static str> {
    ip_port(addr).map(|(transport, _)| transport)
}

/// `(transport, "IP:PORT")` of a direct TCP or QUIC address.
fn ip_port(addr: &Multiaddr) -> Option<(&'static str, String)> {
    let mut ip = None;
    let mut found = None;
    for protocol in addr.iter() {
        match protocol {
            Protocol::Ip4(a) => ip = Some(a.to_string()),
            Protocol::Ip6(a) => ip = Some(format!("[{a}]")),
            Protocol::Tcp(port) => found = Some(("tcp", port)),
            Protocol::Udp(port) => found = Some(("quic", port)),
            Protocol::P2pCircuit => return None,
            _ => {}
        }
    }
    let (transport, port) = found?;
    Some((transport, format!("{}:{port}", ip?)))
}

fn forget_oldest<K: Copy + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    at: impl Fn(&V) -> Instant,
) {
    if let Some(oldest) = map.iter().min_by_key(|(_, v)| at(v)).map(|(k, _)| *k) {
        map.remove(&oldest);
    }
}

/// How long ago, for a person.
pub fn ago(secs: u64) -> String {
    match Duration::from_secs(secs).as_secs() {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_peer;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_port_seen_by_two_peers_is_consistent_and_two_ports_vary() {
        let mut d = Diagnosis::default();
        let now = Instant::now();
        d.observed(random_peer(), &addr("/ip4/198.51.100.21/tcp/4001"), now);
        assert_eq!(
            d.mappings()[0].verdict,
            MappingVerdict::Unknown,
            "one observer"
        );
        d.observed(random_peer(), &addr("/ip4/198.51.100.21/tcp/4001"), now);
        d.observed(
            random_peer(),
            &addr("/ip4/198.51.100.23/udp/61000/quic-v1"),
            now,
        );
        d.observed(
            random_peer(),
            &addr("/ip4/198.51.100.23/udp/52113/quic-v1"),
            now,
        );
        let mappings = d.mappings();
        assert_eq!(mappings.len(), 2);
        assert_eq!(
            (mappings[0].transport.as_str(), mappings[0].verdict),
            ("quic", MappingVerdict::Varies)
        );
        assert_eq!(
            mappings[0].seen,
            ["198.51.100.23:52113", "198.51.100.23:61000"]
        );
        assert_eq!(
            (
                mappings[1].transport.as_str(),
                mappings[1].verdict,
                mappings[1].observers
            ),
            ("tcp", MappingVerdict::Consistent, 2)
        );
    }

    #[test]
    fn one_peer_over_tcp_and_quic_counts_for_both() {
        let mut d = Diagnosis::default();
        let now = Instant::now();
        for _ in 0..2 {
            let peer = random_peer();
            d.observed(peer, &addr("/ip4/198.51.100.21/tcp/4001"), now);
            d.observed(peer, &addr("/ip4/198.51.100.21/udp/4001/quic-v1"), now);
        }
        let mappings = d.mappings();
        assert_eq!(mappings.len(), 2);
        assert!(mappings
            .iter()
            .all(|m| m.verdict == MappingVerdict::Consistent && m.observers == 2));
    }

    #[test]
    fn a_stray_connection_from_another_local_port_does_not_make_a_cone_nat_symmetric() {
        // The NAT lab once saw this: two peers at the listening port's public port, and one
        // connection that left from another local port.
        let mut d = Diagnosis::default();
        let now = Instant::now();
        for port in [4001, 4001, 39782] {
            let seen = format!("/ip4/198.51.100.21/udp/{port}/quic-v1");
            d.observed(random_peer(), &addr(&seen), now);
        }
        let quic = &d.mappings()[0];
        let verdict = (quic.verdict, quic.agreeing, quic.observers);
        assert_eq!(verdict, (MappingVerdict::Consistent, 2, 3));
        assert_eq!(quic.seen[0], "198.51.100.21:4001", "the most seen first");
    }

    #[test]
    fn circuit_addresses_are_not_observations_and_peers_are_bounded() {
        let mut d = Diagnosis::default();
        let now = Instant::now();
        let circuit = "/ip4/198.51.100.10/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";
        d.observed(random_peer(), &addr(circuit), now);
        assert!(d.mappings().is_empty());
        let first = random_peer();
        d.observed(first, &addr("/ip4/203.0.113.1/tcp/1"), now);
        for i in 0..2 * MAX_OBSERVERS {
            let later = now + Duration::from_secs(1 + i as u64);
            d.observed(random_peer(), &addr("/ip4/203.0.113.1/tcp/1"), later);
        }
        let report = d.report(now + Duration::from_secs(100));
        assert_eq!(report.observations.len(), 2 * MAX_OBSERVERS);
        assert!(report
            .observations
            .iter()
            .all(|o| o.peer != first.to_string()));
    }

    #[test]
    fn the_last_punch_with_a_peer_is_kept() {
        let mut d = Diagnosis::default();
        let (peer, now) = (random_peer(), Instant::now());
        assert!(d.punch_of(&peer, now).is_none());
        d.punched(peer, Err("all dials failed".into()), now);
        let punch = d.punch_of(&peer, now + Duration::from_secs(3)).unwrap();
        assert!(!punch.succeeded);
        assert_eq!(
            (punch.error.as_deref(), punch.secs_ago),
            (Some("all dials failed"), 3)
        );
        d.punched(peer, Ok(()), now + Duration::from_secs(5));
        assert!(
            d.punch_of(&peer, now + Duration::from_secs(5))
                .unwrap()
                .succeeded
        );
        assert_eq!(ago(3), "3 s ago");
        assert_eq!(ago(600), "10 min ago");
    }
}
