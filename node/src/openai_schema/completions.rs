//! OpenAI's legacy text completions (`POST /v1/completions`) as the gateway reads and writes
//! them: a raw prompt in, its continuation out (whole, or as `text_completion` chunks).
//! [`super::CompletionRequest`] is the other direction, which the upstream engine writes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Stop, StreamOptions, Usage};

/// `POST /v1/completions`, as the gateway reads it. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TextCompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub logprobs: Option<u32>,
}

/// `prompt`: a string, or a list of them (of which mesh takes exactly one), or token ids
/// (kept so the gateway refuses them with a clear message).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
    Other(Value),
}

impl Prompt {
    /// The one text prompt, or why there is none.
    pub fn single(&self) -> Result<&str, String> {
        match self {
            Prompt::One(p) => Ok(p),
            Prompt::Many(v) if v.len() == 1 => Ok(&v[0]),
            Prompt::Many(v) => Err(format!("prompt takes one string, got {}", v.len())),
            Prompt::Other(_) => Err("prompt must be a string (token ids are not supported)".into()),
        }
    }
}

/// A whole answer, and (with one choice and no usage, or no choice and the usage) each event
/// of a streamed one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCompletion {
    pub choices: Vec<TextChoice>,
    pub created: u64,
    pub id: String,
    pub model: String,
    /// `text_completion`.
    pub object: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextChoice {
    /// `null` until the last chunk.
    pub finish_reason: Option<String>,
    pub index: u32,
    /// Always `null`: mesh reports no log probabilities.
    pub logprobs: Option<Value>,
    pub text: String,
}
