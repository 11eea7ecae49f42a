//! Inbound streams to their handlers, in the manner of iroh's `Router`.
//!
//! The stream's protocol id picks the handler ([`Protocol`]), and a bound on the streams
//! served at once (over all peers) keeps a flood from taking the node down: past it, an
//! inference stream is answered `overloaded` at once and a catalog stream is dropped. The
//! transport only hands streams over; it knows nothing of serving.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::ids::{CATALOG_PROTOCOL, INFER_PROTOCOL, STAGE_PROTOCOL};
use mesh_protocol::{ErrorCode, InferResponse, WireError};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Server;
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
}

impl Protocol {
    /// The protocol with stream protocol id `id`, if this node serves it.
    pub fn from_id(id: &str) -> Option<Protocol> {
        match id {
            INFER_PROTOCOL => Some(Protocol::Infer),
            CATALOG_PROTOCOL => Some(Protocol::Catalog),
            STAGE_PROTOCOL => Some(Protocol::Stage),
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
        }
    }
}

/// Answers an inference stream the node has no room for: `overloaded`, then a close.
async fn refuse_overloaded<S: AsyncWrite + Unpin>(mut stream: S) {
    let busy = InferResponse::Error(WireError::new(
        ErrorCode::Overloaded,
        "this node is serving its maximum number of streams",
    ));
    let refuse = async {
        let _ = write_frame(&mut stream, &busy, DEFAULT_MAX_FRAME_LEN).await;
        let _ = stream.close().await;
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refuse).await;
}

/// Serves `incoming` streams `(peer, protocol id, stream)`, each on its own task, at most
/// `limit` at once, until `shutdown` (then the streams still being served are aborted).
pub async fn accept<P, S>(
    mut incoming: mpsc::Receiver<(PeerId, P, S)>,
    server: Arc<Server>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) where
    P: AsRef<str>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut calls = JoinSet::new();
    // Served streams plus at most this many refusals in flight.
    let refusal_cap = limit.available_permits() + REFUSAL_HEADROOM;
    loop {
        tokio::select! {
            next = incoming.recv() => {
                let Some((peer, id, stream)) = next else { break };
                let Some(protocol) = Protocol::from_id(id.as_ref()) else {
                    tracing::debug!(%peer, protocol = id.as_ref(), "stream of a protocol not served");
                    continue;
                };
                match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let server = server.clone();
                        calls.spawn(async move {
                            server.serve(protocol, peer, stream).await;
                            drop(permit);
                        });
                    }
                    // Refusals are bounded too; past that bound the stream is dropped (reset).
                    Err(_) if protocol == Protocol::Infer && calls.len() < refusal_cap => {
                        calls.spawn(refuse_overloaded(stream));
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
