//! Ollama's JSON shapes, as the node reads and writes them (Ollama's `api/types.go`): the
//! requests of `/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings` and `/api/show`,
//! their `options`, and the answers, chunks and listings.
//!
//! Requests accept unknown fields (ignored, as Ollama's clients send many). Fields mesh does
//! not support are read so that the handlers refuse them with a clear message.

use mesh_protocol::Role;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::openai_schema::{EmbeddingInput, Stop};

/// `POST /api/chat`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Absent means `true`, as in Ollama.
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Option<Options>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub think: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub images: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
}

/// `POST /api/generate`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerateRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    /// No chat template: the prompt goes to the model as it is.
    #[serde(default)]
    pub raw: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub context: Option<Vec<Value>>,
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub images: Option<Vec<Value>>,
    #[serde(default)]
    pub options: Option<Options>,
    #[serde(default)]
    pub think: Option<Value>,
}

/// The `options` of a request that mesh maps; the rest of Ollama's (`num_gpu`, `mirostat`,
/// penalties, …) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Options {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub num_predict: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub num_ctx: Option<i64>,
}

/// `POST /api/embed`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EmbedRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub options: Option<Options>,
}

/// `POST /api/embeddings`, the older form: one prompt, one vector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub options: Option<Options>,
}

/// `POST /api/show`: the model, as `model` (or the older `name`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ShowRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// One line of a streamed `/api/chat` or `/api/generate` answer, or the whole answer: chat's
/// carry `message`, generate's `response`; the last (`done: true`) carries the statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub model: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<AnswerMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    pub done: bool,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerMessage {
    pub role: Role,
    pub content: String,
}

/// The statistics of a finished answer; durations in nanoseconds, as Ollama reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// `stop`, `length`, or `load` for a request that only loads the model.
    pub done_reason: String,
    pub total_duration: u64,
    pub load_duration: u64,
    pub prompt_eval_count: u32,
    pub prompt_eval_duration: u64,
    pub eval_count: u32,
    pub eval_duration: u64,
}

/// `POST /api/embed`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbedResponse {
    pub model: String,
    pub embeddings: Vec<Vec<f32>>,
    pub total_duration: u64,
    pub load_duration: u64,
    pub prompt_eval_count: u32,
}

/// `POST /api/embeddings`' answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingResponse {
    pub embedding: Vec<f32>,
}

/// `GET /api/tags`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TagList {
    pub models: Vec<Tag>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tag {
    pub name: String,
    pub model: String,
    pub modified_at: String,
    /// Bytes of the weights; 0: the card does not say.
    pub size: u64,
    pub digest: String,
    pub details: Details,
}

/// `GET /api/ps`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunningList {
    pub models: Vec<Running>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Running {
    pub name: String,
    pub model: String,
    pub size: u64,
    pub digest: String,
    pub details: Details,
    pub expires_at: String,
    pub size_vram: u64,
    pub context_length: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Details {
    pub parent_model: String,
    pub format: String,
    pub family: String,
    pub families: Vec<String>,
    pub parameter_size: String,
    pub quantization_level: String,
}

/// `POST /api/show`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShowResponse {
    pub modelfile: String,
    pub parameters: String,
    pub template: String,
    pub license: String,
    pub details: Details,
    pub model_info: serde_json::Map<String, Value>,
    pub capabilities: Vec<&'static str>,
    pub modified_at: String,
}

/// `GET /api/version`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Version {
    pub version: &'static str,
}

/// Ollama's error body, `{"error": "..."}`: an answer's, or the last line of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
