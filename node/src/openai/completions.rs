//! `POST /v1/completions`: OpenAI's legacy text completions. The prompt goes to the model raw,
//! without its chat template (`Input::Completion` on the wire, through the spec's `prompt`);
//! the answer is one `text_completion`, or with `stream: true` server-sent `text_completion`
//! chunks ending with `data: [DONE]` ([`TextFramer`]).

use std::collections::VecDeque;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use mesh_protocol::{FinishReason, Task};

use super::chat::{collect, sampling};
use super::error::{OpenAiError, OpenAiJson};
use super::schema::{
    finish_reason_name, ErrorBody, TextChoice, TextCompletion, TextCompletionRequest, Usage,
};
use super::stream::{first_event, frames, Framer};
use super::{mesh_token, spec_for_any};
use crate::api::state::ApiState;
use crate::auth::unix_now;
use crate::dispatch::{CallEvent, InferSpec};

/// OpenAI's default `max_tokens` for completions (chat's is mesh's 256).
const DEFAULT_MAX_TOKENS: u32 = 16;

pub(super) async fn completions(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OpenAiJson(req): OpenAiJson<TextCompletionRequest>,
) -> Result<Response, OpenAiError> {
    let spec = InferSpec {
        token: mesh_token(&headers)?,
        ..completion_spec(&req)?
    };
    let mut events = state.dispatch(spec);
    let mut framer = TextFramer {
        id: format!("cmpl-{:016x}", rand::random::<u64>()),
        model: req.model.clone(),
        created: unix_now(),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        finished: false,
    };
    if !req.stream {
        let answer = collect(events).await?;
        return Ok(Json(TextCompletion {
            usage: Some(Usage::from(&answer.usage)),
            ..framer.completion(answer.text, Some(answer.finish_reason))
        })
        .into_response());
    }
    let first = first_event(&mut events)
        .await
        .map_err(OpenAiError::from_mesh)?;
    let queued = VecDeque::from(framer.on_event(first));
    let body = frames(framer, events, queued).map(|f| f.event());
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The mesh call a completion request asks for, checked as far as this side can.
fn completion_spec(req: &TextCompletionRequest) -> Result<InferSpec, OpenAiError> {
    if req.n.unwrap_or(1) != 1 || req.best_of.unwrap_or(1) != 1 {
        return Err(OpenAiError::bad_request(
            "only n = 1 and best_of = 1 are supported",
        ));
    }
    if req.echo == Some(true) {
        return Err(OpenAiError::bad_request("echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(OpenAiError::bad_request("suffix is not supported"));
    }
    if req.logprobs.is_some() {
        return Err(OpenAiError::bad_request("logprobs are not supported"));
    }
    let prompt = req.prompt.single().map_err(OpenAiError::bad_request)?;
    let params = sampling(
        req.max_tokens,
        DEFAULT_MAX_TOKENS,
        req.temperature,
        req.top_p,
        req.seed,
        req.stop.clone(),
    )?;
    Ok(InferSpec {
        prompt: Some(prompt.to_string()),
        params,
        ..spec_for_any(&req.model, Task::Generate)
    })
}

/// One server-sent event of a streamed completion.
#[derive(Debug, Clone, PartialEq)]
enum TextFrame {
    Chunk(TextCompletion),
    Error(ErrorBody),
    Done,
}

impl TextFrame {
    fn event(&self) -> Result<Event, axum::Error> {
        match self {
            TextFrame::Chunk(chunk) => Event::default().json_data(chunk),
            TextFrame::Error(body) => Event::default().json_data(body),
            TextFrame::Done => Ok(Event::default().data("[DONE]")),
        }
    }
}

/// The `text_completion` chunks of one streamed answer: a pure mapping.
struct TextFramer {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    finished: bool,
}

impl TextFramer {
    fn completion(&self, text: String, finish: Option<FinishReason>) -> TextCompletion {
        TextCompletion {
            choices: vec![TextChoice {
                finish_reason: finish.map(|f| finish_reason_name(f).into()),
                index: 0,
                logprobs: None,
                text,
            }],
            created: self.created,
            id: self.id.clone(),
            model: self.model.clone(),
            object: "text_completion".into(),
            usage: None,
        }
    }
}

/// A delta per chunk; `done` is a chunk with the finish reason (then the usage, when asked
/// for) and `[DONE]`; a failure is an error object and `[DONE]`.
impl Framer for TextFramer {
    type Frame = TextFrame;

    fn on_event(&mut self, event: CallEvent) -> Vec<TextFrame> {
        if self.finished {
            return Vec::new();
        }
        match event {
            CallEvent::Delta { text } => vec![TextFrame::Chunk(self.completion(text, None))],
            CallEvent::Done {
                finish_reason,
                usage,
                ..
            } => {
                let mut frames = vec![TextFrame::Chunk(
                    self.completion(String::new(), Some(finish_reason)),
                )];
                if self.include_usage {
                    frames.push(TextFrame::Chunk(TextCompletion {
                        choices: Vec::new(),
                        usage: Some(Usage::from(&usage)),
                        ..self.completion(String::new(), None)
                    }));
                }
                frames.extend(self.on_end());
                frames
            }
            CallEvent::Error(failure) => {
                let mut frames = vec![TextFrame::Error(OpenAiError::from_mesh(failure).body())];
                frames.extend(self.on_end());
                frames
            }
            CallEvent::Connected { .. }
            | CallEvent::Started { .. }
            | CallEvent::Embeddings { .. } => Vec::new(),
        }
    }

    fn on_end(&mut self) -> Vec<TextFrame> {
        if std::mem::replace(&mut self.finished, true) {
            Vec::new()
        } else {
            vec![TextFrame::Done]
        }
    }

    fn is_finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::super::chunks::tests::{delta, done};
    use super::*;
    use crate::dispatch::CallFailure;
    use mesh_protocol::{ErrorCode, WireError};
    use serde_json::{json, Value};

    fn request(body: Value) -> TextCompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn a_completion_is_a_raw_prompt_with_openais_defaults() {
        let spec = completion_spec(&request(json!({
            "model": "smol", "prompt": "Once upon", "stop": ["."], "seed": 1,
        })))
        .unwrap();
        assert_eq!(spec.prompt.as_deref(), Some("Once upon"));
        assert!(spec.messages.is_empty() && spec.prompts.is_empty());
        assert_eq!(spec.expect, Some(Task::Generate));
        assert_eq!(
            spec.params.max_tokens, 16,
            "OpenAI's default for completions"
        );
        assert_eq!(spec.params.temperature, 1.0);
        assert_eq!(spec.params.stop, ["."]);
        let one_of_a_list = completion_spec(&request(
            json!({ "model": "m", "prompt": ["p"], "max_tokens": 5 }),
        ))
        .unwrap();
        assert_eq!(
            (
                one_of_a_list.prompt.as_deref(),
                one_of_a_list.params.max_tokens
            ),
            (Some("p"), 5)
        );
    }

    #[test]
    fn what_completions_cannot_do_is_a_400() {
        let message = |body: Value| {
            let e = completion_spec(&request(body)).unwrap_err();
            assert_eq!(e.status().as_u16(), 400);
            e.body().error.message
        };
        assert!(message(json!({ "model": "m", "prompt": ["a", "b"] })).contains("got 2"));
        assert!(message(json!({ "model": "m", "prompt": [1, 2] })).contains("token ids"));
        assert!(message(json!({ "model": "m", "prompt": "p", "echo": true })).contains("echo"));
        assert!(message(json!({ "model": "m", "prompt": "p", "n": 3 })).contains("n = 1"));
        assert!(
            message(json!({ "model": "m", "prompt": "p", "logprobs": 2 })).contains("logprobs")
        );
        assert!(
            message(json!({ "model": "m", "prompt": "p", "temperature": 3 }))
                .contains("temperature")
        );
    }

    fn framer(include_usage: bool) -> TextFramer {
        TextFramer {
            id: "cmpl-1".into(),
            model: "smol".into(),
            created: 5,
            include_usage,
            finished: false,
        }
    }

    fn json_of(frames: Vec<TextFrame>) -> Vec<Value> {
        frames
            .into_iter()
            .map(|f| match f {
                TextFrame::Chunk(c) => serde_json::to_value(c).unwrap(),
                TextFrame::Error(e) => serde_json::to_value(e).unwrap(),
                TextFrame::Done => json!("[DONE]"),
            })
            .collect()
    }

    #[test]
    fn a_stream_is_text_chunks_a_finish_the_usage_and_done() {
        let mut f = framer(true);
        let mut out = Vec::new();
        for e in [
            delta("Once"),
            delta(" more"),
            done(FinishReason::Length, 3, 2),
        ] {
            out.extend(f.on_event(e));
        }
        out.extend(f.on_end());
        out.extend(f.on_event(delta("late")));
        let chunk = |text: &str, finish: Value| {
            json!({ "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "smol",
                    "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }] })
        };
        assert_eq!(
            json_of(out),
            [
                chunk("Once", Value::Null),
                chunk(" more", Value::Null),
                chunk("", json!("length")),
                json!({ "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "smol",
                        "choices": [], "usage": { "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5 } }),
                json!("[DONE]"),
            ]
        );
        let mut f = framer(false);
        let failure = CallFailure::remote(WireError::new(ErrorCode::Internal, "boom"));
        let out = json_of(f.on_event(CallEvent::Error(failure)));
        assert_eq!(out[0]["error"]["message"], "boom");
        assert_eq!(out[1], "[DONE]");
        assert!(f.is_finished());
    }
}
