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
    /// The other files of a model that is a directory (a BERT model's `config.json` and
    /// `tokenizer.json`), each a blob of its own; empty (and omitted) for a model of one file.
    /// `sha256` and `blob_root` above are always the weights file's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<CardFile>,
}

/// Most files a card may name besides its weights.
pub const MAX_CARD_FILES: usize = 8;

/// One more file of a model that is a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardFile {
    /// The file's name in the model's directory: `[A-Za-z0-9._-]`, 1 to 64 characters, not
    /// starting with a dot ([`CardFile::validate`]).
    pub name: String,
    /// sha256 of the file, lower-case hex.
    pub sha256: String,
    /// The root of the file's blob tree, lower-case hex.
    pub blob_root: String,
}

/// Whether `name` is one safe path component: 1 to 64 of `[A-Za-z0-9._-]`, not starting with a
/// dot (so never `.`, `..`, a hidden file or a path).
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl CardFile {
    /// Whether the name is safe to create in a directory and the hashes are well formed. A
    /// card comes from a peer: a name like `../x` must never reach the file system.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if !is_safe_file_name(name) {
            return Err(format!(
                "file name {name:?} is not 1 to 64 of [A-Za-z0-9._-] not starting with a dot"
            ));
        }
        for (what, hex) in [("sha256", &self.sha256), ("blob_root", &self.blob_root)] {
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(format!(
                    "file {name:?}: {what} is not 64 lower-case hex digits"
                ));
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> CardFile {
        CardFile {
            name: name.into(),
            sha256: "ab".repeat(32),
            blob_root: "cd".repeat(32),
        }
    }

    #[test]
    fn a_card_file_name_never_leaves_its_directory() {
        for good in ["config.json", "tokenizer.json", "a-b_c.0"] {
            assert_eq!(file(good).validate(), Ok(()), "{good}");
        }
        let long = "x".repeat(65);
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "a\\b", "é.json", &long,
        ] {
            assert!(file(bad).validate().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_card_file_hash_is_64_lower_case_hex_digits() {
        let mut f = file("config.json");
        f.sha256 = "AB".repeat(32);
        assert!(f.validate().unwrap_err().contains("sha256"));
        f = file("config.json");
        f.blob_root = "cd".repeat(31);
        assert!(f.validate().unwrap_err().contains("blob_root"));
    }
}
