//! Engines: a loaded model behind one trait, run on a blocking thread by the server.
//!
//! - [`builtin`]: small deterministic models for tests and demos without model files.
//! - [`gguf`]: text generation from GGUF files: tokenizer, template, sampling loop.
//! - [`gguf_header`]: a GGUF file's metadata and tensor index, read and checked before any weight.
//! - [`gguf_meta`]: a text model's tokenizer, chat template, stop tokens and context, from that metadata.
//! - [`llama`]: mesh's own forward pass for llama-family GGUF, by ranges of layers.
//! - [`prompt_cache`]: recent calls' key-value caches, reused by prompts that share a prefix.
//! - [`sample`]: the next token from logits (greedy, temperature, top-k, top-p).
//! - [`threads`]: one plan for the compute threads.
//! - [`cpu`]: the compute pool and the CPU kernels the engines share.
//! - [`bert`]: sentence embeddings from BERT safetensors.
//! - [`text`]: chat templates, incremental detokenization, stop sequences.
//! - [`upstream`]: a model served by an OpenAI-compatible server, offered to the mesh.

pub mod bert;
pub mod builtin;
pub mod cpu;
pub mod gguf;
pub mod gguf_header;
pub mod gguf_meta;
pub mod llama;
pub mod prompt_cache;
pub mod sample;
pub mod text;
pub mod threads;
pub mod upstream;

use std::sync::Arc;

use mesh_protocol::{FinishReason, InferRequest, ModelCard, Task, WireError};
use tokio_util::sync::CancellationToken;

/// One piece of streamed output.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Text since the last delta (whole UTF-8 characters), and the ids of the tokens sampled
    /// since then (empty when the engine has no token ids to give, as an upstream server).
    Delta { text: String, tokens: Vec<u32> },
    /// One vector per input.
    Embeddings(Vec<Vec<f32>>),
}

impl Output {
    /// A delta of text alone.
    pub fn text(text: impl Into<String>) -> Output {
        Output::Delta {
            text: text.into(),
            tokens: Vec::new(),
        }
    }
}

/// What an engine reports when it finishes.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose keys and values came from the prompt cache, not computed.
    pub cached_tokens: u32,
    /// For a resumed call: the tokens another node sampled, taken as given (not counted in
    /// `completion_tokens`).
    pub resumed_tokens: u32,
    /// For a split model: the stages the call ran on.
    pub stages: Vec<mesh_protocol::StageUse>,
}

/// How engines are loaded: shared by every model of a node.
#[derive(Clone)]
pub struct EngineOptions {
    /// Calls one model runs at once.
    pub max_concurrency: u32,
    /// What quantized weights without a SIMD kernel become at load.
    pub weight_format: llama::WeightFormat,
    /// The node's prompt cache (one budget for all models).
    pub prompt_cache: Arc<prompt_cache::PromptCache>,
}

/// The prompt cache's size when none is given: room for a few long conversations.
pub const DEFAULT_PROMPT_CACHE_MIB: usize = 256;

impl EngineOptions {
    /// The defaults, with `max_concurrency` calls at once.
    pub fn new(max_concurrency: u32) -> EngineOptions {
        EngineOptions {
            max_concurrency,
            weight_format: llama::WeightFormat::default(),
            prompt_cache: Arc::new(prompt_cache::PromptCache::new(
                DEFAULT_PROMPT_CACHE_MIB << 20,
            )),
        }
    }
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

    /// The model's files, which `/mesh/blob/1` serves to peers: the weights first (their root
    /// is the card's `blob_root`), then the card's `files` in order; none for a model without
    /// files (builtin, upstream).
    fn blobs(&self) -> Vec<crate::blobs::Blob> {
        Vec::new()
    }

    /// Checks what only the model can check (e.g. the prompt fits its context), cheaply and
    /// before the call is admitted, so a bad request never takes a slot or starts compute.
    fn validate(&self, _request: &InferRequest) -> Result<(), WireError> {
        Ok(())
    }

    /// Whether the engine can carry on a call another node began (`InferRequest::resume`):
    /// it must sample by token ids, from the same weights. Others refuse such a request.
    fn resumes(&self) -> bool {
        false
    }

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError>;
}

pub type SharedEngine = Arc<dyn Engine>;

/// The refusal of an input of the other kind: a prompt for an embedding model, texts to
/// embed for a generation model. Every engine answers it the same way.
pub fn wrong_task(card: &ModelCard) -> WireError {
    let wants = match card.task {
        Task::Generate => "chat or completion",
        Task::Embed => "embed",
    };
    WireError::bad_request(format!("model {} takes {wants} input", card.name))
}

/// Where a model comes from, as given on the command line: `NAME=SPEC`, or `NAME` for the
/// model of that name in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub source: String,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // `NAME` alone hosts the cached model of that name under it.
        let (name, source) = s.split_once('=').unwrap_or((s, s));
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

/// Loads the engine a spec names. The source may be `builtin:KIND`, an upstream server
/// (`openai+http://…`, see [`upstream`]), a GGUF file, a directory
/// with `config.json` + `tokenizer.json` + `model.safetensors` (BERT), or the name of a model
/// fetched with `mesh model fetch` (looked up in `models_dir`).
pub fn load(
    spec: &ModelSpec,
    models_dir: &std::path::Path,
    max_concurrency: u32,
) -> Result<SharedEngine, LoadError> {
    load_with(spec, models_dir, &EngineOptions::new(max_concurrency))
}

/// [`load`] with every option given.
pub fn load_with(
    spec: &ModelSpec,
    models_dir: &std::path::Path,
    options: &EngineOptions,
) -> Result<SharedEngine, LoadError> {
    let max_concurrency = options.max_concurrency;
    let fail = |reason: String| LoadError {
        name: spec.name.clone(),
        source_spec: spec.source.clone(),
        reason,
    };
    if upstream::is_upstream(&spec.source) {
        return upstream::UpstreamEngine::load(&spec.name, &spec.source, max_concurrency)
            .map(|e| Arc::new(e) as SharedEngine)
            .map_err(fail);
    }
    if let Some(kind) = spec.source.strip_prefix("builtin:") {
        return builtin::from_spec(&spec.name, kind, max_concurrency)
            .map(Arc::from)
            .map_err(fail);
    }
    let path = model_path(spec, models_dir)?;
    // Model loaders parse untrusted files: a panic in one is a load error, not a crash.
    let loaded = std::panic::catch_unwind(|| load_path(&spec.name, &path, options))
        .unwrap_or_else(|_| Err("the loader panicked on this file (corrupt?)".into()));
    let mut engine = loaded.map_err(fail)?;
    if let Some(known) = crate::models::find_known(&spec.source) {
        engine.fill_license(known.license);
    }
    Ok(Arc::from(engine.into_engine()))
}

/// The file `spec` names: a known model's (fetched, and its pinned sums checked again) or
/// the path as given.
pub fn model_path(
    spec: &ModelSpec,
    models_dir: &std::path::Path,
) -> Result<std::path::PathBuf, LoadError> {
    let fail = |reason: String| LoadError {
        name: spec.name.clone(),
        source_spec: spec.source.clone(),
        reason,
    };
    match crate::models::find_known(&spec.source) {
        Some(known) => {
            let path = crate::models::entry_path(models_dir, known);
            if !path.exists() {
                return Err(fail(format!(
                    "it is not fetched yet: run `mesh model fetch {}`",
                    known.name
                )));
            }
            // The pinned sums again: the models directory may be shared and writable by
            // others. Cached beside each file, so only a changed file is hashed.
            crate::models::verify_known(models_dir, known).map_err(fail)?;
            Ok(path)
        }
        None => {
            let path = std::path::PathBuf::from(&spec.source);
            // A name in the model cache (`mesh model add` or `pull`), unless a file of that
            // name is here.
            if path.exists() || crate::models::library::validate_name(&spec.source).is_err() {
                return Ok(path);
            }
            match crate::models::library::read(models_dir, &spec.source).map_err(fail)? {
                Some(entry) => {
                    entry.verify(models_dir).map_err(fail)?;
                    Ok(entry.entry_path(models_dir))
                }
                None => Err(fail(format!(
                    "no such file, and no model of that name in the cache ({}): see `mesh model list`",
                    models_dir.display()
                ))),
            }
        }
    }
}

/// A part of a model, by its layers: a head's (from layer 0, with the ends, to serve the model
/// and sample) or a stage's (later layers only, run for heads).
pub enum Layers {
    Head(Box<gguf::GgufEngine>),
    /// A stage: its card, its layers and its weights file (which it serves to peers too).
    Stage(Box<ModelCard>, Arc<llama::Llama>, crate::blobs::Blob),
}

/// Loads the layers `layers` of the llama GGUF model `spec` names.
pub fn load_layers(
    spec: &ModelSpec,
    models_dir: &std::path::Path,
    options: &EngineOptions,
    layers: std::ops::Range<usize>,
) -> Result<Layers, LoadError> {
    let fail = |reason: String| LoadError {
        name: spec.name.clone(),
        source_spec: spec.source.clone(),
        reason,
    };
    let path = model_path(spec, models_dir)?;
    let loaded = std::panic::catch_unwind(|| {
        if layers.start == 0 {
            gguf::GgufEngine::load_layers(&spec.name, &path, options, Some(layers.clone()))
                .map(|e| Layers::Head(Box::new(e)))
        } else {
            gguf::load_stage(&spec.name, &path, options, layers.clone())
                .map(|(card, model, blob)| Layers::Stage(Box::new(card), model, blob))
        }
    })
    .unwrap_or_else(|_| Err("the loader panicked on this file (corrupt?)".into()));
    let mut loaded = loaded.map_err(fail)?;
    if let Some(known) = crate::models::find_known(&spec.source) {
        let card = match &mut loaded {
            Layers::Head(e) => e.card_mut(),
            Layers::Stage(card, _, _) => card,
        };
        card.license
            .get_or_insert_with(|| known.license.to_string());
    }
    Ok(loaded)
}

/// A loaded file engine, before it is shared.
enum Loaded {
    Gguf(Box<gguf::GgufEngine>),
    Bert(Box<bert::BertEngine>),
}

impl Loaded {
    fn fill_license(&mut self, license: &str) {
        let card = match self {
            Loaded::Gguf(e) => e.card_mut(),
            Loaded::Bert(e) => e.card_mut(),
        };
        card.license.get_or_insert_with(|| license.to_string());
    }

    fn into_engine(self) -> Box<dyn Engine> {
        match self {
            Loaded::Gguf(e) => e,
            Loaded::Bert(e) => e,
        }
    }
}

fn load_path(
    name: &str,
    path: &std::path::Path,
    options: &EngineOptions,
) -> Result<Loaded, String> {
    let max_concurrency = options.max_concurrency;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.is_dir() {
        if path.join("config.json").exists() && path.join("model.safetensors").exists() {
            return bert::BertEngine::load(name, path, max_concurrency)
                .map(|e| Loaded::Bert(Box::new(e)));
        }
        return Err(
            "a model directory needs config.json, tokenizer.json and model.safetensors".into(),
        );
    }
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if &magic == b"GGUF" {
        return gguf::GgufEngine::load(name, path, options).map(|e| Loaded::Gguf(Box::new(e)));
    }
    Err("not a GGUF file (no GGUF magic) and not a model directory".into())
}

/// The error an engine returns when it saw `cancel` set.
pub fn cancelled() -> WireError {
    WireError::new(mesh_protocol::ErrorCode::Internal, "cancelled")
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::{ErrorCode, Input};

    #[test]
    fn every_engine_refuses_the_other_kind_of_input_alike() {
        let refusals: Vec<WireError> = [("echo", "builtin:echo"), ("embed", "builtin:hash-embed")]
            .into_iter()
            .map(|(name, source)| {
                let spec = ModelSpec {
                    name: name.into(),
                    source: source.into(),
                };
                let engine = load(&spec, std::path::Path::new("/nonexistent"), 1).unwrap();
                let wrong = match engine.card().task {
                    Task::Generate => Input::Embed {
                        texts: vec!["x".into()],
                    },
                    Task::Embed => Input::Completion { prompt: "x".into() },
                };
                let request = InferRequest {
                    model: name.into(),
                    input: wrong,
                    params: Default::default(),
                    deadline_ms: None,
                    token: None,
                    resume: None,
                };
                engine
                    .run(&request, &mut |_| Ok(()), &CancellationToken::new())
                    .unwrap_err()
            })
            .collect();
        assert_eq!(refusals[0].code, ErrorCode::BadRequest);
        assert_eq!(
            refusals[0].message,
            "model echo takes chat or completion input"
        );
        assert_eq!(refusals[1].message, "model embed takes embed input");
    }
}
