//! Networking: one task owns the libp2p `Swarm` ([`event_loop`]); a cloneable [`Client`]
//! sends it commands, each with a oneshot for the reply; [`NetworkEvent`]s come out on a
//! broadcast channel. [`new`] builds the pair.
//!
//! - [`behaviour`]: the composed behaviour (identify, ping, Kademlia, mDNS, AutoNAT, relay
//!   client and server, DCUtR, mesh streams, connection limits) and the swarm builder.
//! - [`streams`]: accepting inbound mesh streams into a bounded queue, and opening outbound
//!   ones on the best connection.
//! - [`provider_store`]: the Kademlia store; a full provider list gives the stalest slot to a
//!   new provider instead of ignoring it.
//! - [`peer_table`]: the one record of open connections and their paths, shared by the
//!   stream behaviour, the swarm task and the client.
//! - [`connect`]: connecting to a peer by id (dial, DHT lookup, give up).
//! - [`discovery`]: DHT announcements, provider queries and walks.
//! - [`reachability`]: AutoNAT, relay reservations, identify pushes, the network status.
//! - [`relays`]: choosing relays and keeping reservations while the node is not reachable.
//! - [`relay_server`]: the relay server, offered only while the node is directly reachable.
//! - [`addr`]: multiaddr helpers.
//! - [`event_loop`]: the task that owns the swarm, dispatching into the parts above.
//! - [`client`]: the handle the rest of the node uses; [`NetworkError`] what it can fail with.

mod addr;
pub mod autonat_quorum;
pub mod behaviour;
pub mod client;
mod connect;
pub mod diagnosis;
mod discovery;
mod error;
pub mod event_loop;
pub mod inbound_guard;
mod peer_table;
pub mod provider_store;
mod reachability;
pub mod relay_server;
pub mod relays;
pub mod repunch;
pub mod streams;
pub mod trim;

use std::num::NonZeroU32;
use std::time::Duration;

use libp2p::StreamProtocol;
use mesh_protocol::ids::{BLOB_PROTOCOL, CATALOG_PROTOCOL, INFER_PROTOCOL, STAGE_PROTOCOL};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub use behaviour::BuildError;
pub use client::Client;
pub use error::NetworkError;
pub use event_loop::EventLoop;
pub use libp2p::{Multiaddr, PeerId};
pub use streams::Inbound;

/// The inference protocol, `/mesh/infer/1`.
pub const INFER: StreamProtocol = StreamProtocol::new(INFER_PROTOCOL);
/// The catalog protocol, `/mesh/catalog/1`.
pub const CATALOG: StreamProtocol = StreamProtocol::new(CATALOG_PROTOCOL);
/// `/mesh/stage/1`: a range of a model's layers, run for a head.
pub const STAGE: StreamProtocol = StreamProtocol::new(STAGE_PROTOCOL);
/// `/mesh/blob/1`: pieces of a model's file.
pub const BLOB: StreamProtocol = StreamProtocol::new(BLOB_PROTOCOL);

/// [`NetworkEvent`]s a slow subscriber may fall behind by before it misses some.
const EVENT_QUEUE: usize = 1024;

/// Builds the network of the node `identity`: the swarm, listening on `config.listen`; the
/// [`Client`] handle; the receiver of accepted inbound streams; and the [`EventLoop`], which
/// the caller spawns (`tokio::spawn(event_loop.run())`) and which stops when `shutdown` is
/// cancelled. Subscribe to [`Client::events`] before spawning it to see every event.
pub fn new(
    identity: &crate::identity::NodeIdentity,
    config: &NetworkConfig,
    shutdown: CancellationToken,
) -> Result<(Client, mpsc::Receiver<Inbound>, EventLoop), BuildError> {
    let mut unscraped = prometheus_client::registry::Registry::default();
    new_observed(
        identity,
        config,
        shutdown,
        &mut unscraped,
        crate::metrics::Metrics::default(),
    )
}

/// [`new`], with the swarm's metrics (`libp2p-metrics`, bytes in and out) registered in
/// `registry` and mesh's network events counted in `metrics`.
pub fn new_observed(
    identity: &crate::identity::NodeIdentity,
    config: &NetworkConfig,
    shutdown: CancellationToken,
    registry: &mut prometheus_client::registry::Registry,
    metrics: crate::metrics::Metrics,
) -> Result<(Client, mpsc::Receiver<Inbound>, EventLoop), BuildError> {
    let table = peer_table::SharedPeerTable::default();
    let (mut swarm, inbound, opener) =
        behaviour::build_swarm(identity, config, table.clone(), registry)?;
    let recorders = event_loop::Recorders {
        p2p: libp2p::metrics::Metrics::new(registry),
        mesh: metrics,
    };
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| BuildError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    let (command_tx, command_rx) = mpsc::channel(config.command_queue);
    let (event_tx, _) = broadcast::channel(EVENT_QUEUE);
    let client = Client::new(
        command_tx,
        opener,
        event_tx.clone(),
        identity.peer_id(),
        table.clone(),
    );
    let event_loop = EventLoop::new(
        swarm,
        command_rx,
        event_tx,
        config.clone(),
        shutdown,
        table,
        recorders,
    );
    Ok((client, inbound, event_loop))
}

#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// A member of the mesh (`mesh join`): a DHT server once reachable, AutoNAT, a relay for
    /// others when reachable, relay reservations when not. False for a short-lived client,
    /// which only asks.
    pub dht_server: bool,
    /// Announce listen addresses bound to a specific IP as reachable: the operator chose that
    /// IP. Addresses of a wildcard listener (`0.0.0.0`) wait for AutoNAT to confirm them.
    pub announce_listen_addrs: bool,
    /// Addresses others can reach this node at (a public IP, a forwarded port).
    pub external: Vec<Multiaddr>,
    /// Offer circuit relay v2 to others, with these limits, while reachable.
    pub relay_server: Option<RelayLimits>,
    /// Relay reservations to hold while this node is not reachable.
    pub max_relays: usize,
    /// How long a call to a peer reached only through a relay waits for a hole punch.
    pub hole_punch_wait: Duration,
    /// How often AutoNAT asks again while it is not sure (its confirmations need two peers at
    /// two IPs: [`autonat_quorum`]).
    pub autonat_retry: Duration,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    pub max_pending: u32,
    /// The band the connection count is trimmed to, below `max_connections` ([`trim`]).
    pub connection_marks: trim::Watermarks,
    pub idle_connection_timeout: Duration,
    /// How long one address may take to become a connection (transport, encryption and
    /// multiplexing). A peer's addresses are dialled in parallel, so one that black-holes
    /// (a stale address, a punch through a symmetric NAT) costs its own dial only.
    pub dial_timeout: Duration,
    pub query_timeout: Duration,
    /// How often Kademlia walks its routing table again (a lookup of its own id and of one
    /// key in each farther bucket); a table with fewer than k peers is also walked whenever
    /// a peer joins it.
    pub routing_refresh: Duration,
    /// How often each connection is pinged: its round trip ranks providers and shows in
    /// `mesh peers`. The first ping goes out as the connection opens.
    pub ping_interval: Duration,
    pub provider_ttl: Duration,
    pub max_providers_per_key: usize,
    /// Commands that may wait for the swarm task.
    pub command_queue: usize,
    /// Inbound streams accepted but not yet picked up by a serving task.
    pub inbound_queue: usize,
    /// Connections over the in-process transport (`/memory/N`, the simulator's) skip
    /// encryption: peers are authenticated by the key they claim, in the clear. Never for a
    /// real network; every other transport always runs Noise.
    pub memory_plaintext: bool,
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
            external: Vec::new(),
            relay_server: Some(RelayLimits::default()),
            max_relays: 2,
            // DCUtR punches a cone NAT within a few round trips of the relayed connection
            // (under 10 ms in the NAT lab); a symmetric NAT fails only after three attempts
            // (about 30 s), so a longer wait costs a symmetric peer's first call exactly that.
            hole_punch_wait: Duration::from_millis(300),
            autonat_retry: Duration::from_secs(30),
            max_connections: 256,
            max_connections_per_peer: 4,
            max_pending: 64,
            connection_marks: trim::Watermarks::default(),
            idle_connection_timeout: Duration::from_secs(120),
            // libp2p's default is 10 s; a relayed dial across the internet takes a few round
            // trips, well inside 5 s.
            dial_timeout: Duration::from_secs(5),
            // Below the client's 20 s wait, so a slow walk ends with what it found.
            query_timeout: Duration::from_secs(15),
            // libp2p's default. Each refresh walks once per bucket, so at 60 s (this node's
            // setting until December 2026) the walks alone made a node touch nearly every
            // peer of a 200-node mesh each minute (docs/scale.md).
            routing_refresh: Duration::from_secs(5 * 60),
            // libp2p's default is 15 s. Pings were most of what a node handles at 100 to 200
            // simulated nodes (a connection to every other node, each pinged 4 times a
            // minute), and a round trip a minute old ranks providers as well.
            ping_interval: Duration::from_secs(60),
            provider_ttl: Duration::from_secs(15 * 60),
            max_providers_per_key: 100,
            command_queue: 256,
            inbound_queue: 1024,
            memory_plaintext: false,
        }
    }
}

/// What a mesh relay allows. libp2p's defaults (2 minutes and 128 KiB per circuit) would cut
/// a model call short, so a mesh relay raises them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    pub reservation_duration: Duration,
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    /// A circuit lasts at most this long; calls have a deadline of at most 10 minutes.
    pub max_circuit_duration: Duration,
    /// Bytes relayed per circuit, both directions together.
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(60 * 60),
            // A NATed node holds a circuit to each peer it reaches through the relay (and
            // keeps it until the connection idles out, also after a hole punch), so an
            // office of NATed nodes needs many; each costs at most two Yamux windows of
            // buffering (2 x 256 KiB).
            max_circuits: 256,
            max_circuits_per_peer: 16,
            max_circuit_duration: Duration::from_secs(15 * 60),
            max_circuit_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Circuits a relay opens for one source peer: a burst of this many, then one per interval.
/// libp2p's default (30, then one every 2 minutes) starved the nodes of the NAT lab, which dial
/// each of a handful of NATed peers through each relay (Kademlia, calls, hole punches).
pub const CIRCUIT_RATE_PER_PEER: (NonZeroU32, Duration) =
    (NonZeroU32::new(64).expect("64 > 0"), Duration::from_secs(5));
/// The same for one source IP address, which every node behind one NAT shares.
pub const CIRCUIT_RATE_PER_IP: (NonZeroU32, Duration) = (
    NonZeroU32::new(256).expect("256 > 0"),
    Duration::from_secs(1),
);

impl RelayLimits {
    pub(crate) fn to_relay_config(&self) -> libp2p::relay::Config {
        libp2p::relay::Config {
            circuit_src_rate_limiters: Vec::new(),
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            ..Default::default()
        }
        .circuit_src_per_peer(CIRCUIT_RATE_PER_PEER.0, CIRCUIT_RATE_PER_PEER.1)
        .circuit_src_per_ip(CIRCUIT_RATE_PER_IP.0, CIRCUIT_RATE_PER_IP.1)
    }
}

/// Whether others can dial this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reachability {
    /// It has a confirmed external address (explicit, or confirmed by AutoNAT).
    Public,
    /// Not reachable directly: reachable through its relays, if it holds reservations.
    Private,
    /// Not known yet.
    Unknown,
}

impl Reachability {
    fn unknown() -> Self {
        Reachability::Unknown
    }
}

/// How the node sits in the network, for `/v1/mesh/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NetworkStatus {
    pub reachability: Reachability,
    /// AutoNAT's own verdict, which turns `public` on one peer's dial-back. The node believes
    /// it only once two peers at two IPs confirmed an address (`autonat_quorum`); then
    /// `reachability` says `public` too.
    #[serde(default = "Reachability::unknown")]
    pub autonat: Reachability,
    /// Confirmed external addresses, relayed ones included.
    pub external_addrs: Vec<String>,
    /// Relays this node holds an accepted reservation with.
    pub relays: Vec<String>,
    /// Whether this node relays for others now.
    pub relaying: bool,
    /// What its Kademlia record store holds.
    #[serde(default)]
    pub dht: DhtStore,
}

/// What a node's Kademlia record store holds (`provider_store`): its own provider records,
/// and the remote ones, with the largest share any one remote peer has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DhtStore {
    /// Keys this node provides itself.
    pub own_keys: usize,
    /// Remote peers with provider records here.
    pub remote_providers: usize,
    /// Their records (one per key and provider).
    pub remote_records: usize,
    /// The addresses kept in those records.
    pub remote_addresses: usize,
    /// The most keys one remote peer provides here.
    pub most_keys_of_one_provider: usize,
    /// The most addresses kept in one record.
    pub most_addresses_in_one_record: usize,
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
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PeerSummary {
    /// Serialized as its text form (`12D3KooW…`).
    #[serde(
        serialize_with = "serialize_display",
        deserialize_with = "deserialize_from_str"
    )]
    pub peer_id: PeerId,
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
    Connected {
        peer: PeerId,
        path: Path,
    },
    /// A relay accepted a reservation: others can reach this node through it.
    Reserved {
        relay: PeerId,
    },
    Disconnected {
        peer: PeerId,
    },
}

fn serialize_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn deserialize_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mesh_relay_replaces_libp2ps_circuit_rate_limits_with_its_own() {
        let config = RelayLimits::default().to_relay_config();
        let shown = format!("{config:?}");
        assert!(shown.contains("max_circuits: 256"), "{shown}");
        assert!(shown.contains("max_circuits_per_peer: 16"), "{shown}");
        // libp2p's two default limiters are gone; mesh's per-peer and per-IP ones remain.
        assert!(
            shown.contains(r#"circuit_src_rate_limiters: "[2 rate limiters]""#),
            "{shown}"
        );
        assert!(CIRCUIT_RATE_PER_PEER.0.get() >= 64);
        assert!(CIRCUIT_RATE_PER_IP.0.get() >= CIRCUIT_RATE_PER_PEER.0.get());
    }
}
