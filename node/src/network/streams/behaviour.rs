//! The `NetworkBehaviour` half: keeps the [`PeerTable`] as connections open and close, and
//! routes each open request to the best connection, or holds it for a hole punch in progress.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::control::{OpenError, OpenRequest, Opener};
use super::handler::{Accepted, Handler, Open};
use super::{Config, Inbound};
use crate::network::addr::is_relayed;
use crate::network::peer_table::SharedPeerTable;
use crate::network::Path;

/// A failed hole punch counts for this long, across reconnections (the peer's NAT does not
/// change because a relay restarted): calls meanwhile run on the relay at once.
const PUNCH_FAILURE_MEMORY: Duration = Duration::from_secs(600);
/// A relayed connection that closes after this long with no direct connection beside it
/// counts as a failed hole punch (see [`PeerTable::stayed_relayed`]).
///
/// [`PeerTable::stayed_relayed`]: crate::network::peer_table::PeerTable::stayed_relayed
const PUNCH_GIVEN_UP_AFTER: Duration = Duration::from_secs(3);
/// Most peers whose failed hole punch is remembered.
const PUNCH_FAILURES_KEPT: usize = 4096;

pub struct Behaviour {
    config: Config,
    inbound: mpsc::Sender<Inbound>,
    requests: mpsc::Receiver<OpenRequest>,
    table: SharedPeerTable,
    /// Requests held until a hole punch to their peer succeeds, fails or takes too long.
    held: Vec<(Instant, OpenRequest)>,
    /// Peers a hole punch failed for: their calls run on the relay without waiting.
    punch_failed: HashMap<PeerId, Instant>,
    wake_at: Option<Pin<Box<tokio::time::Sleep>>>,
    events: VecDeque<ToSwarm<Infallible, Open>>,
}

impl Behaviour {
    /// The behaviour, writing connections into `table`; the receiver of inbound streams; and
    /// the handle that opens streams.
    pub fn new(config: Config, table: SharedPeerTable) -> (Self, mpsc::Receiver<Inbound>, Opener) {
        let (inbound, inbound_rx) = mpsc::channel(config.inbound_queue.max(1));
        let (opener, requests) = mpsc::channel(config.open_queue.max(1));
        let behaviour = Behaviour {
            config,
            inbound,
            requests,
            table,
            held: Vec::new(),
            punch_failed: HashMap::new(),
            wake_at: None,
            events: VecDeque::new(),
        };
        (behaviour, inbound_rx, Opener { requests: opener })
    }

    /// DCUtR upgraded a relayed connection to `peer`: this connection is the direct one.
    pub fn hole_punched(&mut self, peer: PeerId, connection: ConnectionId) {
        self.table.write().hole_punched(&peer, connection);
        self.punch_failed.remove(&peer);
        self.release(peer);
    }

    /// DCUtR gave up on `peer`: calls to it run on the relay, now and for
    /// [`PUNCH_FAILURE_MEMORY`].
    pub fn hole_punch_failed(&mut self, peer: PeerId) {
        self.remember_punch_failure(peer);
        self.release(peer);
    }

    fn remember_punch_failure(&mut self, peer: PeerId) {
        if self.punch_failed.len() >= PUNCH_FAILURES_KEPT {
            self.punch_failed
                .retain(|_, failed| failed.elapsed() < PUNCH_FAILURE_MEMORY);
        }
        if self.punch_failed.len() < PUNCH_FAILURES_KEPT {
            self.punch_failed.insert(peer, Instant::now());
        }
    }

    fn add_connection(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        remote: &Multiaddr,
        relayed: bool,
    ) {
        self.table
            .write()
            .add(peer, id, remote.clone(), relayed, std::time::Instant::now());
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
        let best = self
            .table
            .read()
            .best(&request.peer)
            .map(|c| (c.id, c.path, Instant::from_std(c.since)));
        let Some((id, path, since)) = best else {
            let _ = request
                .reply
                .send(Err(OpenError::NotConnected(request.peer)));
            return;
        };
        if may_wait && path == Path::Relayed {
            let wait_until = since + self.config.hole_punch_wait;
            let punch_failed = self
                .punch_failed
                .get(&request.peer)
                .is_some_and(|failed| failed.elapsed() < PUNCH_FAILURE_MEMORY);
            if !punch_failed && Instant::now() < wait_until {
                tracing::debug!(peer = %request.peer, "call waits for a hole punch");
                self.held.push((wait_until, request));
                self.schedule_wake();
                return;
            }
        }
        self.table.write().stream_opened(&request.peer, id);
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
        Handler::new(
            peer,
            self.config.inbound_protocols.clone(),
            self.inbound.clone(),
        )
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
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.add_connection(peer, id, remote_addr, is_relayed(local_addr));
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
        self.add_connection(peer, id, addr, is_relayed(addr));
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id,
            connection_id,
            ..
        }) = event
        {
            let stayed_relayed = self.table.read().stayed_relayed(
                &peer_id,
                connection_id,
                std::time::Instant::now(),
                PUNCH_GIVEN_UP_AFTER,
            );
            if stayed_relayed {
                // Its next connection (through another relay, say) does not wait for a punch.
                tracing::debug!(peer = %peer_id, "a relayed connection never got a hole punch; not waiting for one next time");
                self.remember_punch_failure(peer_id);
            }
            self.table.write().remove(&peer_id, connection_id);
            // Held requests go to the remaining connection, or fail as not connected.
            self.release(peer_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        Accepted(streams): THandlerOutEvent<Self>,
    ) {
        let mut table = self.table.write();
        for _ in 0..streams.min(64) {
            table.stream_opened(&peer, connection);
        }
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
