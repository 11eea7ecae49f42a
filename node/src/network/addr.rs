//! Multiaddr helpers shared by the swarm task, the stream behaviour and relay selection: one
//! copy of each.

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// `addr` without its `/p2p/…` components.
pub fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// Whether `addr` goes through a circuit relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Whether `addr` names the wildcard IP (`0.0.0.0`, `::`), which no peer can dial.
pub fn is_unspecified(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_unspecified())
}

/// `/…/p2p/RELAY/p2p-circuit`: listening on it reserves a slot on the relay; dialled with
/// `/p2p/PEER` appended, it reaches a peer holding a reservation there.
pub fn circuit_addr(relay_addr: &Multiaddr, relay: &PeerId) -> Multiaddr {
    relay_addr
        .clone()
        .with(Protocol::P2p(*relay))
        .with(Protocol::P2pCircuit)
}

/// The first IP address in `addr`.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Whether `addr` comes from a listener the operator bound to a specific IP (one of `listen`,
/// not a wildcard).
pub fn chosen_ip(addr: &Multiaddr, listen: &[Multiaddr]) -> bool {
    let Some(ip) = ip_of(addr) else { return false };
    listen
        .iter()
        .filter_map(ip_of)
        .any(|chosen| chosen == ip && !chosen.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    use crate::test_support::random_peer as peer;

    #[test]
    fn strip_p2p_keeps_everything_else() {
        let relay = peer();
        let with = addr(&format!("/ip4/198.51.100.1/tcp/4001/p2p/{relay}"));
        assert_eq!(strip_p2p(&with), addr("/ip4/198.51.100.1/tcp/4001"));
    }

    #[test]
    fn circuit_addresses_are_relayed_and_direct_ones_are_not() {
        let relay = peer();
        let direct = addr("/ip4/198.51.100.1/udp/4001/quic-v1");
        let circuit = circuit_addr(&direct, &relay);
        assert_eq!(
            circuit.to_string(),
            format!("/ip4/198.51.100.1/udp/4001/quic-v1/p2p/{relay}/p2p-circuit")
        );
        assert!(is_relayed(&circuit));
        assert!(!is_relayed(&direct));
        assert_eq!(strip_p2p(&circuit).iter().count(), 4);
    }

    #[test]
    fn wildcards_are_unspecified() {
        assert!(is_unspecified(&addr("/ip4/0.0.0.0/tcp/1")));
        assert!(is_unspecified(&addr("/ip6/::/tcp/1")));
        assert!(!is_unspecified(&addr("/ip4/127.0.0.1/tcp/1")));
        assert!(!is_unspecified(&addr("/dns4/example.com/tcp/1")));
    }

    #[test]
    fn only_a_specific_listen_ip_is_chosen() {
        let listen = [addr("/ip4/0.0.0.0/tcp/0"), addr("/ip4/10.0.0.5/tcp/0")];
        assert!(chosen_ip(&addr("/ip4/10.0.0.5/tcp/4001"), &listen));
        assert!(!chosen_ip(&addr("/ip4/10.0.0.6/tcp/4001"), &listen));
        assert!(
            !chosen_ip(&addr("/ip4/0.0.0.0/tcp/4001"), &listen),
            "a wildcard is never chosen"
        );
        assert!(!chosen_ip(&addr("/dns4/example.com/tcp/1"), &listen));
    }
}
