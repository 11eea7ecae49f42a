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
    }
}
