//! OpenAI's JSON shapes, typed, for both directions: the gateway ([`crate::openai`]) reads
//! requests and writes answers in them, and [`crate::engine::upstream`] writes requests and
//! reads answers in them from an OpenAI-compatible server. It is a module of its own, beside
//! both, so that an engine never depends on the HTTP gateway.
//!
//! Only what mesh uses is typed. Requests accept unknown fields (ignored, as OpenAI's clients
//! send many), and fields an answer may lack default, so a server that sends less still parses.
//! The fields of the answers the gateway writes are declared in alphabetical order: that is the
//! order serde_json wrote them in when these bodies were `json!` maps, so clients see the same
//! bytes.
//!
//! The legacy text completions are in `completions`, the Responses API in `responses`.

mod completions;
mod responses;

pub use completions::{Prompt, TextChoice, TextCompletion, TextCompletionRequest};
pub use responses::{
    IncompleteDetails, InputItem, InputTokensDetails, OutputMessage, OutputText,
    OutputTokensDetails, ResponseError, ResponseEventBody, ResponseObject, ResponseStreamEvent,
    ResponsesInput, ResponsesRequest, ResponsesUsage,
};

use mesh_protocol::{ChatMessage, FinishReason, Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /chat/completions`. The gateway reads it; the upstream engine writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Not OpenAI's, but llama.cpp's and vLLM's: sent upstream when a mesh call sets it. The
    /// gateway does not read it (an OpenAI client's `top_k` is ignored like any unknown field).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
}

/// `POST /completions` (a bare prompt, no chat template), which only the upstream engine writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop` may be one string or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// One message of a chat request. The role stays text here so that the gateway can refuse an
/// unsupported one with its own message ([`Message::to_mesh`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content: a string, or a list of parts of which mesh takes the text ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
    /// Any other JSON: kept so the gateway refuses it with a clear message, not a parse error.
    Other(Value),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Message {
    /// The mesh message, with `Role`'s own names; OpenAI's `developer` is a system message.
    pub fn to_mesh(&self) -> Result<ChatMessage, String> {
        let name = match self.role.as_str() {
            "developer" => "system",
            other => other,
        };
        let role = Role::deserialize(
            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name),
        )
        .map_err(|_| format!("unsupported message role {:?}", self.role))?;
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    _ => Err("only text content parts are supported".to_string()),
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            Some(Content::Other(_)) => {
                return Err("message content must be a string or a list of text parts".into())
            }
        };
        Ok(ChatMessage { role, content })
    }
}

impl From<&ChatMessage> for Message {
    fn from(m: &ChatMessage) -> Message {
        Message {
            role: role_name(m.role),
            content: Some(Content::Text(m.content.clone())),
        }
    }
}

/// A role as `Role`'s serde names it (`system`, `user`, `assistant`), which are OpenAI's.
pub fn role_name(role: Role) -> String {
    match serde_json::to_value(role) {
        Ok(Value::String(name)) => name,
        _ => unreachable!("Role serializes as its name"),
    }
}

/// OpenAI's `finish_reason` for a mesh one: `length`, else `stop`.
pub fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Complete => "stop",
    }
}

/// The mesh reason for OpenAI's `finish_reason`: `length`, or a stop of some kind.
pub fn finish_reason_from(name: &str) -> FinishReason {
    match name {
        "length" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

/// Token counts of a chat answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub completion_tokens: u32,
    pub prompt_tokens: u32,
    pub total_tokens: u32,
    /// OpenAI's `prompt_tokens_details`: here, the prompt tokens the prompt cache supplied.
    /// Sent only when some were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// How the prompt's tokens were obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<&mesh_protocol::Usage> for Usage {
    fn from(u: &mesh_protocol::Usage) -> Usage {
        let mut usage = Usage::new(u.prompt_tokens, u.completion_tokens);
        if u.cached_tokens > 0 {
            usage.prompt_tokens_details = Some(PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            });
        }
        usage
    }
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage {
            completion_tokens,
            prompt_tokens,
            // Both come from the serving node: a hostile one's figures saturate.
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
        }
    }
}

/// A whole chat answer (`stream: false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub choices: Vec<Choice>,
    pub created: u64,
    pub id: String,
    pub model: String,
    /// `chat.completion`.
    pub object: String,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub finish_reason: Option<String>,
    pub index: u32,
    pub message: AnswerMessage,
}

/// The assistant's message in a whole answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerMessage {
    pub content: String,
    pub role: Role,
}

/// One event of a streamed chat answer. The gateway writes them; the upstream engine reads
/// them, also from `/completions` streams, whose choices carry `text` instead of `delta`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatCompletionChunk {
    pub choices: Vec<ChunkChoice>,
    pub created: u64,
    pub id: String,
    pub model: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Only in the last chunk, and only when asked for (`stream_options.include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChunkChoice {
    pub delta: Delta,
    /// Always written, as `null` until the last chunk.
    pub finish_reason: Option<String>,
    pub index: u32,
    /// What a `/completions` stream sends instead of `delta`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl ChunkChoice {
    /// The text this chunk adds, from either kind of stream.
    pub fn text(&self) -> &str {
        self.delta
            .content
            .as_deref()
            .or(self.text.as_deref())
            .unwrap_or("")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// What one event of an upstream's stream holds: a chunk, or an error the server reports
/// in the stream (as llama.cpp does once it has started answering).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StreamEvent {
    Failed { error: Value },
    Chunk(ChatCompletionChunk),
}

/// `POST /embeddings`. The gateway reads it; the upstream engine writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
}

/// `input` may be one string or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

impl EmbeddingInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            EmbeddingInput::One(s) => vec![s],
            EmbeddingInput::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsResponse {
    pub data: Vec<Embedding>,
    #[serde(default)]
    pub model: String,
    /// `list`.
    #[serde(default)]
    pub object: String,
    #[serde(default)]
    pub usage: EmbeddingsUsage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    pub embedding: Vector,
    #[serde(default)]
    pub index: usize,
    /// `embedding`.
    #[serde(default)]
    pub object: String,
}

/// A vector as numbers, or (`encoding_format: base64`) as the base64 of its little-endian
/// f32 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

impl Vector {
    /// OpenAI's base64 form: the little-endian f32 bytes of the vector.
    pub fn base64(v: &[f32]) -> Vector {
        use base64::Engine as _;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EmbeddingsUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

/// `GET /models`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelList {
    pub data: Vec<ModelObject>,
    /// `list`.
    pub object: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelObject {
    pub created: u64,
    pub id: String,
    /// `model`.
    pub object: String,
    pub owned_by: String,
}

/// OpenAI's error body: `{"error": {"code", "message", "param", "type"}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
    /// Always `null`: mesh does not say which parameter was wrong.
    pub param: Option<String>,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[cfg(test)]
mod tests;
