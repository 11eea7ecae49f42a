//! Inbound streams to their handlers, in the manner of iroh's `Router`.
//!
//! The stream's protocol id picks the handler ([`Protocol`]), and bounds on the streams served
//! at once keep a flood from taking the node down ([`StreamLimits`]): per peer, so one peer
//! cannot take every place; over all peers; and pools of their own for catalogs and for
//! pieces of model files. Past a
//! bound, an inference stream is answered `overloaded` at once and a catalog stream is
//! dropped. The transport only hands streams over; it knows nothing of serving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::ids::{BLOB_PROTOCOL, CATALOG_PROTOCOL, INFER_PROTOCOL, STAGE_PROTOCOL};
use mesh_protocol::{ErrorCode, InferResponse, WireError};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Server;
use crate::metrics::Outcome;
use crate::wire::write_frame;

/// Refusals that may be in flight besides the streams being served. Past this, a stream
/// beyond the limit is dropped unanswered (the caller sees a reset).
pub const REFUSAL_HEADROOM: usize = 64;

/// Longest time spent telling a caller `overloaded` (writing the frame and closing).
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A protocol this node serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `/mesh/infer/1`: one inference call per stream.
    Infer,
    /// `/mesh/catalog/1`: the node's signed model cards and load.
    Catalog,
    /// `/mesh/stage/1`: one session of a range of layers, for a head.
    Stage,
    /// `/mesh/blob/1`: pieces of a model's file.
    Blob,
}

impl Protocol {
    /// The protocol with stream protocol id `id`, if this node serves it.
    pub fn from_id(id: &str) -> Option<Protocol> {
        match id {
            INFER_PROTOCOL => Some(Protocol::Infer),
            CATALOG_PROTOCOL => Some(Protocol::Catalog),
            STAGE_PROTOCOL => Some(Protocol::Stage),
            BLOB_PROTOCOL => Some(Protocol::Blob),
            _ => None,
        }
    }
}

impl Server {
    /// Serves one inbound `protocol` stream from `peer`, start to end.
    pub async fn serve<S>(&self, protocol: Protocol, peer: PeerId, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match protocol {
            Protocol::Infer => self.serve_infer(peer, stream).await,
            Protocol::Catalog => self.serve_catalog(stream).await,
            Protocol::Stage => self.serve_stage(peer, stream).await,
            Protocol::Blob => self.serve_blob(peer, stream).await,
        }
    }
}

/// How many inbound streams are served at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Inference and stage streams, over all peers.
    pub streams: usize,
    /// Inference and stage streams of one peer: one peer alone cannot take every place.
    pub per_peer: usize,
    /// Catalog streams, over all peers: a pool of their own, so a flood of calls leaves
    /// routing working, and the reverse.
    pub catalogs: usize,
    /// Catalog streams of one peer.
    pub catalogs_per_peer: usize,
    /// Blob streams (pieces of model files), over all peers: a pool of their own, so a
    /// download never takes the places of calls.
    pub blobs: usize,
    /// Blob streams of one peer.
    pub blobs_per_peer: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            streams: 256,
            per_peer: 32,
            catalogs: 64,
            catalogs_per_peer: 4,
            blobs: 32,
            blobs_per_peer: 8,
        }
    }
}

/// The streams each peer has open, by pool; a place is given back when its [`Place`] drops.
#[derive(Default)]
struct PeerStreams {
    open: Mutex<HashMap<(PeerId, Pool), usize>>,
}

/// Which pool a stream counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pool {
    Calls,
    Catalogs,
    Blobs,
}

/// One stream's place in its peer's count.
struct Place {
    streams: Arc<PeerStreams>,
    key: (PeerId, Pool),
}

impl PeerStreams {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<(PeerId, Pool), usize>> {
        self.open
            .lock()
            .expect("never poisoned: no panics while held")
    }

    /// A place for one more stream of `peer` in `pool`, if it has fewer than `limit` open.
    fn take(self: &Arc<Self>, peer: PeerId, pool: Pool, limit: usize) -> Option<Place> {
        let mut open = self.open();
        let count = open.entry((peer, pool)).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Place {
            streams: self.clone(),
            key: (peer, pool),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.streams.open();
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Answers an inference stream it will not serve with `error`, then closes it.
async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, error: WireError) {
    let refusal = InferResponse::Error(error);
    let refuse = async {
        let _ = write_frame(&mut stream, &refusal, DEFAULT_MAX_FRAME_LEN).await;
        let _ = stream.close().await;
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refuse).await;
}

/// Serves `incoming` streams `(peer, protocol id, stream)`, each on its own task, within
/// `limits`, until `shutdown` (then the streams still being served are aborted).
///
/// Every check here is made before the stream is read, and costs no place: the peer's own
/// count ([`StreamLimits::per_peer`]); for an inference stream on a node whose every model is
/// closed to all but its allow lists, the caller's peer id against them; then a place in the
/// node-wide pool. An
/// inference stream refused here is told why (`overloaded` or `unauthorized`), within a
/// bounded number of refusals in flight; any other is dropped.
pub async fn accept<P, S>(
    mut incoming: mpsc::Receiver<(PeerId, P, S)>,
    server: Arc<Server>,
    limits: StreamLimits,
    shutdown: CancellationToken,
) where
    P: AsRef<str>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut calls = JoinSet::new();
    let streams = Arc::new(Semaphore::new(limits.streams));
    let catalogs = Arc::new(Semaphore::new(limits.catalogs));
    let blobs = Arc::new(Semaphore::new(limits.blobs));
    let per_peer = Arc::new(PeerStreams::default());
    // Served streams plus at most this many refusals in flight.
    let refusal_cap = limits.streams + limits.catalogs + limits.blobs + REFUSAL_HEADROOM;
    loop {
        tokio::select! {
            next = incoming.recv() => {
                let Some((peer, id, stream)) = next else { break };
                let Some(protocol) = Protocol::from_id(id.as_ref()) else {
                    tracing::debug!(%peer, protocol = id.as_ref(), "stream of a protocol not served");
                    continue;
                };
                let may_refuse = protocol == Protocol::Infer && calls.len() < refusal_cap;
                let (pool, pool_limit, places) = match protocol {
                    Protocol::Catalog => (Pool::Catalogs, limits.catalogs_per_peer, &catalogs),
                    Protocol::Blob => (Pool::Blobs, limits.blobs_per_peer, &blobs),
                    Protocol::Infer | Protocol::Stage => (Pool::Calls, limits.per_peer, &streams),
                };
                // A stage stream is refused in its own protocol, by the stage session.
                if protocol == Protocol::Infer && !server.auth.may_call_any(&peer) {
                    tracing::debug!(%peer, "stream from a peer no model here allows");
                    server.metrics.served(None, Outcome::Refused(ErrorCode::Unauthorized.as_str()));
                    if may_refuse {
                        calls.spawn(refuse(stream, WireError::new(
                            ErrorCode::Unauthorized,
                            format!("not on the allow list: peer {peer} may call no model on this node"),
                        )));
                    }
                    continue;
                }
                let Some(place) = per_peer.take(peer, pool, pool_limit) else {
                    tracing::debug!(%peer, ?protocol, "the peer has its most streams open");
                    if protocol == Protocol::Infer {
                        server.metrics.served(None, Outcome::Refused(ErrorCode::Overloaded.as_str()));
                    }
                    if may_refuse {
                        calls.spawn(refuse(stream, WireError::new(
                            ErrorCode::Overloaded,
                            format!("this node serves at most {pool_limit} streams of one peer at once"),
                        )));
                    }
                    continue;
                };
                match places.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let server = server.clone();
                        calls.spawn(async move {
                            server.serve(protocol, peer, stream).await;
                            drop((permit, place));
                        });
                    }
                    // Refusals are bounded too; past that bound the stream is dropped (reset).
                    Err(_) if may_refuse => {
                        server.metrics.served(None, Outcome::Refused(ErrorCode::Overloaded.as_str()));
                        calls.spawn(refuse(stream, WireError::new(
                            ErrorCode::Overloaded,
                            "this node is serving its maximum number of streams",
                        )));
                    }
                    Err(_) => {}
                }
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    calls.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_peer;

    #[test]
    fn a_peer_gets_its_own_bounded_count_in_each_pool() {
        let streams = Arc::new(PeerStreams::default());
        let (a, b) = (random_peer(), random_peer());
        let first = streams.take(a, Pool::Calls, 2).unwrap();
        let second = streams.take(a, Pool::Calls, 2).unwrap();
        assert!(streams.take(a, Pool::Calls, 2).is_none(), "a's third call");
        assert!(streams.take(b, Pool::Calls, 2).is_some(), "b counts apart");
        assert!(
            streams.take(a, Pool::Catalogs, 1).is_some(),
            "catalogs count apart"
        );
        drop(first);
        let third = streams.take(a, Pool::Calls, 2);
        assert!(third.is_some(), "a place given back is taken again");
        drop((second, third));
        assert!(streams.open().is_empty(), "no entry outlives its streams");
    }
}
