//! The serving side of `/mesh/stage/1`: a range of a model's layers, run for a head.
//!
//! [`HostedStage`] is one model's layers this node holds. A [`StageSession`] serves one
//! stream, phase by phase:
//!
//! 1. `open`: one `open` frame within the request timeout; the caller is checked against the
//!    access policy for the model's name (as a call would be) before anything else, then the
//!    weights' sha256 and the range; the session takes one of the stage's bounded places.
//! 2. `steps`: each `step` frame is checked (its positions follow the session's, its size and
//!    shape match, every value is finite), run on a blocking thread, and answered. A session
//!    that sends nothing for [`STAGE_IDLE_TIMEOUT`] is closed, and none lives past
//!    [`MAX_STAGE_SESSION`].
//! 3. `close`: the session's receipt, signed, over hashes of everything it received and sent.
//!
//! A malformed frame ends its own session with an `error` frame; other sessions go on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::PeerId;
use mesh_protocol::stage::{MAX_STAGE_POSITIONS, STAGE_RECEIPT_VERSION};
use mesh_protocol::{
    ErrorCode, HiddenFormat, LayerRange, ModelCard, SignedModelCard, StageReceipt, StageRequest,
    StageResponse, WireError,
};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::frames::{self, WRITE_TIMEOUT};
use super::Server;
use crate::auth::{receipt, unix_now};
use crate::engine::llama::{Hidden, KvCache, Llama};
use crate::wire::{read_frame, write_frame, WireIoError};

/// Fewest sessions a stage serves at once (`--concurrency` may raise it); more are refused
/// `overloaded`. Its card advertises the number, and heads plan by it.
pub const DEFAULT_MAX_STAGE_SESSIONS: usize = 8;
/// How long a session may wait for its next frame.
pub const STAGE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a session lives.
pub const MAX_STAGE_SESSION: Duration = Duration::from_secs(30 * 60);

/// One range of layers a node runs for heads, as its status reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageStatus {
    pub card: ModelCard,
    /// Sessions open now.
    pub sessions: usize,
}

/// The layers of one model this node runs for heads.
pub struct HostedStage {
    model: Arc<Llama>,
    card: ModelCard,
    signed_card: SignedModelCard,
    sessions: Arc<Semaphore>,
    max_sessions: usize,
}

impl HostedStage {
    /// `card` names the model, its weights and (in `layers`) the range `model` holds.
    pub(super) fn new(
        model: Arc<Llama>,
        card: ModelCard,
        signed_card: SignedModelCard,
        max_sessions: usize,
    ) -> HostedStage {
        HostedStage {
            model,
            card,
            signed_card,
            sessions: Arc::new(Semaphore::new(max_sessions)),
            max_sessions,
        }
    }

    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    pub(super) fn signed_card(&self) -> &SignedModelCard {
        &self.signed_card
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.max_sessions - self.sessions.available_permits()
    }

    fn layers(&self) -> LayerRange {
        self.card.layers.expect("a stage's card names its layers")
    }
}

/// A session that opened: what it runs, and what it has seen.
struct Open {
    stage: Arc<HostedStage>,
    layers: LayerRange,
    format: HiddenFormat,
    max_positions: usize,
    cache: Option<KvCache>,
    _place: OwnedSemaphorePermit,
    inputs: Sha256,
    outputs: Sha256,
    steps: u32,
    opened_unix_ms: u64,
    compute: Duration,
}

/// One `/mesh/stage/1` stream being served.
pub(super) struct StageSession<'s, R, W> {
    server: &'s Server,
    peer: PeerId,
    rd: R,
    wr: W,
}

fn failed(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

impl<'s, R, W> StageSession<'s, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub(super) fn new(server: &'s Server, peer: PeerId, rd: R, wr: W) -> Self {
        StageSession {
            server,
            peer,
            rd,
            wr,
        }
    }

    /// Serves the stream start to end; every failure the caller can hear of becomes an
    /// `error` frame.
    pub(super) async fn run(mut self) {
        let began = Instant::now();
        let result = match self.open().await {
            Ok(Some(mut open)) => {
                let steps = tokio::time::timeout(MAX_STAGE_SESSION, self.steps(&mut open)).await;
                let result = steps.unwrap_or_else(|_| {
                    Err(failed(
                        ErrorCode::DeadlineExceeded,
                        format!("a stage session lives at most {MAX_STAGE_SESSION:?}"),
                    ))
                });
                tracing::info!(peer = %self.peer, model = %open.stage.card.name, layers = %open.layers,
                    steps = open.steps, ms = began.elapsed().as_millis() as u64, "stage session ended");
                result
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::info!(peer = %self.peer, code = %e.code, "stage session failed: {}", e.message);
            self.send(&StageResponse::Error(e)).await;
        }
        frames::close(&mut self.wr).await;
    }

    async fn read(&mut self, timeout: Duration) -> Result<Option<StageRequest>, WireError> {
        let max = self.server.config.max_frame_len;
        match tokio::time::timeout(timeout, read_frame::<StageRequest, _>(&mut self.rd, max)).await
        {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(WireIoError::Io(_))) => Ok(None),
            Ok(Err(e)) => Err(WireError::bad_request(e.to_string())),
            Err(_) => Err(failed(
                ErrorCode::DeadlineExceeded,
                format!("no frame within {timeout:?}"),
            )),
        }
    }

    async fn send(&mut self, frame: &StageResponse) {
        let max = self.server.config.max_frame_len;
        match tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut self.wr, frame, max)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("stage frame failed: {e}"),
            Err(_) => tracing::debug!("stage frame timed out"),
        }
    }

    /// Reads and checks `open`, authorizes the caller, takes a place, answers `opened`.
    /// `None` when the caller went away first.
    async fn open(&mut self) -> Result<Option<Open>, WireError> {
        let Some(frame) = self.read(self.server.config.request_timeout).await? else {
            return Ok(None);
        };
        let StageRequest::Open {
            model,
            weights_sha256,
            layers,
            max_positions,
            hidden,
            token,
        } = frame
        else {
            return Err(WireError::bad_request("a stage session begins with `open`"));
        };
        // Who may call comes first: a refused head learns nothing and costs nothing.
        let grant =
            self.server
                .auth
                .authorize(&self.peer, &model, token.as_deref(), unix_now())
                .map_err(|r| {
                    tracing::info!(peer = %self.peer, %model, reason = r.reason(), "stage refused: {r}");
                    WireError::from(r)
                })?;
        let stage = self.server.stages.get(&model).cloned().ok_or_else(|| {
            failed(
                ErrorCode::UnknownModel,
                format!("this node runs no layers of model {model:?}"),
            )
        })?;
        if weights_sha256 != stage.card.sha256 {
            return Err(failed(
                ErrorCode::UnknownModel,
                format!(
                    "this node's layers of {model:?} are of other weights ({})",
                    stage.card.sha256
                ),
            ));
        }
        layers.validate().map_err(WireError::bad_request)?;
        if !stage.layers().contains(&layers) {
            return Err(failed(
                ErrorCode::UnknownModel,
                format!(
                    "this node runs layers {} of {model:?}, not {layers}",
                    stage.layers()
                ),
            ));
        }
        let context = stage.card.context_length.min(MAX_STAGE_POSITIONS);
        if max_positions == 0 || max_positions > context {
            return Err(WireError::bad_request(format!(
                "a session holds 1 to {context} positions, not {max_positions}"
            )));
        }
        let place = stage.sessions.clone().try_acquire_owned().map_err(|_| {
            failed(
                ErrorCode::Overloaded,
                format!(
                    "this node runs {} sessions of model {model:?} already",
                    stage.max_sessions
                ),
            )
        })?;
        self.server
            .auth
            .commit(&grant, unix_now())
            .map_err(WireError::from)?;
        let range = layers.start as usize..layers.end as usize;
        let cache = stage.model.new_cache(range, max_positions as usize);
        let width = stage.model.config().width as u32;
        self.send(&StageResponse::Opened { width, layers }).await;
        Ok(Some(Open {
            stage,
            layers,
            format: hidden,
            max_positions: max_positions as usize,
            cache: Some(cache),
            _place: place,
            inputs: Sha256::new(),
            outputs: Sha256::new(),
            steps: 0,
            opened_unix_ms: receipt::unix_ms_now(),
            compute: Duration::ZERO,
        }))
    }

    /// Answers steps until `close` (with the receipt) or the caller leaves.
    async fn steps(&mut self, open: &mut Open) -> Result<(), WireError> {
        loop {
            let Some(frame) = self.read(STAGE_IDLE_TIMEOUT).await? else {
                return Ok(());
            };
            match frame {
                StageRequest::Step {
                    start,
                    rows,
                    hidden,
                } => {
                    let output = self.step(open, start, rows, hidden).await?;
                    self.send(&StageResponse::Output { hidden: output }).await;
                }
                StageRequest::Close => {
                    let signed = receipt::sign_stage(&self.server.identity, &self.receipt(open));
                    self.send(&StageResponse::Closed { receipt: signed }).await;
                    return Ok(());
                }
                StageRequest::Open { .. } => {
                    return Err(WireError::bad_request("the session is open already"))
                }
            }
        }
    }

    /// Checks one step and runs it on a blocking thread.
    async fn step(
        &self,
        open: &mut Open,
        start: u32,
        rows: u32,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, WireError> {
        let mut cache = open
            .cache
            .take()
            .ok_or_else(|| failed(ErrorCode::Internal, "an earlier step failed"))?;
        let held = cache.len();
        let (start, rows) = (start as usize, rows as usize);
        if start != held {
            return Err(WireError::bad_request(format!(
                "the step starts at position {start}; the session holds positions 0..{held}"
            )));
        }
        if rows == 0 || held + rows > open.max_positions {
            return Err(WireError::bad_request(format!(
                "a step of {rows} positions after {held}: the session holds at most {}",
                open.max_positions
            )));
        }
        let width = open.stage.model.config().width;
        let hidden =
            Hidden::decode(&bytes, rows, width, open.format).map_err(WireError::bad_request)?;
        open.inputs.update((start as u32).to_be_bytes());
        open.inputs.update(&bytes);
        let model = open.stage.model.clone();
        let began = Instant::now();
        let ran = tokio::task::spawn_blocking(move || {
            let mut hidden = hidden;
            let result = model.forward_layers(&mut cache, &mut hidden);
            (cache, result.map(|()| hidden))
        })
        .await
        .map_err(|_| failed(ErrorCode::Internal, "the stage's compute crashed"))?;
        open.compute += began.elapsed();
        let (cache, result) = ran;
        let output = result.map_err(|e| failed(ErrorCode::Internal, e))?;
        open.cache = Some(cache);
        open.steps += 1;
        let encoded = output.encode(open.format);
        open.outputs.update(&encoded);
        Ok(encoded)
    }

    fn receipt(&self, open: &Open) -> StageReceipt {
        StageReceipt {
            version: STAGE_RECEIPT_VERSION,
            model: open.stage.card.name.clone(),
            weights_sha256: open.stage.card.sha256.clone(),
            layers: open.layers,
            server: self.server.identity.peer_id().to_bytes(),
            client: self.peer.to_bytes(),
            positions: open.cache.as_ref().map_or(0, |c| c.len() as u32),
            steps: open.steps,
            inputs_sha256: open.inputs.clone().finalize().to_vec(),
            outputs_sha256: open.outputs.clone().finalize().to_vec(),
            opened_unix_ms: open.opened_unix_ms,
            compute_ms: open.compute.as_millis() as u64,
        }
    }
}

impl Server {
    /// Serves one inbound `/mesh/stage/1` stream from `peer`, start to end.
    pub async fn serve_stage<S>(&self, peer: PeerId, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (rd, wr) = stream.split();
        StageSession::new(self, peer, rd, wr).run().await;
    }
}
