//! Mesh streams on libp2p connections: accepting inbound streams into a bounded queue, and
//! opening outbound streams on the best connection to a peer.
//!
//! libp2p-stream 0.5 did both at first, and the code proved it wrong for mesh on three counts:
//! its inbound channel holds one stream (a burst of calls on one connection was dropped
//! unread), it opens outbound streams one at a time per connection, and it picks a random
//! connection when a peer has several, so after a hole punch half of the calls still went
//! through the relay. This behaviour:
//!
//! - accepts `/mesh/infer/1` and `/mesh/catalog/1` and queues up to a fixed number of streams
//!   for the serving tasks; beyond that bound a stream is dropped before anything was read
//!   (the caller sees it refused and may retry);
//! - opens each outbound stream on a direct or hole-punched connection when there is one, and
//!   on a relayed connection only when there is none; a call to a peer reached a moment ago
//!   through a relay waits (bounded by [`Config::hole_punch_wait`]) for DCUtR to finish, so a
//!   call that can run direct does not start on the relay;
//! - reports the [`Path`] of the connection each stream runs on.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, InboundUpgrade, Multiaddr, OutboundUpgrade, UpgradeInfo};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    FromSwarm, NetworkBehaviour, NotifyHandler, StreamUpgradeError, SubstreamProtocol, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Path;

/// An accepted stream, its protocol and who opened it.
pub type Inbound = (PeerId, StreamProtocol, Stream);

#[derive(Debug, Clone)]
pub struct Config {
    /// Protocols accepted from peers.
    pub inbound_protocols: Vec<StreamProtocol>,
    /// Accepted streams not yet picked up by a serving task.
    pub inbound_queue: usize,
    /// Open requests waiting for the swarm task.
    pub open_queue: usize,
    /// How long a stream to a peer reached only through a relay waits for a hole punch.
    pub hole_punch_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("not connected to {0}")]
    NotConnected(PeerId),
    #[error("{peer} does not speak {protocol}: is it a mesh node?")]
    Unsupported { peer: PeerId, protocol: String },
    #[error("cannot open a stream to {peer}: {reason}")]
    Failed { peer: PeerId, reason: String },
    #[error("the node's network task has stopped")]
    Stopped,
}

type OpenReply = oneshot::Sender<Result<(Stream, Path), OpenError>>;

struct OpenRequest {
    peer: PeerId,
    protocol: StreamProtocol,
    reply: OpenReply,
}

/// A cloneable handle that opens outbound streams.
#[derive(Clone)]
pub struct Opener {
    requests: mpsc::Sender<OpenRequest>,
}

impl Opener {
    /// Opens a stream for `protocol` on the best open connection to `peer`.
    pub async fn open(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<(Stream, Path), OpenError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(OpenRequest {
                peer,
                protocol,
                reply,
            })
            .await
            .map_err(|_| OpenError::Stopped)?;
        answer.await.map_err(|_| OpenError::Failed {
            peer,
            reason: "the connection closed before the stream opened".into(),
        })?
    }
}

struct Connection {
    id: ConnectionId,
    path: Path,
    since: Instant,
}

pub struct Behaviour {
    config: Config,
    inbound: mpsc::Sender<Inbound>,
    requests: mpsc::Receiver<OpenRequest>,
    connections: HashMap<PeerId, Vec<Connection>>,
    /// Requests held until a hole punch to their peer succeeds, fails or takes too long.
    held: Vec<(Instant, OpenRequest)>,
    /// Peers a hole punch failed for: their calls run on the relay without waiting.
    punch_failed: HashMap<PeerId, Instant>,
    wake_at: Option<Pin<Box<tokio::time::Sleep>>>,
    events: VecDeque<ToSwarm<Infallible, Open>>,
}

impl Behaviour {
    /// The behaviour, the receiver of inbound streams, and the handle that opens streams.
    pub fn new(config: Config) -> (Self, mpsc::Receiver<Inbound>, Opener) {
        let (inbound, inbound_rx) = mpsc::channel(config.inbound_queue.max(1));
        let (opener, requests) = mpsc::channel(config.open_queue.max(1));
        let behaviour = Behaviour {
            config,
            inbound,
            requests,
            connections: HashMap::new(),
            held: Vec::new(),
            punch_failed: HashMap::new(),
            wake_at: None,
            events: VecDeque::new(),
        };
        (behaviour, inbound_rx, Opener { requests: opener })
    }

    /// DCUtR upgraded a relayed connection to `peer`: this connection is the direct one.
    pub fn hole_punched(&mut self, peer: PeerId, connection: ConnectionId) {
        if let Some(c) = self
            .connections
            .get_mut(&peer)
            .and_then(|cs| cs.iter_mut().find(|c| c.id == connection))
        {
            c.path = Path::HolePunched;
        }
        self.punch_failed.remove(&peer);
        self.release(peer);
    }

    /// DCUtR gave up on `peer`: calls to it run on the relay.
    pub fn hole_punch_failed(&mut self, peer: PeerId) {
        self.punch_failed.insert(peer, Instant::now());
        self.release(peer);
    }

    /// The path of the best open connection to `peer`.
    pub fn best_path(&self, peer: &PeerId) -> Option<Path> {
        self.best(peer).map(|c| c.path)
    }

    fn best(&self, peer: &PeerId) -> Option<&Connection> {
        // Prefer a direct connection, then a hole-punched one, then the newest relayed one.
        self.connections.get(peer)?.iter().min_by_key(|c| {
            let rank = match c.path {
                Path::Direct | Path::Local => 0,
                Path::HolePunched => 1,
                Path::Relayed => 2,
            };
            (rank, std::cmp::Reverse(c.since))
        })
    }

    fn add_connection(&mut self, peer: PeerId, id: ConnectionId, relayed: bool) {
        let entry = self.connections.entry(peer).or_default();
        let path = if relayed {
            Path::Relayed
        } else if entry.iter().any(|c| c.path == Path::Relayed) {
            // A direct connection that appears while a relayed one is open is DCUtR's: on the
            // side whose dial lost the race no dcutr event says so.
            Path::HolePunched
        } else {
            Path::Direct
        };
        entry.push(Connection {
            id,
            path,
            since: Instant::now(),
        });
        if !relayed {
            self.release(peer);
        }
    }

    /// Sends the held requests for `peer` on their way.
    fn release(&mut self, peer: PeerId) {
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(_, r)| r.peer == peer);
        self.held = keep;
        for (_, request) in ready {
            self.dispatch(request, false);
        }
    }

    /// Routes a request to a connection, or holds it for a hole punch in progress.
    fn dispatch(&mut self, request: OpenRequest, may_wait: bool) {
        let Some(best) = self.best(&request.peer) else {
            let _ = request
                .reply
                .send(Err(OpenError::NotConnected(request.peer)));
            return;
        };
        if may_wait && best.path == Path::Relayed {
            let wait_until = best.since + self.config.hole_punch_wait;
            let punch_failed = self.punch_failed.get(&request.peer).is_some_and(|failed| {
                failed.elapsed() < Duration::from_secs(600) && *failed >= best.since
            });
            if !punch_failed && Instant::now() < wait_until {
                tracing::debug!(peer = %request.peer, "call waits for a hole punch");
                self.held.push((wait_until, request));
                self.schedule_wake();
                return;
            }
        }
        let (id, path) = (best.id, best.path);
        self.events.push_back(ToSwarm::NotifyHandler {
            peer_id: request.peer,
            handler: NotifyHandler::One(id),
            event: Open {
                protocol: request.protocol,
                reply: request.reply,
                path,
            },
        });
    }

    fn schedule_wake(&mut self) {
        if let Some(earliest) = self.held.iter().map(|(t, _)| *t).min() {
            self.wake_at = Some(Box::pin(tokio::time::sleep_until(earliest)));
        } else {
            self.wake_at = None;
        }
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            protocols: self.config.inbound_protocols.clone(),
            queue: self.inbound.clone(),
            pending: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.add_connection(peer, id, is_relayed(local_addr));
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.add_connection(peer, id, is_relayed(addr));
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id,
            connection_id,
            ..
        }) = event
        {
            if let Some(connections) = self.connections.get_mut(&peer_id) {
                connections.retain(|c| c.id != connection_id);
                if connections.is_empty() {
                    self.connections.remove(&peer_id);
                    self.punch_failed.remove(&peer_id);
                }
            }
            // Held requests go to the remaining connection, or fail as not connected.
            self.release(peer_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Poll::Ready(event);
            }
            if let Some(wake) = self.wake_at.as_mut() {
                if wake.poll_unpin(cx).is_ready() {
                    let now = Instant::now();
                    let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                        .into_iter()
                        .partition(|(t, _)| *t <= now);
                    self.held = keep;
                    for (_, request) in due {
                        tracing::debug!(peer = %request.peer, "no hole punch in time; the call runs on the relay");
                        self.dispatch(request, false);
                    }
                    self.schedule_wake();
                    continue;
                }
            }
            match self.requests.poll_recv(cx) {
                Poll::Ready(Some(request)) => self.dispatch(request, true),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
}

/// A request, from the behaviour to one connection, to open a stream.
#[derive(Debug)]
pub struct Open {
    protocol: StreamProtocol,
    reply: OpenReply,
    path: Path,
}

pub struct Handler {
    peer: PeerId,
    protocols: Vec<StreamProtocol>,
    queue: mpsc::Sender<Inbound>,
    pending: VecDeque<Open>,
}

/// Negotiates one of the listed protocols and yields the raw stream.
pub struct Negotiate(Vec<StreamProtocol>);

impl UpgradeInfo for Negotiate {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Negotiate {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl OutboundUpgrade<Stream> for Negotiate {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_outbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

/// What an outbound stream request carries through the negotiation.
pub struct OpenInfo {
    reply: OpenReply,
    path: Path,
    protocol: StreamProtocol,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Open;
    type ToBehaviour = Infallible;
    type InboundProtocol = Negotiate;
    type OutboundProtocol = Negotiate;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = OpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(Negotiate(self.protocols.clone()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        // Open streams keep the connection alive by themselves.
        !self.pending.is_empty()
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, OpenInfo, Self::ToBehaviour>> {
        match self.pending.pop_front() {
            Some(open) => Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    Negotiate(vec![open.protocol.clone()]),
                    OpenInfo {
                        reply: open.reply,
                        path: open.path,
                        protocol: open.protocol,
                    },
                ),
            }),
            None => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, open: Open) {
        self.pending.push_back(open);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), OpenInfo>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => {
                if let Err(e) = self.queue.try_send((self.peer, protocol, stream)) {
                    tracing::warn!(peer = %self.peer, "inbound stream queue full ({e}); dropping a stream");
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: (stream, _),
                info,
            }) => {
                let _ = info.reply.send(Ok((stream, info.path)));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => {
                let peer = self.peer;
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported {
                        peer,
                        protocol: info.protocol.to_string(),
                    },
                    StreamUpgradeError::Timeout => OpenError::Failed {
                        peer,
                        reason: "timed out negotiating the stream".into(),
                    },
                    StreamUpgradeError::Io(e) => OpenError::Failed {
                        peer,
                        reason: e.to_string(),
                    },
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = info.reply.send(Err(error));
            }
            _ => {}
        }
    }
}
