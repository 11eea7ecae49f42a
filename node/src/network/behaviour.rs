//! The composed libp2p behaviour and the swarm that carries it.

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, connection_limits, dcutr, identify, kad, mdns, noise, ping, relay, tcp, yamux,
    StreamProtocol, Swarm, SwarmBuilder,
};
use mesh_protocol::ids::{IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL};
use tokio::sync::mpsc;

use super::peer_table::SharedPeerTable;
use super::streams::{self, Inbound, Opener};
use super::{NetworkConfig, BLOB, CATALOG, INFER, STAGE};
use crate::identity::NodeIdentity;

pub const KAD: StreamProtocol = StreamProtocol::new(KAD_PROTOCOL);

#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    pub limits: connection_limits::Behaviour,
    pub inbound: super::inbound_guard::InboundGuard,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<super::provider_store::ProviderStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub autonat: Toggle<super::autonat_quorum::AutonatQuorum>,
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<super::relay_server::RelayServer>,
    pub dcutr: dcutr::Behaviour,
    pub streams: streams::Behaviour,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot set up the transport: {0}")]
    Transport(String),
    #[error("cannot set up the network behaviour: {0}")]
    Behaviour(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        addr: libp2p::Multiaddr,
        reason: String,
    },
}

/// Builds the swarm, its stream behaviour keeping `table`; inbound mesh streams arrive on
/// the returned receiver, and the [`Opener`] opens outbound ones.
pub fn build_swarm(
    identity: &NodeIdentity,
    config: &NetworkConfig,
    table: SharedPeerTable,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<(Swarm<MeshBehaviour>, mpsc::Receiver<Inbound>, Opener), BuildError> {
    let streams_config = streams::Config {
        inbound_protocols: vec![INFER, CATALOG, STAGE, BLOB],
        inbound_queue: config.inbound_queue,
        open_queue: config.command_queue,
        hole_punch_wait: config.hole_punch_wait,
    };
    let (streams, inbound, opener) = streams::Behaviour::new(streams_config, table.clone());
    let mut streams = Some(streams);
    let transport = |e: &dyn std::fmt::Display| BuildError::Transport(e.to_string());
    let swarm = SwarmBuilder::with_existing_identity(identity.keypair().clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_other_transport::<libp2p::core::muxing::StreamMuxerBox, MemoryStack, _>(|key| {
            memory_transport(key, config.memory_plaintext)
        })
        .map_err(|e| transport(&e))?
        .with_dns()
        .map_err(|e| transport(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        // Bytes in and out, by transport stack (`libp2p_bandwidth_bytes_total`).
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key, relay_client| {
            let streams = streams.take().expect("the behaviour is built once");
            build_behaviour(key, relay_client, streams, table.clone(), config).map_err(|e| e.into())
        })
        .map_err(|e| BuildError::Behaviour(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_connection_timeout)
                // Each stream proposes exactly one protocol, so the opener may send its
                // request before the answer to the negotiation: one round trip fewer per call.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .with_connection_timeout(config.dial_timeout)
        .build();
    Ok((swarm, inbound, opener))
}

type MemoryStack =
    libp2p::core::transport::Boxed<(libp2p::PeerId, libp2p::core::muxing::StreamMuxerBox)>;

/// In-process connections (`/memory/N`), which only the simulator (`testnet/sim`) listens on:
/// Noise and Yamux as over TCP, or plaintext when it asks (`memory_plaintext`).
fn memory_transport(
    key: &libp2p::identity::Keypair,
    plaintext: bool,
) -> Result<MemoryStack, Box<dyn std::error::Error + Send + Sync>> {
    use libp2p::core::muxing::StreamMuxerBox;
    use libp2p::core::transport::{MemoryTransport, Transport};
    use libp2p::core::upgrade::Version;
    let memory = MemoryTransport::default().upgrade(Version::V1Lazy);
    Ok(if plaintext {
        memory
            .authenticate(libp2p::plaintext::Config::new(key))
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed()
    } else {
        memory
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed()
    })
}

fn build_behaviour(
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
    streams: streams::Behaviour,
    table: SharedPeerTable,
    config: &NetworkConfig,
) -> Result<MeshBehaviour, std::io::Error> {
    let peer_id = key.public().to_peer_id();
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(config.max_pending))
        .with_max_pending_outgoing(Some(config.max_pending))
        .with_max_established(Some(config.max_connections))
        // Two or more, so a relayed and a direct connection can coexist while DCUtR upgrades.
        .with_max_established_per_peer(Some(config.max_connections_per_peer.max(2)));

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_string(), key.public())
            .with_agent_version(format!("mesh/{}", env!("CARGO_PKG_VERSION")))
            .with_push_listen_addr_updates(true)
            // Tell peers only the addresses known to reach this node (explicit, confirmed by
            // AutoNAT, or a relay's circuit): a NATed node's LAN address is of no use to them.
            .with_hide_listen_addrs(true),
    );

    let mut kad_config = kad::Config::new(KAD);
    kad_config
        .set_query_timeout(config.query_timeout)
        .set_provider_record_ttl(Some(config.provider_ttl))
        .set_provider_publication_interval(Some(config.provider_ttl / 3))
        // Provider lists for popular models exceed the 16 KiB default response.
        .set_max_packet_size(256 * 1024)
        .set_periodic_bootstrap_interval(Some(config.routing_refresh));
    let store = super::provider_store::ProviderStore::new(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_providers_per_key: config.max_providers_per_key,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
    // A member is a DHT server once it has a confirmed external address (direct or through a
    // relay); until then, and always for a short-lived client, it only asks.
    kad.set_mode(if config.dht_server {
        None
    } else {
        Some(kad::Mode::Client)
    });

    let mdns = if config.mdns {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config::default(),
            peer_id,
        )?)
    } else {
        None
    };

    let autonat = config.dht_server.then(|| {
        let autonat = autonat::Behaviour::new(
            peer_id,
            autonat::Config {
                boot_delay: Duration::from_secs(2),
                retry_interval: config.autonat_retry,
                throttle_server_period: Duration::from_secs(15),
                // LANs and test networks use private and documentation ranges; a dial-back only
                // ever goes to the IP the asking peer was observed at, so this opens no
                // amplification.
                only_global_ips: false,
                ..Default::default()
            },
        );
        super::autonat_quorum::AutonatQuorum::new(autonat)
    });
    // The relay advertises itself only while this node has a direct confirmed external address.
    let relay = config
        .relay_server
        .as_ref()
        .filter(|_| config.dht_server)
        .map(|limits| super::relay_server::RelayServer::new(peer_id, limits.to_relay_config()));

    Ok(MeshBehaviour {
        limits: connection_limits::Behaviour::new(limits),
        inbound: super::inbound_guard::InboundGuard::new(
            super::inbound_guard::InboundLimits::for_totals(
                config.max_pending,
                config.max_connections,
            ),
            table,
        ),
        identify,
        ping: ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval)),
        kad,
        mdns: Toggle::from(mdns),
        autonat: Toggle::from(autonat),
        relay_client,
        relay: Toggle::from(relay),
        dcutr: dcutr::Behaviour::new(peer_id),
        streams,
    })
}
