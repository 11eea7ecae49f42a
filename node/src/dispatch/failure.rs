//! Why a call failed, as a type: the error code, where it came from ([`Origin`]: a node's
//! answer, the network, or this side), and the one classification every front end maps from
//! ([`FailureClass`]: the CLI to exit codes, the OpenAI gateway to HTTP statuses).
//!
//! On the JSON of `/v1/mesh/infer` and `mesh infer --json` a failure is
//! `{"event":"error","code":…,"message":…,"network":bool}`, as it always was: `network` is
//! true for [`Origin::Network`] only, so a refusal made on this side reads back as
//! [`Origin::Node`] (its class, which comes from its code, is the same).

use mesh_protocol::{ErrorCode, WireError};
use serde::{Deserialize, Serialize};

use crate::call::CallError;

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A node answered the call with an error frame.
    Node,
    /// The call never got a node's answer: unreachable, dropped, or timed out on the way.
    Network,
    /// This side refused or gave up before a node answered: no node hosts the model, the
    /// request does not fit the model, or the asker went away.
    Local,
}

/// A failed call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "FailureJson", into = "FailureJson")]
pub struct CallFailure {
    pub code: ErrorCode,
    pub message: String,
    pub origin: Origin,
}

/// What a caller does about a failure; every front end maps from this one classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// No node hosts the model, or the named node does not.
    NotFound,
    Unauthorized,
    Overloaded,
    BadRequest,
    DeadlineExceeded,
    /// The node could not be reached or the connection failed.
    Network,
    /// Anything else a node reported.
    Internal,
}

impl FailureClass {
    /// The HTTP status of this failure, the one mapping every HTTP front end answers with
    /// (OpenAI's API in [`crate::openai`], Ollama's in [`crate::ollama`]).
    pub fn http_status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            FailureClass::NotFound => StatusCode::NOT_FOUND,
            FailureClass::BadRequest => StatusCode::BAD_REQUEST,
            FailureClass::Unauthorized => StatusCode::FORBIDDEN,
            FailureClass::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            FailureClass::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            FailureClass::Network => StatusCode::BAD_GATEWAY,
            FailureClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl CallFailure {
    /// A failure a node reported.
    pub fn remote(error: WireError) -> CallFailure {
        CallFailure {
            code: error.code,
            message: error.message,
            origin: Origin::Node,
        }
    }

    /// A failure on the network or on this side, with the code that best describes it.
    pub fn network(code: ErrorCode, message: impl Into<String>) -> CallFailure {
        CallFailure {
            code,
            message: message.into(),
            origin: Origin::Network,
        }
    }

    /// A refusal made on this side, before any node answered.
    pub fn local(code: ErrorCode, message: impl Into<String>) -> CallFailure {
        CallFailure {
            code,
            message: message.into(),
            origin: Origin::Local,
        }
    }

    pub fn class(&self) -> FailureClass {
        match self.code {
            ErrorCode::UnknownModel => FailureClass::NotFound,
            ErrorCode::Unauthorized => FailureClass::Unauthorized,
            ErrorCode::Overloaded => FailureClass::Overloaded,
            ErrorCode::BadRequest => FailureClass::BadRequest,
            ErrorCode::DeadlineExceeded => FailureClass::DeadlineExceeded,
            _ if self.origin == Origin::Network => FailureClass::Network,
            ErrorCode::Internal | ErrorCode::Unknown => FailureClass::Internal,
        }
    }
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<&CallError> for CallFailure {
    fn from(e: &CallError) -> CallFailure {
        match e {
            CallError::Remote(w) => CallFailure::remote(w.clone()),
            CallError::Timeout(_) | CallError::Stalled(_) => {
                CallFailure::network(ErrorCode::DeadlineExceeded, e.to_string())
            }
            other => CallFailure::network(ErrorCode::Internal, other.to_string()),
        }
    }
}

/// The wire shape of a failure, unchanged since the first release.
#[derive(Serialize, Deserialize)]
struct FailureJson {
    code: ErrorCode,
    message: String,
    /// True when the failure was on the network, not an answer from a node.
    network: bool,
}

impl From<FailureJson> for CallFailure {
    fn from(j: FailureJson) -> CallFailure {
        CallFailure {
            code: j.code,
            message: j.message,
            origin: if j.network {
                Origin::Network
            } else {
                Origin::Node
            },
        }
    }
}

impl From<CallFailure> for FailureJson {
    fn from(f: CallFailure) -> FailureJson {
        FailureJson {
            code: f.code,
            message: f.message,
            network: f.origin == Origin::Network,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::CallEvent;

    #[test]
    fn the_json_shape_is_unchanged() {
        let event = CallEvent::Error(CallFailure::network(ErrorCode::Internal, "no route"));
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event":"error","code":"internal","message":"no route","network":true})
        );
        let back: CallEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        let remote: CallEvent = serde_json::from_str(
            r#"{"event":"error","code":"overloaded","message":"busy","network":false}"#,
        )
        .unwrap();
        assert_eq!(
            remote,
            CallEvent::Error(CallFailure::remote(WireError::new(
                ErrorCode::Overloaded,
                "busy"
            )))
        );
    }

    #[test]
    fn classes_come_from_the_code_first_then_the_origin() {
        let net = |code| CallFailure::network(code, "x").class();
        let node = |code| CallFailure::remote(WireError::new(code, "x")).class();
        assert_eq!(net(ErrorCode::UnknownModel), FailureClass::NotFound);
        assert_eq!(node(ErrorCode::UnknownModel), FailureClass::NotFound);
        assert_eq!(node(ErrorCode::Unauthorized), FailureClass::Unauthorized);
        assert_eq!(node(ErrorCode::Overloaded), FailureClass::Overloaded);
        assert_eq!(net(ErrorCode::BadRequest), FailureClass::BadRequest);
        assert_eq!(
            net(ErrorCode::DeadlineExceeded),
            FailureClass::DeadlineExceeded
        );
        assert_eq!(net(ErrorCode::Internal), FailureClass::Network);
        assert_eq!(node(ErrorCode::Internal), FailureClass::Internal);
        assert_eq!(node(ErrorCode::Unknown), FailureClass::Internal);
        let timeout = CallFailure::from(&CallError::Timeout(std::time::Duration::from_secs(1)));
        assert_eq!(timeout.class(), FailureClass::DeadlineExceeded);
        let local = |code| CallFailure::local(code, "x").class();
        assert_eq!(local(ErrorCode::UnknownModel), FailureClass::NotFound);
        assert_eq!(local(ErrorCode::BadRequest), FailureClass::BadRequest);
        assert_eq!(local(ErrorCode::Internal), FailureClass::Internal);
    }

    #[test]
    fn a_local_refusal_is_not_a_network_failure_on_the_json() {
        let refusal = CallFailure::local(ErrorCode::UnknownModel, "no node announces it");
        let json = serde_json::to_value(CallEvent::Error(refusal.clone())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event":"error","code":"unknown_model","message":"no node announces it","network":false})
        );
        let CallEvent::Error(back) = serde_json::from_value(json).unwrap() else {
            panic!("an error event")
        };
        assert_eq!(back.origin, Origin::Node, "the JSON has no third origin");
        assert_eq!(back.class(), refusal.class());
        assert_eq!(back.to_string(), refusal.to_string());
    }

    #[test]
    fn call_errors_map_to_their_origin() {
        let remote = CallFailure::from(&CallError::Remote(WireError::new(
            ErrorCode::Overloaded,
            "busy",
        )));
        assert_eq!(
            remote,
            CallFailure::remote(WireError::new(ErrorCode::Overloaded, "busy"))
        );
        let network = CallFailure::from(&CallError::Network("no route".into()));
        assert_eq!(network.origin, Origin::Network);
        assert_eq!(network.code, ErrorCode::Internal);
        assert_eq!(network.message, "network failure: no route");
        assert_eq!(
            CallFailure::from(&CallError::Closed).class(),
            FailureClass::Network
        );
    }
}
