//! The server-sent events of one streamed chat answer, from the call's events: a pure
//! mapping ([`ChunkStream`]), so the sequence of chunks and the `[DONE]` that ends it are
//! tested without a network. `chat` drives it from the call's receiver.

use axum::response::sse::Event;
use mesh_protocol::{FinishReason, Role};

use super::error::OpenAiError;
use super::schema::{
    finish_reason_name, ChatCompletionChunk, ChunkChoice, Delta, ErrorBody, Usage,
};
use super::stream::Framer;
use crate::dispatch::CallEvent;

/// One server-sent event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Frame {
    Chunk(ChatCompletionChunk),
    /// The call failed after the stream began.
    Error(ErrorBody),
    /// `data: [DONE]`, always the last.
    Done,
}

impl Frame {
    pub(super) fn event(&self) -> Result<Event, axum::Error> {
        match self {
            Frame::Chunk(chunk) => Event::default().json_data(chunk),
            Frame::Error(body) => Event::default().json_data(body),
            Frame::Done => Ok(Event::default().data("[DONE]")),
        }
    }
}

/// The chunks of one streamed answer, from the call's events: a pure mapping.
pub(super) struct ChunkStream {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    finished: bool,
}

impl ChunkStream {
    pub(super) fn new(id: String, model: String, created: u64, include_usage: bool) -> Self {
        ChunkStream {
            id,
            model,
            created,
            include_usage,
            finished: false,
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            choices,
            created: self.created,
            id: self.id.clone(),
            model: self.model.clone(),
            object: "chat.completion.chunk".into(),
            usage: None,
        }
    }

    fn choice(&self, delta: Delta, finish_reason: Option<FinishReason>) -> Frame {
        Frame::Chunk(self.chunk(vec![ChunkChoice {
            delta,
            finish_reason: finish_reason.map(|f| finish_reason_name(f).into()),
            index: 0,
            text: None,
        }]))
    }

    /// The first event: the assistant's role, with empty content.
    pub(super) fn opening(&self) -> Frame {
        let delta = Delta {
            content: Some(String::new()),
            role: Some(Role::Assistant),
        };
        self.choice(delta, None)
    }
}

/// The last event (`done` or `error`) is followed by `[DONE]`; nothing comes after that.
impl Framer for ChunkStream {
    type Frame = Frame;

    fn on_event(&mut self, event: CallEvent) -> Vec<Frame> {
        if self.finished {
            return Vec::new();
        }
        match event {
            CallEvent::Delta { text } => {
                let delta = Delta {
                    content: Some(text),
                    role: None,
                };
                vec![self.choice(delta, None)]
            }
            CallEvent::Done {
                finish_reason,
                usage: u,
                ..
            } => {
                let mut frames = vec![self.choice(Delta::default(), Some(finish_reason))];
                if self.include_usage {
                    frames.push(Frame::Chunk(ChatCompletionChunk {
                        usage: Some(Usage::from(&u)),
                        ..self.chunk(Vec::new())
                    }));
                }
                frames.extend(self.on_end());
                frames
            }
            CallEvent::Error(failure) => {
                let mut frames = vec![Frame::Error(OpenAiError::from_mesh(failure).body())];
                frames.extend(self.on_end());
                frames
            }
            CallEvent::Connected { .. }
            | CallEvent::Started { .. }
            | CallEvent::Embeddings { .. } => Vec::new(),
        }
    }

    /// The events ended: `[DONE]`, unless it was sent already.
    fn on_end(&mut self) -> Vec<Frame> {
        if std::mem::replace(&mut self.finished, true) {
            Vec::new()
        } else {
            vec![Frame::Done]
        }
    }

    fn is_finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::dispatch::CallFailure;
    use crate::network::Path;
    use axum::response::sse::Sse;
    use axum::response::IntoResponse;
    use mesh_protocol::{ErrorCode, Usage as MeshUsage, WireError};
    use serde_json::{json, Value};

    pub(crate) fn done(
        finish_reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
    ) -> CallEvent {
        CallEvent::Done {
            peer: "12D3KooW".into(),
            path: Path::Direct,
            finish_reason,
            usage: MeshUsage {
                prompt_tokens,
                completion_tokens,
                ..MeshUsage::default()
            },
            connect_ms: 1,
            time_to_first_byte_ms: 2,
            total_ms: 3,
            receipt: None,
            receipt_verified: false,
            receipt_error: None,
            stages: Vec::new(),
            resumed: Vec::new(),
        }
    }

    pub(crate) fn delta(text: &str) -> CallEvent {
        CallEvent::Delta { text: text.into() }
    }

    /// The frames of a whole stream, as `stream_chat` sends them, in JSON (`[DONE]` as a string).
    fn frames(include_usage: bool, events: Vec<CallEvent>) -> Vec<Value> {
        let mut chunks = ChunkStream::new(
            "chatcmpl-1".into(),
            "smol".into(),
            1_700_000_000,
            include_usage,
        );
        let mut out = vec![chunks.opening()];
        for event in events {
            out.extend(chunks.on_event(event));
        }
        out.extend(chunks.on_end());
        assert!(chunks.is_finished());
        out.into_iter()
            .map(|f| match f {
                Frame::Chunk(c) => serde_json::to_value(c).unwrap(),
                Frame::Error(e) => serde_json::to_value(e).unwrap(),
                Frame::Done => json!("[DONE]"),
            })
            .collect()
    }

    fn chunk(delta: Value, finish_reason: Value) -> Value {
        json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
                "model": "smol", "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }] })
    }

    #[test]
    fn a_call_becomes_role_deltas_finish_usage_and_done() {
        let events = vec![
            CallEvent::Started { queue_ms: 0 },
            delta("Par"),
            delta("is"),
            done(FinishReason::Length, 12, 2),
        ];
        let mut usage = chunk(json!({}), Value::Null);
        usage["choices"] = json!([]);
        usage["usage"] = json!({ "prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14 });
        assert_eq!(
            frames(true, events.clone()),
            [
                chunk(json!({ "role": "assistant", "content": "" }), Value::Null),
                chunk(json!({ "content": "Par" }), Value::Null),
                chunk(json!({ "content": "is" }), Value::Null),
                chunk(json!({}), json!("length")),
                usage,
                json!("[DONE]"),
            ]
        );
        let without_usage = frames(false, events);
        assert_eq!(without_usage.len(), 5, "no usage chunk unless asked for");
        assert_eq!(without_usage[3], chunk(json!({}), json!("length")));
    }

    #[test]
    fn a_failure_after_the_start_is_the_last_event_before_done() {
        let failure = CallFailure::remote(WireError::new(ErrorCode::Overloaded, "busy"));
        let frames = frames(
            false,
            vec![delta("a"), CallEvent::Error(failure), delta("late")],
        );
        assert_eq!(
            frames[2..],
            [
                json!({ "error": { "message": "busy", "type": "rate_limit_error", "param": null, "code": "overloaded" } }),
                json!("[DONE]"),
            ],
            "and nothing after [DONE]"
        );
    }

    #[test]
    fn events_that_end_without_done_still_close_the_stream() {
        assert_eq!(
            frames(false, vec![delta("a")]).last(),
            Some(&json!("[DONE]"))
        );
    }

    #[tokio::test]
    async fn the_frames_go_out_as_single_line_server_sent_events() {
        let mut chunks = ChunkStream::new("chatcmpl-1".into(), "smol".into(), 7, false);
        let mut all = vec![chunks.opening()];
        all.extend(chunks.on_event(delta("hi\nthere")));
        all.extend(chunks.on_event(done(FinishReason::Stop, 1, 1)));
        let sse = Sse::new(futures::stream::iter(
            all.iter().map(Frame::event).collect::<Vec<_>>(),
        ));
        let response = sse.into_response();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        let events: Vec<&str> = body.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 4, "{body}");
        assert_eq!(
            events[1],
            r#"data: {"choices":[{"delta":{"content":"hi\nthere"},"finish_reason":null,"index":0}],"created":7,"id":"chatcmpl-1","model":"smol","object":"chat.completion.chunk"}"#
        );
        assert_eq!(events[3], "data: [DONE]");
        assert!(body.ends_with("\n\n"));
    }
}
