//! Text generation from GGUF files with candle's quantized models.
//!
//! The architecture comes from the file's metadata (`general.architecture`): llama (SmolLM2,
//! Llama, Mistral-style), gemma3 and qwen3 are wired; others are refused clearly. The
//! tokenizer and chat template come from the GGUF metadata too.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_qwen3};
use mesh_protocol::{ErrorCode, FinishReason, InferRequest, Input, ModelCard, Task, WireError};
use tokenizers::Tokenizer;
use tokio_util::sync::CancellationToken;

use super::gguf_header;
use super::gguf_meta::{meta_str, meta_u32, TextModel};
use super::llama::{KvCache, Llama, Parts, PREFILL_CHUNK};
use super::prompt_cache::PromptCache;
use super::sample::Sampler;
use super::text::{ChatTemplate, IncrementalDecoder, StopMatcher, StopStep};
use super::{cancelled, Completion, Engine, EngineOptions, Output, Sink};

/// The models candle-transformers computes, for the architectures mesh's own forward pass
/// does not cover yet (gemma3, qwen3).
#[derive(Clone)]
enum CandleWeights {
    Gemma3(quantized_gemma3::ModelWeights),
    Qwen3(quantized_qwen3::ModelWeights),
}

impl CandleWeights {
    fn forward(&mut self, input: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        let logits = match self {
            CandleWeights::Gemma3(m) => m.forward(input, position)?,
            CandleWeights::Qwen3(m) => m.forward(input, position)?,
        };
        // (1, vocab) or (1, seq, vocab): keep the last position's logits as a vector.
        match logits.rank() {
            3 => logits.squeeze(0)?.get(logits.dim(1)? - 1),
            2 => logits.squeeze(0),
            _ => Ok(logits),
        }
    }
}

enum Weights {
    /// mesh's own forward pass ([`super::llama`]).
    Own(Arc<Llama>),
    Candle(Box<CandleWeights>),
}

/// A call's forward pass, whatever runs it: this node's model, or a pipeline of nodes that
/// each hold a range of its layers.
pub trait Feed {
    /// Runs `tokens` at the next positions; returns the logits after the last.
    fn feed(&mut self, tokens: &[u32], cancel: &CancellationToken) -> Result<Vec<f32>, WireError>;
}

/// One call's state of the model: its cache, and where it stands.
enum Session<'a> {
    Own {
        model: &'a Llama,
        cache: KvCache,
    },
    Candle {
        weights: CandleWeights,
        position: usize,
    },
}

impl Feed for Session<'_> {
    fn feed(&mut self, tokens: &[u32], cancel: &CancellationToken) -> Result<Vec<f32>, WireError> {
        match self {
            Session::Own { model, cache } => {
                let mut last = None;
                for chunk in tokens.chunks(PREFILL_CHUNK) {
                    if cancel.is_cancelled() {
                        return Err(cancelled());
                    }
                    let mut hidden = model.embed(chunk).map_err(internal)?;
                    model.forward_layers(cache, &mut hidden).map_err(internal)?;
                    last = Some(hidden);
                }
                let hidden = last.ok_or_else(|| internal("no tokens to run"))?;
                model.logits(&hidden, hidden.rows - 1).map_err(internal)
            }
            Session::Candle { weights, position } => {
                let input = Tensor::new(tokens, &Device::Cpu)
                    .and_then(|t| t.unsqueeze(0))
                    .map_err(internal)?;
                let logits = weights.forward(&input, *position).map_err(internal)?;
                *position += tokens.len();
                logits.to_vec1::<f32>().map_err(internal)
            }
        }
    }
}

pub struct GgufEngine {
    card: ModelCard,
    /// The weights file, which `/mesh/blob/1` serves.
    blob: crate::blobs::Blob,
    weights: Weights,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    stop_ids: Vec<u32>,
    prompt_cache: Arc<PromptCache>,
    /// The prompt cache's key: the file's hash and the weight format.
    cache_key: String,
}

/// llama.cpp's `general.file_type` values, for the card's quantization field.
fn file_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// A GGUF file's hashes (sha256 and blob tree, in one read), the file opened, and its
/// metadata and tensor index read and checked against the file's size.
fn open_gguf(path: &Path) -> Result<(crate::blobs::Blob, File, gguf_file::Content), String> {
    let blob = crate::blobs::hash_file(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut file = File::open(path).map_err(|e| format!("cannot open the file: {e}"))?;
    let content = gguf_header::read(&mut file)?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?
        .len();
    gguf_header::check_tensors(&content, len)?;
    Ok((blob, file, content))
}

/// The layers `layers` of the llama model in `path`, without its ends, for a node that runs
/// them for heads (a stage of a split model); and the card that node advertises.
pub fn load_stage(
    name: &str,
    path: &Path,
    options: &EngineOptions,
    layers: std::ops::Range<usize>,
) -> Result<(ModelCard, Arc<Llama>, crate::blobs::Blob), String> {
    let started = Instant::now();
    let (blob, mut file, content) = open_gguf(path)?;
    let config = super::llama::LlamaConfig::from_gguf(&content)?;
    if layers.start == 0 || layers.start >= layers.end || layers.end > config.layers {
        return Err(format!(
            "a stage runs layers after the first, within the model's {}: not {}..{}",
            config.layers, layers.start, layers.end
        ));
    }
    let parts = Parts {
        layers: layers.clone(),
        ends: false,
    };
    let model = Llama::load_parts(&content, &mut file, options.weight_format, &parts)
        .map_err(|e| format!("cannot load the llama weights: {e}"))?;
    let parameters = gguf_header::parameters(&content);
    tracing::info!(
        model = name,
        layers = ?layers,
        mib = model.weight_bytes() >> 20,
        ms = started.elapsed().as_millis() as u64,
        "loaded a stage"
    );
    let card = ModelCard {
        name: name.to_string(),
        task: Task::Generate,
        architecture: config.architecture.clone(),
        parameters,
        quantization: meta_u32(&content, "general.file_type")
            .and_then(file_type_name)
            .unwrap_or("unknown")
            .to_string(),
        context_length: config.context as u32,
        embedding_dims: None,
        sha256: blob.sha256.clone(),
        license: meta_str(&content, "general.license"),
        max_concurrency: options.max_concurrency,
        layers: Some(mesh_protocol::LayerRange {
            start: layers.start as u32,
            end: layers.end as u32,
            total: config.layers as u32,
        }),
        blob_root: Some(blob.root_hex()),
        files: Vec::new(),
    };
    Ok((card, Arc::new(model), blob))
}

impl GgufEngine {
    pub fn load(name: &str, path: &Path, options: &EngineOptions) -> Result<GgufEngine, String> {
        Self::load_layers(name, path, options, None)
    }

    /// Loads the model for a head that holds `layers` (from the first) and the ends, the rest
    /// of the layers running elsewhere; `None` loads every layer.
    pub fn load_layers(
        name: &str,
        path: &Path,
        options: &EngineOptions,
        layers: Option<std::ops::Range<usize>>,
    ) -> Result<GgufEngine, String> {
        let started = Instant::now();
        let (blob, mut file, content) = open_gguf(path)?;
        let parameters = gguf_header::parameters(&content);
        let quantization = meta_u32(&content, "general.file_type")
            .and_then(file_type_name)
            .map(str::to_string)
            .unwrap_or_else(|| "unknown".into());
        let TextModel {
            architecture: arch,
            context_length,
            tokenizer,
            template,
            stop_ids,
            license,
        } = TextModel::from_gguf(&content)?;

        let device = Device::Cpu;
        let format = options.weight_format;
        let weights = match arch.as_str() {
            "llama" => {
                let total = super::llama::LlamaConfig::from_gguf(&content)?.layers;
                let layers = layers.clone().unwrap_or(0..total);
                if layers.start != 0 {
                    return Err(format!(
                        "a node that samples holds the model's first layers, not {}..{}",
                        layers.start, layers.end
                    ));
                }
                let parts = Parts { layers, ends: true };
                Weights::Own(Arc::new(
                    Llama::load_parts(&content, &mut file, format, &parts)
                        .map_err(|e| format!("cannot load the llama weights: {e}"))?,
                ))
            }
            _ if layers.is_some() => {
                return Err(format!(
                    "only llama models can be split by layers, not {arch:?}"
                ))
            }
            "gemma3" => Weights::Candle(Box::new(CandleWeights::Gemma3(
                quantized_gemma3::ModelWeights::from_gguf(content, &mut file, &device)
                    .map_err(|e| format!("cannot load the gemma3 weights: {e}"))?,
            ))),
            "qwen3" => Weights::Candle(Box::new(CandleWeights::Qwen3(
                quantized_qwen3::ModelWeights::from_gguf(content, &mut file, &device)
                    .map_err(|e| format!("cannot load the qwen3 weights: {e}"))?,
            ))),
            other => {
                return Err(format!(
                    "GGUF architecture {other:?} is not supported (supported: llama, gemma3, qwen3)"
                ))
            }
        };
        let cache_key = format!("{}:{format}", blob.sha256);
        let held = match &weights {
            Weights::Own(m) => format!("{} ({} MB held)", m.format(), m.weight_bytes() >> 20),
            Weights::Candle(_) => "as in the file (candle-transformers)".into(),
        };
        tracing::info!(
            model = name,
            arch = %arch,
            params = parameters,
            quant = %quantization,
            weights = %held,
            ms = started.elapsed().as_millis() as u64,
            "loaded GGUF model"
        );
        Ok(GgufEngine {
            card: ModelCard {
                name: name.to_string(),
                task: Task::Generate,
                architecture: arch,
                parameters,
                quantization,
                context_length,
                embedding_dims: None,
                sha256: blob.sha256.clone(),
                license,
                max_concurrency: options.max_concurrency,
                layers: None,
                blob_root: Some(blob.root_hex()),
                files: Vec::new(),
            },
            blob,
            weights,
            tokenizer,
            template,
            stop_ids,
            prompt_cache: options.prompt_cache.clone(),
            cache_key,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The prompt text the model sees for `input` (the chat template applied).
    pub fn prompt_text(&self, input: &Input) -> Result<String, WireError> {
        match input {
            Input::Chat { messages } => match &self.template {
                Some(t) => t.render(messages).map_err(WireError::bad_request),
                None => Err(WireError::bad_request(format!(
                    "model {} has no chat template; send a completion prompt",
                    self.card.name
                ))),
            },
            Input::Completion { prompt } => Ok(prompt.clone()),
            Input::Embed { .. } => Err(super::wrong_task(&self.card)),
        }
    }

    /// Token ids of the prompt, checked against the context.
    pub fn encode_prompt(&self, input: &Input) -> Result<Vec<u32>, WireError> {
        let text = self.prompt_text(input)?;
        let ids = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| WireError::bad_request(format!("cannot tokenize the prompt: {e}")))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(WireError::bad_request("the prompt is empty"));
        }
        if ids.len() >= self.card.context_length as usize {
            return Err(WireError::bad_request(format!(
                "the prompt has {} tokens; model {} has a context of {}",
                ids.len(),
                self.card.name,
                self.card.context_length
            )));
        }
        Ok(ids)
    }
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, format!("generation failed: {e}"))
}

impl GgufEngine {
    pub(crate) fn card_mut(&mut self) -> &mut ModelCard {
        &mut self.card
    }
}

impl Engine for GgufEngine {
    fn blobs(&self) -> Vec<crate::blobs::Blob> {
        vec![self.blob.clone()]
    }

    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn validate(&self, request: &InferRequest) -> Result<(), WireError> {
        self.encode_prompt(&request.input).map(|_| ())
    }

    fn resumes(&self) -> bool {
        true
    }

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let prompt = self.encode_prompt(&request.input)?;
        let resumed = self.resumed_tokens(request)?;
        let capacity = prompt.len() + request.params.max_tokens as usize;
        let capacity = capacity.min(self.card.context_length as usize);
        let (mut session, cached) = match &self.weights {
            Weights::Own(model) => {
                let layers = 0..model.config().layers;
                match self.prompt_cache.lookup(&self.cache_key, &prompt, capacity) {
                    Some(hit) => (
                        Session::Own {
                            model,
                            cache: hit.cache,
                        },
                        hit.tokens,
                    ),
                    None => (
                        Session::Own {
                            model,
                            cache: model.new_cache(layers, capacity),
                        },
                        0,
                    ),
                }
            }
            Weights::Candle(w) => (
                Session::Candle {
                    weights: (**w).clone(),
                    position: 0,
                },
                0,
            ),
        };
        let mut seen = prompt.clone();
        seen.extend_from_slice(resumed);
        let done = self.generate(
            request,
            &prompt,
            cached,
            &mut session,
            &mut seen,
            sink,
            cancel,
        )?;
        self.keep(session, &seen);
        Ok(done)
    }
}

impl GgufEngine {
    /// The tokens another node sampled, for a resumed call: only from the same weights.
    fn resumed_tokens<'r>(&self, request: &'r InferRequest) -> Result<&'r [u32], WireError> {
        match &request.resume {
            None => Ok(&[]),
            Some(r) if r.weights_sha256 == self.card.sha256 => Ok(&r.tokens),
            Some(_) => Err(WireError::bad_request(format!(
                "a resumed call must come from the same weights as model {}'s",
                self.card.name
            ))),
        }
    }

    /// Generates the answer to `request`, whose prompt is `prompt`, through `feed`, which
    /// already holds the first `cached` prompt tokens. A resumed call's tokens are fed as
    /// given, and the decoder, the stop matcher and the sampler are brought to where the first
    /// node left them, so the stream goes on where it stopped. Every token fed is appended to
    /// `seen` (which starts with the prompt and the resumed tokens).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        request: &InferRequest,
        prompt: &[u32],
        cached: usize,
        feed: &mut dyn Feed,
        seen: &mut Vec<u32>,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let resumed = self.resumed_tokens(request)?;
        let context = self.card.context_length as usize;
        if prompt.len() + resumed.len() >= context {
            return Err(WireError::bad_request(format!(
                "the prompt and the resumed answer have {} tokens; model {} has a context of {context}",
                prompt.len() + resumed.len(),
                self.card.name
            )));
        }
        let budget = (request.params.max_tokens as usize)
            .saturating_sub(resumed.len())
            .min(context - prompt.len() - resumed.len());
        let seed = request.params.seed.unwrap_or_else(rand::random);
        let mut sampler = Sampler::new(&request.params, seed);
        let mut decoder = IncrementalDecoder::new();
        let mut stops = StopMatcher::new(request.params.stop.clone());
        // A resumed call: where the first node left the decoder, the matcher and the sampler.
        // Their output then was the caller's already, so it is not sent again.
        for id in resumed {
            if let Some(piece) = decoder.push(&self.tokenizer, *id).map_err(internal)? {
                if let StopStep::Stop(_) = stops.feed(&piece) {
                    return Err(WireError::bad_request(
                        "the resumed answer already ends at a stop sequence",
                    ));
                }
            }
        }
        sampler.skip(resumed.len());
        let mut fed = prompt[cached..].to_vec();
        fed.extend_from_slice(resumed);
        let mut logits = feed.feed(&fed, cancel)?;
        let usage = |finish_reason, generated| Completion {
            finish_reason,
            prompt_tokens: prompt.len() as u32,
            completion_tokens: generated,
            cached_tokens: cached as u32,
            resumed_tokens: resumed.len() as u32,
            stages: Vec::new(),
        };
        let mut generated = 0u32;
        let mut finish = FinishReason::Length;
        // Tokens sampled since the last delta, sent with the next one.
        let mut unsent: Vec<u32> = Vec::new();
        for step in 0..budget {
            if cancel.is_cancelled() {
                return Err(cancelled());
            }
            let next = sampler.sample(&logits);
            if self.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            generated += 1;
            unsent.push(next);
            if let Some(piece) = decoder.push(&self.tokenizer, next).map_err(internal)? {
                let step = stops.feed(&piece);
                let (StopStep::Continue(text) | StopStep::Stop(text)) = &step;
                if !text.is_empty() {
                    let tokens = std::mem::take(&mut unsent);
                    sink(Output::Delta {
                        text: text.clone(),
                        tokens,
                    })
                    .map_err(|_| cancelled())?;
                }
                if matches!(step, StopStep::Stop(_)) {
                    return Ok(usage(FinishReason::Stop, generated));
                }
            }
            if step + 1 == budget {
                break;
            }
            logits = feed.feed(&[next], cancel)?;
            seen.push(next);
        }
        let mut tail = decoder
            .flush(&self.tokenizer)
            .map_err(internal)?
            .unwrap_or_default();
        tail = match stops.feed(&tail) {
            StopStep::Continue(t) => t + &stops.finish(),
            StopStep::Stop(t) => {
                finish = FinishReason::Stop;
                t
            }
        };
        if !tail.is_empty() {
            sink(Output::Delta {
                text: tail,
                tokens: unsent,
            })
            .map_err(|_| cancelled())?;
        }
        Ok(usage(finish, generated))
    }
}

impl GgufEngine {
    /// Hands a finished call's cache to the prompt cache.
    fn keep(&self, session: Session<'_>, seen: &[u32]) {
        if let Session::Own { cache, .. } = session {
            let n = cache.len().min(seen.len());
            self.prompt_cache.store(&self.cache_key, &seen[..n], cache);
        }
    }

    /// The model of mesh's own forward pass, when this file runs on it.
    pub fn llama(&self) -> Option<&Arc<Llama>> {
        match &self.weights {
            Weights::Own(m) => Some(m),
            Weights::Candle(_) => None,
        }
    }
}
