//! The head's side of one `/mesh/stage/1` session: open it, send steps, close it for its
//! receipt. Every exchange is bounded in time, and a step too large for one frame is cut into
//! several.

// A stage's failure is rare and carries what the caller is told (the peer, its layers, the
// refusal), so it is returned as it is rather than boxed.
#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::{
    HiddenFormat, LayerRange, SignedStageReceipt, StageRequest, StageResponse, WireError,
};

use crate::engine::llama::Hidden;
use crate::network::{Client, Path, STAGE};
use crate::wire::{read_frame, write_frame};

/// Longest wait to open a stream and a session.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one step's output.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a session's receipt.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Room left in a frame for everything but the hidden states.
const FRAME_OVERHEAD: usize = 1024;

/// A stage that failed, and how.
#[derive(Debug, Clone, thiserror::Error)]
#[error("stage {peer} (layers {layers}) failed: {reason}")]
pub struct LinkError {
    pub peer: PeerId,
    pub layers: LayerRange,
    pub reason: String,
    /// The stage refused (its access policy, its weights, its room) rather than failed.
    pub refused: Option<WireError>,
}

/// What to open.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub model: String,
    pub weights_sha256: String,
    pub max_positions: u32,
    pub format: HiddenFormat,
    pub token: Option<Vec<u8>>,
}

/// One open session with one stage.
pub struct StageLink {
    pub peer: PeerId,
    pub layers: LayerRange,
    pub path: Path,
    format: HiddenFormat,
    width: usize,
    rd: ReadHalf<Stream>,
    wr: WriteHalf<Stream>,
    /// Positions the stage holds.
    pub positions: usize,
    pub steps: u32,
    /// Time spent waiting for outputs, in all.
    pub wait: Duration,
}

impl StageLink {
    /// Opens a session for `layers` on `peer`.
    pub async fn open(
        client: &Client,
        peer: PeerId,
        layers: LayerRange,
        spec: &SessionSpec,
    ) -> Result<StageLink, LinkError> {
        let fail = |reason: String, refused| LinkError {
            peer,
            layers,
            reason,
            refused,
        };
        let opening = async {
            let (stream, path) = client
                .open_stream_with_path(peer, STAGE)
                .await
                .map_err(|e| fail(e.to_string(), None))?;
            let (mut rd, mut wr) = stream.split();
            let open = StageRequest::Open {
                model: spec.model.clone(),
                weights_sha256: spec.weights_sha256.clone(),
                layers,
                max_positions: spec.max_positions,
                hidden: spec.format,
                token: spec.token.clone(),
            };
            write_frame(&mut wr, &open, DEFAULT_MAX_FRAME_LEN)
                .await
                .map_err(|e| fail(e.to_string(), None))?;
            match read_frame::<StageResponse, _>(&mut rd, DEFAULT_MAX_FRAME_LEN).await {
                Ok(Some(StageResponse::Opened { width, layers: got })) if got == layers => {
                    Ok(StageLink {
                        peer,
                        layers,
                        path,
                        format: spec.format,
                        width: width as usize,
                        rd,
                        wr,
                        positions: 0,
                        steps: 0,
                        wait: Duration::ZERO,
                    })
                }
                Ok(Some(StageResponse::Error(e))) => Err(fail(e.to_string(), Some(e))),
                Ok(Some(other)) => Err(fail(format!("answered {other:?} to open"), None)),
                Ok(None) => Err(fail("closed the stream".into(), None)),
                Err(e) => Err(fail(e.to_string(), None)),
            }
        };
        tokio::time::timeout(OPEN_TIMEOUT, opening)
            .await
            .unwrap_or_else(|_| Err(fail(format!("no answer within {OPEN_TIMEOUT:?}"), None)))
    }

    fn fail(&self, reason: impl Into<String>) -> LinkError {
        LinkError {
            peer: self.peer,
            layers: self.layers,
            reason: reason.into(),
            refused: None,
        }
    }

    /// Runs `hidden` (the positions after those the stage holds) through the stage.
    pub async fn step(&mut self, hidden: &Hidden) -> Result<Hidden, LinkError> {
        let width = self.width;
        if hidden.data.len() != hidden.rows * width {
            return Err(self.fail(format!(
                "hidden states are {} wide, the stage's {width}",
                hidden.data.len() / hidden.rows.max(1)
            )));
        }
        let per_frame =
            ((DEFAULT_MAX_FRAME_LEN - FRAME_OVERHEAD) / (width * self.format.bytes())).max(1);
        let mut out = Vec::with_capacity(hidden.data.len());
        for rows in hidden.data.chunks(per_frame * width) {
            let part = Hidden {
                rows: rows.len() / width,
                data: rows.to_vec(),
            };
            let began = Instant::now();
            let result = tokio::time::timeout(STEP_TIMEOUT, self.exchange(&part)).await;
            self.wait += began.elapsed();
            let output =
                result.map_err(|_| self.fail(format!("no output within {STEP_TIMEOUT:?}")))??;
            out.extend_from_slice(&output.data);
        }
        Ok(Hidden {
            rows: hidden.rows,
            data: out,
        })
    }

    async fn exchange(&mut self, part: &Hidden) -> Result<Hidden, LinkError> {
        let step = StageRequest::Step {
            start: self.positions as u32,
            rows: part.rows as u32,
            hidden: part.encode(self.format),
        };
        write_frame(&mut self.wr, &step, DEFAULT_MAX_FRAME_LEN)
            .await
            .map_err(|e| self.fail(e.to_string()))?;
        let answer = read_frame::<StageResponse, _>(&mut self.rd, DEFAULT_MAX_FRAME_LEN)
            .await
            .map_err(|e| self.fail(e.to_string()))?;
        match answer {
            Some(StageResponse::Output { hidden }) => {
                let out = Hidden::decode(&hidden, part.rows, self.width, self.format)
                    .map_err(|e| self.fail(format!("sent bad output: {e}")))?;
                self.positions += part.rows;
                self.steps += 1;
                Ok(out)
            }
            Some(StageResponse::Error(e)) => Err(self.fail(e.to_string())),
            Some(other) => Err(self.fail(format!("answered {other:?} to a step"))),
            None => Err(self.fail("closed the stream")),
        }
    }

    /// Ends the session; its receipt, if the stage sent one in time.
    pub async fn close(mut self) -> Option<SignedStageReceipt> {
        let closing = async {
            write_frame(&mut self.wr, &StageRequest::Close, DEFAULT_MAX_FRAME_LEN)
                .await
                .ok()?;
            let receipt =
                match read_frame::<StageResponse, _>(&mut self.rd, DEFAULT_MAX_FRAME_LEN).await {
                    Ok(Some(StageResponse::Closed { receipt })) => Some(receipt),
                    _ => None,
                };
            let _ = self.wr.close().await;
            receipt
        };
        tokio::time::timeout(CLOSE_TIMEOUT, closing)
            .await
            .ok()
            .flatten()
    }
}
