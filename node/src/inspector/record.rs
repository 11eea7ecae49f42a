//! One call as the inspector shows it ([`CallRecord`]), and how a call made is followed from
//! its [`CallEvent`]s ([`MadeCall`]). Plain data, tested without a node.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::redact::{Budget, CAPTURE_CAP, REDACTED};
use crate::dispatch::{CallEvent, InferSpec};
use crate::network::Path;

/// Which way a call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Made by this node (through its API: `mesh infer`, the gateways, the console).
    Out,
    /// Served by this node for a peer.
    In,
}

/// Where a call is, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    Running,
    Answered,
    /// The serving node said no: unauthorized, unknown model, overloaded, a bad request.
    Refused,
    /// The network, the node or the deadline failed the call.
    Failed,
    /// The asker hung up.
    Cancelled,
}

impl CallState {
    /// How a call that ended with error `code` is filed.
    pub fn of_code(code: &str) -> CallState {
        match code {
            "unauthorized" | "unknown_model" | "overloaded" | "bad_request" | "too_large"
            | "unsupported" => CallState::Refused,
            "cancelled" => CallState::Cancelled,
            _ => CallState::Failed,
        }
    }
}

/// What was captured of a call's bodies (capture on), redacted and capped.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Capture {
    /// The request as `/v1/mesh/infer` takes it, its token left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    /// The answer's text (a generation), or a line saying what came back (embeddings).
    #[serde(default)]
    pub response: String,
    /// Part of the request or the answer did not fit [`CAPTURE_CAP`].
    #[serde(default)]
    pub truncated: bool,
    /// The request carried a capability token (not kept; a replay needs it again).
    #[serde(default)]
    pub had_token: bool,
}

/// One call in the inspector, and in the events of `/v1/mesh/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallRecord {
    pub id: u64,
    pub direction: Direction,
    pub model: String,
    /// Made: the node that answered (or the last one tried). Served: the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Made: what was asked for, `any` or a peer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Made: the path of the connection that carried the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<Path>,
    pub started_unix_ms: u64,
    pub state: CallState,
    /// The error code, when refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Made: the nodes tried, in order (failovers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    /// From the start of the call to its first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_output_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
    /// Made: the serving node's signed receipt (`mrc1.…`) and whether it verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt_verified: Option<bool>,
    /// The call this one replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<u64>,
    /// The bodies, when capture was on for this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
}

impl CallRecord {
    fn new(id: u64, direction: Direction, model: &str) -> CallRecord {
        CallRecord {
            id,
            direction,
            model: model.to_string(),
            peer: None,
            target: None,
            path: None,
            started_unix_ms: unix_ms(),
            state: CallState::Running,
            code: None,
            message: None,
            tried: Vec::new(),
            connect_ms: None,
            first_output_ms: None,
            total_ms: None,
            tokens: None,
            receipt: None,
            receipt_verified: None,
            replay_of: None,
            capture: None,
        }
    }

    /// A call served for `caller`, starting now.
    pub fn served(id: u64, model: &str, caller: &str) -> CallRecord {
        let mut record = CallRecord::new(id, Direction::In, model);
        record.peer = Some(caller.to_string());
        record
    }

    /// The record without its bodies (the inspector's list).
    pub fn summary(&self) -> CallRecord {
        let mut summary = self.clone();
        if let Some(capture) = &mut summary.capture {
            capture.request = None;
            capture.response.clear();
        }
        summary
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A call made, followed from its events.
#[derive(Debug)]
pub struct MadeCall {
    record: CallRecord,
    started: Instant,
    budget: Budget,
    ended: bool,
}

impl MadeCall {
    /// Call `id` asking `spec`; `capture`: keep its bodies.
    pub fn new(id: u64, spec: &InferSpec, capture: bool, replay_of: Option<u64>) -> MadeCall {
        let mut record = CallRecord::new(id, Direction::Out, &spec.model);
        record.target = Some(spec.target.to_string());
        if let crate::dispatch::Target::Peer(peer) = spec.target {
            // The node asked, even when it refuses before saying it is connected.
            record.peer = Some(peer.to_string());
        }
        record.replay_of = replay_of;
        let mut budget = Budget::new(CAPTURE_CAP);
        if capture {
            record.capture = Some(capture_request(spec, &mut budget));
        }
        MadeCall {
            record,
            started: Instant::now(),
            budget: Budget::new(CAPTURE_CAP),
            ended: false,
        }
    }

    pub fn record(&self) -> &CallRecord {
        &self.record
    }

    /// Takes in one event of the call.
    pub fn see(&mut self, event: &CallEvent) {
        let r = &mut self.record;
        match event {
            CallEvent::Connected {
                peer,
                path,
                connect_ms,
            } => {
                r.tried.push(peer.clone());
                r.peer = Some(peer.clone());
                r.path = Some(*path);
                r.connect_ms = Some(*connect_ms);
            }
            CallEvent::Started { .. } => {}
            CallEvent::Delta { text } => {
                r.first_output_ms
                    .get_or_insert(self.started.elapsed().as_millis() as u64);
                if let Some(capture) = &mut r.capture {
                    if !self.budget.exhausted() || !text.is_empty() {
                        capture.response.push_str(&self.budget.take(text));
                        capture.truncated |= self.budget.truncated;
                    }
                }
            }
            CallEvent::Embeddings { vectors } => {
                r.first_output_ms
                    .get_or_insert(self.started.elapsed().as_millis() as u64);
                if let Some(capture) = &mut r.capture {
                    let dims = vectors.first().map_or(0, Vec::len);
                    capture.response = format!("{} vector(s) of {dims} dimensions", vectors.len());
                }
            }
            CallEvent::Done {
                peer,
                path,
                usage,
                connect_ms,
                total_ms,
                receipt,
                receipt_verified,
                ..
            } => {
                r.state = CallState::Answered;
                r.peer = Some(peer.clone());
                r.path = Some(*path);
                r.connect_ms = Some(*connect_ms);
                r.total_ms = Some(*total_ms);
                r.tokens = Some(usage.completion_tokens);
                r.receipt = receipt.clone();
                r.receipt_verified = Some(*receipt_verified);
                self.ended = true;
            }
            CallEvent::Error(failure) => {
                let code = failure.code.as_str();
                r.state = CallState::of_code(code);
                r.code = Some(code.to_string());
                r.message = Some(failure.message.clone());
                r.total_ms = Some(self.started.elapsed().as_millis() as u64);
                self.ended = true;
            }
        }
    }

    /// The record of the call as it ended: an end not seen means the asker hung up.
    pub fn finish(mut self) -> CallRecord {
        if !self.ended {
            self.record.state = CallState::Cancelled;
            self.record.total_ms = Some(self.started.elapsed().as_millis() as u64);
        }
        self.record
    }
}

/// The request of `spec` as captured: its token left out, its texts redacted and capped.
fn capture_request(spec: &InferSpec, budget: &mut Budget) -> Capture {
    let mut kept = spec.clone();
    kept.token = None;
    let had_token = spec.token.is_some();
    for prompt in &mut kept.prompts {
        *prompt = budget.take(prompt);
    }
    if let Some(system) = &mut kept.system {
        *system = budget.take(system);
    }
    if let Some(prompt) = &mut kept.prompt {
        *prompt = budget.take(prompt);
    }
    for message in &mut kept.messages {
        message.content = budget.take(&message.content);
    }
    let mut request = serde_json::to_value(&kept).unwrap_or(serde_json::Value::Null);
    if had_token {
        request["token"] = REDACTED.into();
    }
    Capture {
        request: Some(request),
        response: String::new(),
        truncated: budget.truncated,
        had_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{CallFailure, Target};
    use mesh_protocol::{ErrorCode, FinishReason, Usage};

    fn spec(prompt: &str) -> InferSpec {
        serde_json::from_value(serde_json::json!({
            "target": "any", "model": "echo", "prompts": [prompt], "deadline_ms": 1000
        }))
        .unwrap()
    }

    fn done(peer: &str) -> CallEvent {
        CallEvent::Done {
            peer: peer.into(),
            path: Path::HolePunched,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                completion_tokens: 3,
                ..Default::default()
            },
            connect_ms: 4,
            time_to_first_byte_ms: 5,
            total_ms: 9,
            receipt: Some("mrc1.x".into()),
            receipt_verified: true,
            receipt_error: None,
            stages: vec![],
            resumed: vec![],
        }
    }

    #[test]
    fn an_answered_call_has_its_peer_path_timings_and_receipt() {
        let mut call = MadeCall::new(7, &spec("hi"), false, None);
        assert_eq!(call.record().state, CallState::Running);
        assert_eq!(call.record().target.as_deref(), Some("any"));
        let connected = |peer: &str| CallEvent::Connected {
            peer: peer.into(),
            path: Path::Relayed,
            connect_ms: 2,
        };
        call.see(&connected("A"));
        call.see(&connected("B"));
        call.see(&CallEvent::Delta { text: "hi".into() });
        call.see(&done("B"));
        let r = call.finish();
        assert_eq!(r.state, CallState::Answered);
        assert_eq!(r.tried, ["A", "B"]);
        assert_eq!(r.peer.as_deref(), Some("B"));
        assert_eq!(r.path, Some(Path::HolePunched));
        assert_eq!((r.tokens, r.total_ms), (Some(3), Some(9)));
        assert!(r.first_output_ms.is_some());
        assert_eq!(r.receipt_verified, Some(true));
        assert!(r.capture.is_none(), "capture off keeps no bodies");
    }

    #[test]
    fn refusals_failures_and_hang_ups_are_told_apart() {
        let mut call = MadeCall::new(1, &spec("hi"), false, None);
        call.see(&CallEvent::Error(CallFailure::remote(
            mesh_protocol::WireError::new(ErrorCode::Unauthorized, "no token"),
        )));
        let r = call.finish();
        assert_eq!(r.state, CallState::Refused);
        assert_eq!(r.code.as_deref(), Some("unauthorized"));
        assert_eq!(r.message.as_deref(), Some("no token"));
        assert_eq!(CallState::of_code("deadline_exceeded"), CallState::Failed);
        assert_eq!(CallState::of_code("unreachable"), CallState::Failed);
        let call = MadeCall::new(2, &spec("hi"), false, None);
        assert_eq!(call.finish().state, CallState::Cancelled);
    }

    #[test]
    fn a_capture_is_redacted_capped_and_keeps_no_token() {
        let mut s = spec("my key is sk-abcdefghijklmnopqrstuvwx");
        s.target = Target::Any;
        s.token = Some(crate::test_support::signed_token());
        let mut call = MadeCall::new(3, &s, true, Some(1));
        call.see(&CallEvent::Delta {
            text: "x".repeat(CAPTURE_CAP + 10),
        });
        call.see(&done("B"));
        let r = call.finish();
        assert_eq!(r.replay_of, Some(1));
        let capture = r.capture.clone().unwrap();
        let request = capture.request.clone().unwrap();
        assert_eq!(request["prompts"][0], "my key is [redacted]");
        assert_eq!(request["token"], REDACTED);
        assert!(capture.had_token);
        assert_eq!(capture.response.len(), CAPTURE_CAP);
        assert!(capture.truncated);
        let summary = r.summary();
        let kept = summary.capture.unwrap();
        assert!(kept.request.is_none() && kept.response.is_empty());
        assert!(kept.truncated, "the list still says what was captured");
    }
}
