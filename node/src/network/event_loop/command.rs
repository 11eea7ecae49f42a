//! What [`super::super::Client`] asks the swarm task to do. Each request carries a oneshot
//! [`Reply`] that gets a typed [`NetworkError`](crate::network::NetworkError) on failure.

use crate::network::discovery::Topic;
use libp2p::{Multiaddr, PeerId};

pub use crate::network::connect::Reply;
use crate::network::NetworkStatus;

pub enum Command {
    /// Dial an address (its peer id may be unknown) and report who answered.
    Dial {
        addr: Multiaddr,
        reply: Reply<PeerId>,
    },
    /// Be connected to `peer`, looking it up in the DHT if needed.
    Connect {
        peer: PeerId,
        reply: Reply<()>,
    },
    /// Close every connection to `peer` (it stopped answering on them).
    Disconnect {
        peer: PeerId,
    },
    /// Announce that this node hosts `topic`.
    Provide {
        topic: Topic,
    },
    /// Peers that announce `topic`, not counting this node.
    FindProviders {
        topic: Topic,
        reply: Reply<Vec<PeerId>>,
    },
    /// Walk the DHT to fill the routing table; replies when the walk ends.
    Bootstrap {
        reply: Reply<()>,
    },
    /// Every peer in the routing table.
    KnownPeers {
        reply: Reply<Vec<PeerId>>,
    },
    ListenAddrs {
        reply: Reply<Vec<Multiaddr>>,
    },
    Status {
        reply: Reply<NetworkStatus>,
    },
    /// What the node saw of its network: observed addresses, port mappings, hole punches.
    Diagnose {
        reply: Reply<crate::network::diagnosis::NetworkDiagnosis>,
    },
}
