//! Networking: one task owns the libp2p `Swarm` ([`event_loop`]); a cloneable [`Client`]
//! sends it commands, each with a oneshot for the reply; [`NetworkEvent`]s come out on a
//! broadcast channel.
//!
//! - [`behaviour`]: the composed behaviour (identify, ping, Kademlia, mDNS, relay client,
//!   DCUtR, libp2p-stream, connection limits) and the swarm builder.
//! - [`inbound`]: accepting inbound mesh streams into a bounded queue.
//! - [`event_loop`]: the task that owns the swarm.
//! - [`client`]: the handle the rest of the node uses.

pub mod behaviour;
pub mod client;
pub mod event_loop;
pub mod inbound;

use std::time::Duration;

use serde::Serialize;

pub use client::{Client, NetworkError};

/// Peers with at least one open connection, kept by the swarm task and read by clients so a
/// call to a connected peer needs no round trip through the swarm task.
pub(crate) type ConnectedPeers =
    std::sync::Arc<std::sync::RwLock<std::collections::HashSet<libp2p::PeerId>>>;
pub use libp2p::{Multiaddr, PeerId};

#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Answer DHT queries (a node others can reach) or only ask them (a short-lived client).
    pub dht_server: bool,
    /// Announce listen addresses as reachable (right on a LAN or loopback).
    pub announce_listen_addrs: bool,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    pub max_pending: u32,
    pub idle_connection_timeout: Duration,
    pub query_timeout: Duration,
    pub provider_ttl: Duration,
    pub max_providers_per_key: usize,
    /// Commands that may wait for the swarm task.
    pub command_queue: usize,
    /// Inbound streams accepted but not yet picked up by a serving task.
    pub inbound_queue: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid"),
                "/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid"),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            dht_server: true,
            announce_listen_addrs: true,
            max_connections: 256,
            max_connections_per_peer: 4,
            max_pending: 64,
            idle_connection_timeout: Duration::from_secs(120),
            // Below the client's 20 s wait, so a slow walk ends with what it found.
            query_timeout: Duration::from_secs(15),
            provider_ttl: Duration::from_secs(15 * 60),
            max_providers_per_key: 100,
            command_queue: 256,
            inbound_queue: 1024,
        }
    }
}

/// How a connection to a peer was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Dialled or accepted directly.
    Direct,
    /// Upgraded from a relayed connection by DCUtR.
    HolePunched,
    /// Through a circuit relay.
    Relayed,
    /// Served by this node itself, without the network.
    Local,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::HolePunched => "hole-punched",
            Path::Relayed => "relayed",
            Path::Local => "local",
        }
    }
}

/// A peer this node is connected to.
#[derive(Debug, Clone, Serialize)]
pub struct PeerSummary {
    pub peer_id: String,
    /// The best path among the open connections.
    pub path: Path,
    pub addresses: Vec<String>,
    pub connections: usize,
    pub agent: Option<String>,
    pub rtt_ms: Option<f64>,
}

/// What the network reports as it happens.
#[derive(Debug, Clone)]
pub enum NetworkEvent {
    Listening(Multiaddr),
    Connected { peer: PeerId, path: Path },
    Disconnected { peer: PeerId },
}
