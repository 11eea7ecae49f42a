//! OpenAI's JSON shapes, typed, for both directions: the gateway ([`crate::openai`]) reads
//! requests and writes answers in them, and [`crate::engine::upstream`] writes requests and
//! reads answers in them from an OpenAI-compatible server.
//!
//! Only what mesh uses is typed. Requests accept unknown fields (ignored, as OpenAI's clients
//! send many), and fields an answer may lack default, so a server that sends less still parses.
//! The fields of the answers the gateway writes are declared in alphabetical order: that is the
//! order serde_json wrote them in when these bodies were `json!` maps, so clients see the same
//! bytes.

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
pub struct Usage {
    #[serde(default)]
    pub completion_tokens: u32,
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage {
            completion_tokens,
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
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
pub struct ChatCompletionChunk {
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub model: String,
    /// `chat.completion.chunk`.
    #[serde(default)]
    pub object: String,
    /// Only in the last chunk, and only when asked for (`stream_options.include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub delta: Delta,
    /// Always written, as `null` until the last chunk.
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub index: u32,
    /// What a `/completions` stream sends instead of `delta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
pub struct EmbeddingsUsage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub total_tokens: u32,
}

/// `GET /models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    #[serde(default)]
    pub data: Vec<ModelObject>,
    /// `list`.
    #[serde(default)]
    pub object: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelObject {
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub id: String,
    /// `model`.
    #[serde(default)]
    pub object: String,
    #[serde(default)]
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
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_chat_request_with_every_field_mesh_supports_parses() {
        // As the official Python client sends it, with fields mesh ignores.
        let body = json!({
            "model": "smol",
            "messages": [
                { "role": "developer", "content": "Be brief." },
                { "role": "system", "content": [{ "type": "text", "text": "Answer " }, { "type": "text", "text": "in English." }] },
                { "role": "user", "content": "Name the capital of France.", "name": "ann" },
                { "role": "assistant", "content": null },
            ],
            "stream": true,
            "stream_options": { "include_usage": true },
            "max_tokens": 24,
            "max_completion_tokens": 32,
            "temperature": 0,
            "top_p": 0.9,
            "seed": 42,
            "stop": ["\n\n", "END"],
            "n": 1,
            "top_k": 5,
            "tools": [], "response_format": { "type": "text" }, "logprobs": false,
            "frequency_penalty": 0.5,
        });
        let req: ChatRequest = serde_json::from_value(body).unwrap();
        assert_eq!(req.model, "smol");
        assert!(req.stream);
        assert_eq!(
            req.stream_options,
            Some(StreamOptions {
                include_usage: true
            })
        );
        assert_eq!(
            (req.max_tokens, req.max_completion_tokens),
            (Some(24), Some(32))
        );
        assert_eq!(
            (req.temperature, req.top_p, req.seed),
            (Some(0.0), Some(0.9), Some(42))
        );
        assert_eq!(
            req.stop,
            Some(Stop::Many(vec!["\n\n".into(), "END".into()]))
        );
        assert_eq!(req.n, Some(1));
        assert_eq!(
            req.top_k, None,
            "an OpenAI client's top_k is ignored, as before"
        );
        let messages: Vec<ChatMessage> =
            req.messages.iter().map(|m| m.to_mesh().unwrap()).collect();
        assert_eq!(
            messages,
            [
                ChatMessage {
                    role: Role::System,
                    content: "Be brief.".into()
                },
                ChatMessage {
                    role: Role::System,
                    content: "Answer in English.".into()
                },
                ChatMessage {
                    role: Role::User,
                    content: "Name the capital of France.".into()
                },
                ChatMessage {
                    role: Role::Assistant,
                    content: String::new()
                },
            ]
        );
    }

    #[test]
    fn stop_is_a_string_or_a_list() {
        let stop = |v: Value| serde_json::from_value::<Stop>(v).unwrap().into_vec();
        assert_eq!(stop(json!("END")), ["END"]);
        assert_eq!(stop(json!(["a", "b"])), ["a", "b"]);
        let minimal: ChatRequest =
            serde_json::from_str(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        assert_eq!(
            (minimal.stream, minimal.stop, minimal.n),
            (false, None, None)
        );
        assert!(serde_json::from_value::<ChatRequest>(json!({ "model": "m" })).is_err());
    }

    #[test]
    fn unsupported_roles_and_content_are_refused_with_a_reason() {
        let to_mesh = |v: Value| serde_json::from_value::<Message>(v).unwrap().to_mesh();
        assert_eq!(
            to_mesh(json!({ "role": "tool", "content": "42" })).unwrap_err(),
            r#"unsupported message role "tool""#
        );
        let image = json!({ "role": "user", "content": [
            { "type": "text", "text": "what is this?" },
            { "type": "image_url", "image_url": { "url": "data:," } },
        ]});
        assert_eq!(
            to_mesh(image).unwrap_err(),
            "only text content parts are supported"
        );
        assert_eq!(
            to_mesh(json!({ "role": "user", "content": 7 })).unwrap_err(),
            "message content must be a string or a list of text parts"
        );
        assert_eq!(to_mesh(json!({ "role": "user" })).unwrap().content, "");
    }

    #[test]
    fn roles_have_openais_names_both_ways() {
        for (role, name) in [
            (Role::System, "system"),
            (Role::User, "user"),
            (Role::Assistant, "assistant"),
        ] {
            assert_eq!(role_name(role), name);
            let m = Message::from(&ChatMessage {
                role,
                content: "x".into(),
            });
            assert_eq!(
                serde_json::to_value(&m).unwrap(),
                json!({ "role": name, "content": "x" })
            );
            assert_eq!(m.to_mesh().unwrap().role, role);
        }
    }

    #[test]
    fn a_request_written_upstream_has_only_the_fields_set() {
        let req = ChatRequest {
            model: "smollm2".into(),
            messages: vec![Message::from(&ChatMessage {
                role: Role::User,
                content: "hi".into(),
            })],
            stream: true,
            stream_options: Some(StreamOptions {
                include_usage: true,
            }),
            max_tokens: Some(24),
            temperature: Some(0.5),
            top_k: Some(40),
            ..ChatRequest::default()
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({
                "model": "smollm2", "messages": [{ "role": "user", "content": "hi" }],
                "stream": true, "stream_options": { "include_usage": true },
                "max_tokens": 24, "temperature": 0.5, "top_k": 40,
            })
        );
    }

    #[test]
    fn embeddings_input_is_a_string_or_a_list() {
        let req: EmbeddingsRequest = serde_json::from_value(json!({
            "model": "minilm", "input": "A man is eating food.", "encoding_format": "base64", "user": "u1",
        }))
        .unwrap();
        assert_eq!(req.input.clone().into_vec(), ["A man is eating food."]);
        assert_eq!(req.encoding_format.as_deref(), Some("base64"));
        let many: EmbeddingsRequest =
            serde_json::from_value(json!({ "model": "minilm", "input": ["a", "b"] })).unwrap();
        assert_eq!(many.input.into_vec(), ["a", "b"]);
        assert!(
            serde_json::from_value::<EmbeddingsRequest>(json!({ "model": "m", "input": 3 }))
                .is_err()
        );
    }

    #[test]
    fn a_whole_answer_is_written_as_before() {
        let answer = ChatCompletion {
            choices: vec![Choice {
                finish_reason: Some(finish_reason_name(FinishReason::Stop).into()),
                index: 0,
                message: AnswerMessage {
                    content: "Paris.".into(),
                    role: Role::Assistant,
                },
            }],
            created: 1_700_000_000,
            id: "chatcmpl-0123456789abcdef".into(),
            model: "smol".into(),
            object: "chat.completion".into(),
            usage: Usage::new(12, 3),
        };
        // The `json!` body this replaced; serde_json wrote its keys sorted.
        let old = json!({
            "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1_700_000_000u64,
            "model": "smol",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": "Paris." },
                          "finish_reason": "stop" }],
            "usage": { "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15 },
        });
        assert_eq!(serde_json::to_string(&answer).unwrap(), old.to_string());
        let back: ChatCompletion = serde_json::from_value(old).unwrap();
        assert_eq!(back, answer);
    }

    #[test]
    fn finish_reasons_map_both_ways() {
        assert_eq!(finish_reason_name(FinishReason::Length), "length");
        assert_eq!(finish_reason_name(FinishReason::Stop), "stop");
        assert_eq!(finish_reason_name(FinishReason::Complete), "stop");
        assert_eq!(finish_reason_from("length"), FinishReason::Length);
        assert_eq!(finish_reason_from("stop"), FinishReason::Stop);
        assert_eq!(finish_reason_from("tool_calls"), FinishReason::Stop);
    }

    #[test]
    fn stream_events_of_real_servers_parse() {
        // llama.cpp's server: a chat chunk with fields mesh does not read.
        let chat = r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" Paris"}}],
            "created":1733100000,"id":"chatcmpl-x","model":"smollm2","system_fingerprint":"b4273",
            "object":"chat.completion.chunk"}"#;
        let StreamEvent::Chunk(chunk) = serde_json::from_str(chat).unwrap() else {
            panic!()
        };
        assert_eq!(chunk.choices[0].text(), " Paris");
        assert_eq!(chunk.usage, None);
        // A `/completions` stream, and a usage-only last chunk (vLLM, OpenAI).
        let text = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m",
            "choices":[{"text":"Hello","index":0,"logprobs":null,"finish_reason":"length"}]}"#;
        let StreamEvent::Chunk(chunk) = serde_json::from_str(text).unwrap() else {
            panic!()
        };
        assert_eq!(chunk.choices[0].text(), "Hello");
        assert_eq!(chunk.choices[0].finish_reason.as_deref(), Some("length"));
        let usage = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],
            "usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#;
        let StreamEvent::Chunk(chunk) = serde_json::from_str(usage).unwrap() else {
            panic!()
        };
        assert_eq!(chunk.usage, Some(Usage::new(9, 4)));
        // An error in the stream (llama.cpp, once it has started answering).
        let error =
            r#"{"error":{"code":500,"message":"context shift is disabled","type":"server_error"}}"#;
        let StreamEvent::Failed { error } = serde_json::from_str(error).unwrap() else {
            panic!()
        };
        assert_eq!(error["message"], "context shift is disabled");
    }

    #[test]
    fn model_lists_round_trip() {
        let list = ModelList {
            data: vec![ModelObject {
                created: 0,
                id: "smol".into(),
                object: "model".into(),
                owned_by: "12D3KooW".into(),
            }],
            object: "list".into(),
        };
        let old = json!({ "object": "list", "data": [
            { "id": "smol", "object": "model", "created": 0, "owned_by": "12D3KooW" }] });
        assert_eq!(serde_json::to_string(&list).unwrap(), old.to_string());
        assert_eq!(serde_json::from_value::<ModelList>(old).unwrap(), list);
    }
}
