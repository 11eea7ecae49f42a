//! The OpenAI-compatible gateway on the node's loopback API: `/v1/models`,
//! `/v1/chat/completions` (plain and server-sent events) and `/v1/embeddings`, for any model
//! on the mesh. docs/openai-compat.md lists the fields supported.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mesh_protocol::{
    ChatMessage, ErrorCode, FinishReason, Role, SamplingParams, SignedToken, Task, Usage,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::ApiState;
use crate::dispatch::{CallEvent, CallFailure, FailureClass, InferSpec, Target};

/// Deadline of a gateway call (the OpenAI API has no per-request deadline field).
const GATEWAY_DEADLINE: Duration = Duration::from_secs(300);

/// An error in OpenAI's shape, with the status code a client acts on.
pub struct OpenAiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
}

impl OpenAiError {
    fn bad_request(message: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "bad_request",
            message: message.into(),
        }
    }

    /// Maps a mesh failure to an HTTP status and OpenAI error type.
    fn from_mesh(failure: CallFailure) -> Self {
        let (status, kind, code) = match failure.class() {
            FailureClass::NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            FailureClass::BadRequest => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_request",
            ),
            FailureClass::Unauthorized => {
                (StatusCode::FORBIDDEN, "permission_error", "unauthorized")
            }
            FailureClass::Overloaded => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "overloaded",
            ),
            FailureClass::DeadlineExceeded => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "deadline_exceeded",
            ),
            FailureClass::Network => (StatusCode::BAD_GATEWAY, "api_error", "mesh_unreachable"),
            FailureClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "api_error", "internal"),
        };
        OpenAiError {
            status,
            kind,
            code,
            message: failure.message,
        }
    }

    fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": null, "code": self.code } })
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// With an API key set, the gateway routes need `Authorization: Bearer <key>` (OpenAI's form).
pub(crate) async fn require_api_key(
    State(key): State<Option<std::sync::Arc<str>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = key {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(&*key) {
            return OpenAiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "invalid_request_error",
                code: "invalid_api_key",
                message: "missing or wrong API key (send Authorization: Bearer <key>)".into(),
            }
            .into_response();
        }
    }
    next.run(request).await
}

/// `stop` may be one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<OpenAiMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct OpenAiMessage {
    role: String,
    /// A string, or a list of parts of which the text parts are used.
    content: Value,
}

fn message(m: &OpenAiMessage) -> Result<ChatMessage, OpenAiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(OpenAiError::bad_request(format!(
                "unsupported message role {other:?}"
            )))
        }
    };
    let content = match &m.content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(OpenAiError::bad_request(
                    "only text content parts are supported",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join(""),
        Value::Null => String::new(),
        _ => {
            return Err(OpenAiError::bad_request(
                "message content must be a string or a list of text parts",
            ))
        }
    };
    Ok(ChatMessage { role, content })
}

fn chat_ask(req: &ChatRequest) -> Result<InferSpec, OpenAiError> {
    if req.n.unwrap_or(1) != 1 {
        return Err(OpenAiError::bad_request("only n = 1 is supported"));
    }
    let messages = req
        .messages
        .iter()
        .map(message)
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
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p,
        top_k: None,
        seed: req.seed,
        stop: match &req.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        },
    };
    params
        .validate()
        .map_err(|e| OpenAiError::bad_request(e.message))?;
    Ok(InferSpec {
        target: Target::Any,
        model: req.model.clone(),
        prompts: Vec::new(),
        system: None,
        messages,
        expect: Some(Task::Generate),
        params,
        deadline_ms: GATEWAY_DEADLINE.as_millis() as u64,
        token: None,
    })
}

/// The capability token a client sends in `X-Mesh-Token` (`mtk1.…`), presented on its behalf.
/// Gateway calls run with this node's identity, so the token must name this node's peer id.
fn mesh_token(headers: &axum::http::HeaderMap) -> Result<Option<SignedToken>, OpenAiError> {
    let Some(value) = headers.get("x-mesh-token") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| OpenAiError::bad_request("X-Mesh-Token must be text (mtk1.…)"))?;
    SignedToken::from_text(text)
        .map(Some)
        .map_err(|e| OpenAiError::bad_request(format!("capability token: {e}")))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Complete => "stop",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({ "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens })
}

/// Starts `ask` on the mesh; events arrive on the receiver, the last being `done` or `error`.
fn start(state: &ApiState, ask: InferSpec) -> mpsc::Receiver<CallEvent> {
    state.dispatcher().dispatch(ask)
}
pub(crate) async fn chat_completions(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<ChatRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return OpenAiError::bad_request(e.body_text()).into_response(),
    };
    let ask = match chat_ask(&req).and_then(|ask| {
        Ok(InferSpec {
            token: mesh_token(&headers)?,
            ..ask
        })
    }) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let events = start(&state, ask);
    if req.stream {
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return stream_chat(id, req.model, events, include_usage).await;
    }
    match collect(events).await {
        Ok(answer) => Json(json!({
            "id": id, "object": "chat.completion", "created": unix_now(), "model": req.model,
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": answer.text },
                          "finish_reason": finish_reason(answer.finish_reason) }],
            "usage": usage_json(&answer.usage),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// A whole answer, for the routes that do not stream.
struct Answer {
    text: String,
    vectors: Vec<Vec<f32>>,
    finish_reason: FinishReason,
    usage: Usage,
}

/// Reads a call's events to the end.
async fn collect(mut events: mpsc::Receiver<CallEvent>) -> Result<Answer, OpenAiError> {
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

/// Streams chunks as server-sent events. Errors before the first token are plain HTTP errors;
/// after it, the stream carries an error object and ends.
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
    let created = unix_now();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
    };
    let (tx, rx) = mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| Event::default().data(v.to_string());
        let _ = tx
            .send(Ok(send(chunk(
                json!({ "role": "assistant", "content": "" }),
                None,
            ))))
            .await;
        let mut next = Some(first);
        loop {
            let event = match next.take() {
                Some(e) => e,
                None => match events.recv().await {
                    Some(e) => e,
                    None => break,
                },
            };
            let out = match event {
                CallEvent::Delta { text } => send(chunk(json!({ "content": text }), None)),
                CallEvent::Done {
                    finish_reason: f,
                    usage,
                    ..
                } => {
                    let mut last = chunk(json!({}), Some(finish_reason(f)));
                    if tx.send(Ok(send(last.take()))).await.is_err() {
                        return;
                    }
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage_json(&usage);
                        let _ = tx.send(Ok(send(u))).await;
                    }
                    break;
                }
                CallEvent::Error(failure) => {
                    let _ = tx
                        .send(Ok(send(OpenAiError::from_mesh(failure).body())))
                        .await;
                    break;
                }
                _ => continue,
            };
            // A client that hung up drops the receiver: dropping `events` then cancels the call.
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Sse::new(stream).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    input: EmbeddingInput,
    #[serde(default)]
    encoding_format: Option<String>,
}

pub(crate) async fn embeddings(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<EmbeddingsRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return OpenAiError::bad_request(e.body_text()).into_response(),
    };
    let token = match mesh_token(&headers) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let as_base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return OpenAiError::bad_request(format!(
                "encoding_format must be \"float\" or \"base64\", got {other:?}"
            ))
            .into_response()
        }
    };
    let texts = match req.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
    };
    let ask = InferSpec {
        target: Target::Any,
        model: req.model.clone(),
        prompts: texts,
        system: None,
        messages: Vec::new(),
        expect: Some(Task::Embed),
        params: SamplingParams::default(),
        deadline_ms: GATEWAY_DEADLINE.as_millis() as u64,
        token,
    };
    match collect(start(&state, ask)).await {
        Ok(answer) => {
            let data: Vec<Value> = answer
                .vectors
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let embedding = if as_base64 {
                        json!(encode_base64(v))
                    } else {
                        json!(v)
                    };
                    json!({ "object": "embedding", "index": i, "embedding": embedding })
                })
                .collect();
            let tokens = answer.usage.prompt_tokens;
            Json(json!({
                "object": "list", "data": data, "model": req.model,
                "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
            }))
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// OpenAI's base64 form: the little-endian f32 bytes of the vector.
fn encode_base64(v: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `GET /v1/models`: this node's models and those in the catalogs of the peers it knows.
pub(crate) async fn models(State(state): State<ApiState>) -> Response {
    let data: Vec<Value> = crate::directory::list(&state.client, Some(&state.server))
        .await
        .into_iter()
        .map(|l| json!({ "id": l.model, "object": "model", "created": 0, "owned_by": l.peer_id }))
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}
