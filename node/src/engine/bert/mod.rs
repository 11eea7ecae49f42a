//! Sentence embeddings from a BERT model in safetensors (all-MiniLM-L6-v2 and its kin), on
//! mesh's own forward pass ([`model`]).
//!
//! The embedding of a text is the mean of the last hidden states over its tokens,
//! L2-normalised, as sentence-transformers computes it. Texts are never padded: a batch's
//! tokens are laid end to end. Inputs are truncated at 256 tokens, sentence-transformers'
//! limit for MiniLM.

pub mod model;

use std::path::Path;
use std::time::Instant;

use mesh_protocol::{FinishReason, InferRequest, Input, ModelCard, Task, WireError};
use tokenizers::{Tokenizer, TruncationParams};
use tokio_util::sync::CancellationToken;

use super::{cancelled, Completion, Engine, Output, Sink};
pub use model::{BertConfig, BertModel};

/// Longest input in tokens; longer inputs are truncated (sentence-transformers does the same).
pub const MAX_INPUT_TOKENS: usize = 256;
/// Most texts in one forward pass; larger requests run in several.
pub const BATCH: usize = 64;
/// Most tokens in one forward pass, which bounds its activations (about 10 KB per token for
/// MiniLM).
pub const BATCH_TOKENS: usize = 4096;

pub struct BertEngine {
    card: ModelCard,
    model: BertModel,
    tokenizer: Tokenizer,
    /// The directory's files, weights first, served to peers over `/mesh/blob/1`.
    blobs: Vec<crate::blobs::Blob>,
}

/// The files of a BERT directory besides the weights, in the order cards name them.
pub const COMPANION_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// The weights file of a BERT directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

impl BertEngine {
    /// Loads `dir/{config.json, tokenizer.json, model.safetensors}`.
    pub fn load(name: &str, dir: &Path, max_concurrency: u32) -> Result<BertEngine, String> {
        let started = Instant::now();
        let read = |file: &str| {
            std::fs::read(dir.join(file)).map_err(|e| format!("cannot read {file}: {e}"))
        };
        // Each file is read once: parsed, and hashed for the card and for sharing.
        let mut blobs = Vec::with_capacity(3);
        let config_bytes = read("config.json")?;
        let tokenizer_bytes = read("tokenizer.json")?;
        let raw: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| format!("config.json is not a BERT config: {e}"))?;
        let config = BertConfig::from_json(&raw)?;
        let max_tokens = MAX_INPUT_TOKENS.min(config.max_positions);

        let mut tokenizer = Tokenizer::from_bytes(&tokenizer_bytes)
            .map_err(|e| format!("tokenizer.json does not load: {e}"))?;
        // No padding (texts are packed, not padded), and long inputs truncated.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| format!("cannot set truncation: {e}"))?;

        // Read into memory rather than mmap: a file truncated under us must be an error, not
        // a SIGBUS.
        let bytes = read(WEIGHTS_FILE)?;
        blobs.push(crate::blobs::hash_bytes(&dir.join(WEIGHTS_FILE), &bytes));
        for (file, data) in COMPANION_FILES
            .iter()
            .zip([&config_bytes, &tokenizer_bytes])
        {
            blobs.push(crate::blobs::hash_bytes(&dir.join(file), data));
        }
        let files = COMPANION_FILES
            .iter()
            .zip(&blobs[1..])
            .map(|(name, blob)| mesh_protocol::CardFile {
                name: name.to_string(),
                sha256: blob.sha256.clone(),
                blob_root: blob.root_hex(),
            })
            .collect();
        let sha256 = blobs[0].sha256.clone();
        let parameters = count_parameters(&bytes)?;
        let hidden = config.width as u32;
        let model = BertModel::load(&bytes, config)
            .map_err(|e| format!("the weights do not fit a BERT model: {e}"))?;
        tracing::info!(
            model = name,
            ms = started.elapsed().as_millis() as u64,
            mib = model.weight_bytes() >> 20,
            "loaded BERT model"
        );
        Ok(BertEngine {
            card: ModelCard {
                name: name.to_string(),
                task: Task::Embed,
                architecture: "bert".into(),
                parameters,
                quantization: "F32".into(),
                context_length: max_tokens as u32,
                embedding_dims: Some(hidden),
                sha256,
                license: None,
                max_concurrency,
                layers: None,
                blob_root: Some(blobs[0].root_hex()),
                files,
            },
            model,
            tokenizer,
            blobs,
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
            let encodings = self
                .tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| WireError::bad_request(format!("cannot tokenize: {e}")))?;
            let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
            tokens += ids.iter().map(|i| i.len() as u32).sum::<u32>();
            // Forward passes of at most BATCH_TOKENS tokens each.
            let mut start = 0;
            while start < ids.len() {
                if cancel.is_cancelled() {
                    return Err(cancelled());
                }
                let mut end = start + 1;
                let mut total = ids[start].len();
                while end < ids.len() && total + ids[end].len() <= BATCH_TOKENS {
                    total += ids[end].len();
                    end += 1;
                }
                let group = &ids[start..end];
                let hidden = self.model.forward(group).map_err(|e| {
                    WireError::new(
                        mesh_protocol::ErrorCode::Internal,
                        format!("embedding failed: {e}"),
                    )
                })?;
                vectors.extend(pool_and_normalize(
                    &hidden,
                    group,
                    self.model.config().width,
                ));
                start = end;
            }
        }
        Ok((vectors, tokens))
    }
}

/// The mean of each text's rows of `hidden` (laid end to end), scaled to unit length.
fn pool_and_normalize(hidden: &[f32], texts: &[&[u32]], width: usize) -> Vec<Vec<f32>> {
    let mut at = 0;
    texts
        .iter()
        .map(|t| {
            let mut mean = vec![0f32; width];
            for row in hidden[at * width..][..t.len() * width].chunks_exact(width) {
                super::cpu::simd::add_assign(&mut mean, row);
            }
            at += t.len();
            let norm = super::cpu::simd::dot(&mean, &mean).sqrt();
            if norm > 0.0 {
                super::cpu::simd::scale(&mut mean, 1.0 / norm);
            }
            mean
        })
        .collect()
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

    fn blobs(&self) -> Vec<crate::blobs::Blob> {
        self.blobs.clone()
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
            resumed_tokens: 0,
            stages: Vec::new(),
        })
    }
}
