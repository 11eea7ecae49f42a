//! The handle the rest of the node (and the CLI) uses to talk to the swarm task.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use mesh_protocol::ids::{CATALOG_PROTOCOL, INFER_PROTOCOL};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::event_loop::Command;
use super::streams::{OpenError, Opener};
use super::{ConnectedPeers, NetworkEvent, NetworkStatus, Path, PeerSummary};

pub const INFER: StreamProtocol = StreamProtocol::new(INFER_PROTOCOL);
pub const CATALOG: StreamProtocol = StreamProtocol::new(CATALOG_PROTOCOL);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the node's network task has stopped")]
    Stopped,
    #[error("{0}")]
    Failed(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("peer {peer} does not speak {protocol}: is it a mesh node?")]
    Unsupported { peer: PeerId, protocol: String },
}

#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    opener: Opener,
    events: broadcast::Sender<NetworkEvent>,
    local_peer_id: PeerId,
    connected: ConnectedPeers,
    /// Bound on dialling and on opening a stream.
    pub connect_timeout: Duration,
}

impl Client {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        opener: Opener,
        events: broadcast::Sender<NetworkEvent>,
        local_peer_id: PeerId,
        connected: ConnectedPeers,
    ) -> Client {
        Client {
            commands,
            opener,
            events,
            local_peer_id,
            connected,
            connect_timeout: Duration::from_secs(20),
        }
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    pub fn events(&self) -> broadcast::Receiver<NetworkEvent> {
        self.events.subscribe()
    }

    async fn ask<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetworkError::Stopped)?;
        match tokio::time::timeout(self.connect_timeout, rx).await {
            Err(_) => Err(NetworkError::Timeout(self.connect_timeout, what)),
            Ok(Err(_)) => Err(NetworkError::Stopped),
            Ok(Ok(result)) => result.map_err(NetworkError::Failed),
        }
    }

    /// Dials `addr` and returns the peer that answered.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetworkError> {
        self.ask("a dial", |reply| Command::Dial { addr, reply })
            .await
    }

    /// Ensures a connection to `peer`, finding it through the DHT if needed.
    pub async fn connect(&self, peer: PeerId) -> Result<(), NetworkError> {
        if self.is_connected(&peer) {
            return Ok(());
        }
        self.ask("a connection", |reply| Command::Connect { peer, reply })
            .await
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected
            .read()
            .expect("never poisoned: no panics while held")
            .contains(peer)
    }

    pub async fn provide(&self, model: &str) -> Result<(), NetworkError> {
        self.commands
            .send(Command::Provide {
                model: model.to_string(),
                on: true,
            })
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// Peers that announce `model` in the DHT (never this node).
    pub async fn find_providers(&self, model: &str) -> Result<Vec<PeerId>, NetworkError> {
        let model = model.to_string();
        self.ask("the DHT", |reply| Command::FindProviders { model, reply })
            .await
    }

    /// Walks the DHT from the known peers, filling the routing table.
    pub async fn bootstrap(&self) -> Result<(), NetworkError> {
        self.ask("the DHT walk", |reply| Command::Bootstrap { reply })
            .await
    }

    pub async fn known_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        self.ask("the routing table", |reply| Command::KnownPeers { reply })
            .await
    }

    pub async fn peers(&self) -> Result<Vec<PeerSummary>, NetworkError> {
        self.ask("the peer list", |reply| Command::Peers { reply })
            .await
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        self.ask("the listen addresses", |reply| Command::ListenAddrs {
            reply,
        })
        .await
    }

    pub async fn path_to(&self, peer: PeerId) -> Result<Option<Path>, NetworkError> {
        self.ask("the path", |reply| Command::PathTo { peer, reply })
            .await
    }

    /// Reachability, external addresses and relays.
    pub async fn status(&self) -> Result<NetworkStatus, NetworkError> {
        self.ask("the network status", |reply| Command::Status { reply })
            .await
    }

    /// Connects to `peer` if needed and opens a stream for `protocol` on the best connection.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, NetworkError> {
        Ok(self.open_stream_with_path(peer, protocol).await?.0)
    }

    /// [`Client::open_stream`], also returning the path the stream runs on.
    pub async fn open_stream_with_path(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<(Stream, Path), NetworkError> {
        self.connect(peer).await?;
        // Bounded by the hole-punch wait plus the negotiation timeout, but bound it anyway.
        match tokio::time::timeout(self.connect_timeout, self.opener.open(peer, protocol)).await {
            Err(_) => Err(NetworkError::Timeout(self.connect_timeout, "a stream")),
            Ok(Ok(opened)) => Ok(opened),
            Ok(Err(OpenError::Unsupported { peer, protocol })) => {
                Err(NetworkError::Unsupported { peer, protocol })
            }
            Ok(Err(OpenError::Stopped)) => Err(NetworkError::Stopped),
            Ok(Err(e)) => Err(NetworkError::Failed(e.to_string())),
        }
    }
}
