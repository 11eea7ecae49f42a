//! Signed receipts: what a serving node states, under its key, about one call it answered.
//!
//! The `done` frame of every call carries a [`SignedReceipt`]: the CBOR bytes of a [`Receipt`]
//! and the serving node's ed25519 signature over [`RECEIPT_SIGNING_CONTEXT`] followed by those
//! bytes. Anyone holding the receipt can check it offline: the signing key is the one inside
//! the `server` peer id. The text form is [`RECEIPT_TEXT_PREFIX`] then base64url (no padding)
//! of the CBOR `SignedReceipt`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::frame::{decode_body, encode_body, FrameError};
use crate::infer::FinishReason;

/// Domain separation: no other signed mesh object verifies as a receipt.
pub const RECEIPT_SIGNING_CONTEXT: &[u8] = b"mesh-receipt-v1\0";
/// The text form starts with this.
pub const RECEIPT_TEXT_PREFIX: &str = "mrc1.";
/// The only receipt version this build reads.
pub const RECEIPT_VERSION: u32 = 1;
/// Longest encoded receipt accepted, checked before decoding.
pub const MAX_RECEIPT_LEN: usize = 4 * 1024;

/// What the serving node signs about one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// [`RECEIPT_VERSION`].
    pub version: u32,
    /// sha256 of the request frame's body: the canonical CBOR of the `InferRequest` as the node
    /// decoded it, `token` included (so the receipt is bound to the authorization used).
    #[serde(with = "serde_bytes")]
    pub request_sha256: Vec<u8>,
    pub model: String,
    /// sha256 of the model's weights file (lower-case hex), as in its model card.
    pub weights_sha256: String,
    /// Peer id bytes of the serving node: the key that signs this receipt.
    #[serde(with = "serde_bytes")]
    pub server: Vec<u8>,
    /// Peer id bytes of the caller, as Noise authenticated it.
    #[serde(with = "serde_bytes")]
    pub client: Vec<u8>,
    /// The id of the capability token the call was authorized by, if any.
    #[serde(default, with = "serde_bytes")]
    pub token_id: Option<Vec<u8>>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: FinishReason,
    /// Unix milliseconds when the node received the request.
    pub received_unix_ms: u64,
    /// Milliseconds the call waited for a slot.
    pub queue_ms: u64,
    /// Milliseconds from the start of compute to the first output.
    pub time_to_first_token_ms: u64,
    /// Milliseconds of compute in all.
    pub compute_ms: u64,
    /// For a split model: each stage the call ran on, with the hash of its signed receipt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<crate::stage::StageUse>,
    /// For a resumed call: the tokens another node sampled before this one took over.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed_tokens: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The CBOR encoding of a [`Receipt`], exactly the bytes that were signed.
    #[serde(with = "serde_bytes")]
    pub receipt: Vec<u8>,
    /// 64-byte ed25519 signature over `RECEIPT_SIGNING_CONTEXT || receipt`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptFormatError {
    #[error("a receipt is at most {MAX_RECEIPT_LEN} bytes, this one has {0}")]
    TooLong(usize),
    #[error("a receipt's text starts with {RECEIPT_TEXT_PREFIX:?}")]
    NoPrefix,
    #[error("the receipt text is not base64url: {0}")]
    Base64(String),
    #[error("the receipt does not decode: {0}")]
    Frame(#[from] FrameError),
    #[error("receipt version {0} is not supported (this build reads {RECEIPT_VERSION})")]
    Version(u32),
}

impl SignedReceipt {
    /// The bytes the signature covers.
    pub fn signed_message(receipt_cbor: &[u8]) -> Vec<u8> {
        [RECEIPT_SIGNING_CONTEXT, receipt_cbor].concat()
    }

    /// Decodes the receipt without checking the signature (the node crate checks it).
    pub fn decode_receipt(&self) -> Result<Receipt, ReceiptFormatError> {
        let receipt: Receipt = decode_body(&self.receipt)?;
        if receipt.version != RECEIPT_VERSION {
            return Err(ReceiptFormatError::Version(receipt.version));
        }
        Ok(receipt)
    }

    /// `mrc1.` + base64url (no padding) of the CBOR `SignedReceipt`.
    pub fn to_text(&self) -> String {
        let bytes = encode_body(self).expect("a signed receipt always encodes");
        format!("{RECEIPT_TEXT_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses the text form; surrounding whitespace is ignored.
    pub fn from_text(text: &str) -> Result<SignedReceipt, ReceiptFormatError> {
        let body = text
            .trim()
            .strip_prefix(RECEIPT_TEXT_PREFIX)
            .ok_or(ReceiptFormatError::NoPrefix)?;
        if body.len() > MAX_RECEIPT_LEN * 4 / 3 + 4 {
            return Err(ReceiptFormatError::TooLong(body.len() * 3 / 4));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| ReceiptFormatError::Base64(e.to_string()))?;
        Ok(decode_body(&bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_refuses_garbage() {
        let receipt = Receipt {
            version: RECEIPT_VERSION,
            request_sha256: vec![1; 32],
            model: "echo".into(),
            weights_sha256: "00".repeat(32),
            server: vec![2; 38],
            client: vec![3; 38],
            token_id: None,
            prompt_tokens: 3,
            completion_tokens: 4,
            finish_reason: FinishReason::Stop,
            received_unix_ms: 1,
            queue_ms: 0,
            time_to_first_token_ms: 1,
            compute_ms: 2,
            stages: Vec::new(),
            resumed_tokens: 0,
        };
        let signed = SignedReceipt {
            receipt: encode_body(&receipt).unwrap(),
            signature: vec![5; 64],
        };
        let text = signed.to_text();
        let back = SignedReceipt::from_text(&text).unwrap();
        assert_eq!(back, signed);
        assert_eq!(back.decode_receipt().unwrap(), receipt);
        assert!(matches!(
            SignedReceipt::from_text("mtk1.AAAA"),
            Err(ReceiptFormatError::NoPrefix)
        ));
        assert!(matches!(
            SignedReceipt::from_text("mrc1.@@"),
            Err(ReceiptFormatError::Base64(_))
        ));
        let v2 = Receipt {
            version: 2,
            ..receipt
        };
        let signed = SignedReceipt {
            receipt: encode_body(&v2).unwrap(),
            signature: vec![],
        };
        assert!(matches!(
            signed.decode_receipt(),
            Err(ReceiptFormatError::Version(2))
        ));
    }
}
