//! OpenAI's Responses API (`POST /v1/responses`) as the gateway reads and writes it: text
//! input (a string, or messages of text parts) and one assistant message of `output_text`,
//! whole or as the API's stream of typed events ([`ResponseStreamEvent`]).

use mesh_protocol::{ChatMessage, Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Content, Message};

/// `POST /v1/responses`, as the gateway reads it. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: ResponsesInput,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
}

/// `input`: a string (one user message) or a list of input items.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ResponsesInput {
    Text(String),
    Items(Vec<InputItem>),
}

/// One input item: a message (`type` absent or `message`) with a role and text content.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InputItem {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub content: Option<Content>,
}

impl ResponsesInput {
    /// The conversation, with `Role`'s names; content parts of type `input_text`,
    /// `output_text` or `text`.
    pub fn to_mesh(&self) -> Result<Vec<ChatMessage>, String> {
        let items = match self {
            ResponsesInput::Text(text) => {
                return Ok(vec![ChatMessage {
                    role: Role::User,
                    content: text.clone(),
                }])
            }
            ResponsesInput::Items(items) => items,
        };
        items
            .iter()
            .map(|item| {
                match item.kind.as_deref() {
                    None | Some("message") => {}
                    Some(other) => {
                        return Err(format!("input items of type {other:?} are not supported"))
                    }
                }
                let content = match &item.content {
                    Some(Content::Parts(parts)) => Some(Content::Parts(
                        parts
                            .iter()
                            .map(|p| match p.kind.as_str() {
                                "input_text" | "output_text" | "text" => {
                                    let mut p = p.clone();
                                    p.kind = "text".into();
                                    Ok(p)
                                }
                                other => Err(format!(
                                    "only text content is supported, got a part of type {other:?}"
                                )),
                            })
                            .collect::<Result<_, _>>()?,
                    )),
                    other => other.clone(),
                };
                Message {
                    role: item.role.clone().unwrap_or_else(|| "user".into()),
                    content,
                }
                .to_mesh()
            })
            .collect()
    }
}

/// A response object: the whole answer, and the `response` of the stream's lifecycle events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseObject {
    pub id: String,
    /// `response`.
    pub object: &'static str,
    pub created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: &'static str,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub model: String,
    pub output: Vec<OutputMessage>,
    pub parallel_tool_calls: bool,
    pub temperature: Option<f32>,
    pub tool_choice: &'static str,
    pub tools: Vec<Value>,
    pub top_p: Option<f32>,
    pub metadata: serde_json::Map<String, Value>,
    pub usage: Option<ResponsesUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseError {
    pub code: &'static str,
    pub message: String,
}

/// Why a response is `incomplete`: `max_output_tokens`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncompleteDetails {
    pub reason: &'static str,
}

/// The assistant's message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputMessage {
    /// `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub status: &'static str,
    pub role: Role,
    pub content: Vec<OutputText>,
}

/// One `output_text` part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputText {
    /// `output_text`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
    pub annotations: Vec<Value>,
}

impl OutputText {
    pub fn new(text: String) -> OutputText {
        OutputText {
            kind: "output_text",
            text,
            annotations: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResponsesUsage {
    pub input_tokens: u32,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u32,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InputTokensDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u32,
}

impl From<&mesh_protocol::Usage> for ResponsesUsage {
    fn from(u: &mesh_protocol::Usage) -> ResponsesUsage {
        ResponsesUsage {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputTokensDetails::default(),
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputTokensDetails::default(),
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

/// One event of a streamed response: `event: <type>` and this as its data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseStreamEvent {
    /// `response.created`, `response.output_text.delta`, …
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub sequence_number: u64,
    #[serde(flatten)]
    pub body: ResponseEventBody,
}

/// What an event carries besides its type and number.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ResponseEventBody {
    /// `response.created`, `.in_progress`, `.completed`, `.incomplete`, `.failed`.
    Response { response: Box<ResponseObject> },
    /// `response.output_item.added`, `.done`.
    Item {
        output_index: u32,
        item: OutputMessage,
    },
    /// `response.content_part.added`, `.done`.
    Part {
        item_id: String,
        output_index: u32,
        content_index: u32,
        part: OutputText,
    },
    /// `response.output_text.delta`.
    Delta {
        item_id: String,
        output_index: u32,
        content_index: u32,
        delta: String,
        logprobs: Vec<Value>,
    },
    /// `response.output_text.done`.
    TextDone {
        item_id: String,
        output_index: u32,
        content_index: u32,
        text: String,
        logprobs: Vec<Value>,
    },
}
