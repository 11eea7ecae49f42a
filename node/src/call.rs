//! The calling side of `/mesh/infer/1` and `/mesh/catalog/1`, over an already open stream.

use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::{
    CatalogRequest, CatalogResponse, InferRequest, InferResponse, ModelCard, SignedModelCard,
    WireError,
};

use crate::identity::verify_by_peer;
use crate::wire::{read_frame, write_frame, WireIoError};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The serving node answered with an error frame.
    #[error("{0}")]
    Remote(WireError),
    #[error("the node closed the stream before the call finished")]
    Closed,
    #[error("no answer from the node within {0:?}")]
    Timeout(Duration),
    #[error("bad frame from the node: {0}")]
    Protocol(String),
    #[error("network failure: {0}")]
    Network(String),
}

impl From<WireIoError> for CallError {
    fn from(e: WireIoError) -> Self {
        match e {
            WireIoError::Io(e) => CallError::Network(e.to_string()),
            WireIoError::Truncated => CallError::Closed,
            WireIoError::Frame(e) => CallError::Protocol(e.to_string()),
        }
    }
}

/// An inference call in progress: yields response frames until `done` or an error.
pub struct Call<S> {
    rd: ReadHalf<S>,
    // Held open: closing our write half would tell the node we went away.
    _wr: WriteHalf<S>,
    idle_timeout: Duration,
    finished: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Call<S> {
    /// Sends `request` on `stream` and returns the call, ready to read frames.
    ///
    /// `idle_timeout` bounds the wait for each frame (the node's own deadline bounds the call).
    pub async fn start(
        stream: S,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> Result<Call<S>, CallError> {
        request.validate().map_err(CallError::Remote)?;
        let (rd, mut wr) = stream.split();
        write_frame(&mut wr, request, DEFAULT_MAX_FRAME_LEN).await?;
        Ok(Call {
            rd,
            _wr: wr,
            idle_timeout,
            finished: false,
        })
    }

    /// The next frame, `Ok(None)` after `done`. An `error` frame comes back as `Err(Remote)`.
    pub async fn next(&mut self) -> Result<Option<InferResponse>, CallError> {
        if self.finished {
            return Ok(None);
        }
        let frame = tokio::time::timeout(
            self.idle_timeout,
            read_frame::<InferResponse, _>(&mut self.rd, DEFAULT_MAX_FRAME_LEN),
        )
        .await
        .map_err(|_| CallError::Timeout(self.idle_timeout))??;
        match frame {
            None => Err(CallError::Closed),
            Some(InferResponse::Error(e)) => {
                self.finished = true;
                Err(CallError::Remote(e))
            }
            Some(done @ InferResponse::Done { .. }) => {
                self.finished = true;
                Ok(Some(done))
            }
            Some(other) => Ok(Some(other)),
        }
    }
}

/// Asks a node for its catalog and keeps only cards whose signature is by `peer`'s key.
pub async fn fetch_catalog<S>(
    stream: S,
    peer: &PeerId,
    timeout: Duration,
) -> Result<(Vec<ModelCard>, u32), CallError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        let (mut rd, mut wr) = stream.split();
        write_frame(&mut wr, &CatalogRequest {}, DEFAULT_MAX_FRAME_LEN).await?;
        let response: Option<CatalogResponse> = read_frame(&mut rd, DEFAULT_MAX_FRAME_LEN).await?;
        let _ = wr.close().await;
        response.ok_or(CallError::Closed)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::Timeout(timeout))??;
    let mut cards = Vec::new();
    for signed in &response.cards {
        match verify_card(peer, signed) {
            Ok(card) => cards.push(card),
            Err(reason) => tracing::warn!(%peer, "dropping a model card: {reason}"),
        }
    }
    Ok((cards, response.load))
}

/// Checks that `signed` was signed by `peer` and decodes it.
pub fn verify_card(peer: &PeerId, signed: &SignedModelCard) -> Result<ModelCard, String> {
    if !verify_by_peer(
        peer,
        &SignedModelCard::signed_message(&signed.card),
        &signed.signature,
    ) {
        return Err("its signature is not by this peer's key".into());
    }
    signed
        .decode_card()
        .map_err(|e| format!("it does not decode: {e}"))
}
