//! Ollama's API on the node's loopback API, for any model on the mesh: the routes local tools
//! built for Ollama call (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
//! `/api/tags`, `/api/ps`, `/api/show`, `/api/version`). docs/openai-compat.md lists what is
//! supported, ignored and refused; a client that expects Ollama's port runs the node with
//! `--api 127.0.0.1:11434`.
//!
//! - [`schema`]: Ollama's JSON shapes.
//! - `options`: model names with and without `:latest`, and `options` as sampling parameters.
//! - `lines`: the NDJSON lines of a streamed answer and their timings, from a call's events.
//! - `generate`: chat and generate, streamed or whole.
//! - `embed`: embeddings, new and old.
//! - `models`: tags, ps, show, version.
//! - [`error`]: errors in Ollama's shape (`{"error": "..."}`), statuses from
//!   [`crate::dispatch::FailureClass::http_status`].
//!
//! Every call goes the way of the OpenAI gateway's ([`crate::openai`]): an [`InferSpec`] for
//! `any` node, run by [`crate::dispatch::Dispatcher::dispatch`], with the client's
//! `X-Mesh-Token` and behind the same API key.

mod embed;
pub mod error;
mod generate;
mod lines;
mod models;
mod options;
pub mod schema;

use axum::http::HeaderMap;
use axum::routing::{delete, get, post};
use axum::Router;
use mesh_protocol::{ErrorCode, ModelCard, SignedToken, Task};

pub use error::OllamaError;

use crate::api::state::ApiState;
use crate::dispatch::{build_request, CallFailure, InferSpec, Target};

/// What Ollama answers on `GET /`, which its clients and scripts use as a liveness check. The
/// node's `/` answers it to anything but a browser (which gets the console, [`crate::api`]).
pub const ROOT_ANSWER: &str = "Ollama is running";

/// Ollama's routes (the API key, like every other check of the request's head, is the
/// API's guard's, which answers in Ollama's shape here).
pub(crate) fn router() -> Router<ApiState> {
    Router::new()
        .route("/api/version", get(models::version))
        .route("/api/tags", get(models::tags))
        .route("/api/ps", get(models::ps))
        .route("/api/show", post(models::show))
        .route("/api/chat", post(generate::chat))
        .route("/api/generate", post(generate::generate))
        .route("/api/embed", post(embed::embed))
        .route("/api/embeddings", post(embed::embeddings))
        .route("/api/pull", post(models::refused))
        .route("/api/push", post(models::refused))
        .route("/api/create", post(models::refused))
        .route("/api/copy", post(models::refused))
        .route("/api/delete", delete(models::refused))
}

/// The client's `X-Mesh-Token`, as the OpenAI gateway reads it.
fn token(headers: &HeaderMap) -> Result<Option<SignedToken>, OllamaError> {
    crate::openai::mesh_token_header(headers).map_err(OllamaError::bad_request)
}

/// The cards of the nodes that host `model` (404 when none does), checked to be of `task`
/// (a 400 otherwise, with the message a call would get).
async fn lookup(state: &ApiState, model: &str, task: Task) -> Result<Vec<ModelCard>, OllamaError> {
    let found =
        crate::dispatch::candidates(&state.dispatcher(), Target::Any, model, &Default::default())
            .await
            .map_err(OllamaError::from_mesh)?;
    let cards: Vec<ModelCard> = found.into_iter().map(|c| c.card).collect();
    let Some(first) = cards.first() else {
        return Err(OllamaError::from_mesh(CallFailure::local(
            ErrorCode::UnknownModel,
            format!("model {model:?} is not on the mesh"),
        )));
    };
    if first.task != task {
        // The refusal build_request makes for a call of the wrong kind.
        let probe = InferSpec {
            expect: Some(task),
            prompts: vec!["x".into()],
            ..crate::openai::spec_for_any(model, task)
        };
        if let Err(e) = build_request(&probe, first) {
            return Err(OllamaError::from_mesh(CallFailure::local(
                e.code, e.message,
            )));
        }
    }
    Ok(cards)
}
