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
//! - opens each outbound stream on the connection the [`PeerTable`](super::peer_table) ranks
//!   best (direct or hole-punched before relayed); a call to a peer reached a moment ago
//!   through a relay waits (bounded by [`Config::hole_punch_wait`]) for DCUtR to finish, so a
//!   call that can run direct does not start on the relay;
//! - reports the [`Path`](super::Path) of the connection each stream runs on;
//! - keeps the peer table: it sees every connection open and close first.
//!
//! Laid out as libp2p-stream is: [`behaviour`] (the `NetworkBehaviour`), [`handler`] (the
//! `ConnectionHandler` and the upgrade), [`control`] (the [`Opener`] handle).

pub mod behaviour;
pub mod control;
pub mod handler;

use std::time::Duration;

use libp2p::{PeerId, Stream, StreamProtocol};

pub use behaviour::Behaviour;
pub use control::{OpenError, Opener};
pub use handler::Handler;

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
