//! `POST /v1/embeddings`: texts to embed become a mesh call for any node hosting the model;
//! the vectors come back as numbers, or as base64 when the client asks (the Python client does).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use mesh_protocol::Task;

use super::chat::collect;
use super::error::{OpenAiError, OpenAiJson};
use super::schema::{Embedding, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage, Vector};
use super::{mesh_token, spec_for_any};
use crate::api::state::ApiState;
use crate::dispatch::InferSpec;

/// How the vectors of an answer are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

impl Encoding {
    fn parse(format: Option<&str>) -> Result<Encoding, OpenAiError> {
        match format {
            None | Some("float") => Ok(Encoding::Float),
            Some("base64") => Ok(Encoding::Base64),
            Some(other) => Err(OpenAiError::bad_request(format!(
                "encoding_format must be \"float\" or \"base64\", got {other:?}"
            ))),
        }
    }

    fn vector(self, v: Vec<f32>) -> Vector {
        match self {
            Encoding::Float => Vector::Float(v),
            Encoding::Base64 => Vector::base64(&v),
        }
    }
}

pub(super) async fn embeddings(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OpenAiJson(req): OpenAiJson<EmbeddingsRequest>,
) -> Result<Json<EmbeddingsResponse>, OpenAiError> {
    let token = mesh_token(&headers)?;
    let encoding = Encoding::parse(req.encoding_format.as_deref())?;
    let spec = InferSpec {
        prompts: req.input.into_vec(),
        token,
        ..spec_for_any(&req.model, Task::Embed)
    };
    let answer = collect(state.dispatch(spec)).await?;
    let tokens = answer.usage.prompt_tokens;
    Ok(Json(answer_body(
        req.model,
        answer.vectors,
        encoding,
        tokens,
    )))
}

fn answer_body(
    model: String,
    vectors: Vec<Vec<f32>>,
    encoding: Encoding,
    prompt_tokens: u32,
) -> EmbeddingsResponse {
    EmbeddingsResponse {
        data: vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| Embedding {
                embedding: encoding.vector(v),
                index,
                object: "embedding".into(),
            })
            .collect(),
        model,
        object: "list".into(),
        usage: EmbeddingsUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    #[test]
    fn the_encoding_format_is_float_or_base64() {
        assert_eq!(Encoding::parse(None).unwrap(), Encoding::Float);
        assert_eq!(Encoding::parse(Some("float")).unwrap(), Encoding::Float);
        assert_eq!(Encoding::parse(Some("base64")).unwrap(), Encoding::Base64);
        let err = Encoding::parse(Some("int8")).unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        assert_eq!(
            err.body().error.message,
            r#"encoding_format must be "float" or "base64", got "int8""#
        );
    }

    #[test]
    fn base64_is_the_little_endian_f32_bytes() {
        let v = [1.0f32, -0.5, 0.25];
        let Vector::Base64(text) = Vector::base64(&v) else {
            panic!("not base64")
        };
        // 1.0 = 0x3f800000, -0.5 = 0xbf000000, 0.25 = 0x3e800000, each little-endian.
        assert_eq!(text, "AACAPwAAAL8AAIA+");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&text)
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(back, v);
    }

    #[test]
    fn an_answer_has_openais_shape_in_either_encoding() {
        let vectors = vec![vec![0.5f32, -1.0], vec![0.25, 2.0]];
        let floats = answer_body("minilm".into(), vectors.clone(), Encoding::Float, 7);
        // The bytes the `json!` body this replaced wrote (keys in serde_json's sorted order).
        let old = json!({
            "object": "list", "model": "minilm",
            "data": [
                { "object": "embedding", "index": 0, "embedding": [0.5, -1.0] },
                { "object": "embedding", "index": 1, "embedding": [0.25, 2.0] },
            ],
            "usage": { "prompt_tokens": 7, "total_tokens": 7 },
        });
        assert_eq!(serde_json::to_string(&floats).unwrap(), old.to_string());
        let b64 = serde_json::to_value(answer_body("minilm".into(), vectors, Encoding::Base64, 7))
            .unwrap();
        assert_eq!(b64["data"][1]["embedding"], "AACAPgAAAEA=");
        assert_eq!(b64["data"][1]["index"], 1);
    }
}
