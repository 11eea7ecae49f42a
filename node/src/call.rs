//! The calling side of `/mesh/infer/1` and `/mesh/catalog/1`: one call over one stream.
//!
//! - [`Call`]: the frames of one inference call over any byte stream ([`CallStream`]).
//! - The transport of a call: [`Call::local`] (an in-memory pipe to this node's own
//!   [`Server`]), [`Calls::call_with_path`] (a libp2p stream, retried while the node drops it
//!   unread), and [`Call::open`], which picks one of the two for a peer.
//! - [`Calls::catalog`] and [`fetch_catalog`]: a node's verified model cards.
//!
//! The network layer only opens streams; what goes over them lives here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::{
    CatalogRequest, CatalogResponse, InferRequest, InferResponse, ModelCard, SignedModelCard,
    WireError,
};
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::identity::verify_by_peer;
use crate::network::client::{CATALOG, INFER};
use crate::network::{Client, Path};
use crate::serve::Server;
use crate::wire::{read_frame, write_frame, WireIoError};

/// Attempts at a call whose stream the node dropped unread.
const CALL_ATTEMPTS: u32 = 8;

/// How long a node may take to answer a catalog request once the stream is open: it answers
/// at once, however busy its models are.
pub const CATALOG_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes the in-memory pipe of a local call buffers each way.
const LOCAL_PIPE_BYTES: usize = 64 * 1024;

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
    /// No first frame within the patience of a call another provider could take.
    #[error("the node sent nothing within {0:?}; another provider can take the call")]
    Stalled(Duration),
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
            e @ (WireIoError::NoRequest(_) | WireIoError::TooSlow { .. }) => {
                CallError::Network(e.to_string())
            }
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
    /// The request goes as it is: the caller checks it once when it builds it
    /// ([`crate::dispatch::build_request`]), and the serving node checks it again.
    /// `idle_timeout` bounds the wait for each frame (the node's own deadline bounds the call).
    pub async fn start(
        stream: S,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> Result<Call<S>, CallError> {
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

impl Call<BoxedStream> {
    /// Starts `request` on this node's own `server`, through an in-memory pipe: the server
    /// answers it as it answers a stream from `caller` (this node's own peer id), policy and
    /// receipt included, without the network.
    pub async fn local(
        server: &Arc<Server>,
        caller: PeerId,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> Result<Call<BoxedStream>, CallError> {
        let (near, far) = tokio::io::duplex(LOCAL_PIPE_BYTES);
        let server = server.clone();
        tokio::spawn(async move { server.serve_infer(caller, far.compat()).await });
        Call::start(
            Box::new(near.compat()) as BoxedStream,
            request,
            idle_timeout,
        )
        .await
    }

    /// Starts `request` on `peer`: on `local` when `peer` is this node and it serves models
    /// here, else over a libp2p stream ([`Calls::call_with_path`]). Returns the path it took.
    pub async fn open(
        client: &Client,
        local: Option<&Arc<Server>>,
        peer: PeerId,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> Result<(Call<BoxedStream>, Path), CallError> {
        match local {
            Some(server) if peer == client.local_peer_id() => {
                let call = Call::local(server, peer, request, idle_timeout).await?;
                Ok((call, Path::Local))
            }
            _ => {
                let (call, path) = client.call_with_path(peer, request, idle_timeout).await?;
                Ok((call.boxed(), path))
            }
        }
    }
}

/// Calls and catalog requests over the network client's streams.
///
/// An extension of [`Client`], which only opens streams: `use mesh_node::call::Calls;` to
/// write `client.call(peer, &request, idle)`.
pub trait Calls {
    /// Starts an inference call on `peer`: returns once the node has answered its first frame.
    ///
    /// A stream that ends before any frame was never processed by the node (its inbound queue
    /// was full, or it is shutting down), so the call is retried a few times, backing off.
    fn call(
        &self,
        peer: PeerId,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> impl Future<Output = Result<Call<Stream>, CallError>> + Send;

    /// [`Calls::call`], also returning the path the call runs on.
    fn call_with_path(
        &self,
        peer: PeerId,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> impl Future<Output = Result<(Call<Stream>, Path), CallError>> + Send;

    /// The verified model cards `peer` hosts, and its current load.
    fn catalog(
        &self,
        peer: PeerId,
    ) -> impl Future<Output = Result<(Vec<ModelCard>, u32), CallError>> + Send;
}

impl Calls for Client {
    async fn call(
        &self,
        peer: PeerId,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> Result<Call<Stream>, CallError> {
        Ok(self.call_with_path(peer, request, idle_timeout).await?.0)
    }

    async fn call_with_path(
        &self,
        peer: PeerId,
        request: &InferRequest,
        idle_timeout: Duration,
    ) -> Result<(Call<Stream>, Path), CallError> {
        let mut backoff = Duration::from_millis(1);
        let mut attempt = 1;
        loop {
            let (stream, path) = self
                .open_stream_with_path(peer, INFER)
                .await
                .map_err(|e| CallError::Network(e.to_string()))?;
            match Call::start_confirmed(stream, request, idle_timeout).await {
                Ok(call) => return Ok((call, path)),
                Err(CallError::NotAccepted) if attempt < CALL_ATTEMPTS => {
                    tracing::debug!(%peer, attempt, "stream not accepted; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                    attempt += 1;
                }
                Err(CallError::NotAccepted) => {
                    return Err(CallError::Network(format!(
                        "{peer} closed the stream without answering, {CALL_ATTEMPTS} times \
                         (overloaded, shutting down, or not a mesh node)"
                    )))
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn catalog(&self, peer: PeerId) -> Result<(Vec<ModelCard>, u32), CallError> {
        let stream = self
            .open_stream(peer, CATALOG)
            .await
            .map_err(|e| CallError::Network(e.to_string()))?;
        fetch_catalog(stream, &peer, CATALOG_TIMEOUT.min(self.connect_timeout)).await
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

#[cfg(test)]
mod tests;
