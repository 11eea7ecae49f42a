//! Fixtures the unit tests of several modules share.

use libp2p::PeerId;
use mesh_protocol::{ModelCard, Task};

/// A fresh peer id that no node holds.
pub(crate) fn random_peer() -> PeerId {
    libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
}

/// A minimal card for model `name` of kind `task`.
pub(crate) fn card(name: &str, task: Task) -> ModelCard {
    ModelCard {
        name: name.into(),
        task,
        architecture: "test".into(),
        parameters: 0,
        quantization: "none".into(),
        context_length: 64,
        embedding_dims: None,
        sha256: String::new(),
        license: None,
        max_concurrency: 1,
        layers: None,
        blob_root: None,
        files: Vec::new(),
    }
}

/// A `delta` event.
pub(crate) fn delta(text: &str) -> crate::dispatch::CallEvent {
    crate::dispatch::CallEvent::Delta { text: text.into() }
}

/// A `done` event with these usage and timings.
pub(crate) fn done_with(
    finish_reason: mesh_protocol::FinishReason,
    usage: mesh_protocol::Usage,
    connect_ms: u64,
    total_ms: u64,
) -> crate::dispatch::CallEvent {
    crate::dispatch::CallEvent::Done {
        peer: "12D3KooW".into(),
        path: crate::network::Path::Direct,
        finish_reason,
        usage,
        connect_ms,
        time_to_first_byte_ms: 0,
        total_ms,
        receipt: None,
        receipt_verified: false,
        receipt_error: None,
        stages: Vec::new(),
        resumed: Vec::new(),
    }
}

/// A capability token for `echo`, issued by a fresh key to a fresh peer.
pub(crate) fn signed_token() -> mesh_protocol::SignedToken {
    let request = crate::auth::token::TokenRequest {
        subject: random_peer(),
        models: vec!["echo".into()],
        not_before: 0,
        expires: u64::MAX / 2,
        max_requests: None,
    };
    crate::auth::token::issue(&crate::NodeIdentity::generate(), &request).expect("a valid token")
}
