//! [`NetworkError`]: what can go wrong when asking the network for something.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use super::streams::OpenError;

/// A failed request to the swarm task, a failed connect, or a stream that did not open.
///
/// Callers classify it with the `is_*` methods (or by matching), never by its text; the text
/// is for people.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// The swarm task is gone (the node is shutting down).
    #[error("the node's network task has stopped")]
    Stopped,
    /// No answer in time; the second field says what was waited for.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The peer asked for is this node.
    #[error("that is this node's own peer id")]
    SelfDial,
    /// Dialling an address (whose peer may be unknown) failed.
    #[error("{reason}")]
    DialAddr { addr: Multiaddr, reason: String },
    /// A dial to `peer` could not even start (denied by a connection limit, for example).
    #[error("cannot dial {peer}: {reason}")]
    DialFailed { peer: PeerId, reason: String },
    /// Every address known for `peer`, and those the DHT gave, failed.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable { peer: PeerId, reason: String },
    /// Neither this node nor the DHT knows an address for `peer`.
    #[error("peer {peer} was not found on the mesh")]
    NotFound { peer: PeerId },
    /// A DHT walk needs a peer to start from, and the routing table is empty.
    #[error("no known peers to start from")]
    NoKnownPeers,
    /// The DHT walk ended in an error.
    #[error(transparent)]
    Bootstrap(libp2p::kad::BootstrapError),
    /// The peer does not accept the protocol.
    #[error("peer {peer} does not speak {protocol}: is it a mesh node?")]
    Unsupported { peer: PeerId, protocol: String },
    /// The connection is there, but the stream did not open.
    #[error(transparent)]
    StreamOpen(OpenError),
}

impl NetworkError {
    /// Nothing answered in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, NetworkError::Timeout(..))
    }

    /// The node is shutting down.
    pub fn is_stopped(&self) -> bool {
        matches!(self, NetworkError::Stopped)
    }

    /// The peer could not be found or reached at all (as opposed to reached and refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            NetworkError::DialAddr { .. }
                | NetworkError::DialFailed { .. }
                | NetworkError::Unreachable { .. }
                | NetworkError::NotFound { .. }
        )
    }
}

impl From<OpenError> for NetworkError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Unsupported { peer, protocol } => {
                NetworkError::Unsupported { peer, protocol }
            }
            OpenError::Stopped => NetworkError::Stopped,
            other => NetworkError::StreamOpen(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::random_peer as peer;

    #[test]
    fn messages_people_and_tests_rely_on() {
        let p = peer();
        assert_eq!(
            NetworkError::NotFound { peer: p }.to_string(),
            format!("peer {p} was not found on the mesh")
        );
        assert_eq!(
            NetworkError::Timeout(Duration::from_secs(20), "a connection").to_string(),
            "timed out after 20s waiting for a connection"
        );
        assert_eq!(
            NetworkError::SelfDial.to_string(),
            "that is this node's own peer id"
        );
    }

    #[test]
    fn classification_needs_no_text() {
        let p = peer();
        assert!(NetworkError::Timeout(Duration::from_secs(1), "x").is_timeout());
        assert!(NetworkError::Stopped.is_stopped());
        assert!(NetworkError::NotFound { peer: p }.is_unreachable());
        assert!(!NetworkError::SelfDial.is_unreachable());
        let unsupported = OpenError::Unsupported {
            peer: p,
            protocol: "/mesh/infer/1".into(),
        };
        assert!(matches!(
            NetworkError::from(unsupported),
            NetworkError::Unsupported { .. }
        ));
        assert!(NetworkError::from(OpenError::Stopped).is_stopped());
        assert!(matches!(
            NetworkError::from(OpenError::NotConnected(p)),
            NetworkError::StreamOpen(OpenError::NotConnected(_))
        ));
    }
}
