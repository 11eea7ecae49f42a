//! [`Opener`]: the cloneable handle that asks the behaviour for outbound streams.

use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use crate::network::Path;

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

pub(crate) type OpenReply = oneshot::Sender<Result<(Stream, Path), OpenError>>;

pub(crate) struct OpenRequest {
    pub(crate) peer: PeerId,
    pub(crate) protocol: StreamProtocol,
    pub(crate) reply: OpenReply,
}

/// A cloneable handle that opens outbound streams.
#[derive(Clone)]
pub struct Opener {
    pub(crate) requests: mpsc::Sender<OpenRequest>,
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
