//! The handle the rest of the node (and the CLI) uses to talk to the swarm task.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::discovery::Topic;
use super::event_loop::{Command, Reply};
use super::peer_table::SharedPeerTable;
use super::streams::Opener;
use super::{NetworkEvent, NetworkStatus, Path, PeerSummary};

pub use super::error::NetworkError;
pub use super::{BLOB, CATALOG, INFER, STAGE};

/// How long a request to the swarm task, a dial or a stream open may take by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    opener: Opener,
    events: broadcast::Sender<NetworkEvent>,
    local_peer_id: PeerId,
    table: SharedPeerTable,
    /// Bound on dialling and on opening a stream.
    pub connect_timeout: Duration,
}

impl Client {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        opener: Opener,
        events: broadcast::Sender<NetworkEvent>,
        local_peer_id: PeerId,
        table: SharedPeerTable,
    ) -> Client {
        Client {
            commands,
            opener,
            events,
            local_peer_id,
            table,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    pub fn events(&self) -> broadcast::Receiver<NetworkEvent> {
        self.events.subscribe()
    }

    /// Sends a command to the swarm task and waits (bounded) for its reply.
    async fn request<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetworkError::Stopped)?;
        match tokio::time::timeout(self.connect_timeout, rx).await {
            Err(_) => Err(NetworkError::Timeout(self.connect_timeout, what)),
            Ok(Err(_)) => Err(NetworkError::Stopped),
            Ok(Ok(result)) => result,
        }
    }

    /// Dials `addr` and returns the peer that answered.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetworkError> {
        self.request("a dial", |reply| Command::Dial { addr, reply })
            .await
    }

    /// Ensures a connection to `peer`, finding it through the DHT if needed.
    pub async fn connect(&self, peer: PeerId) -> Result<(), NetworkError> {
        if self.is_connected(&peer) {
            return Ok(());
        }
        self.request("a connection", |reply| Command::Connect { peer, reply })
            .await
    }

    /// Whether at least one connection to `peer` is open (no round trip to the swarm task).
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.table.read().is_connected(peer)
    }

    /// The last round trip libp2p's ping measured to `peer`, if connected and measured.
    pub fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        self.table.read().rtt(peer)
    }

    /// Closes every connection to `peer`: a connection on which it stopped answering (its
    /// relay vanished, its network changed) would otherwise stay up until the transport's
    /// idle timeout. The next call dials it again.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetworkError> {
        self.commands
            .send(Command::Disconnect { peer })
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// Announces on the DHT that this node hosts `model`, for as long as it runs.
    pub async fn provide(&self, model: &str) -> Result<(), NetworkError> {
        self.announce(Topic::Model(model.to_string())).await
    }

    /// Announces that this node runs layers of the weights whose sha256 is `weights_sha256`.
    pub async fn provide_stage(&self, weights_sha256: &str) -> Result<(), NetworkError> {
        self.announce(Topic::Stage(weights_sha256.to_string()))
            .await
    }

    /// Announces that this node serves the file whose sha256 is `file_sha256`
    /// (`/mesh/blob/1`).
    pub async fn provide_blob(&self, file_sha256: &str) -> Result<(), NetworkError> {
        self.announce(Topic::Blob(file_sha256.to_string())).await
    }

    /// Peers that announce the file whose sha256 is `file_sha256`.
    pub async fn find_blob_hosts(&self, file_sha256: &str) -> Result<Vec<PeerId>, NetworkError> {
        let topic = Topic::Blob(file_sha256.to_string());
        self.request("the DHT", |reply| Command::FindProviders { topic, reply })
            .await
    }

    async fn announce(&self, topic: Topic) -> Result<(), NetworkError> {
        self.commands
            .send(Command::Provide { topic })
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// Peers that announce `model` in the DHT (never this node).
    pub async fn find_providers(&self, model: &str) -> Result<Vec<PeerId>, NetworkError> {
        let topic = Topic::Model(model.to_string());
        self.request("the DHT", |reply| Command::FindProviders { topic, reply })
            .await
    }

    /// Peers that announce layers of the weights whose sha256 is `weights_sha256`.
    pub async fn find_stage_hosts(
        &self,
        weights_sha256: &str,
    ) -> Result<Vec<PeerId>, NetworkError> {
        let topic = Topic::Stage(weights_sha256.to_string());
        self.request("the DHT", |reply| Command::FindProviders { topic, reply })
            .await
    }

    /// Walks the DHT from the known peers, filling the routing table.
    pub async fn bootstrap(&self) -> Result<(), NetworkError> {
        self.request("the DHT walk", |reply| Command::Bootstrap { reply })
            .await
    }

    pub async fn known_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        self.request("the routing table", |reply| Command::KnownPeers { reply })
            .await
    }

    /// Every connected peer, with the path a stream to it would take now. Read from the
    /// peer table the stream behaviour keeps, without a round trip to the swarm task.
    pub async fn peers(&self) -> Result<Vec<PeerSummary>, NetworkError> {
        Ok(self.table.read().summaries())
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        self.request("the listen addresses", |reply| Command::ListenAddrs {
            reply,
        })
        .await
    }

    /// Reachability, external addresses and relays.
    pub async fn status(&self) -> Result<NetworkStatus, NetworkError> {
        self.request("the network status", |reply| Command::Status { reply })
            .await
    }

    /// What the node saw of its network, for `mesh doctor`.
    pub async fn diagnosis(&self) -> Result<super::diagnosis::NetworkDiagnosis, NetworkError> {
        self.request("the network diagnosis", |reply| Command::Diagnose { reply })
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
            Ok(result) => result.map_err(NetworkError::from),
        }
    }
}
