//! `/mesh/infer/1`: the request a client sends and the frames a node streams back.
//!
//! A stream carries exactly one [`InferRequest`], then [`InferResponse`] frames:
//! `started`, then `delta`s (generation) or one `embeddings`, then `done`; or an `error`
//! at any point, which ends the stream.

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::receipt::SignedReceipt;

/// Most chat messages or embedding inputs one request may carry.
pub const MAX_INPUTS: usize = 256;
/// Most stop sequences one request may carry.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Hard ceiling on `max_tokens`; a node may lower it to its model's context.
pub const MAX_TOKENS_LIMIT: u32 = 32_768;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    /// The model name as the node announces it.
    pub model: String,
    pub input: Input,
    /// Sampling parameters; ignored for embeddings.
    #[serde(default)]
    pub params: SamplingParams,
    /// Milliseconds the caller is willing to wait for the whole answer; the node may cap it.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// A capability token, opaque to this crate (checked by the serving node).
    #[serde(default, with = "serde_bytes")]
    pub token: Option<Vec<u8>>,
    /// Carry on a call another node began and could not finish: the tokens it sampled
    /// already, which this node takes as given before it samples on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// The part of an answer another node already gave, for a call resumed elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// sha256 of the weights the tokens came from: the resuming node's must be the same, since
    /// token ids mean nothing under another tokenizer.
    pub weights_sha256: String,
    /// The ids sampled so far, in order.
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Chat messages, rendered with the model's chat template by the node.
    Chat { messages: Vec<ChatMessage> },
    /// A raw prompt, fed to the model without a template.
    Completion { prompt: String },
    /// Texts to embed, one vector each.
    Embed { texts: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_tokens: u32,
    /// 0 means greedy decoding.
    pub temperature: f32,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 256,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks every field's range; both the client and the serving node call this.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |m: String| Err(WireError::bad_request(m));
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_LIMIT {
            return bad(format!(
                "max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {}",
                self.max_tokens
            ));
        }
        if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
            return bad(format!(
                "temperature must be a number between 0 and 2, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            if !p.is_finite() || p <= 0.0 || p > 1.0 {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if self.stop.len() > MAX_STOP_SEQUENCES || self.stop.iter().any(|s| s.is_empty()) {
            return bad(format!(
                "stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences"
            ));
        }
        Ok(())
    }
}

impl InferRequest {
    /// Checks the request's shape without knowing the model (the node checks the rest).
    pub fn validate(&self) -> Result<(), WireError> {
        crate::ids::validate_model_name(&self.model).map_err(WireError::bad_request)?;
        if self.deadline_ms == Some(0) {
            return Err(WireError::bad_request("deadline_ms must be at least 1"));
        }
        if let Some(r) = &self.resume {
            if matches!(self.input, Input::Embed { .. }) {
                return Err(WireError::bad_request(
                    "an embedding call cannot be resumed",
                ));
            }
            if r.tokens.len() as u64 >= u64::from(self.params.max_tokens) {
                return Err(WireError::bad_request(format!(
                    "a resumed call has {} tokens already, as many as max_tokens ({})",
                    r.tokens.len(),
                    self.params.max_tokens
                )));
            }
        }
        match &self.input {
            Input::Chat { messages } => {
                if messages.is_empty() || messages.len() > MAX_INPUTS {
                    return Err(WireError::bad_request(format!(
                        "chat needs 1 to {MAX_INPUTS} messages, got {}",
                        messages.len()
                    )));
                }
                if messages.iter().all(|m| m.content.trim().is_empty()) {
                    return Err(WireError::bad_request("the prompt is empty"));
                }
                self.params.validate()
            }
            Input::Completion { prompt } => {
                if prompt.trim().is_empty() {
                    return Err(WireError::bad_request("the prompt is empty"));
                }
                self.params.validate()
            }
            Input::Embed { texts } => {
                if texts.is_empty() || texts.len() > MAX_INPUTS {
                    return Err(WireError::bad_request(format!(
                        "embeddings need 1 to {MAX_INPUTS} inputs, got {}",
                        texts.len()
                    )));
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InferResponse {
    /// The request was accepted and compute started.
    Started {
        model: String,
        /// Milliseconds the request waited for a free slot.
        queue_ms: u64,
    },
    /// Generated text since the previous delta: always whole UTF-8 characters.
    Delta {
        text: String,
        /// The ids of the tokens sampled since the last delta (their text is `text`, or part of
        /// it is still held back), so a caller can resume the call elsewhere.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tokens: Vec<u32>,
    },
    /// One vector per input text, in input order.
    Embeddings { vectors: Vec<Vec<f32>> },
    /// The call finished.
    Done {
        finish_reason: FinishReason,
        usage: Usage,
        /// The serving node's signed receipt for this call. Absent from nodes that predate
        /// receipts (and then not encoded at all, so their frames are unchanged).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt: Option<SignedReceipt>,
        /// For a split model: the stages the call ran on.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stages: Vec<crate::stage::StageUse>,
    },
    /// The call failed; no more frames follow.
    Error(WireError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-turn or end-of-text token.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// Embeddings finished.
    Complete,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens taken from the provider's prompt cache rather than computed (absent
    /// from older nodes' frames, read as 0; not sent when 0, so such frames are unchanged).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u32,
    /// Milliseconds from the start of compute to the first delta.
    pub time_to_first_token_ms: u64,
    /// Milliseconds of compute in all.
    pub total_ms: u64,
}
