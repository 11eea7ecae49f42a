//! Engines: a loaded model behind one trait, run on a blocking thread by the server.
//!
//! - [`builtin`]: small deterministic models for tests and demos without model files.

pub mod builtin;

use std::sync::Arc;

use mesh_protocol::{FinishReason, InferRequest, ModelCard, WireError};
use tokio_util::sync::CancellationToken;

/// One piece of streamed output.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Text since the last delta; whole UTF-8 characters.
    Delta(String),
    /// One vector per input.
    Embeddings(Vec<Vec<f32>>),
}

/// What an engine reports when it finishes.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Where an engine sends its output. `Err` means nobody is listening any more: stop.
pub type Sink<'a> = dyn FnMut(Output) -> Result<(), Gone> + 'a;

/// The receiver of an engine's output went away (the caller hung up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// A loaded model. `run` blocks: the server calls it on a blocking thread, never on the
/// networking task. It must check `cancel` between steps and stop soon after it is set.
pub trait Engine: Send + Sync + 'static {
    fn card(&self) -> &ModelCard;

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError>;
}

pub type SharedEngine = Arc<dyn Engine>;

/// Where a model comes from, as given on the command line: `NAME=SPEC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub source: String,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, source) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))?;
        mesh_protocol::ids::validate_model_name(name)?;
        if source.is_empty() {
            return Err(format!("model {name:?} has an empty path"));
        }
        Ok(ModelSpec {
            name: name.to_string(),
            source: source.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot load model {name:?} from {source_spec}: {reason}")]
pub struct LoadError {
    pub name: String,
    pub source_spec: String,
    pub reason: String,
}

/// Loads the engine a spec names. `builtin:KIND` specs need no files.
pub fn load(spec: &ModelSpec, max_concurrency: u32) -> Result<SharedEngine, LoadError> {
    let fail = |reason: String| LoadError {
        name: spec.name.clone(),
        source_spec: spec.source.clone(),
        reason,
    };
    if let Some(kind) = spec.source.strip_prefix("builtin:") {
        return builtin::from_spec(&spec.name, kind, max_concurrency)
            .map(Arc::from)
            .map_err(fail);
    }
    Err(fail(
        "not a known model source; expected builtin:echo or builtin:hash-embed".into(),
    ))
}

/// The error an engine returns when it saw `cancel` set.
pub fn cancelled() -> WireError {
    WireError::new(mesh_protocol::ErrorCode::Internal, "cancelled")
}
