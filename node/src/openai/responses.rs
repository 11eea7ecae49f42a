//! `POST /v1/responses`: OpenAI's Responses API for text. The input (a string, or messages of
//! text parts) and `instructions` (a system message) become a chat call for any node hosting
//! the model; the answer is one response object, or with `stream: true` the API's event
//! sequence ([`super::response_events`]).

use std::collections::VecDeque;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use mesh_protocol::{ChatMessage, Role, SamplingParams, Task};

use super::chat::{collect, sampling};
use super::error::{OpenAiError, OpenAiJson};
use super::response_events::{ResponseFramer, ResponseHead};
use super::schema::ResponsesRequest;
use super::stream::{first_event, frames, Framer};
use super::{mesh_token, spec_for_any};
use crate::api::state::ApiState;
use crate::auth::unix_now;
use crate::dispatch::InferSpec;

pub(super) async fn responses(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OpenAiJson(req): OpenAiJson<ResponsesRequest>,
) -> Result<Response, OpenAiError> {
    let spec = InferSpec {
        token: mesh_token(&headers)?,
        ..response_spec(&req)?
    };
    let head = ResponseHead {
        id: format!("resp_{:016x}", rand::random::<u64>()),
        item_id: format!("msg_{:016x}", rand::random::<u64>()),
        created_at: unix_now(),
        model: req.model.clone(),
        instructions: req.instructions.clone(),
        max_output_tokens: Some(spec.params.max_tokens),
        temperature: Some(spec.params.temperature),
        top_p: spec.params.top_p,
    };
    let mut events = state.dispatch(spec);
    if !req.stream {
        let answer = collect(events).await?;
        let response = head.finished(answer.text, answer.finish_reason, &answer.usage);
        return Ok(Json(response).into_response());
    }
    let first = first_event(&mut events)
        .await
        .map_err(OpenAiError::from_mesh)?;
    let mut framer = ResponseFramer::new(head);
    let mut queued = VecDeque::from(framer.opening());
    queued.extend(framer.on_event(first));
    let body = frames(framer, events, queued).map(|e| e.sse());
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The mesh call a Responses request asks for, checked as far as this side can.
fn response_spec(req: &ResponsesRequest) -> Result<InferSpec, OpenAiError> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OpenAiError::bad_request("tools are not supported"));
    }
    if req.previous_response_id.is_some() {
        return Err(OpenAiError::bad_request(
            "previous_response_id is not supported (mesh stores no responses): send the conversation as input",
        ));
    }
    let system = req.instructions.iter().map(|text| ChatMessage {
        role: Role::System,
        content: text.clone(),
    });
    let input = req.input.to_mesh().map_err(OpenAiError::bad_request)?;
    if input.is_empty() {
        return Err(OpenAiError::bad_request("input must not be empty"));
    }
    let params = sampling(
        req.max_output_tokens,
        SamplingParams::default().max_tokens,
        req.temperature,
        req.top_p,
        None,
        None,
    )?;
    Ok(InferSpec {
        messages: system.chain(input).collect(),
        params,
        ..spec_for_any(&req.model, Task::Generate)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spec(body: Value) -> Result<InferSpec, OpenAiError> {
        response_spec(&serde_json::from_value(body).unwrap())
    }

    #[test]
    fn input_and_instructions_become_the_conversation() {
        let s = spec(
            json!({ "model": "smol", "input": "hi", "instructions": "be brief",
                             "max_output_tokens": 9, "temperature": 0 }),
        )
        .unwrap();
        assert_eq!(
            s.messages,
            [
                ChatMessage {
                    role: Role::System,
                    content: "be brief".into()
                },
                ChatMessage {
                    role: Role::User,
                    content: "hi".into()
                }
            ]
        );
        assert_eq!((s.params.max_tokens, s.params.temperature), (9, 0.0));
        assert_eq!(s.expect, Some(Task::Generate));
        let s = spec(json!({ "model": "smol", "input": [
            { "role": "developer", "content": "rules" },
            { "type": "message", "role": "user", "content": [{ "type": "input_text", "text": "a" }] },
            { "role": "assistant", "content": [{ "type": "output_text", "text": "b" }] },
        ] }))
        .unwrap();
        let roles: Vec<Role> = s.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant]);
        assert_eq!(s.messages[1].content, "a");
        assert_eq!(s.params.max_tokens, 256, "mesh's default, as in chat");
        assert_eq!(s.params.temperature, 1.0, "OpenAI's default");
    }

    #[test]
    fn what_responses_cannot_do_is_a_400() {
        let message = |body: Value| {
            let e = spec(body).unwrap_err();
            assert_eq!(e.status().as_u16(), 400);
            e.body().error.message
        };
        assert!(message(
            json!({ "model": "m", "input": "x", "tools": [{ "type": "web_search" }] })
        )
        .contains("tools"));
        assert!(
            message(json!({ "model": "m", "input": "x", "previous_response_id": "resp_1" }))
                .contains("previous_response_id")
        );
        assert!(message(json!({ "model": "m", "input": [
            { "role": "user", "content": [{ "type": "input_image", "image_url": "x" }] }] }))
        .contains("input_image"));
        assert!(message(json!({ "model": "m", "input": [
            { "type": "function_call_output", "call_id": "c", "output": "x" }] }))
        .contains("function_call_output"));
        assert_eq!(
            message(json!({ "model": "m", "input": [] })),
            "input must not be empty"
        );
        assert!(
            message(json!({ "model": "m", "input": "x", "temperature": 9 }))
                .contains("temperature")
        );
        // An empty tool list is what some clients always send.
        assert!(spec(json!({ "model": "m", "input": "x", "tools": [] })).is_ok());
    }
}
