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
    pub model: String,
    /// The prompt for a generation model; the texts to embed for an embedding model.
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default)]
    pub system: Option<String>,
    /// A whole conversation for a generation model (used instead of `system` + `prompts`).
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
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
    },
    /// The call failed; always the last event.
    Error(CallFailure),
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
    };
    request.validate()?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::ErrorCode;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn card(task: Task) -> ModelCard {
        ModelCard {
            name: "m".into(),
            task,
            architecture: "test".into(),
            parameters: 0,
            quantization: "none".into(),
            context_length: 64,
            embedding_dims: None,
            sha256: String::new(),
            license: None,
            max_concurrency: 1,
        }
    }

    fn spec(prompts: &[&str]) -> InferSpec {
        InferSpec {
            target: Target::Any,
            model: "m".into(),
            prompts: prompts.iter().map(|p| p.to_string()).collect(),
            system: None,
            messages: Vec::new(),
            expect: None,
            params: SamplingParams::default(),
            deadline_ms: 5_000,
            token: None,
        }
    }

    fn token() -> SignedToken {
        let issuer = crate::NodeIdentity::generate();
        crate::auth::token::issue(
            &issuer,
            &crate::auth::token::TokenRequest {
                subject: peer(),
                models: vec!["m".into()],
                not_before: 0,
                expires: 4_000_000_000,
                max_requests: None,
            },
        )
        .unwrap()
    }

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn targets_are_any_or_a_peer_id_as_text() {
        let p = peer();
        for (target, text) in [
            (Target::Any, "any".to_string()),
            (Target::Peer(p), p.to_string()),
        ] {
            assert_eq!(
                serde_json::to_value(target).unwrap(),
                serde_json::json!(text)
            );
            assert_eq!(
                serde_json::from_value::<Target>(text.clone().into()).unwrap(),
                target
            );
            assert_eq!(text.parse::<Target>(), Ok(target));
            assert_eq!(target.to_string(), text);
        }
        for bad in ["", "Any", "not-a-peer", "12D3KooW"] {
            let err = bad.parse::<Target>().unwrap_err();
            assert_eq!(err.text, bad);
            assert!(err.to_string().contains("not a peer id"), "{err}");
            let json = serde_json::from_value::<Target>(bad.into()).unwrap_err();
            assert!(json.to_string().contains("not a peer id"), "{json}");
        }
        assert!(serde_json::from_value::<Target>(serde_json::json!(7)).is_err());
    }

    #[test]
    fn a_spec_reads_the_json_the_cli_and_api_send() {
        let t = token();
        let json = serde_json::json!({
            "target": "any", "model": "m", "prompts": ["hi"], "deadline_ms": 1000,
            "token": t.to_text(),
        });
        let spec: InferSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(spec.target, Target::Any);
        assert_eq!(spec.token.as_ref(), Some(&t));
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["target"], "any");
        assert_eq!(back["token"], json["token"]);

        let without: InferSpec = serde_json::from_value(
            serde_json::json!({"target": "any", "model": "m", "deadline_ms": 1}),
        )
        .unwrap();
        assert!(without.token.is_none());
        assert_eq!(
            serde_json::to_value(&without).unwrap()["token"],
            serde_json::Value::Null
        );

        let bad = serde_json::from_value::<InferSpec>(serde_json::json!({
            "target": "any", "model": "m", "deadline_ms": 1, "token": "mtk1.not-a-token",
        }))
        .unwrap_err();
        assert!(bad.to_string().contains("capability token"), "{bad}");
        let bad = serde_json::from_value::<InferSpec>(
            serde_json::json!({"target": "nobody", "model": "m", "deadline_ms": 1}),
        )
        .unwrap_err();
        assert!(bad.to_string().contains("not a peer id"), "{bad}");
    }

    #[test]
    fn a_prompt_becomes_a_chat_with_its_system_message() {
        let request = build_request(&spec(&["hello"]), &card(Task::Generate)).unwrap();
        assert_eq!(
            request.input,
            Input::Chat {
                messages: vec![message(Role::User, "hello")]
            }
        );
        assert_eq!(request.deadline_ms, Some(5_000));
        assert_eq!(request.model, "m");
        assert!(request.token.is_none());

        let with_system = InferSpec {
            system: Some("be brief".into()),
            ..spec(&["hello"])
        };
        let request = build_request(&with_system, &card(Task::Generate)).unwrap();
        assert_eq!(
            request.input,
            Input::Chat {
                messages: vec![
                    message(Role::System, "be brief"),
                    message(Role::User, "hello")
                ]
            }
        );
    }

    #[test]
    fn messages_go_as_they_are_and_prompts_embed() {
        let messages = vec![
            message(Role::User, "hi"),
            message(Role::Assistant, "hello"),
            message(Role::User, "how are you?"),
        ];
        let chat = InferSpec {
            messages: messages.clone(),
            system: Some("ignored with messages".into()),
            ..spec(&[])
        };
        let request = build_request(&chat, &card(Task::Generate)).unwrap();
        assert_eq!(request.input, Input::Chat { messages });

        let request = build_request(&spec(&["a", "b c"]), &card(Task::Embed)).unwrap();
        assert_eq!(
            request.input,
            Input::Embed {
                texts: vec!["a".into(), "b c".into()]
            }
        );
    }

    #[test]
    fn the_token_goes_in_its_wire_form() {
        let t = token();
        let with_token = InferSpec {
            token: Some(t.clone()),
            ..spec(&["hi"])
        };
        let request = build_request(&with_token, &card(Task::Generate)).unwrap();
        assert_eq!(request.token, Some(t.to_bytes()));
    }

    #[test]
    fn requests_that_do_not_fit_are_bad_requests() {
        let refused = |spec: &InferSpec, task| {
            let e = build_request(spec, &card(task)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{e}");
            e.message
        };
        let wants_chat = InferSpec {
            expect: Some(Task::Generate),
            ..spec(&["x"])
        };
        assert_eq!(
            refused(&wants_chat, Task::Embed),
            "model \"m\" is an embedding model; use it for embeddings"
        );
        let wants_embed = InferSpec {
            expect: Some(Task::Embed),
            ..spec(&["x"])
        };
        assert_eq!(
            refused(&wants_embed, Task::Generate),
            "model \"m\" is a generation model; use it for chat completions"
        );
        assert_eq!(
            refused(&spec(&["a", "b"]), Task::Generate),
            "a generation model takes one prompt, got 2"
        );
        assert_eq!(
            refused(&spec(&[]), Task::Generate),
            "a generation model takes one prompt, got 0"
        );
        // The request's own checks, made once here.
        assert!(refused(&spec(&["   "]), Task::Generate).contains("empty"));
        assert!(refused(&spec(&[]), Task::Embed).contains("embeddings need"));
        let hot = InferSpec {
            params: SamplingParams {
                temperature: 5.0,
                ..Default::default()
            },
            ..spec(&["x"])
        };
        assert!(refused(&hot, Task::Generate).contains("temperature"));
        let no_time = InferSpec {
            deadline_ms: 0,
            ..spec(&["x"])
        };
        assert!(refused(&no_time, Task::Generate).contains("deadline_ms"));
        let bad_name = InferSpec {
            model: "a b".into(),
            ..spec(&["x"])
        };
        assert!(refused(&bad_name, Task::Generate).contains("model name"));
    }
}
