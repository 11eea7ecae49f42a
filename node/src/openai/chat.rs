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
