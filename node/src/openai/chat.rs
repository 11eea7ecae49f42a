//! `POST /v1/chat/completions`: a chat request becomes a mesh call for any node hosting the
//! model; its events become one whole answer ([`collect`]) or, with `stream: true`,
//! server-sent `chat.completion.chunk` events ending with `data: [DONE]` (mapped by
//! [`ChunkStream`]).
//!
//! A streamed answer is one task: the call's event receiver is mapped straight into the
//! response body. A client that hangs up drops the body, which drops the receiver, which
//! cancels the call on the serving node.

use std::collections::VecDeque;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use mesh_protocol::{ErrorCode, FinishReason, Role, SamplingParams, Task, Usage as MeshUsage};
use tokio::sync::mpsc;

use super::chunks::ChunkStream;
use super::error::{OpenAiError, OpenAiJson};
use super::schema::{
    finish_reason_name, AnswerMessage, ChatCompletion, ChatRequest, Choice, Stop, Usage,
};
use super::stream::{first_event, frames, Framer};
use super::{mesh_token, spec_for_any};
use crate::api::state::ApiState;
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
    let events = state.dispatch(spec);
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
        usage: Usage::from(&answer.usage),
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
    let params = sampling(
        req.max_completion_tokens.or(req.max_tokens),
        SamplingParams::default().max_tokens,
        req.temperature,
        req.top_p,
        req.seed,
        req.stop.clone(),
    )?;
    Ok(InferSpec {
        messages,
        params,
        ..spec_for_any(&req.model, Task::Generate)
    })
}

/// Sampling parameters from OpenAI's fields (the same in chat, completions and responses),
/// with OpenAI's defaults where absent, checked.
pub(super) fn sampling(
    max_tokens: Option<u32>,
    default_max_tokens: u32,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
) -> Result<SamplingParams, OpenAiError> {
    let params = SamplingParams {
        max_tokens: max_tokens.unwrap_or(default_max_tokens),
        // OpenAI's default, not mesh's.
        temperature: temperature.unwrap_or(1.0),
        top_p,
        top_k: None,
        seed,
        stop: stop.map(Stop::into_vec).unwrap_or_default(),
    };
    params
        .validate()
        .map_err(|e| OpenAiError::bad_request(e.message))?;
    Ok(params)
}

/// A whole answer, for the routes that do not stream (of every API the node speaks).
pub(crate) struct Answer {
    pub(crate) text: String,
    pub(crate) vectors: Vec<Vec<f32>>,
    pub(crate) finish_reason: FinishReason,
    /// Tokens and the serving node's compute times.
    pub(crate) usage: MeshUsage,
    /// Milliseconds until the serving node was reached, and for the whole call, on this side.
    pub(crate) connect_ms: u64,
    pub(crate) total_ms: u64,
}

/// Reads a call's events to the end, as OpenAI's error when it failed.
pub(super) async fn collect(events: mpsc::Receiver<CallEvent>) -> Result<Answer, OpenAiError> {
    collect_answer(events).await.map_err(OpenAiError::from_mesh)
}

/// The most text a whole (non-streaming) answer may hold: far past any honest answer of a
/// call's token limit, and a bound on what a provider that floods deltas can make this node
/// buffer.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Reads a call's events to the end. An answer past [`MAX_ANSWER_BYTES`] is a failure (and
/// dropping the events cancels the call).
pub(crate) async fn collect_answer(
    mut events: mpsc::Receiver<CallEvent>,
) -> Result<Answer, CallFailure> {
    let (mut text, mut vectors) = (String::new(), Vec::new());
    while let Some(event) = events.recv().await {
        match event {
            CallEvent::Delta { text: t } => {
                if text.len().saturating_add(t.len()) > MAX_ANSWER_BYTES {
                    return Err(CallFailure::network(
                        ErrorCode::Internal,
                        format!(
                            "the provider's answer passed {} MiB; the call was dropped",
                            MAX_ANSWER_BYTES >> 20
                        ),
                    ));
                }
                text.push_str(&t)
            }
            CallEvent::Embeddings { vectors: v } => vectors = v,
            CallEvent::Done {
                finish_reason,
                usage,
                connect_ms,
                total_ms,
                ..
            } => {
                return Ok(Answer {
                    text,
                    vectors,
                    finish_reason,
                    usage,
                    connect_ms,
                    total_ms,
                })
            }
            CallEvent::Error(failure) => return Err(failure),
            CallEvent::Connected { .. } | CallEvent::Started { .. } => {}
        }
    }
    Err(CallFailure::network(
        ErrorCode::Internal,
        "the call ended without an answer",
    ))
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
    let first = match first_event(&mut events).await {
        Ok(first) => first,
        Err(failure) => return OpenAiError::from_mesh(failure).into_response(),
    };
    let mut chunks = ChunkStream::new(id, model, unix_now(), include_usage);
    let mut queued = VecDeque::from([chunks.opening()]);
    queued.extend(chunks.on_event(first));
    // Keep-alive comments hold idle connections open.
    let body = frames(chunks, events, queued).map(|frame| frame.event());
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::super::chunks::tests::{delta, done};
    use super::*;
    use crate::dispatch::Target;
    use mesh_protocol::WireError;
    use serde_json::{json, Value};

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
        assert_eq!((spec.target, spec.model.as_str()), (Target::Any, "smol"));
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
    async fn an_answer_past_the_cap_is_a_failure_and_drops_the_call() {
        let (tx, rx) = mpsc::channel(8);
        let sender = tokio::spawn(async move {
            let piece = "x".repeat(1 << 20);
            // More than the cap and the channel's room together: the sender must see the drop.
            for _ in 0..MAX_ANSWER_BYTES / piece.len() + 32 {
                if tx
                    .send(CallEvent::Delta {
                        text: piece.clone(),
                    })
                    .await
                    .is_err()
                {
                    return true;
                }
            }
            false
        });
        let failure = collect_answer(rx).await.err().expect("a failure");
        assert!(failure.message.contains("16 MiB"), "{}", failure.message);
        assert!(sender.await.unwrap(), "the call's events were dropped");
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
