//! mesh-protocol: the wire format of mesh, and nothing else.
//!
//! - [`ids`]: versioned protocol ids and DHT keys.
//! - [`frame`]: unsigned-varint length prefix + one CBOR value, bounded before allocating.
//! - [`infer`]: request and response frames of `/mesh/infer/1`.
//! - [`card`]: the model card a node advertises, and the catalog exchange.
//! - [`error`]: typed error codes a client can act on.
//! - [`token`]: capability tokens a node owner signs for a caller.
//! - [`receipt`]: the receipt a serving node signs into the `done` frame.
//! - [`stage`]: `/mesh/stage/1`, a range of a model's layers run for a head.
//! - [`blob`]: `/mesh/blob/1`, a model's file by verified pieces.
//!
//! This crate has no async runtime, no networking and no model code, so another
//! implementation (or a fuzzer) can use it alone. `docs/protocol.md` specifies every frame.

pub mod blob;
pub mod card;
pub mod error;
pub mod frame;
pub mod ids;
pub mod infer;
pub mod receipt;
pub mod stage;
pub mod token;

pub use card::{CardFile, CatalogRequest, CatalogResponse, ModelCard, SignedModelCard, Task};
pub use error::{ErrorCode, WireError};
pub use frame::{decode_frame, encode_frame, FrameError, DEFAULT_MAX_FRAME_LEN};
pub use infer::{
    ChatMessage, FinishReason, InferRequest, InferResponse, Input, Resume, Role, SamplingParams,
    Usage,
};
pub use receipt::{Receipt, SignedReceipt};
pub use stage::{
    HiddenFormat, LayerRange, SignedStageReceipt, StageReceipt, StageRequest, StageResponse,
    StageUse,
};
pub use token::{SignedToken, TokenClaims};
