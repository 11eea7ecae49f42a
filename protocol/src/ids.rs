//! Protocol identifiers and the DHT key under which a model is announced.
//!
//! Every id carries a major version; a change that old peers cannot read gets a new id.

/// Streamed inference: one request frame, then response frames until `done` or `error`.
pub const INFER_PROTOCOL: &str = "/mesh/infer/1";
/// Catalog: one request frame, one response frame listing the node's signed model cards.
pub const CATALOG_PROTOCOL: &str = "/mesh/catalog/1";
/// A range of a model's layers run for a head: one session per stream (see [`crate::stage`]).
pub const STAGE_PROTOCOL: &str = "/mesh/stage/1";
/// A model's file by pieces, each checked against the blob tree's root (see [`crate::blob`]).
pub const BLOB_PROTOCOL: &str = "/mesh/blob/1";
/// Kademlia protocol name, so a mesh DHT never merges with the public IPFS DHT.
pub const KAD_PROTOCOL: &str = "/mesh/kad/1";
/// identify's protocol version string.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/mesh/1";

/// The Kademlia provider key for a model name: `/mesh/model/1/<name>`.
///
/// Names are matched exactly (case-sensitive), as OpenAI-style clients send them.
pub fn model_provider_key(model: &str) -> Vec<u8> {
    format!("/mesh/model/1/{model}").into_bytes()
}

/// The Kademlia provider key under which nodes hosting layers of a model's weights announce
/// themselves: `/mesh/stage/1/<sha256 of the weights, lower-case hex>`.
pub fn stage_provider_key(weights_sha256: &str) -> Vec<u8> {
    format!("/mesh/stage/1/{weights_sha256}").into_bytes()
}

/// The Kademlia provider key under which nodes that serve a model's file announce it:
/// `/mesh/blob/1/<sha256 of the file, lower-case hex>` (the sha256 every card names; the card
/// signed by the node gives the blob tree's root to fetch it by).
pub fn blob_provider_key(file_sha256: &str) -> Vec<u8> {
    format!("/mesh/blob/1/{file_sha256}").into_bytes()
}

/// A model name is 1..=128 bytes of `[A-Za-z0-9._:/-]`: safe in a DHT key, a URL path and a shell.
pub fn validate_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!(
            "model name must be 1 to 128 bytes long, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')))
    {
        return Err(format!(
            "model name {name:?} has the character {c:?}; allowed are A-Z a-z 0-9 . _ : / -"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_key_is_versioned_and_exact() {
        assert_eq!(model_provider_key("smol"), b"/mesh/model/1/smol".to_vec());
        assert_ne!(model_provider_key("Smol"), model_provider_key("smol"));
    }

    #[test]
    fn model_names_are_checked() {
        assert!(validate_model_name("smollm2-135m-instruct").is_ok());
        assert!(validate_model_name("org/model:q4_1").is_ok());
        assert!(validate_model_name("").is_err());
        assert!(validate_model_name("a b").is_err());
        assert!(validate_model_name(&"x".repeat(129)).is_err());
        assert!(validate_model_name("é").is_err());
    }
}
