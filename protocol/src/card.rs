//! Model cards and `/mesh/catalog/1`.
//!
//! A node answers a [`CatalogRequest`] with a [`CatalogResponse`] holding one
//! [`SignedModelCard`] per hosted model. The signature is the node key's ed25519 signature
//! over [`CARD_SIGNING_CONTEXT`] followed by the card's CBOR bytes, so a client that knows the
//! node's peer id can check the card came from that node, whoever relayed it.

use serde::{Deserialize, Serialize};

use crate::frame::{decode_body, FrameError};

/// Domain separation for card signatures, so no other signed mesh object verifies as a card.
pub const CARD_SIGNING_CONTEXT: &[u8] = b"mesh-model-card-v1\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Chat and text generation.
    Generate,
    /// Sentence embeddings.
    Embed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    pub name: String,
    pub task: Task,
    /// e.g. `llama`, `bert`, `builtin-echo`.
    pub architecture: String,
    /// Number of weights; 0 when unknown.
    pub parameters: u64,
    /// e.g. `Q4_1`, `F32`.
    pub quantization: String,
    /// Tokens of context (generation) or of input (embeddings).
    pub context_length: u32,
    /// Vector size, for embedding models.
    #[serde(default)]
    pub embedding_dims: Option<u32>,
    /// sha256 of the weights file, lower-case hex.
    pub sha256: String,
    #[serde(default)]
    pub license: Option<String>,
    /// Requests served at once; more wait in a bounded queue.
    pub max_concurrency: u32,
    /// For a node that hosts only some of the model's layers (a stage of a split model, served
    /// over `/mesh/stage/1`, not `/mesh/infer/1`): which ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<crate::stage::LayerRange>,
    /// The root of the weights file's blob tree, lower-case hex (docs/protocol.md, "Blob
    /// tree"): what `/mesh/blob/1` fetches it by, each piece checked against it. Absent for a
    /// model with no single file (builtin, upstream, a directory) and from older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_root: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedModelCard {
    /// The CBOR encoding of a [`ModelCard`], exactly the bytes that were signed.
    #[serde(with = "serde_bytes")]
    pub card: Vec<u8>,
    /// 64-byte ed25519 signature over `CARD_SIGNING_CONTEXT || card`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedModelCard {
    /// The bytes the signature covers.
    pub fn signed_message(card_cbor: &[u8]) -> Vec<u8> {
        [CARD_SIGNING_CONTEXT, card_cbor].concat()
    }

    /// Decodes the card without checking the signature (the node crate checks it).
    pub fn decode_card(&self) -> Result<ModelCard, FrameError> {
        decode_body(&self.card)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogResponse {
    pub cards: Vec<SignedModelCard>,
    /// Requests waiting or running on this node now, a hint for routing.
    pub load: u32,
}
