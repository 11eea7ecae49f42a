//! `/mesh/stage/1`: a range of a model's layers, run by one node for a head that holds the rest.
//!
//! One stream carries one session of one hop. The head opens it with [`StageRequest::Open`]
//! (the model, the sha256 of its weights, the layers, the most positions the session will use);
//! the stage answers [`StageResponse::Opened`] and keeps a key-value cache for the session. Each
//! [`StageRequest::Step`] then carries hidden states for consecutive positions, and the stage
//! answers with its layers' output for them. [`StageRequest::Close`] ends the session with a
//! receipt the stage signs over everything it saw and sent ([`StageReceipt`]), so a wrong stage
//! can be pointed at afterwards.

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::frame::{decode_body, FrameError};

/// Domain separation: no other signed mesh object verifies as a stage receipt.
pub const STAGE_RECEIPT_SIGNING_CONTEXT: &[u8] = b"mesh-stage-receipt-v1\0";
/// The only stage receipt version this build reads.
pub const STAGE_RECEIPT_VERSION: u32 = 1;
/// Most positions one session may use.
pub const MAX_STAGE_POSITIONS: u32 = 1 << 20;

/// How hidden states travel: little-endian IEEE floats, position-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenFormat {
    F32,
    F16,
}

impl HiddenFormat {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            HiddenFormat::F32 => 4,
            HiddenFormat::F16 => 2,
        }
    }
}

/// A range of layers `start..end` of a model of `total` layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: u32,
    pub end: u32,
    pub total: u32,
}

impl LayerRange {
    /// Checks that the range is within the model and not empty.
    pub fn validate(&self) -> Result<(), String> {
        if self.start >= self.end || self.end > self.total {
            return Err(format!(
                "layers {}..{} are not a range within {} layers",
                self.start, self.end, self.total
            ));
        }
        Ok(())
    }

    /// Whether `inner` lies within this range (of the same model).
    pub fn contains(&self, inner: &LayerRange) -> bool {
        self.total == inner.total && self.start <= inner.start && inner.end <= self.end
    }
}

impl std::fmt::Display for LayerRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{} of {}", self.start, self.end, self.total)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageRequest {
    /// Starts a session: the stage checks the weights, the range and the caller's access.
    Open {
        model: String,
        /// sha256 of the model's weights file (lower-case hex): the stage's must equal it.
        weights_sha256: String,
        /// The layers to run, within the ones the stage hosts.
        layers: LayerRange,
        /// The most positions the session will hold (the stage reserves its cache for them).
        max_positions: u32,
        hidden: HiddenFormat,
        /// A capability token for `model`, as for `/mesh/infer/1`.
        #[serde(default, with = "serde_bytes")]
        token: Option<Vec<u8>>,
    },
    /// Hidden states for positions `start..start + rows`, which must follow the positions the
    /// session already holds: `rows × width` values in the session's format.
    Step {
        start: u32,
        rows: u32,
        #[serde(with = "serde_bytes")]
        hidden: Vec<u8>,
    },
    /// Ends the session and asks for its receipt.
    Close,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageResponse {
    /// The session is open: hidden states are `width` values wide.
    Opened {
        width: u32,
        layers: LayerRange,
    },
    /// The layers' output for the step's positions, in the session's format.
    Output {
        #[serde(with = "serde_bytes")]
        hidden: Vec<u8>,
    },
    /// The session's receipt, after `close`.
    Closed {
        receipt: SignedStageReceipt,
    },
    Error(WireError),
}

/// What a stage signs about one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReceipt {
    /// [`STAGE_RECEIPT_VERSION`].
    pub version: u32,
    pub model: String,
    pub weights_sha256: String,
    pub layers: LayerRange,
    /// Peer id bytes of the stage: the key that signs this receipt.
    #[serde(with = "serde_bytes")]
    pub server: Vec<u8>,
    /// Peer id bytes of the head, as Noise authenticated it.
    #[serde(with = "serde_bytes")]
    pub client: Vec<u8>,
    /// Positions the session ran.
    pub positions: u32,
    /// Steps the session ran.
    pub steps: u32,
    /// sha256 over every step's input: for each step, its start position (4 bytes, big
    /// endian), then its hidden bytes, in order.
    #[serde(with = "serde_bytes")]
    pub inputs_sha256: Vec<u8>,
    /// sha256 over every step's output hidden bytes, in order.
    #[serde(with = "serde_bytes")]
    pub outputs_sha256: Vec<u8>,
    /// Unix milliseconds when the session opened.
    pub opened_unix_ms: u64,
    /// Milliseconds of compute in all.
    pub compute_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStageReceipt {
    /// The CBOR encoding of a [`StageReceipt`], exactly the bytes that were signed.
    #[serde(with = "serde_bytes")]
    pub receipt: Vec<u8>,
    /// 64-byte ed25519 signature over `STAGE_RECEIPT_SIGNING_CONTEXT || receipt`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedStageReceipt {
    /// The bytes the signature covers.
    pub fn signed_message(receipt_cbor: &[u8]) -> Vec<u8> {
        [STAGE_RECEIPT_SIGNING_CONTEXT, receipt_cbor].concat()
    }

    /// Decodes the receipt without checking the signature (the node crate checks it).
    pub fn decode_receipt(&self) -> Result<StageReceipt, FrameError> {
        let receipt: StageReceipt = decode_body(&self.receipt)?;
        if receipt.version != STAGE_RECEIPT_VERSION {
            return Err(FrameError::BadBody(format!(
                "stage receipt version {} is not supported",
                receipt.version
            )));
        }
        Ok(receipt)
    }
}

/// What a split call's head reports about one stage, in `done` and in its receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageUse {
    /// Peer id bytes of the stage.
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    pub layers: LayerRange,
    /// sha256 of the stage's signed receipt (its CBOR), when it sent one.
    #[serde(default, with = "serde_bytes")]
    pub receipt_sha256: Option<Vec<u8>>,
    /// Steps sent to it.
    pub steps: u32,
    /// Milliseconds from sending its steps to having their outputs, in all.
    pub wait_ms: u64,
    /// The path of its stream: `direct`, `hole-punched` or `relayed`.
    pub path: String,
    /// Whether it replaced a stage that failed during the call.
    #[serde(default)]
    pub replacement: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_and_nest() {
        let whole = LayerRange {
            start: 10,
            end: 30,
            total: 30,
        };
        assert!(whole.validate().is_ok());
        let inner = LayerRange {
            start: 10,
            end: 20,
            total: 30,
        };
        assert!(whole.contains(&inner));
        assert!(!inner.contains(&whole));
        for (start, end, total) in [(5, 5, 30), (20, 10, 30), (0, 31, 30)] {
            assert!(LayerRange { start, end, total }.validate().is_err());
        }
        assert!(!whole.contains(&LayerRange {
            start: 10,
            end: 20,
            total: 24
        }));
        assert_eq!(whole.to_string(), "10..30 of 30");
    }
}
