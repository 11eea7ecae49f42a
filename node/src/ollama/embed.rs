//! `POST /api/embed` (texts in, `embeddings` out, with timings) and the older
//! `POST /api/embeddings` (one `prompt`, one `embedding`): mesh calls for any node hosting
//! the embedding model.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use mesh_protocol::Task;

use super::error::{OllamaError, OllamaJson};
use super::options::{model_name, tag_name};
use super::schema::{EmbedRequest, EmbedResponse, EmbeddingResponse, EmbeddingsRequest};
use super::token;
use crate::api::state::ApiState;
use crate::dispatch::InferSpec;
use crate::openai::chat::{collect_answer, Answer};
use crate::openai::spec_for_any;

pub(super) async fn embed(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OllamaJson(req): OllamaJson<EmbedRequest>,
) -> Result<Json<EmbedResponse>, OllamaError> {
    if req.dimensions.is_some() {
        return Err(OllamaError::bad_request(
            "dimensions is not supported: mesh returns the model's own vectors",
        ));
    }
    let texts = req.input.into_vec();
    let answer = run(&state, &headers, &req.model, texts).await?;
    Ok(Json(embed_body(&req.model, answer)))
}

pub(super) async fn embeddings(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OllamaJson(req): OllamaJson<EmbeddingsRequest>,
) -> Result<Json<EmbeddingResponse>, OllamaError> {
    let answer = run(&state, &headers, &req.model, vec![req.prompt]).await?;
    Ok(Json(EmbeddingResponse {
        embedding: answer.vectors.into_iter().next().unwrap_or_default(),
    }))
}

async fn run(
    state: &ApiState,
    headers: &HeaderMap,
    model: &str,
    texts: Vec<String>,
) -> Result<Answer, OllamaError> {
    let spec = InferSpec {
        prompts: texts,
        token: token(headers)?,
        ..spec_for_any(model_name(model), Task::Embed)
    };
    collect_answer(state.dispatch(spec))
        .await
        .map_err(OllamaError::from_mesh)
}

fn embed_body(model: &str, answer: Answer) -> EmbedResponse {
    EmbedResponse {
        model: tag_name(model_name(model)),
        embeddings: answer.vectors,
        total_duration: super::lines::ns(answer.total_ms),
        load_duration: super::lines::ns(answer.connect_ms),
        prompt_eval_count: answer.usage.prompt_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::{FinishReason, Usage};
    use serde_json::json;

    #[test]
    fn an_embed_answer_has_ollamas_fields_in_nanoseconds() {
        let answer = Answer {
            text: String::new(),
            vectors: vec![vec![0.5, -0.5]],
            finish_reason: FinishReason::Complete,
            usage: Usage {
                prompt_tokens: 6,
                ..Usage::default()
            },
            connect_ms: 2,
            total_ms: 30,
        };
        assert_eq!(
            serde_json::to_value(embed_body("minilm", answer)).unwrap(),
            json!({ "model": "minilm:latest", "embeddings": [[0.5, -0.5]],
                    "total_duration": 30_000_000u64, "load_duration": 2_000_000u64,
                    "prompt_eval_count": 6 })
        );
    }
}
