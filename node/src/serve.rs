//! The serving side: answers `/mesh/infer/1` and `/mesh/catalog/1` streams.
//!
//! Each hosted model has a bounded admission count (running + waiting). A request beyond it
//! is answered `overloaded` at once. Compute runs on a blocking thread; its output flows
//! through a small bounded channel to the stream. The call is cancelled when the caller goes
//! away or the deadline passes, and the engine stops at its next step.
//!
//! Before any of that, the caller's Noise-authenticated peer id and token are checked against
//! the access policy ([`crate::auth`]); a refused call gets `unauthorized` and computes
//! nothing. Every answered call ends with a `done` frame carrying a receipt signed by the node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use mesh_protocol::frame::{encode_body, encode_frame, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::receipt::{Receipt, RECEIPT_VERSION};
use mesh_protocol::{
    CatalogRequest, CatalogResponse, ErrorCode, InferRequest, InferResponse, Input, ModelCard,
    SignedModelCard, Task, Usage, WireError,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::auth::{unix_now, AccessConfig, AccessSetupError, Authorizer, Grant, PolicySummary};
use crate::engine::{Gone, Output, SharedEngine};
use crate::identity::NodeIdentity;
use crate::wire::{read_frame, write_frame, WireIoError};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// How long a caller has to send its request frame after opening a stream.
    pub request_timeout: Duration,
    /// Deadline of a call that names none.
    pub default_deadline: Duration,
    /// Longest deadline a caller may ask for.
    pub max_deadline: Duration,
    /// Requests that may wait per model while all its slots are busy.
    pub max_queue: usize,
    pub max_frame_len: usize,
    /// Who may call which model.
    pub access: AccessConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            request_timeout: Duration::from_secs(10),
            default_deadline: Duration::from_secs(120),
            max_deadline: Duration::from_secs(600),
            max_queue: 16,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            access: AccessConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeSetupError {
    #[error("two models are named {0:?}")]
    DuplicateName(String),
    #[error("model name {0:?}: {1}")]
    BadName(String, String),
    #[error("model {0:?} has max_concurrency 0")]
    NoConcurrency(String),
    #[error(transparent)]
    Access(#[from] AccessSetupError),
}

/// One hosted model with its admission control.
pub struct HostedModel {
    engine: SharedEngine,
    signed_card: SignedModelCard,
    slots: Arc<Semaphore>,
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    runs: AtomicU64,
}

/// Releases an admission when dropped.
struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HostedModel {
    fn try_admit(&self) -> Option<Admission> {
        let mut current = self.admitted.load(Ordering::Acquire);
        loop {
            if current >= self.capacity {
                return None;
            }
            match self.admitted.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Admission(self.admitted.clone())),
                Err(now) => current = now,
            }
        }
    }

    pub fn card(&self) -> &ModelCard {
        self.engine.card()
    }
}

/// Everything a node serves.
pub struct Server {
    models: BTreeMap<String, Arc<HostedModel>>,
    config: ServeConfig,
    identity: NodeIdentity,
    auth: Authorizer,
}

impl Server {
    pub fn new(
        identity: &NodeIdentity,
        engines: Vec<SharedEngine>,
        config: ServeConfig,
    ) -> Result<Server, ServeSetupError> {
        let mut models = BTreeMap::new();
        for engine in engines {
            let card = engine.card().clone();
            mesh_protocol::ids::validate_model_name(&card.name)
                .map_err(|e| ServeSetupError::BadName(card.name.clone(), e))?;
            if card.max_concurrency == 0 {
                return Err(ServeSetupError::NoConcurrency(card.name));
            }
            let bytes = encode_body(&card).expect("a model card always encodes");
            let signature = identity
                .sign(&SignedModelCard::signed_message(&bytes))
                .to_vec();
            let slots = card.max_concurrency as usize;
            let hosted = HostedModel {
                engine,
                signed_card: SignedModelCard {
                    card: bytes,
                    signature,
                },
                slots: Arc::new(Semaphore::new(slots)),
                admitted: Arc::new(AtomicUsize::new(0)),
                capacity: slots + config.max_queue,
                runs: AtomicU64::new(0),
            };
            if models.insert(card.name.clone(), Arc::new(hosted)).is_some() {
                return Err(ServeSetupError::DuplicateName(card.name));
            }
        }
        let names: Vec<String> = models.keys().cloned().collect();
        let auth = Authorizer::new(identity.peer_id(), &config.access, &names)?;
        Ok(Server {
            models,
            config,
            identity: identity.clone(),
            auth,
        })
    }

    /// The access policy in effect.
    pub fn policy(&self) -> PolicySummary {
        self.auth.summary()
    }

    pub fn cards(&self) -> impl Iterator<Item = &ModelCard> {
        self.models.values().map(|m| m.card())
    }

    pub fn model_names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// Requests running or waiting, over all models.
    pub fn load(&self) -> u32 {
        self.models
            .values()
            .map(|m| m.admitted.load(Ordering::Acquire) as u32)
            .sum()
    }

    /// How many times `model`'s engine was started (refused calls never start it).
    pub fn runs(&self, model: &str) -> u64 {
        self.models
            .get(model)
            .map_or(0, |m| m.runs.load(Ordering::Acquire))
    }

    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// Answers one catalog stream.
    pub async fn serve_catalog<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = stream.split();
        let max = self.config.max_frame_len;
        match tokio::time::timeout(
            self.config.request_timeout,
            read_frame::<CatalogRequest, _>(&mut rd, max),
        )
        .await
        {
            Ok(Ok(Some(_))) => {
                let response = CatalogResponse {
                    cards: self
                        .models
                        .values()
                        .map(|m| m.signed_card.clone())
                        .collect(),
                    load: self.load(),
                };
                match tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut wr, &response, max))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("catalog reply failed: {e}"),
                    Err(_) => tracing::debug!("catalog reply timed out"),
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::debug!("bad catalog request: {e}"),
            Err(_) => tracing::debug!("catalog request timed out"),
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.close()).await;
    }

    /// Answers one inference stream from `peer`, start to end. Never panics on bad input:
    /// every failure becomes an `error` frame if the stream still works.
    pub async fn serve_infer<S>(&self, peer: PeerId, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut rd, mut wr) = stream.split();
        let max = self.config.max_frame_len;
        let request = match tokio::time::timeout(
            self.config.request_timeout,
            read_frame::<InferRequest, _>(&mut rd, max),
        )
        .await
        {
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) => return,
            Ok(Err(WireIoError::Io(e))) => {
                tracing::debug!(%peer, "stream failed before the request: {e}");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, "malformed request: {e}");
                self.send_error(&mut wr, WireError::bad_request(e.to_string()))
                    .await;
                return;
            }
            Err(_) => {
                let e = WireError::bad_request(format!(
                    "no request frame within {:?}",
                    self.config.request_timeout
                ));
                self.send_error(&mut wr, e).await;
                return;
            }
        };
        let model = request.model.clone();
        let started = Instant::now();
        let received_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Authorization comes first: a refused caller learns nothing and costs no compute.
        let grant = match self
            .auth
            .authorize(&peer, &model, request.token.as_deref(), unix_now())
        {
            Ok(grant) => grant,
            Err(refusal) => {
                tracing::info!(%peer, %model, reason = refusal.reason(), "call refused: {refusal}");
                self.send_error(&mut wr, refusal.into()).await;
                let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.close()).await;
                return;
            }
        };
        let call = CallInfo {
            peer,
            grant,
            received_unix_ms,
        };
        match self.run_call(request, call, &mut rd, &mut wr).await {
            Ok(()) => {
                tracing::info!(%peer, %model, ms = started.elapsed().as_millis() as u64, "call served")
            }
            Err(CallEnd::CallerGone) => {
                tracing::info!(%peer, %model, "caller went away; call cancelled")
            }
            Err(CallEnd::Refused(e)) => {
                tracing::info!(%peer, %model, code = %e.code, "call failed: {}", e.message);
                self.send_error(&mut wr, e).await;
            }
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.close()).await;
    }

    async fn send_error<W: AsyncWrite + Unpin>(&self, wr: &mut W, error: WireError) {
        let frame = InferResponse::Error(error);
        match tokio::time::timeout(
            WRITE_TIMEOUT,
            write_frame(wr, &frame, self.config.max_frame_len),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("could not send error frame: {e}"),
            Err(_) => tracing::debug!("error frame timed out"),
        }
    }

    fn check(&self, request: &InferRequest) -> Result<Arc<HostedModel>, WireError> {
        request.validate()?;
        let hosted = self.models.get(&request.model).ok_or_else(|| {
            WireError::new(
                ErrorCode::UnknownModel,
                format!(
                    "this node does not host {:?}; it hosts: {}",
                    request.model,
                    self.model_names().join(", ")
                ),
            )
        })?;
        let wants = match request.input {
            Input::Embed { .. } => Task::Embed,
            Input::Chat { .. } | Input::Completion { .. } => Task::Generate,
        };
        if hosted.card().task != wants {
            return Err(WireError::bad_request(format!(
                "model {:?} is a {:?} model and cannot take {:?} input",
                request.model,
                hosted.card().task,
                wants
            )));
        }
        Ok(hosted.clone())
    }

    async fn run_call<R, W>(
        &self,
        request: InferRequest,
        call: CallInfo,
        rd: &mut R,
        wr: &mut W,
    ) -> Result<(), CallEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let hosted = self.check(&request)?;
        // Model checks may tokenize a large prompt: keep them off the async threads.
        let (engine, checked) = (hosted.engine.clone(), request.clone());
        tokio::task::spawn_blocking(move || engine.validate(&checked))
            .await
            .map_err(|_| WireError::new(ErrorCode::Internal, "the model check crashed"))??;
        let deadline_len = request
            .deadline_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.default_deadline)
            .min(self.config.max_deadline);
        let deadline = tokio::time::Instant::now() + deadline_len;
        let queued = Instant::now();
        let admission = hosted.try_admit().ok_or_else(|| {
            WireError::new(
                ErrorCode::Overloaded,
                format!(
                    "model {:?} is busy: {} calls running or queued",
                    request.model, hosted.capacity
                ),
            )
        })?;
        let permit = tokio::time::timeout_at(deadline, hosted.slots.clone().acquire_owned())
            .await
            .map_err(|_| deadline_exceeded(deadline_len))?
            .expect("the slot semaphore is never closed");
        // A token's quota is counted now, when compute is about to start.
        self.auth.commit(&call.grant, unix_now())?;
        let request_sha256 = crate::auth::receipt::request_sha256(&request);
        let queue_ms = queued.elapsed().as_millis() as u64;
        let mut out = FrameBuffer::new(self.config.max_frame_len, deadline);
        // Held back briefly: it usually leaves in one packet with the first output.
        out.push(&InferResponse::Started {
            model: request.model.clone(),
            queue_ms,
        })?;

        let cancel = CancellationToken::new();
        let _cancel_on_exit = cancel.clone().drop_guard();
        let (tx, mut rx) = mpsc::channel::<Output>(16);
        hosted.runs.fetch_add(1, Ordering::AcqRel);
        let compute_start = Instant::now();
        let job = spawn_compute(
            hosted.clone(),
            request,
            tx,
            cancel.clone(),
            permit,
            admission,
        );

        let mut first_output: Option<Duration> = None;
        let mut probe = [0u8; 1];
        let hold_started = tokio::time::sleep(STARTED_HOLD);
        tokio::pin!(hold_started);
        let result = loop {
            tokio::select! {
                output = rx.recv() => match output {
                    Some(output) => {
                        first_output.get_or_insert_with(|| compute_start.elapsed());
                        let frame = match output {
                            Output::Delta(text) => InferResponse::Delta { text },
                            Output::Embeddings(vectors) => InferResponse::Embeddings { vectors },
                        };
                        if let Err(e) = out.push(&frame) {
                            break Err(e);
                        }
                        // Send unless more output is already waiting: one packet for a burst.
                        if rx.is_empty() && out.send(wr).await.is_err() {
                            break Err(CallEnd::CallerGone);
                        }
                    }
                    None => break Ok(()),
                },
                _ = &mut hold_started, if out.has_data() && first_output.is_none() => {
                    if out.send(wr).await.is_err() {
                        break Err(CallEnd::CallerGone);
                    }
                }
                // The caller sends nothing after its request: any read result means it left.
                _ = rd.read(&mut probe) => break Err(CallEnd::CallerGone),
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(deadline_exceeded(deadline_len).into());
                }
            }
        };
        if let Err(end) = result {
            cancel.cancel();
            // Whatever is buffered goes out before an error frame.
            if matches!(end, CallEnd::Refused(_)) {
                let _ = out.send(wr).await;
            }
            return Err(end);
        }
        let completion = match job.await {
            Ok(result) => result,
            Err(join) => {
                tracing::error!("engine task failed: {join}");
                Err(WireError::new(ErrorCode::Internal, "the engine crashed"))
            }
        };
        let completion = match completion {
            Ok(c) => c,
            Err(e) => {
                let _ = out.send(wr).await;
                return Err(e.into());
            }
        };
        let total = compute_start.elapsed();
        let usage = Usage {
            prompt_tokens: completion.prompt_tokens,
            completion_tokens: completion.completion_tokens,
            time_to_first_token_ms: first_output.unwrap_or(total).as_millis() as u64,
            total_ms: total.as_millis() as u64,
        };
        let receipt = Receipt {
            version: RECEIPT_VERSION,
            request_sha256: request_sha256.to_vec(),
            model: hosted.card().name.clone(),
            weights_sha256: hosted.card().sha256.clone(),
            server: self.identity.peer_id().to_bytes(),
            client: call.peer.to_bytes(),
            token_id: call.grant.token_id.map(|id| id.to_vec()),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            finish_reason: completion.finish_reason,
            received_unix_ms: call.received_unix_ms,
            queue_ms,
            time_to_first_token_ms: usage.time_to_first_token_ms,
            compute_ms: usage.total_ms,
        };
        out.push(&InferResponse::Done {
            finish_reason: completion.finish_reason,
            usage,
            receipt: Some(crate::auth::receipt::sign(&self.identity, &receipt)),
        })?;
        out.send(wr).await.map_err(|_| CallEnd::CallerGone)
    }
}

/// How long `started` may wait to share a packet with the first output.
const STARTED_HOLD: Duration = Duration::from_millis(2);

/// Longest wait for a small control write (an error frame, a catalog, a close): a caller
/// that stops reading must not hold a serving task.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Encoded frames waiting to be written together.
struct FrameBuffer {
    bytes: Vec<u8>,
    max_frame_len: usize,
    /// Writes give up at the call's deadline, so a caller that stops reading (while its
    /// connection stays up) cannot hold a slot past it.
    deadline: tokio::time::Instant,
}

impl FrameBuffer {
    fn new(max_frame_len: usize, deadline: tokio::time::Instant) -> Self {
        FrameBuffer {
            bytes: Vec::new(),
            max_frame_len,
            deadline,
        }
    }

    fn has_data(&self) -> bool {
        !self.bytes.is_empty()
    }

    /// Encodes a frame; one too large for a frame is the node's failure, told to the caller.
    fn push(&mut self, frame: &InferResponse) -> Result<(), CallEnd> {
        let encoded = encode_frame(frame, self.max_frame_len).map_err(|e| {
            CallEnd::Refused(WireError::new(
                ErrorCode::Internal,
                format!("the answer does not fit in a frame: {e}"),
            ))
        })?;
        self.bytes.extend_from_slice(&encoded);
        Ok(())
    }

    /// Writes and flushes everything buffered.
    async fn send<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        let write = async {
            wr.write_all(&self.bytes).await?;
            wr.flush().await
        };
        tokio::time::timeout_at(self.deadline, write)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        self.bytes.clear();
        Ok(())
    }
}

/// Runs the engine on a blocking thread. The slot and admission are held until compute
/// really stops, so a cancelled call cannot leave extra work running behind the bound.
fn spawn_compute(
    hosted: Arc<HostedModel>,
    request: InferRequest,
    tx: mpsc::Sender<Output>,
    cancel: CancellationToken,
    permit: OwnedSemaphorePermit,
    admission: Admission,
) -> tokio::task::JoinHandle<Result<crate::engine::Completion, WireError>> {
    tokio::task::spawn_blocking(move || {
        let _held = (permit, admission);
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
    })
}

fn deadline_exceeded(after: Duration) -> WireError {
    WireError::new(
        ErrorCode::DeadlineExceeded,
        format!("the call did not finish within its deadline of {after:?}"),
    )
}

/// Who is calling, and what let them in.
struct CallInfo {
    peer: PeerId,
    grant: Grant,
    received_unix_ms: u64,
}

enum CallEnd {
    /// Answered with an error frame.
    Refused(WireError),
    /// The caller closed or reset the stream; nothing more can be sent.
    CallerGone,
}

impl From<crate::auth::Refusal> for CallEnd {
    fn from(r: crate::auth::Refusal) -> Self {
        CallEnd::Refused(r.into())
    }
}

impl From<WireError> for CallEnd {
    fn from(e: WireError) -> Self {
        CallEnd::Refused(e)
    }
}
