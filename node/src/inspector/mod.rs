//! The traffic inspector: the last [`MAX_CALLS`] calls this node made and served, with their
//! metadata, timings, path, refusal reason and receipt, and the live feed of
//! `/v1/mesh/events` ([`MeshEvent`]).
//!
//! Calls made through the API (`mesh infer`, the OpenAI and Ollama gateways, the console) are
//! followed from their events ([`Inspector::watch_made`]); calls served are told by the
//! server's session ([`Inspector::served_started`], [`Inspector::served_ended`]). Bodies are
//! kept only while the operator has capture on ([`Inspector::set_capture`]), only for calls
//! made, and then redacted and capped ([`redact`]). A captured call can be replayed
//! ([`Inspector::replay_spec`]).
//!
//! Bounded: at most [`MAX_CALLS`] records (the oldest go first), [`redact::CAPTURE_CAP`] bytes
//! of each body, and [`EVENT_BACKLOG`] events queued for a slow subscriber, which is told how
//! many it missed.

pub mod record;
pub mod redact;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use libp2p::PeerId;
use mesh_protocol::{SignedToken, Usage};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

pub use record::{CallRecord, CallState, Capture, Direction, MadeCall};

use crate::dispatch::{CallEvent, InferSpec, Target};
use crate::network::Path;

/// Calls the inspector keeps, made and served together; the oldest go first.
pub const MAX_CALLS: usize = 256;

/// Events queued for each `/v1/mesh/events` subscriber before it misses some.
pub const EVENT_BACKLOG: usize = 256;

/// The longest model name a served call's record keeps (a caller names what it likes).
const MAX_MODEL_NAME: usize = 128;

/// One event of `/v1/mesh/events`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum MeshEvent {
    CallStarted(CallRecord),
    CallEnded(CallRecord),
    PeerConnected { peer: String, path: Path },
    PeerDisconnected { peer: String },
}

impl MeshEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            MeshEvent::CallStarted(_) => "call_started",
            MeshEvent::CallEnded(_) => "call_ended",
            MeshEvent::PeerConnected { .. } => "peer_connected",
            MeshEvent::PeerDisconnected { .. } => "peer_disconnected",
        }
    }
}

/// Where a replay goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayTo {
    /// The node that answered the call (or was last tried).
    Same,
    Target(Target),
}

/// Why a call cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("no call {0} in the inspector (it keeps the last {MAX_CALLS})")]
    NotFound(u64),
    #[error("call {0} was served for a peer; only calls this node made can be replayed")]
    Served(u64),
    #[error("call {0} was made with capture off, so its request was not kept; turn capture on (`mesh capture on`, or the console's switch) and make the call again")]
    NotCaptured(u64),
    #[error("call {0}'s request was longer than the capture keeps ({cap} bytes), so it cannot be replayed as it was", cap = redact::CAPTURE_CAP)]
    Truncated(u64),
    #[error("call {0} never reached a node, so there is no same node to replay it to; replay it to `any` or a peer id")]
    NoPeer(u64),
    #[error("call {0} carried a capability token, which the capture does not keep; give the token again")]
    NeedsToken(u64),
}

/// The inspector of one node; clones share it.
#[derive(Clone)]
pub struct Inspector {
    inner: Arc<Inner>,
}

struct Inner {
    calls: Mutex<VecDeque<CallRecord>>,
    capture: AtomicBool,
    next_id: AtomicU64,
    events: broadcast::Sender<MeshEvent>,
}

impl Default for Inspector {
    fn default() -> Self {
        Inspector {
            inner: Arc::new(Inner {
                calls: Mutex::new(VecDeque::with_capacity(MAX_CALLS)),
                capture: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                events: broadcast::channel(EVENT_BACKLOG).0,
            }),
        }
    }
}

impl Inspector {
    /// Whether calls made now keep their bodies.
    pub fn capturing(&self) -> bool {
        self.inner.capture.load(Ordering::Relaxed)
    }

    pub fn set_capture(&self, on: bool) {
        self.inner.capture.store(on, Ordering::Relaxed);
    }

    /// The live feed: every call started and ended, and peers connected and gone.
    pub fn subscribe(&self) -> broadcast::Receiver<MeshEvent> {
        self.inner.events.subscribe()
    }

    /// Sends `event` to the subscribers (none: dropped).
    pub fn publish(&self, event: MeshEvent) {
        let _ = self.inner.events.send(event);
    }

    /// The calls kept, newest first, without their bodies.
    pub fn calls(&self) -> Vec<CallRecord> {
        let calls = self.inner.calls.lock();
        calls.iter().rev().map(CallRecord::summary).collect()
    }

    /// Call `id`, whole.
    pub fn call(&self, id: u64) -> Option<CallRecord> {
        let calls = self.inner.calls.lock();
        calls.iter().find(|r| r.id == id).cloned()
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn started(&self, record: CallRecord) {
        {
            let mut calls = self.inner.calls.lock();
            if calls.len() == MAX_CALLS {
                calls.pop_front();
            }
            calls.push_back(record.clone());
        }
        self.publish(MeshEvent::CallStarted(record.summary()));
    }

    fn ended(&self, record: CallRecord) {
        {
            let mut calls = self.inner.calls.lock();
            if let Some(kept) = calls.iter_mut().rev().find(|r| r.id == record.id) {
                *kept = record.clone();
            }
        }
        self.publish(MeshEvent::CallEnded(record.summary()));
    }

    /// Follows a call made: `events` are the dispatcher's, and the receiver returned carries
    /// them on unchanged. Dropping it hangs up the call as dropping `events` would.
    pub fn watch_made(
        &self,
        spec: &InferSpec,
        replay_of: Option<u64>,
        mut events: mpsc::Receiver<CallEvent>,
    ) -> (u64, mpsc::Receiver<CallEvent>) {
        let id = self.next_id();
        let mut call = MadeCall::new(id, spec, self.capturing(), replay_of);
        self.started(call.record().clone());
        let (tx, rx) = mpsc::channel(events.max_capacity().max(1));
        let inspector = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.recv() => {
                        let Some(event) = event else { break };
                        call.see(&event);
                        if tx.send(event).await.is_err() {
                            break;
                        }
                    }
                    () = tx.closed() => break,
                }
            }
            inspector.ended(call.finish());
        });
        (id, rx)
    }

    /// A call from `caller` for `model` was read: its id for [`Inspector::served_ended`].
    pub fn served_started(&self, model: &str, caller: &PeerId) -> u64 {
        let id = self.next_id();
        let model: String = model.chars().take(MAX_MODEL_NAME).collect();
        self.started(CallRecord::served(id, &model, &caller.to_string()));
        id
    }

    /// Served call `id` ended: answered with `usage`, or refused or failed with `code`.
    pub fn served_ended(&self, id: u64, end: ServedEnd<'_>) {
        let Some(mut record) = self.call(id) else {
            return; // pushed out by newer calls
        };
        match end {
            ServedEnd::Answered(usage) => {
                record.state = CallState::Answered;
                record.first_output_ms = Some(usage.time_to_first_token_ms);
                record.total_ms = Some(usage.total_ms);
                record.tokens = Some(usage.completion_tokens);
            }
            ServedEnd::Cancelled => record.state = CallState::Cancelled,
            ServedEnd::Error { code, message } => {
                record.state = CallState::of_code(code);
                record.code = Some(code.to_string());
                record.message = Some(message.to_string());
            }
        }
        if record.total_ms.is_none() {
            let now = record::unix_ms();
            record.total_ms = Some(now.saturating_sub(record.started_unix_ms));
        }
        self.ended(record);
    }

    /// The request to make again for replaying call `id` to `to`, with `token` if it needs one.
    pub fn replay_spec(
        &self,
        id: u64,
        to: ReplayTo,
        token: Option<SignedToken>,
    ) -> Result<InferSpec, ReplayError> {
        let record = self.call(id).ok_or(ReplayError::NotFound(id))?;
        if record.direction == Direction::In {
            return Err(ReplayError::Served(id));
        }
        let capture = record.capture.ok_or(ReplayError::NotCaptured(id))?;
        if capture.truncated {
            return Err(ReplayError::Truncated(id));
        }
        if capture.had_token && token.is_none() {
            return Err(ReplayError::NeedsToken(id));
        }
        let mut request = capture.request.ok_or(ReplayError::NotCaptured(id))?;
        if let Some(fields) = request.as_object_mut() {
            fields.remove("token");
        }
        let mut spec: InferSpec =
            serde_json::from_value(request).map_err(|_| ReplayError::NotCaptured(id))?;
        spec.token = token;
        spec.target = match to {
            ReplayTo::Target(target) => target,
            ReplayTo::Same => {
                let peer = record.peer.ok_or(ReplayError::NoPeer(id))?;
                Target::Peer(peer.parse().map_err(|_| ReplayError::NoPeer(id))?)
            }
        };
        Ok(spec)
    }
}

/// How a served call ended, for [`Inspector::served_ended`].
#[derive(Debug, Clone, Copy)]
pub enum ServedEnd<'a> {
    Answered(&'a Usage),
    Cancelled,
    Error { code: &'a str, message: &'a str },
}

#[cfg(test)]
mod tests;
