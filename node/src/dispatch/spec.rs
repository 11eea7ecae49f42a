//! What a caller asks for and what it hears back: [`InferSpec`] (the call before a node is
//! chosen, with its [`Target`]), [`CallEvent`] (one step of the call, as the JSON of
//! `/v1/mesh/infer` and `mesh infer --json` carries it), and [`build_request`], which turns a
//! spec into the wire request that fits the chosen model — the one check of a request on the
//! calling side (the serving node checks it again).

use std::fmt;
use std::str::FromStr;

use libp2p::PeerId;
use mesh_protocol::{
    ChatMessage, FinishReason, InferRequest, Input, ModelCard, Role, SamplingParams, SignedToken,
    Task, Usage, WireError,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::failure::CallFailure;
use crate::call::CallError;
use crate::network::Path;

/// Which node a call goes to.
///
/// On the JSON and on the command line it is the text `any` or a peer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Any node that hosts the model: this one first, else a provider found in the DHT.
    Any,
    /// This node, named by its peer id (this node's own id means this node).
    Peer(PeerId),
}

/// A target that is neither `any` nor a peer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a peer id (they start with 12D3KooW) or `any`: {reason}")]
pub struct BadTarget {
    pub text: String,
    /// Why it is not a peer id.
    pub reason: String,
}

impl FromStr for Target {
    type Err = BadTarget;

    fn from_str(text: &str) -> Result<Target, BadTarget> {
        if text == "any" {
            return Ok(Target::Any);
        }
        text.parse().map(Target::Peer).map_err(|e| BadTarget {
            text: text.to_string(),
            reason: format!("{e}"),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Any => f.write_str("any"),
            Target::Peer(peer) => write!(f, "{peer}"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Target, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What to ask, before knowing which node will answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferSpec {
    pub target: Target,
    /// The model's name, or `NAME@sha256:HEX` to pin the weights ([`super::trust`]).
    pub model: String,
    /// The weights the call is pinned to (sha256, hex): a provider whose signed card names
    /// other weights is not used. Absent from the JSON when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// The prompt for a generation model; the texts to embed for an embedding model.
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default)]
    pub system: Option<String>,
    /// A whole conversation for a generation model (used instead of `system` + `prompts`).
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    /// A raw prompt for a generation model, fed without its chat template (used instead of
    /// `messages`, `system` and `prompts`). Absent from the JSON when unset, so specs without
    /// it read and write as they always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The kind of model the asker can use; another kind is a bad request.
    #[serde(default)]
    pub expect: Option<Task>,
    #[serde(default)]
    pub params: SamplingParams,
    /// Milliseconds for the whole call.
    pub deadline_ms: u64,
    /// A capability token, for nodes whose policy asks for one; on the JSON in its text form
    /// (`mtk1.…`), parsed once when the spec is made.
    #[serde(default, with = "token_text")]
    pub token: Option<SignedToken>,
}

/// The text form (`mtk1.…`) of an optional capability token.
mod token_text {
    use mesh_protocol::SignedToken;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(token: &Option<SignedToken>, s: S) -> Result<S::Ok, S::Error> {
        match token {
            Some(t) => s.serialize_some(&t.to_text()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SignedToken>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| {
                SignedToken::from_text(&text)
                    .map_err(|e| serde::de::Error::custom(format!("capability token: {e}")))
            })
            .transpose()
    }
}

/// One step of a call, as `mesh infer --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CallEvent {
    Connected {
        peer: String,
        path: Path,
        connect_ms: u64,
    },
    Started {
        queue_ms: u64,
    },
    Delta {
        text: String,
    },
    Embeddings {
        vectors: Vec<Vec<f32>>,
    },
    Done {
        peer: String,
        path: Path,
        finish_reason: FinishReason,
        usage: Usage,
        connect_ms: u64,
        time_to_first_byte_ms: u64,
        total_ms: u64,
        /// The serving node's signed receipt, in its text form (`mrc1.…`).
        #[serde(default)]
        receipt: Option<String>,
        /// True when the receipt's signature is by the node called and it covers this request.
        #[serde(default)]
        receipt_verified: bool,
        /// Why the receipt did not verify (or that there was none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt_error: Option<String>,
        /// For a split model: the stages the serving node ran the call on.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stages: Vec<StageReport>,
        /// The nodes that failed during the call, each after some tokens, before `peer`
        /// carried it on.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        resumed: Vec<ResumedFrom>,
    },
    /// The call failed; always the last event.
    Error(CallFailure),
}

/// One stage of a split call, as the `done` line shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReport {
    pub peer: String,
    /// `start..end` of the model's layers.
    pub layers: String,
    pub steps: u32,
    /// Time from sending the stage its steps to having their outputs, in all.
    pub wait_ms: u64,
    pub path: String,
    /// It replaced a stage that failed during the call.
    #[serde(default)]
    pub replacement: bool,
    /// sha256 of the stage's signed receipt, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt_sha256: Option<String>,
}

impl From<&mesh_protocol::StageUse> for StageReport {
    fn from(s: &mesh_protocol::StageUse) -> Self {
        StageReport {
            peer: libp2p::PeerId::from_bytes(&s.peer)
                .map_or_else(|_| hex::encode(&s.peer), |p| p.to_string()),
            layers: format!("{}..{}", s.layers.start, s.layers.end),
            steps: s.steps,
            wait_ms: s.wait_ms,
            path: s.path.clone(),
            replacement: s.replacement,
            receipt_sha256: s.receipt_sha256.as_ref().map(hex::encode),
        }
    }
}

/// A node that failed mid-answer, and how far it had come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumedFrom {
    pub peer: String,
    /// Tokens it had sampled and passed on.
    pub tokens: u32,
    /// Why it failed.
    pub error: String,
}

impl CallEvent {
    pub fn from_call_error(e: &CallError) -> CallEvent {
        CallEvent::Error(CallFailure::from(e))
    }
}

/// Builds the request that fits the model's task, and checks it: the one check on the
/// calling side. A refusal is a `bad_request` made here.
pub fn build_request(spec: &InferSpec, card: &ModelCard) -> Result<InferRequest, WireError> {
    if let Some(expected) = spec.expect {
        if expected != card.task {
            let (is, use_) = match card.task {
                Task::Embed => ("an embedding model", "embeddings"),
                Task::Generate => ("a generation model", "chat completions"),
            };
            return Err(WireError::bad_request(format!(
                "model {:?} is {is}; use it for {use_}",
                card.name
            )));
        }
    }
    let input = match card.task {
        Task::Embed => Input::Embed {
            texts: spec.prompts.clone(),
        },
        Task::Generate if spec.prompt.is_some() => Input::Completion {
            prompt: spec.prompt.clone().unwrap_or_default(),
        },
        Task::Generate if !spec.messages.is_empty() => Input::Chat {
            messages: spec.messages.clone(),
        },
        Task::Generate => {
            let [prompt] = spec.prompts.as_slice() else {
                return Err(WireError::bad_request(format!(
                    "a generation model takes one prompt, got {}",
                    spec.prompts.len()
                )));
            };
            let system = spec.system.iter().map(|system| ChatMessage {
                role: Role::System,
                content: system.clone(),
            });
            let user = ChatMessage {
                role: Role::User,
                content: prompt.clone(),
            };
            Input::Chat {
                messages: system.chain([user]).collect(),
            }
        }
    };
    let request = InferRequest {
        model: spec.model.clone(),
        input,
        params: spec.params.clone(),
        deadline_ms: Some(spec.deadline_ms),
        token: spec.token.as_ref().map(SignedToken::to_bytes),
        resume: None,
    };
    request.validate()?;
    Ok(request)
}

#[cfg(test)]
mod tests;
