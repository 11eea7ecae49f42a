//! `POST /v1/chat/completions`: a chat request becomes a mesh call for any node hosting the
//! model; its events become one whole answer ([`collect`]) or, with `stream: true`,
//! server-sent `chat.completion.chunk` events ending with `data: [DONE]` ([`ChunkStream`]).
//!
//! A streamed answer is one task: the call's event receiver is mapped straight into the
//! response body. A client that hangs up drops the body, which drops the receiver, which
//! cancels the call on the serving node.

use std::collections::VecDeque;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mesh_protocol::{ErrorCode, FinishReason, Role, SamplingParams, Task, Usage as MeshUsage};
use tokio::sync::mpsc;

use super::error::{OpenAiError, OpenAiJson};
use super::schema::{
    finish_reason_name, AnswerMessage, ChatCompletion, ChatCompletionChunk, ChatRequest, Choice,
    ChunkChoice, Delta, ErrorBody, Usage,
};
use super::{mesh_token, spec_for_any};
use crate::api::ApiState;
use crate::auth::unix_now;
use crate::dispatch::{CallEvent, CallFailure, InferSpec};

pub(super) async fn chat_completions(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OpenAiJson(req): OpenAiJson<ChatRequest>,
) -> Result<Response, OpenAiError> {
    let spec = chat_spec(&req)?;
    let spec = InferSpec {
        token: mesh_token(&headers)?,
        ..spec
    };
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let events = state.dispatcher().dispatch(spec);
    if req.stream {
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream_chat(id, req.model, events, include_usage).await);
    }
    let answer = collect(events).await?;
    Ok(Json(ChatCompletion {
        choices: vec![Choice {
            finish_reason: Some(finish_reason_name(answer.finish_reason).into()),
            index: 0,
            message: AnswerMessage {
                content: answer.text,
                role: Role::Assistant,
            },
        }],
        created: unix_now(),
        id,
        model: req.model,
        object: "chat.completion".into(),
        usage: usage(&answer.usage),
    })
    .into_response())
}

/// The mesh call a chat request asks for, checked as far as this side can.
fn chat_spec(req: &ChatRequest) -> Result<InferSpec, OpenAiError> {
    if req.n.unwrap_or(1) != 1 {
        return Err(OpenAiError::bad_request("only n = 1 is supported"));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| m.to_mesh().map_err(OpenAiError::bad_request))
        .collect::<Result<Vec<_>, _>>()?;
    if messages.is_empty() {
        return Err(OpenAiError::bad_request("messages must not be empty"));
    }
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        max_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(defaults.max_tokens),
        // OpenAI's default, not mesh's.
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p,
        top_k: None,
        seed: req.seed,
        stop: req.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
    };
    params
        .validate()
        .map_err(|e| OpenAiError::bad_request(e.message))?;
    Ok(InferSpec {
        messages,
        params,
        ..spec_for_any(&req.model, Task::Generate)
    })
}

fn usage(u: &MeshUsage) -> Usage {
    Usage::new(u.prompt_tokens, u.completion_tokens)
}

/// A whole answer, for the routes that do not stream.
pub(super) struct Answer {
    pub(super) text: String,
    pub(super) vectors: Vec<Vec<f32>>,
    pub(super) finish_reason: FinishReason,
    pub(super) usage: MeshUsage,
}

/// Reads a call's events to the end.
pub(super) async fn collect(mut events: mpsc::Receiver<CallEvent>) -> Result<Answer, OpenAiError> {
    let (mut text, mut vectors) = (String::new(), Vec::new());
    while let Some(event) = events.recv().await {
        match event {
            CallEvent::Delta { text: t } => text.push_str(&t),
            CallEvent::Embeddings { vectors: v } => vectors = v,
            CallEvent::Done {
                finish_reason,
                usage,
                ..
            } => {
                return Ok(Answer {
                    text,
                    vectors,
                    finish_reason,
                    usage,
                })
            }
            CallEvent::Error(failure) => return Err(OpenAiError::from_mesh(failure)),
            CallEvent::Connected { .. } | CallEvent::Started { .. } => {}
        }
    }
    Err(OpenAiError::from_mesh(CallFailure::network(
        ErrorCode::Internal,
        "the call ended without an answer",
    )))
}

/// Streams the answer as server-sent events. Errors before the first token are plain HTTP
/// errors; after it, the stream carries an error object and ends.
async fn stream_chat(
    id: String,
    model: String,
    mut events: mpsc::Receiver<CallEvent>,
    include_usage: bool,
) -> Response {
    // Wait for the call to start, so refusals get their status code.
    let first = loop {
        match events.recv().await {
            Some(CallEvent::Connected { .. }) => continue,
            Some(CallEvent::Error(failure)) => {
                return OpenAiError::from_mesh(failure).into_response()
            }
            Some(other) => break other,
            None => {
                return OpenAiError::from_mesh(CallFailure::network(
                    ErrorCode::Internal,
                    "no answer",
                ))
                .into_response()
            }
        }
    };
    let mut chunks = ChunkStream::new(id, model, unix_now(), include_usage);
    let mut queued = VecDeque::from([chunks.opening()]);
    queued.extend(chunks.on_event(first));
    let body = futures::stream::unfold(
        (chunks, events, queued),
        |(mut chunks, mut events, mut queued)| async move {
            loop {
                if let Some(frame) = queued.pop_front() {
                    return Some((frame.event(), (chunks, events, queued)));
                }
                if chunks.is_finished() {
                    return None;
                }
                match events.recv().await {
                    Some(event) => queued.extend(chunks.on_event(event)),
                    None => queued.extend(chunks.on_end()),
                }
            }
        },
    );
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

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
    fn event(&self) -> Result<Event, axum::Error> {
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

    /// What one call event adds to the stream. The last (`done` or `error`) is followed by
    /// `[DONE]`; nothing comes after that.
    pub(super) fn on_event(&mut self, event: CallEvent) -> Vec<Frame> {
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
                        usage: Some(usage(&u)),
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
    pub(super) fn on_end(&mut self) -> Vec<Frame> {
        if std::mem::replace(&mut self.finished, true) {
            Vec::new()
        } else {
            vec![Frame::Done]
        }
    }

    pub(super) fn is_finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Path;
    use mesh_protocol::WireError;
    use serde_json::{json, Value};

    fn done(finish_reason: FinishReason, prompt_tokens: u32, completion_tokens: u32) -> CallEvent {
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
        }
    }

    fn delta(text: &str) -> CallEvent {
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

    fn request(body: Value) -> ChatRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn a_chat_request_becomes_a_call_for_any_node() {
        let spec = chat_spec(&request(json!({
            "model": "smol", "messages": [{ "role": "user", "content": "hi" }],
            "max_tokens": 10, "max_completion_tokens": 20, "stop": "END", "seed": 3,
        })))
        .unwrap();
        assert_eq!((spec.target.as_str(), spec.model.as_str()), ("any", "smol"));
        assert_eq!(spec.expect, Some(Task::Generate));
        assert_eq!(spec.deadline_ms, 300_000);
        assert_eq!(spec.params.max_tokens, 20, "max_completion_tokens wins");
        assert_eq!(spec.params.temperature, 1.0, "OpenAI's default temperature");
        assert_eq!(spec.params.stop, ["END"]);
        assert_eq!(spec.params.seed, Some(3));
        assert_eq!(spec.messages.len(), 1);
        let plain = chat_spec(&request(
            json!({ "model": "m", "messages": [{ "role": "user", "content": "x" }] }),
        ))
        .unwrap();
        assert_eq!(
            plain.params.max_tokens,
            SamplingParams::default().max_tokens
        );
    }

    #[test]
    fn what_this_side_can_check_is_a_400() {
        let message = |body: Value| {
            let err = chat_spec(&request(body)).unwrap_err();
            assert_eq!(err.status().as_u16(), 400);
            err.body().error.message
        };
        let user = json!([{ "role": "user", "content": "x" }]);
        assert_eq!(
            message(json!({ "model": "m", "messages": user, "n": 2 })),
            "only n = 1 is supported"
        );
        assert_eq!(
            message(json!({ "model": "m", "messages": [] })),
            "messages must not be empty"
        );
        assert!(
            message(json!({ "model": "m", "messages": user, "temperature": 5 }))
                .contains("temperature")
        );
        assert_eq!(
            message(json!({ "model": "m", "messages": [{ "role": "tool", "content": "x" }] })),
            r#"unsupported message role "tool""#
        );
    }

    #[tokio::test]
    async fn collect_reads_to_done_or_the_first_failure() {
        let (tx, rx) = mpsc::channel(8);
        for e in [
            CallEvent::Started { queue_ms: 0 },
            delta("a"),
            delta("b"),
            done(FinishReason::Stop, 2, 2),
        ] {
            tx.send(e).await.unwrap();
        }
        let answer = collect(rx).await.map_err(|e| e.body()).unwrap();
        assert_eq!(
            (answer.text.as_str(), answer.finish_reason),
            ("ab", FinishReason::Stop)
        );
        assert_eq!(answer.usage.completion_tokens, 2);

        let (tx, rx) = mpsc::channel(8);
        tx.send(CallEvent::Error(CallFailure::remote(WireError::new(
            ErrorCode::UnknownModel,
            "none",
        ))))
        .await
        .unwrap();
        assert_eq!(collect(rx).await.err().unwrap().status().as_u16(), 404);

        let (tx, rx) = mpsc::channel(8);
        tx.send(delta("a")).await.unwrap();
        drop(tx);
        let err = collect(rx).await.err().unwrap();
        assert_eq!(
            err.status().as_u16(),
            502,
            "a call that just stops is the network's failure"
        );
    }
}
