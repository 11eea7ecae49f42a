//! mesh-node: everything a mesh node does. The `mesh` binary is a thin shell over this crate.
//!
//! - [`home`]: the data directory and its layout.
//! - [`identity`]: the node's ed25519 key, its PeerId, signatures.
//! - [`auth`]: access policies, capability tokens and signed receipts.
//! - [`wire`]: protocol frames over async streams.
//! - [`engine`]: loaded models behind one trait.
//! - [`models`]: real model files mesh knows how to fetch.
//! - [`serve`]: answering inference and catalog streams, with admission control.
//! - [`call`]: the calling side of those streams.
//! - [`network`]: the libp2p swarm task and its client handle.
//! - [`node`]: a running node, tying the above together.
//! - [`api`]: the HTTP API on loopback, and ([`api::client`]) the typed client the CLI uses.
//! - [`client_node`]: a short-lived node for one command.
//! - [`openai`]: the OpenAI-compatible gateway on the API.
//! - [`openai_schema`]: OpenAI's JSON shapes, shared by the gateway and the upstream engine.
//! - [`dispatch`]: choosing a node for a model and running a call end to end, with failover.
//! - [`directory`]: the models this node can see on the mesh, and who hosts them.
//! - [`split`]: a model's layers pooled across nodes: the head, its plan, its stages.
//! - [`metrics`]: Prometheus metrics for `GET /metrics`.

pub mod api;
pub mod auth;
pub mod blobs;
pub mod call;
pub mod client_node;
pub mod directory;
pub mod dispatch;
pub mod doctor;
pub mod engine;
pub mod home;
pub mod identity;
pub mod inspector;
pub mod metrics;
pub mod models;
pub mod network;
pub mod node;
pub mod ollama;
pub mod openai;
pub mod openai_schema;
pub mod serve;
pub mod split;
#[cfg(test)]
mod test_support;
pub mod wire;

pub use home::Home;
pub use identity::NodeIdentity;
pub use node::{Node, NodeConfig, NodeError};
