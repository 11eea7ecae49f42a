//! The per-connection half: accepts inbound streams into the node's queue and opens the
//! outbound streams the behaviour assigns to this connection, negotiating exactly one protocol
//! each ([`Negotiate`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use libp2p::core::{InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionHandler, ConnectionHandlerEvent, StreamUpgradeError, SubstreamProtocol,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

use super::control::{OpenError, OpenReply};
use super::Inbound;
use crate::network::Path;

/// A request, from the behaviour to one connection, to open a stream.
#[derive(Debug)]
pub struct Open {
    pub(super) protocol: StreamProtocol,
    pub(super) reply: OpenReply,
    pub(super) path: Path,
}

pub struct Handler {
    peer: PeerId,
    protocols: Vec<StreamProtocol>,
    queue: mpsc::Sender<Inbound>,
    pending: VecDeque<Open>,
    /// Inbound streams accepted and not yet reported to the behaviour.
    accepted: u32,
}

/// What a connection tells the behaviour: it accepted this many inbound streams.
#[derive(Debug)]
pub struct Accepted(pub u32);

impl Handler {
    /// The handler of a connection to `peer`, accepting `protocols` into `queue`.
    pub(super) fn new(
        peer: PeerId,
        protocols: Vec<StreamProtocol>,
        queue: mpsc::Sender<Inbound>,
    ) -> Self {
        Handler {
            peer,
            protocols,
            queue,
            pending: VecDeque::new(),
            accepted: 0,
        }
    }
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
    type ToBehaviour = Accepted;
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
        if self.accepted > 0 {
            let accepted = std::mem::take(&mut self.accepted);
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(Accepted(accepted)));
        }
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
            }) => match self.queue.try_send((self.peer, protocol, stream)) {
                Ok(()) => self.accepted = self.accepted.saturating_add(1),
                Err(e) => {
                    tracing::warn!(peer = %self.peer, "inbound stream queue full ({e}); dropping a stream")
                }
            },
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
