//! Running an engine for one call: a blocking thread, bridged to the stream by a channel.
//!
//! The engine's sink sends each output into a small bounded channel, so an engine that
//! outruns the caller waits (backpressure), and stops as soon as the channel's receiver is
//! dropped (the call ended). The call's slot and admission travel with the thread: they are
//! released only when compute really stops, so a cancelled call cannot leave extra work
//! running behind the bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_protocol::{ErrorCode, InferRequest, WireError};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::hosted::{Admission, HostedModel};
use crate::engine::{Completion, Gone, Output};

/// Outputs that may wait between the engine thread and the stream. Small: output waiting
/// here is latency the caller pays, and a full queue is what slows a fast engine down.
pub(super) const OUTPUT_QUEUE: usize = 16;

/// The engine running for one call.
pub(super) struct Compute {
    outputs: mpsc::Receiver<Output>,
    job: JoinHandle<Result<Completion, WireError>>,
    started: Instant,
    first_output: Option<Duration>,
}

impl Compute {
    /// Starts `hosted`'s engine on `request` on a blocking thread, holding `slot` and
    /// `admission` until it returns. It stops at its next step once `cancel` is set.
    pub(super) fn spawn(
        hosted: Arc<HostedModel>,
        request: InferRequest,
        cancel: CancellationToken,
        slot: OwnedSemaphorePermit,
        admission: Admission,
    ) -> Compute {
        let (tx, outputs) = mpsc::channel::<Output>(OUTPUT_QUEUE);
        hosted.count_run();
        let started = Instant::now();
        let job = tokio::task::spawn_blocking(move || {
            let _held = (slot, admission);
            let mut sink = |output: Output| tx.blocking_send(output).map_err(|_| Gone);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                hosted.engine.run(&request, &mut sink, &cancel)
            }));
            result.unwrap_or_else(|_| {
                Err(WireError::new(
                    ErrorCode::Internal,
                    "the engine panicked on this request",
                ))
            })
        });
        Compute {
            outputs,
            job,
            started,
            first_output: None,
        }
    }

    /// The next output, or `None` once the engine has returned. Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<Output> {
        let output = self.outputs.recv().await;
        if output.is_some() {
            let started = self.started;
            self.first_output.get_or_insert_with(|| started.elapsed());
        }
        output
    }

    /// Whether more output is already waiting.
    pub(super) fn has_more(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// Whether any output has come yet.
    pub(super) fn has_output(&self) -> bool {
        self.first_output.is_some()
    }

    /// Waits for the engine to return, after its last output.
    pub(super) async fn finish(self) -> Result<Finished, WireError> {
        let completion = match self.job.await {
            Ok(result) => result?,
            Err(join) => {
                tracing::error!("engine task failed: {join}");
                return Err(WireError::new(ErrorCode::Internal, "the engine crashed"));
            }
        };
        let total = self.started.elapsed();
        Ok(Finished {
            completion,
            time_to_first_output: self.first_output.unwrap_or(total),
            total,
        })
    }
}

/// An engine run that returned normally.
pub(super) struct Finished {
    pub(super) completion: Completion,
    /// From the engine's start to its first output (its whole run if it gave none).
    pub(super) time_to_first_output: Duration,
    /// From the engine's start to its return.
    pub(super) total: Duration,
}
