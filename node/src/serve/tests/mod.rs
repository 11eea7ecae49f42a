//! Unit tests of the serving side over in-memory pipes, with the real built-in engines: no
//! swarm, no sockets. This file holds the shared fixtures.
//!
//! - [`session`]: one inference stream, phase by phase.
//! - [`accept`]: routing inbound streams and the node-wide stream bound.

mod accept;
mod session;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::{
    decode_frame, ChatMessage, InferRequest, InferResponse, Input, Role, SamplingParams,
};
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use super::{ServeConfig, Server};
use crate::engine::{builtin, SharedEngine};
use crate::identity::NodeIdentity;
use crate::wire::{read_frame, write_frame};

/// Bound on every single wait in these tests, so a broken server fails a test instead of
/// hanging it. Far longer than any step should take.
pub(super) const WAIT: Duration = Duration::from_secs(5);

/// Bytes the in-memory pipe holds in each direction (as `ask.rs` uses for local calls).
const PIPE_BYTES: usize = 64 * 1024;

/// A server hosting built-in `models` as `(name, spec, max_concurrency)`, e.g.
/// `("slow", "echo?delay_ms=20", 1)`, and its identity.
pub(super) fn server(
    models: &[(&str, &str, u32)],
    config: ServeConfig,
) -> (Arc<Server>, NodeIdentity) {
    let identity = NodeIdentity::generate();
    let engines: Vec<SharedEngine> = models
        .iter()
        .map(|(name, spec, slots)| {
            SharedEngine::from(
                builtin::from_spec(name, spec, *slots).expect("a valid builtin spec"),
            )
        })
        .collect();
    let server = Server::new(&identity, engines, config).expect("the server builds");
    (Arc::new(server), identity)
}

/// Some peer other than the server.
pub(super) fn stranger() -> PeerId {
    NodeIdentity::generate().peer_id()
}

/// A chat request for `model` whose last user message is `text`.
pub(super) fn chat(model: &str, text: &str) -> InferRequest {
    InferRequest {
        model: model.into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: text.into(),
            }],
        },
        params: SamplingParams {
            max_tokens: 4096,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
        resume: None,
    }
}

/// `n` words: the echo model answers with `n + 1` deltas.
pub(super) fn words(n: usize) -> String {
    vec!["w"; n].join(" ")
}

/// Polls `ready` until it holds, for at most [`WAIT`], for states no event announces
/// (e.g. a call waiting in the queue).
pub(super) async fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until one of `model`'s slots is free, for at most [`WAIT`]. The compute thread
/// holds its slot until the engine returns, so on a one-slot model this shows compute stopped
/// (tests make the full answer take much longer than `WAIT`).
pub(super) async fn compute_stopped(server: &Server, model: &str) {
    let slot = tokio::time::timeout(WAIT, server.models[model].slot())
        .await
        .expect("compute stops and frees its slot");
    drop(slot);
}

pub(super) type Pipe = Compat<DuplexStream>;

/// The caller's end of one stream, with the task serving the other end.
pub(super) struct Caller {
    rd: ReadHalf<Pipe>,
    wr: WriteHalf<Pipe>,
    /// The task serving the far end, if this fixture started it.
    serving: Option<JoinHandle<()>>,
}

/// A pipe whose far end `serve` serves on its own task.
fn open<F, Fut>(serve: F) -> Caller
where
    F: FnOnce(Pipe) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (near, far) = tokio::io::duplex(PIPE_BYTES);
    let serving = Some(tokio::spawn(serve(far.compat())));
    let (rd, wr) = near.compat().split();
    Caller { rd, wr, serving }
}

impl Caller {
    /// An inference stream from `peer`, served by `server`.
    pub(super) fn infer(server: &Arc<Server>, peer: PeerId) -> Caller {
        let server = server.clone();
        open(move |far| async move { server.serve_infer(peer, far).await })
    }

    /// Like [`Caller::infer`], recording what the server writes (see [`Packets`]).
    pub(super) fn infer_recorded(server: &Arc<Server>, peer: PeerId) -> (Caller, Packets) {
        let server = server.clone();
        let packets = Packets::default();
        let record = packets.clone();
        let caller = open(move |far| async move {
            let far = Recorded {
                inner: far,
                packets: record,
            };
            server.serve_infer(peer, far).await
        });
        (caller, packets)
    }

    /// A caller and the far end of its pipe, to hand to an accept loop.
    pub(super) fn unserved() -> (Caller, Pipe) {
        let (near, far) = tokio::io::duplex(PIPE_BYTES);
        let (rd, wr) = near.compat().split();
        let caller = Caller {
            rd,
            wr,
            serving: None,
        };
        (caller, far.compat())
    }

    /// A call of 1,000 words on `model` (an echo with a delay), once the node said `started`:
    /// it holds its slot for as long as the test needs.
    pub(super) async fn running(server: &Arc<Server>, model: &str) -> Caller {
        let mut caller = Caller::infer(server, stranger());
        caller.send(&chat(model, &words(1000))).await;
        assert!(matches!(
            caller.frame().await,
            Some(InferResponse::Started { .. })
        ));
        caller
    }

    pub(super) async fn send(&mut self, request: &InferRequest) {
        write_frame(&mut self.wr, request, DEFAULT_MAX_FRAME_LEN)
            .await
            .expect("the request is written");
    }

    /// Writes raw bytes, e.g. a partial or oversized frame.
    pub(super) async fn send_bytes(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.expect("bytes written");
        self.wr.flush().await.expect("bytes flushed");
    }

    /// The next frame, or `None` once the server ended the stream.
    pub(super) async fn next<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        match tokio::time::timeout(
            WAIT,
            read_frame::<T, _>(&mut self.rd, DEFAULT_MAX_FRAME_LEN),
        )
        .await
        {
            Ok(Ok(frame)) => frame,
            Ok(Err(crate::wire::WireIoError::Io(_))) => None,
            Ok(Err(e)) => panic!("bad frame from the server: {e}"),
            Err(_) => panic!("no frame from the server within {WAIT:?}"),
        }
    }

    /// The next inference response frame.
    pub(super) async fn frame(&mut self) -> Option<InferResponse> {
        self.next::<InferResponse>().await
    }

    /// Every frame until the server ends the stream.
    pub(super) async fn rest(&mut self) -> Vec<InferResponse> {
        let mut frames = Vec::new();
        while let Some(frame) = self.frame().await {
            frames.push(frame);
        }
        frames
    }

    /// Sends `request` and returns every frame of the answer.
    pub(super) async fn call(
        server: &Arc<Server>,
        peer: PeerId,
        request: &InferRequest,
    ) -> Vec<InferResponse> {
        let mut caller = Caller::infer(server, peer);
        caller.send(request).await;
        let frames = caller.rest().await;
        caller.served().await;
        frames
    }

    /// Waits for the serving task to end.
    pub(super) async fn served(self) {
        let Caller { rd, wr, serving } = self;
        let serving = serving.expect("a stream this fixture serves");
        tokio::time::timeout(WAIT, serving)
            .await
            .expect("the serving task ends")
            .expect("the serving task does not panic");
        drop((rd, wr));
    }

    /// Closes the caller's end (as a caller going away does); returns the serving task.
    pub(super) fn hang_up(self) -> JoinHandle<()> {
        self.serving.expect("a stream this fixture serves")
    }
}

/// The text of every delta in `frames`.
pub(super) fn text(frames: &[InferResponse]) -> String {
    frames
        .iter()
        .filter_map(|f| match f {
            InferResponse::Delta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// What the server flushed, one entry per flush: when, and the frames in it.
#[derive(Clone, Default)]
pub(super) struct Packets(Arc<Mutex<Recording>>);

#[derive(Default)]
struct Recording {
    unflushed: Vec<u8>,
    flushed: Vec<(Instant, Vec<u8>)>,
}

impl Packets {
    pub(super) fn frames(&self) -> Vec<(Instant, Vec<InferResponse>)> {
        let recording = self.0.lock().unwrap();
        recording
            .flushed
            .iter()
            .map(|(at, bytes)| {
                let mut frames = Vec::new();
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let (frame, used) = decode_frame::<InferResponse>(rest, DEFAULT_MAX_FRAME_LEN)
                        .expect("a valid frame")
                        .expect("whole frames in each flush");
                    frames.push(frame);
                    rest = &rest[used..];
                }
                (*at, frames)
            })
            .collect()
    }
}

/// A stream that records what is written to it, flush by flush.
struct Recorded<S> {
    inner: S,
    packets: Packets,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.packets
                .0
                .lock()
                .unwrap()
                .unflushed
                .extend_from_slice(&buf[..n]);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            let mut recording = this.packets.0.lock().unwrap();
            if !recording.unflushed.is_empty() {
                let bytes = std::mem::take(&mut recording.unflushed);
                recording.flushed.push((Instant::now(), bytes));
            }
        }
        flushed
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
