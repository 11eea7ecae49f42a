//! One inference stream, from its request frame to its last frame.
//!
//! [`InferSession`] follows mini-redis's per-connection `Handler`: it owns the stream's two
//! halves, and [`InferSession::run`] goes through the call's phases, one method each:
//!
//! 1. `read_request`: one request frame within the request timeout.
//! 2. `authorize`: the caller's Noise-authenticated peer id and token against the access
//!    policy. A refused call gets `unauthorized` and costs no compute.
//! 3. `check`: the model is hosted here and takes this input; then the engine's own check.
//! 4. `admit`: a place among the model's admitted calls (else `overloaded` at once), a slot
//!    by the deadline, and the token's quota, counted now that compute is about to start.
//! 5. `start`: `started` (held back briefly), and compute on a blocking thread.
//! 6. `stream_outputs`: outputs become frames until compute ends, the caller leaves, or the
//!    deadline passes. Leaving and the deadline both cancel compute.
//! 7. `finish`: usage and the signed receipt in `done`.
//!
//! A call that does not reach `done` ends as a [`CallEnd`]; every end but the caller's
//! going away is told to the caller in an `error` frame.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::PeerId;
use mesh_protocol::{ErrorCode, InferRequest, InferResponse, Usage, WireError};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::compute::Compute;
use super::frames::{self, FrameBuffer, STARTED_HOLD};
use super::hosted::{Admission, HostedModel};
use super::{ServeConfig, Server};
use crate::auth::receipt::{self, ServedCall};
use crate::auth::{unix_now, Grant, Refusal};
use crate::engine::Output;
use crate::inspector::ServedEnd;
use crate::metrics::Outcome;
use crate::wire::{read_frame_paced, WireIoError, REQUEST_PACE};

/// One inference stream being served.
pub(super) struct InferSession<'s, R, W> {
    server: &'s Server,
    /// The caller, as authenticated by the transport.
    peer: PeerId,
    rd: R,
    wr: W,
}

/// How a call ended, when it did not end with `done`.
#[derive(Debug)]
pub(super) enum CallEnd {
    /// The call failed; the caller gets this error.
    Failed(WireError),
    /// The access policy refused the caller, or its token's quota is spent; the caller gets
    /// `unauthorized`.
    Unauthorized(Refusal),
    /// The caller closed or reset the stream; nothing more can be sent.
    CallerGone,
}

impl From<WireError> for CallEnd {
    fn from(e: WireError) -> Self {
        CallEnd::Failed(e)
    }
}

impl From<Refusal> for CallEnd {
    fn from(r: Refusal) -> Self {
        CallEnd::Unauthorized(r)
    }
}

/// A request its caller may make.
struct AuthorizedCall {
    request: InferRequest,
    grant: Grant,
    /// When the request frame arrived, in unix milliseconds (for the receipt).
    received_unix_ms: u64,
}

/// When a call must be over.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    len: Duration,
    at: tokio::time::Instant,
}

impl Deadline {
    /// The request's own deadline, or the default, capped at the longest allowed.
    fn for_request(request: &InferRequest, config: &ServeConfig) -> Deadline {
        let len = request
            .deadline_ms
            .map(Duration::from_millis)
            .unwrap_or(config.default_deadline)
            .min(config.max_deadline);
        Deadline {
            len,
            at: tokio::time::Instant::now() + len,
        }
    }

    fn exceeded(&self) -> WireError {
        WireError::new(
            ErrorCode::DeadlineExceeded,
            format!(
                "the call did not finish within its deadline of {:?}",
                self.len
            ),
        )
    }
}

/// A call holding a slot, its quota counted.
struct Admitted {
    deadline: Deadline,
    queue_ms: u64,
    slot: tokio::sync::OwnedSemaphorePermit,
    admission: Admission,
}

/// A call whose compute is running.
struct Running {
    hosted: Arc<HostedModel>,
    grant: Grant,
    received_unix_ms: u64,
    request_sha256: [u8; 32],
    queue_ms: u64,
    deadline: Deadline,
    out: FrameBuffer,
    compute: Compute,
    cancel: CancellationToken,
    /// Cancels compute when the call ends, however it ends.
    _cancel_on_exit: DropGuard,
}

impl<'s, R, W> InferSession<'s, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub(super) fn new(server: &'s Server, peer: PeerId, rd: R, wr: W) -> Self {
        InferSession {
            server,
            peer,
            rd,
            wr,
        }
    }

    /// Serves the stream start to end. Never panics on bad input: every failure becomes an
    /// `error` frame if the stream still works.
    pub(super) async fn run(mut self) {
        let request = match self.read_request().await {
            Ok(request) => request,
            // No call began: say what was wrong with the request, if anything, and drop the stream.
            Err(end) => {
                if let CallEnd::Failed(e) = end {
                    self.send_error(e).await;
                }
                return;
            }
        };
        let model = request.model.clone();
        let started = Instant::now();
        // A call this node makes to itself is in the inspector already, as made (path local).
        let inspected = (self.peer != self.server.identity().peer_id())
            .then(|| self.server.inspector.served_started(&model, &self.peer));
        let result = self.answer(request).await;
        let peer = self.peer;
        let server: &Server = self.server;
        let metrics = &server.metrics;
        let inspector = &server.inspector;
        let ended = |end: ServedEnd| {
            if let Some(id) = inspected {
                inspector.served_ended(id, end);
            }
        };
        // Only hosted models' names become labels: a caller can name anything.
        let label = server.models.contains_key(&model).then_some(model.as_str());
        match result {
            Ok(usage) => {
                tracing::info!(%peer, %model, ms = started.elapsed().as_millis() as u64, "call served");
                metrics.served(label, Outcome::Answered);
                ended(ServedEnd::Answered(&usage));
                metrics.answered(
                    &model,
                    Duration::from_millis(usage.time_to_first_token_ms),
                    Duration::from_millis(usage.total_ms),
                    usage.completion_tokens,
                );
            }
            Err(CallEnd::CallerGone) => {
                tracing::info!(%peer, %model, "caller went away; call cancelled");
                metrics.served(label, Outcome::Cancelled);
                ended(ServedEnd::Cancelled);
            }
            Err(CallEnd::Unauthorized(refusal)) => {
                tracing::info!(%peer, %model, reason = refusal.reason(), "call refused: {refusal}");
                metrics.served(label, Outcome::Refused(ErrorCode::Unauthorized.as_str()));
                let refusal: WireError = refusal.into();
                let (code, message) = (refusal.code.as_str(), refusal.message.as_str());
                ended(ServedEnd::Error { code, message });
                self.send_error(refusal).await;
            }
            Err(CallEnd::Failed(e)) => {
                tracing::info!(%peer, %model, code = %e.code, "call failed: {}", e.message);
                metrics.served(label, Outcome::of_code(e.code.as_str()));
                let (code, message) = (e.code.as_str(), e.message.as_str());
                ended(ServedEnd::Error { code, message });
                self.send_error(e).await;
            }
        }
        frames::close(&mut self.wr).await;
    }

    /// The phases of a call whose request was read, up to `done`: its usage.
    async fn answer(&mut self, request: InferRequest) -> Result<Usage, CallEnd> {
        let call = self.authorize(request)?;
        let hosted = self.check(&call.request).await?;
        let admitted = self.admit(&call, &hosted).await?;
        let mut running = self.start(call, hosted, admitted)?;
        self.stream_outputs(&mut running).await?;
        self.finish(running).await
    }

    /// Reads the request frame, within the request timeout.
    async fn read_request(&mut self) -> Result<InferRequest, CallEnd> {
        let config = &self.server.config;
        let peer = self.peer;
        let pace = REQUEST_PACE.within(config.request_timeout);
        match read_frame_paced::<InferRequest, _>(&mut self.rd, config.max_frame_len, pace).await {
            Ok(Some(request)) => Ok(request),
            Ok(None) => Err(CallEnd::CallerGone),
            Err(WireIoError::Io(e)) => {
                tracing::debug!(%peer, "stream failed before the request: {e}");
                Err(CallEnd::CallerGone)
            }
            Err(e) => {
                tracing::info!(%peer, "malformed or late request: {e}");
                Err(WireError::bad_request(e.to_string()).into())
            }
        }
    }

    /// Checks the caller against the access policy. Comes first: a refused caller learns
    /// nothing about the model and costs no compute.
    fn authorize(&self, request: InferRequest) -> Result<AuthorizedCall, CallEnd> {
        let received_unix_ms = receipt::unix_ms_now();
        let grant = self.server.auth.authorize(
            &self.peer,
            &request.model,
            request.token.as_deref(),
            unix_now(),
        )?;
        Ok(AuthorizedCall {
            request,
            grant,
            received_unix_ms,
        })
    }

    /// The hosted model the request may run on. Model checks may tokenize a large prompt,
    /// so the engine's own check runs off the async threads.
    async fn check(&self, request: &InferRequest) -> Result<Arc<HostedModel>, CallEnd> {
        let hosted = self.server.hosted_for(request)?;
        let (engine, checked) = (hosted.engine.clone(), request.clone());
        tokio::task::spawn_blocking(move || engine.validate(&checked))
            .await
            .map_err(|_| WireError::new(ErrorCode::Internal, "the model check crashed"))??;
        Ok(hosted)
    }

    /// Admits the call, waits for a slot until the deadline, then counts the token's quota.
    async fn admit(
        &self,
        call: &AuthorizedCall,
        hosted: &HostedModel,
    ) -> Result<Admitted, CallEnd> {
        let deadline = Deadline::for_request(&call.request, &self.server.config);
        let queued = Instant::now();
        let admission = hosted.try_admit().ok_or_else(|| {
            WireError::new(
                ErrorCode::Overloaded,
                format!(
                    "model {:?} is busy: {} calls running or queued",
                    call.request.model,
                    hosted.capacity()
                ),
            )
        })?;
        let slot = tokio::time::timeout_at(deadline.at, hosted.slot())
            .await
            .map_err(|_| deadline.exceeded())?;
        // A token's quota is counted now, when compute is about to start.
        self.server.auth.commit(&call.grant, unix_now())?;
        Ok(Admitted {
            deadline,
            queue_ms: queued.elapsed().as_millis() as u64,
            slot,
            admission,
        })
    }

    /// Buffers `started` and starts compute.
    fn start(
        &self,
        call: AuthorizedCall,
        hosted: Arc<HostedModel>,
        admitted: Admitted,
    ) -> Result<Running, CallEnd> {
        let request_sha256 = receipt::request_sha256(&call.request);
        let mut out = FrameBuffer::new(self.server.config.max_frame_len, admitted.deadline.at);
        // Held back briefly: it usually leaves in one packet with the first output.
        out.push(&InferResponse::Started {
            model: call.request.model.clone(),
            queue_ms: admitted.queue_ms,
        })?;
        let cancel = CancellationToken::new();
        let compute = Compute::spawn(
            hosted.clone(),
            call.request,
            cancel.clone(),
            admitted.slot,
            admitted.admission,
        );
        Ok(Running {
            hosted,
            grant: call.grant,
            received_unix_ms: call.received_unix_ms,
            request_sha256,
            queue_ms: admitted.queue_ms,
            deadline: admitted.deadline,
            out,
            compute,
            _cancel_on_exit: cancel.clone().drop_guard(),
            cancel,
        })
    }

    /// Sends outputs as they come, until compute has no more. Leaving and the deadline
    /// cancel compute.
    async fn stream_outputs(&mut self, run: &mut Running) -> Result<(), CallEnd> {
        let mut probe = [0u8; 1];
        let hold_started = tokio::time::sleep(STARTED_HOLD);
        tokio::pin!(hold_started);
        let result = loop {
            tokio::select! {
                output = run.compute.next() => match output {
                    Some(output) => {
                        let frame = match output {
                            Output::Delta { text, tokens } => {
                                InferResponse::Delta { text, tokens }
                            }
                            Output::Embeddings(vectors) => InferResponse::Embeddings { vectors },
                        };
                        if let Err(e) = run.out.push(&frame) {
                            break Err(e.into());
                        }
                        // Send unless more output is already waiting: one packet for a burst.
                        if !run.compute.has_more() && run.out.send(&mut self.wr).await.is_err() {
                            break Err(CallEnd::CallerGone);
                        }
                    }
                    None => break Ok(()),
                },
                _ = &mut hold_started, if run.out.has_data() && !run.compute.has_output() => {
                    if run.out.send(&mut self.wr).await.is_err() {
                        break Err(CallEnd::CallerGone);
                    }
                }
                // The caller sends nothing after its request: any read result means it left.
                _ = self.rd.read(&mut probe) => break Err(CallEnd::CallerGone),
                _ = tokio::time::sleep_until(run.deadline.at) => {
                    break Err(run.deadline.exceeded().into());
                }
            }
        };
        if let Err(end) = result {
            run.cancel.cancel();
            // Whatever is buffered goes out before an error frame.
            if !matches!(end, CallEnd::CallerGone) {
                let _ = run.out.send(&mut self.wr).await;
            }
            return Err(end);
        }
        Ok(())
    }

    /// Waits for compute's result and sends `done` with usage and the signed receipt.
    async fn finish(&mut self, run: Running) -> Result<Usage, CallEnd> {
        let Running {
            hosted,
            grant,
            received_unix_ms,
            request_sha256,
            queue_ms,
            mut out,
            compute,
            _cancel_on_exit,
            ..
        } = run;
        let finished = match compute.finish().await {
            Ok(finished) => finished,
            Err(e) => {
                let _ = out.send(&mut self.wr).await;
                return Err(e.into());
            }
        };
        let completion = finished.completion;
        let usage = Usage {
            prompt_tokens: completion.prompt_tokens,
            completion_tokens: completion.completion_tokens,
            cached_tokens: completion.cached_tokens,
            time_to_first_token_ms: finished.time_to_first_output.as_millis() as u64,
            total_ms: finished.total.as_millis() as u64,
        };
        let signed = receipt::for_call(
            &self.server.identity,
            &ServedCall {
                request_sha256,
                card: hosted.card(),
                client: self.peer,
                token_id: grant.token_id,
                finish_reason: completion.finish_reason,
                usage: &usage,
                received_unix_ms,
                queue_ms,
                stages: &completion.stages,
                resumed_tokens: completion.resumed_tokens,
            },
        );
        out.push(&InferResponse::Done {
            finish_reason: completion.finish_reason,
            usage: usage.clone(),
            receipt: Some(signed),
            stages: completion.stages,
        })?;
        out.send(&mut self.wr)
            .await
            .map_err(|_| CallEnd::CallerGone)?;
        Ok(usage)
    }

    async fn send_error(&mut self, error: WireError) {
        frames::send_error(&mut self.wr, error, self.server.config.max_frame_len).await;
    }
}
