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

/// A call's byte stream: a libp2p stream, or an in-memory pipe to this node's own server.
pub trait CallStream: futures::AsyncRead + futures::AsyncWrite + Unpin + Send {}
impl<T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send> CallStream for T {}
pub type BoxedStream = Box<dyn CallStream>;

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
    /// The stream closed before the node answered anything: it never read the request
    /// (e.g. its accept queue was full), so trying again is safe.
    #[error("the node did not accept the stream")]
    NotAccepted,
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
    /// The first frame, read early by [`Call::start_confirmed`].
    first: Option<InferResponse>,
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
            first: None,
        })
    }

    /// Like [`Call::start`], but also waits for the node's first frame, so a stream the node
    /// dropped unread (it never saw the request) shows up here as [`CallError::NotAccepted`].
    pub async fn start_confirmed(
        stream: S,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> Result<Call<S>, CallError> {
        let mut call = Self::start(stream, request, idle_timeout).await?;
        match call.next().await {
            Ok(Some(frame)) => {
                call.first = Some(frame);
                Ok(call)
            }
            Ok(None) => Err(CallError::NotAccepted),
            Err(CallError::Closed | CallError::Network(_)) => Err(CallError::NotAccepted),
            Err(e) => Err(e),
        }
    }

    /// The same call over a boxed stream, so calls over different transports share a type.
    pub fn boxed(self) -> Call<BoxedStream>
    where
        S: Send + 'static,
    {
        let stream = self.rd.reunite(self._wr).expect("halves of one stream");
        let (rd, wr) = (Box::new(stream) as BoxedStream).split();
        Call {
            rd,
            _wr: wr,
            idle_timeout: self.idle_timeout,
            finished: self.finished,
            first: self.first,
        }
    }

    /// The next frame, `Ok(None)` after `done`. An `error` frame comes back as `Err(Remote)`.
    pub async fn next(&mut self) -> Result<Option<InferResponse>, CallError> {
        if let Some(frame) = self.first.take() {
            return Ok(Some(frame));
        }
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
                // A clean close lets both ends free the stream at once (dropping resets it).
                let _ = self._wr.close().await;
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
