//! Sentence embeddings from a BERT model in safetensors (all-MiniLM-L6-v2 and its kin).
//!
//! The embedding of a text is the mean of the last hidden states over its real tokens (the
//! attention mask keeps padding out), L2-normalised, as sentence-transformers computes it.
//! Inputs are truncated at 256 tokens, sentence-transformers' limit for MiniLM.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use mesh_protocol::{ErrorCode, FinishReason, InferRequest, Input, ModelCard, Task, WireError};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio_util::sync::CancellationToken;

use super::{cancelled, Completion, Engine, Output, Sink};

/// Longest input in tokens; longer inputs are truncated (sentence-transformers does the same).
pub const MAX_INPUT_TOKENS: usize = 256;
/// Texts embedded in one forward pass; larger requests run in several.
pub const BATCH: usize = 32;

pub struct BertEngine {
    card: ModelCard,
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl BertEngine {
    /// Loads `dir/{config.json, tokenizer.json, model.safetensors}`.
    pub fn load(name: &str, dir: &Path, max_concurrency: u32) -> Result<BertEngine, String> {
        let started = Instant::now();
        let read = |file: &str| {
            std::fs::read(dir.join(file)).map_err(|e| format!("cannot read {file}: {e}"))
        };
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| format!("config.json is not a BERT config: {e}"))?;
        let raw: serde_json::Value =
            serde_json::from_slice(&read("config.json")?).map_err(|e| e.to_string())?;
        let hidden = raw["hidden_size"].as_u64().unwrap_or(0) as u32;
        let max_positions = raw["max_position_embeddings"].as_u64().unwrap_or(512) as usize;

        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| format!("tokenizer.json does not load: {e}"))?;
        // Pad each batch to its longest input (not to a fixed 128) and truncate long inputs.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_INPUT_TOKENS.min(max_positions),
                ..Default::default()
            }))
            .map_err(|e| format!("cannot set truncation: {e}"))?;

        // Read into memory rather than mmap: a file truncated under us must be an error, not
        // a SIGBUS.
        let bytes = read("model.safetensors")?;
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let parameters = count_parameters(&bytes)?;
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device)
            .map_err(|e| format!("model.safetensors does not load (corrupt?): {e}"))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| format!("the weights do not fit a BERT model: {e}"))?;
        tracing::info!(
            model = name,
            ms = started.elapsed().as_millis() as u64,
            "loaded BERT model"
        );
        Ok(BertEngine {
            card: ModelCard {
                name: name.to_string(),
                task: Task::Embed,
                architecture: "bert".into(),
                parameters,
                quantization: "F32".into(),
                context_length: MAX_INPUT_TOKENS.min(max_positions) as u32,
                embedding_dims: Some(hidden),
                sha256,
                license: None,
                max_concurrency,
            },
            model,
            tokenizer,
            device,
        })
    }

    /// Embeds `texts`: one unit vector each. Returns the vectors and the tokens used.
    pub fn embed(
        &self,
        texts: &[String],
        cancel: &CancellationToken,
    ) -> Result<(Vec<Vec<f32>>, u32), WireError> {
        let mut vectors = Vec::with_capacity(texts.len());
        let mut tokens = 0u32;
        for chunk in texts.chunks(BATCH) {
            if cancel.is_cancelled() {
                return Err(cancelled());
            }
            let encodings = self
                .tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| WireError::bad_request(format!("cannot tokenize: {e}")))?;
            tokens += encodings
                .iter()
                .map(|e| e.get_attention_mask().iter().sum::<u32>())
                .sum::<u32>();
            let stack =
                |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> candle_core::Result<Tensor> {
                    let rows = encodings
                        .iter()
                        .map(|e| Tensor::new(f(e), &self.device))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::stack(&rows, 0)
                };
            let pooled = (|| -> candle_core::Result<Vec<Vec<f32>>> {
                let ids = stack(&|e| e.get_ids())?;
                let type_ids = stack(&|e| e.get_type_ids())?;
                let mask = stack(&|e| e.get_attention_mask())?;
                let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?;
                let mean = summed.broadcast_div(&counts)?;
                let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
                mean.broadcast_div(&norm)?.to_vec2::<f32>()
            })()
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("embedding failed: {e}")))?;
            vectors.extend(pooled);
        }
        Ok((vectors, tokens))
    }
}

/// Weights in a safetensors file, from its header; fails on a corrupt or truncated file.
fn count_parameters(bytes: &[u8]) -> Result<u64, String> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("model.safetensors is corrupt or truncated: {e}"))?;
    Ok(st
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
        .sum())
}

impl BertEngine {
    pub(crate) fn card_mut(&mut self) -> &mut ModelCard {
        &mut self.card
    }
}

impl Engine for BertEngine {
    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let Input::Embed { texts } = &request.input else {
            return Err(super::wrong_task(&self.card));
        };
        let (vectors, tokens) = self.embed(texts, cancel)?;
        sink(Output::Embeddings(vectors)).map_err(|_| cancelled())?;
        Ok(Completion {
            finish_reason: FinishReason::Complete,
            prompt_tokens: tokens,
            completion_tokens: 0,
            cached_tokens: 0,
        })
    }
}
