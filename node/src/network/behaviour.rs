//! The composed libp2p behaviour and the swarm that carries it.

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    connection_limits, dcutr, identify, kad, mdns, noise, ping, relay, tcp, yamux, StreamProtocol,
    Swarm, SwarmBuilder,
};
use mesh_protocol::ids::{
    CATALOG_PROTOCOL, IDENTIFY_PROTOCOL_VERSION, INFER_PROTOCOL, KAD_PROTOCOL,
};
use tokio::sync::mpsc;

use super::inbound::Inbound;

use super::NetworkConfig;
use crate::identity::NodeIdentity;

pub const KAD: StreamProtocol = StreamProtocol::new(KAD_PROTOCOL);

#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    pub limits: connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub relay_client: relay::client::Behaviour,
    pub dcutr: dcutr::Behaviour,
    pub stream: libp2p_stream::Behaviour,
    pub inbound: super::inbound::Behaviour,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot set up the transport: {0}")]
    Transport(String),
    #[error("cannot set up the network behaviour: {0}")]
    Behaviour(String),
}

/// Builds the swarm; inbound mesh streams arrive on the returned receiver.
pub fn build_swarm(
    identity: &NodeIdentity,
    config: &NetworkConfig,
) -> Result<(Swarm<MeshBehaviour>, mpsc::Receiver<Inbound>), BuildError> {
    let (inbound, streams) = super::inbound::Behaviour::new(
        vec![
            StreamProtocol::new(INFER_PROTOCOL),
            StreamProtocol::new(CATALOG_PROTOCOL),
        ],
        config.inbound_queue,
    );
    let mut inbound = Some(inbound);
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
        .with_dns()
        .map_err(|e| transport(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        .with_behaviour(|key, relay_client| {
            let inbound = inbound.take().expect("the behaviour is built once");
            build_behaviour(key, relay_client, inbound, config).map_err(|e| e.into())
        })
        .map_err(|e| BuildError::Behaviour(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_connection_timeout)
                // Each stream proposes exactly one protocol, so the opener may send its
                // request before the answer to the negotiation: one round trip fewer per call.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok((swarm, streams))
}

fn build_behaviour(
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
    inbound: super::inbound::Behaviour,
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
            .with_push_listen_addr_updates(true),
    );

    let mut kad_config = kad::Config::new(KAD);
    kad_config
        .set_query_timeout(config.query_timeout)
        .set_provider_record_ttl(Some(config.provider_ttl))
        .set_provider_publication_interval(Some(config.provider_ttl / 3))
        // Provider lists for popular models exceed the 16 KiB default response.
        .set_max_packet_size(256 * 1024)
        .set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
    let store = kad::store::MemoryStore::with_config(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_providers_per_key: config.max_providers_per_key,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
    kad.set_mode(Some(if config.dht_server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));

    let mdns = if config.mdns {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config::default(),
            peer_id,
        )?)
    } else {
        None
    };

    Ok(MeshBehaviour {
        limits: connection_limits::Behaviour::new(limits),
        identify,
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
        kad,
        mdns: Toggle::from(mdns),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
        stream: libp2p_stream::Behaviour::new(),
        inbound,
    })
}
