//! Telling a busy node from a frozen one while a call waits on it.
//!
//! A node whose process stopped (a laptop put to sleep, a `SIGSTOP`, a wedged runtime) keeps
//! its sockets open: the connection stays up and a stream opens, but nothing ever comes back.
//! A busy node also sends nothing for a while (a call waits for a slot, a long prompt is
//! prefilled). To tell the two apart, a call that has heard nothing from its node for
//! [`PATIENCE`] asks the node for its catalog on a stream of its own: a live node answers that
//! at once however busy its models are (the catalog is not queued behind calls). A node that
//! does not answer within [`PROBE_TIMEOUT`] has stopped answering, and the call gives up on it
//! (then fails over, or resumes elsewhere).
//!
//! A node that stopped answering on a connection that still looks open is often not frozen at
//! all: the connection is dead (its relay vanished without a word, the network changed) and
//! stays up until the transport's idle timeout. A call to a named node therefore closes the
//! connections to it ([`Watch::disconnect`]) and tries once more on a fresh one.
//!
//! Only a connected node is probed: reaching a node has deadlines of its own.

use std::future::Future;
use std::time::Duration;

use libp2p::PeerId;

use mesh_protocol::ModelCard;

use super::ProviderCache;
use crate::call::{CallError, Calls};
use crate::network::Client;

/// How long a call waits on a silent node before it checks that the node is alive.
pub const PATIENCE: Duration = Duration::from_millis(300);
/// How long a live node takes at most to answer the check, on a path whose round trip is
/// short; a longer path gets [`PROBE_ROUND_TRIPS`] of its measured round trip.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// The check opens a stream and asks: two round trips at most, with room to spare.
const PROBE_ROUND_TRIPS: u32 = 4;
/// Between two checks of a node that answered the last one.
const RECHECK: Duration = Duration::from_secs(1);

/// What is watched: the node a call waits on, through this node's network client; a node
/// found unresponsive is marked in `marks`, so the next calls try it last.
#[derive(Clone, Copy)]
pub struct Watch<'a> {
    pub client: &'a Client,
    pub peer: PeerId,
    pub marks: Option<&'a ProviderCache>,
    /// Close the connections to a node found unresponsive (see the module's doc).
    pub disconnect: bool,
}

impl Watch<'_> {
    fn probe_timeout(&self) -> Duration {
        probe_timeout(self.client, &self.peer)
    }
}

/// How long a live node takes at most to answer a check on the path to it.
pub fn probe_timeout(client: &Client, peer: &PeerId) -> Duration {
    probe_timeout_for(client.rtt(peer))
}

/// The probe timeout on a path whose measured round trip is `rtt`.
fn probe_timeout_for(rtt: Option<Duration>) -> Duration {
    PROBE_TIMEOUT.max(rtt.unwrap_or_default().saturating_mul(PROBE_ROUND_TRIPS))
}

/// How long closing a peer's connections may take before the next attempt goes ahead anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Closes the connections to `peer` and waits (at most [`CLOSE_WAIT`]) until they are gone, so
/// that the next attempt dials afresh instead of opening a stream on a closing connection.
async fn drop_connections(client: &Client, peer: PeerId) {
    if client.disconnect(peer).await.is_err() {
        return;
    }
    let end = tokio::time::Instant::now() + CLOSE_WAIT;
    while client.is_connected(&peer) && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `peer`'s catalog. Asked on a connection that is already open, a live node answers within
/// [`probe_timeout`]; when it does not, the connection may be dead while it looks open, so it
/// is closed and the catalog asked again on a fresh one (within the catalog's own deadline).
pub async fn catalog(client: &Client, peer: PeerId) -> Result<(Vec<ModelCard>, u32), CallError> {
    if client.is_connected(&peer) {
        let limit = probe_timeout(client, &peer);
        match tokio::time::timeout(limit, client.catalog(peer)).await {
            Ok(answer) => return answer,
            Err(_) => {
                tracing::info!(%peer, ms = limit.as_millis() as u64, "no catalog on the open connection; asking again on a fresh one");
                drop_connections(client, peer).await;
            }
        }
    }
    client.catalog(peer).await
}

/// Why a watched wait was abandoned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {peer} stopped answering: no answer for {silent_ms} ms, and none to a check of its catalog within {probe_ms} ms")]
pub struct Unresponsive {
    pub peer: PeerId,
    pub silent_ms: u64,
    pub probe_ms: u64,
}

impl From<Unresponsive> for CallError {
    fn from(e: Unresponsive) -> Self {
        CallError::Network(e.to_string())
    }
}

/// Runs `work` (a wait on `watch.peer`) to its end, unless the node stops answering first.
pub async fn unless_unresponsive<F: Future>(
    watch: Option<Watch<'_>>,
    work: F,
) -> Result<F::Output, Unresponsive> {
    let Some(watch) = watch else {
        return Ok(work.await);
    };
    let started = tokio::time::Instant::now();
    tokio::pin!(work);
    let mut next_check = started + PATIENCE;
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            () = tokio::time::sleep_until(next_check) => {}
        }
        if !watch.client.is_connected(&watch.peer) {
            // Still connecting, or the connection just went: the wait fails by itself then.
            next_check = tokio::time::Instant::now() + PATIENCE;
            continue;
        }
        let probe_timeout = watch.probe_timeout();
        let probe = tokio::time::timeout(probe_timeout, watch.client.catalog(watch.peer));
        tokio::pin!(probe);
        tokio::select! {
            out = &mut work => return Ok(out),
            answer = &mut probe => match answer {
                Ok(Ok(_)) => next_check = tokio::time::Instant::now() + RECHECK,
                // A probe refused at once (the stream was reset, the connection closed)
                // says nothing more than the wait will; a probe with no answer does.
                Ok(Err(_)) => next_check = tokio::time::Instant::now() + PATIENCE,
                Err(_) => {
                    tracing::info!(peer = %watch.peer, "node stopped answering; giving up on it");
                    if let Some(marks) = watch.marks {
                        marks.back_off(watch.peer, super::provider_cache::Misbehaviour::Unresponsive);
                    }
                    if watch.disconnect {
                        drop_connections(watch.client, watch.peer).await;
                    }
                    return Err(Unresponsive {
                        peer: watch.peer,
                        silent_ms: started.elapsed().as_millis() as u64,
                        probe_ms: probe_timeout.as_millis() as u64,
                    });
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_path_gets_a_longer_check() {
        assert_eq!(probe_timeout_for(None), PROBE_TIMEOUT);
        assert_eq!(
            probe_timeout_for(Some(Duration::from_millis(20))),
            PROBE_TIMEOUT
        );
        assert_eq!(
            probe_timeout_for(Some(Duration::from_millis(400))),
            Duration::from_millis(1600)
        );
        assert_eq!(probe_timeout_for(Some(Duration::MAX)), Duration::MAX);
    }
}
