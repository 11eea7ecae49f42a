//! The OpenAI-compatible gateway on the node's loopback API: `/v1/models`,
//! `/v1/chat/completions`, `/v1/completions` and `/v1/responses` (each plain and as
//! server-sent events) and `/v1/embeddings`, for any model on the mesh.
//! docs/openai-compat.md lists the fields supported.
//!
//! - [`schema`]: OpenAI's JSON shapes, shared with [`crate::engine::upstream`], which speaks
//!   them in the other direction.
//! - [`error`]: errors in OpenAI's shape, the API key, the JSON body extractor.
//! - `chat`: chat completions, whole and streamed.
//! - `chunks`: the server-sent events of a streamed answer, from the call's events.
//! - `completions`: text completions of a raw prompt, whole and streamed.
//! - `responses` and `response_events`: the Responses API, whole and as its event sequence.
//! - `embeddings`: embeddings, as numbers or base64.
//! - [`stream`]: what every streamed answer shares, Ollama's too ([`crate::ollama`]).
//!
//! Every route makes an [`InferSpec`] for `any` node hosting the model and runs it with
//! [`crate::dispatch::Dispatcher::dispatch`], as `mesh infer any` does.

pub(crate) mod chat;
mod chunks;
mod completions;
mod embeddings;
pub mod error;
mod response_events;
mod responses;
pub(crate) mod stream;
pub use crate::openai_schema as schema;

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use mesh_protocol::{SamplingParams, SignedToken, Task};

pub use error::OpenAiError;
use schema::{ModelList, ModelObject};

use crate::api::state::ApiState;
use crate::dispatch::{InferSpec, Target};

/// Deadline of a gateway call (the OpenAI API has no per-request deadline field).
const GATEWAY_DEADLINE: Duration = Duration::from_secs(300);

/// The gateway's routes. The API key, if any, is checked in front of the whole API
/// ([`crate::api::guard`]).
pub(crate) fn router() -> Router<ApiState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/embeddings", post(embeddings::embeddings))
}

/// `GET /v1/models`: this node's models and those in the catalogs of the peers it knows.
async fn models(State(state): State<ApiState>) -> Json<ModelList> {
    let data = crate::directory::callable(&state.client, Some(&state.server))
        .await
        .into_iter()
        .map(|l| ModelObject {
            created: 0,
            id: l.model,
            object: "model".into(),
            owned_by: l.peer_id,
        })
        .collect();
    Json(ModelList {
        data,
        object: "list".into(),
    })
}

/// A call of `task` on `model`, on any node that hosts it, with the gateway's deadline.
pub(crate) fn spec_for_any(model: &str, task: Task) -> InferSpec {
    InferSpec {
        target: Target::Any,
        model: model.to_string(),
        weights: None,
        prompts: Vec::new(),
        system: None,
        messages: Vec::new(),
        prompt: None,
        expect: Some(task),
        params: SamplingParams::default(),
        deadline_ms: GATEWAY_DEADLINE.as_millis() as u64,
        token: None,
    }
}

/// The capability token a client sends in `X-Mesh-Token` (`mtk1.…`), presented on its behalf.
/// Gateway calls run with this node's identity, so the token must name this node's peer id.
fn mesh_token(headers: &HeaderMap) -> Result<Option<SignedToken>, OpenAiError> {
    mesh_token_header(headers).map_err(OpenAiError::bad_request)
}

/// The `X-Mesh-Token` header, parsed; the error is the client's (a 400 in every API).
pub(crate) fn mesh_token_header(headers: &HeaderMap) -> Result<Option<SignedToken>, String> {
    let Some(value) = headers.get("x-mesh-token") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| "X-Mesh-Token must be text (mtk1.…)".to_string())?;
    SignedToken::from_text(text.trim())
        .map(Some)
        .map_err(|e| format!("capability token: {e}"))
}
