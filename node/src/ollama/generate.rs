//! `POST /api/chat` and `POST /api/generate`: a conversation, or a prompt (with its system
//! message, or `raw` without the chat template), becomes a mesh call for any node hosting the
//! model. The answer streams as NDJSON by default ([`super::lines`]), or comes as one object
//! with `"stream": false`. A request with no messages (or an empty prompt) only checks that
//! the model is there and answers `done_reason: "load"`, as Ollama does when asked to load one.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use mesh_protocol::{ChatMessage, Role, Task};
use serde_json::Value;

use super::error::{OllamaError, OllamaJson};
use super::lines::{stats, Kind, LineFramer};
use super::options::{check_num_ctx, model_name, sampling, tag_name};
use super::schema::{ChatRequest, GenerateRequest, Message, Options, Stats};
use super::{lookup, token};
use crate::api::state::ApiState;
use crate::dispatch::InferSpec;
use crate::openai::chat::collect_answer;
use crate::openai::spec_for_any;
use crate::openai::stream::{first_event, frames, Framer};

pub(super) async fn chat(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OllamaJson(req): OllamaJson<ChatRequest>,
) -> Result<Response, OllamaError> {
    let spec = InferSpec {
        token: token(&headers)?,
        ..chat_spec(&req)?
    };
    let num_ctx = num_ctx(req.options.as_ref());
    answer(
        &state,
        spec,
        Kind::Chat,
        req.stream.unwrap_or(true),
        num_ctx,
    )
    .await
}

pub(super) async fn generate(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OllamaJson(req): OllamaJson<GenerateRequest>,
) -> Result<Response, OllamaError> {
    let spec = InferSpec {
        token: token(&headers)?,
        ..generate_spec(&req)?
    };
    let num_ctx = num_ctx(req.options.as_ref());
    answer(
        &state,
        spec,
        Kind::Generate,
        req.stream.unwrap_or(true),
        num_ctx,
    )
    .await
}

fn num_ctx(options: Option<&Options>) -> Option<i64> {
    options.and_then(|o| o.num_ctx)
}

/// The call a chat request asks for. No messages: a request to load the model.
fn chat_spec(req: &ChatRequest) -> Result<InferSpec, OllamaError> {
    refuse_unsupported(req.format.as_ref(), req.think.as_ref())?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OllamaError::bad_request("tools are not supported"));
    }
    let messages = req
        .messages
        .iter()
        .map(to_mesh)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InferSpec {
        messages,
        params: sampling(req.options.as_ref())?,
        ..spec_for_any(model_name(&req.model), Task::Generate)
    })
}

/// The call a generate request asks for. An empty prompt: a request to load the model.
fn generate_spec(req: &GenerateRequest) -> Result<InferSpec, OllamaError> {
    refuse_unsupported(req.format.as_ref(), req.think.as_ref())?;
    let given = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
    if given(&req.suffix) {
        return Err(OllamaError::bad_request(
            "suffix (fill-in-the-middle) is not supported",
        ));
    }
    if given(&req.template) {
        return Err(OllamaError::bad_request(
            "template is not supported: the serving node applies the model's own chat template (or none, with raw)",
        ));
    }
    if req.context.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(OllamaError::bad_request(
            "context is not supported: send the conversation to /api/chat",
        ));
    }
    if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(OllamaError::bad_request("images are not supported"));
    }
    let base = InferSpec {
        params: sampling(req.options.as_ref())?,
        ..spec_for_any(model_name(&req.model), Task::Generate)
    };
    if req.prompt.is_empty() {
        return Ok(base);
    }
    Ok(if req.raw == Some(true) {
        InferSpec {
            prompt: Some(req.prompt.clone()),
            ..base
        }
    } else {
        InferSpec {
            prompts: vec![req.prompt.clone()],
            system: req.system.clone().filter(|s| !s.is_empty()),
            ..base
        }
    })
}

/// Structured output and thinking, which mesh's models do not do, are refused; their "off"
/// values (`""`, `null`, `false`) are what clients send by default and are accepted.
fn refuse_unsupported(format: Option<&Value>, think: Option<&Value>) -> Result<(), OllamaError> {
    match format {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => {
            return Err(OllamaError::bad_request(
                "format (structured output) is not supported",
            ))
        }
    }
    match think {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(_) => Err(OllamaError::bad_request(
            "think is not supported: mesh's models do not think",
        )),
    }
}

/// One chat message in mesh's terms: roles `system`, `user`, `assistant`, text only.
fn to_mesh(m: &Message) -> Result<ChatMessage, OllamaError> {
    if m.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(OllamaError::bad_request("images are not supported"));
    }
    if m.tool_calls.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OllamaError::bad_request("tool calls are not supported"));
    }
    let role = match m.role.as_str() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(OllamaError::bad_request(format!(
                "unsupported message role {other:?}"
            )))
        }
    };
    Ok(ChatMessage {
        role,
        content: m.content.clone(),
    })
}

/// Runs the call and answers: one object, or NDJSON lines. A request that only loads the
/// model, and one that sets `num_ctx`, first look the model up.
async fn answer(
    state: &ApiState,
    spec: InferSpec,
    kind: Kind,
    stream: bool,
    num_ctx: Option<i64>,
) -> Result<Response, OllamaError> {
    let load_only = spec.messages.is_empty() && spec.prompts.is_empty() && spec.prompt.is_none();
    let mut framer = LineFramer::new(kind, tag_name(&spec.model));
    if load_only || num_ctx.is_some() {
        let cards = lookup(state, &spec.model, Task::Generate).await?;
        if let Some(n) = num_ctx {
            check_num_ctx(n, &cards)?;
        }
    }
    if load_only {
        let loaded = Stats {
            done_reason: "load".into(),
            total_duration: 0,
            load_duration: 0,
            prompt_eval_count: 0,
            prompt_eval_duration: 0,
            eval_count: 0,
            eval_duration: 0,
        };
        return Ok(Json(framer.chunk(String::new(), Some(loaded))).into_response());
    }
    let mut events = state.dispatch(spec);
    if !stream {
        let a = collect_answer(events)
            .await
            .map_err(OllamaError::from_mesh)?;
        let stats = stats(a.finish_reason, &a.usage, a.connect_ms, a.total_ms);
        return Ok(Json(framer.chunk(a.text, Some(stats))).into_response());
    }
    // Wait for the call to start, so refusals get their status code.
    let first = first_event(&mut events)
        .await
        .map_err(OllamaError::from_mesh)?;
    let queued = framer.on_event(first).into();
    let body = frames(framer, events, queued).map(|line| Ok::<_, Infallible>(line.text()));
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(body))
        .expect("static headers are valid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<InferSpec, OllamaError> {
        chat_spec(&serde_json::from_value(body).unwrap())
    }

    fn generate(body: Value) -> Result<InferSpec, OllamaError> {
        generate_spec(&serde_json::from_value(body).unwrap())
    }

    #[test]
    fn a_chat_becomes_a_call_for_the_model_without_its_tag() {
        let s = chat(json!({ "model": "smol:latest", "stream": false,
            "messages": [{ "role": "system", "content": "be brief" }, { "role": "user", "content": "hi" }],
            "options": { "temperature": 0, "num_predict": 24 }, "format": "", "think": false }))
        .unwrap();
        assert_eq!(s.model, "smol");
        assert_eq!(s.expect, Some(Task::Generate));
        let roles: Vec<Role> = s.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User]);
        assert_eq!((s.params.temperature, s.params.max_tokens), (0.0, 24));
        assert!(s.prompt.is_none() && s.prompts.is_empty());
    }

    #[test]
    fn a_generate_is_a_prompt_with_its_system_or_raw() {
        let s = generate(json!({ "model": "smol", "prompt": "hi", "system": "be brief" })).unwrap();
        assert_eq!(s.prompts, ["hi"]);
        assert_eq!(s.system.as_deref(), Some("be brief"));
        assert_eq!(s.params.temperature, 0.8, "Ollama's default");
        let raw =
            generate(json!({ "model": "smol", "prompt": "<|im_start|>", "raw": true })).unwrap();
        assert_eq!(raw.prompt.as_deref(), Some("<|im_start|>"));
        assert!(raw.prompts.is_empty());
        let load = generate(json!({ "model": "smol" })).unwrap();
        assert!(load.prompts.is_empty() && load.prompt.is_none());
    }

    #[test]
    fn what_mesh_cannot_do_is_a_400() {
        let refused = |r: Result<InferSpec, OllamaError>| {
            let e = r.unwrap_err();
            assert_eq!(e.status().as_u16(), 400);
            e.body().error
        };
        let user = json!([{ "role": "user", "content": "hi" }]);
        assert!(refused(chat(
            json!({ "model": "m", "messages": user, "format": "json" })
        ))
        .contains("format"));
        assert!(refused(chat(
            json!({ "model": "m", "messages": user, "think": true })
        ))
        .contains("think"));
        assert!(refused(chat(
            json!({ "model": "m", "messages": user, "tools": [{}] })
        ))
        .contains("tools"));
        assert!(refused(chat(
            json!({ "model": "m", "messages": [{ "role": "tool", "content": "x" }] })
        ))
        .contains("role"));
        assert!(refused(chat(
            json!({ "model": "m", "messages": [{ "role": "user", "content": "x", "images": ["aGk="] }] })
        ))
        .contains("images"));
        assert!(refused(chat(
            json!({ "model": "m", "messages": user, "options": { "temperature": 9 } })
        ))
        .contains("temperature"));
        assert!(refused(generate(
            json!({ "model": "m", "prompt": "p", "context": [1, 2] })
        ))
        .contains("context"));
        assert!(refused(generate(
            json!({ "model": "m", "prompt": "p", "suffix": "s" })
        ))
        .contains("suffix"));
        assert!(refused(generate(
            json!({ "model": "m", "prompt": "p", "template": "t" })
        ))
        .contains("template"));
    }
}
