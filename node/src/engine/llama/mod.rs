//! mesh's own forward pass for llama-family GGUF models (SmolLM2, Llama, Mistral-style).
//!
//! The model is three separate steps, with hidden states in and out, so that a range of layers
//! can run anywhere:
//! - [`Llama::embed`]: token ids to hidden states;
//! - [`Llama::forward_layers`]: the layers of a [`KvCache`]'s range over hidden states, at the
//!   cache's next positions;
//! - [`Llama::logits`]: the final norm and the output head, for one row.
//!
//! [`Llama::forward_tokens`] chains the three over the whole model, in chunks of at most
//! [`PREFILL_CHUNK`] tokens so a long prompt's activations stay bounded.
//!
//! What makes it fast on a CPU: mesh's own kernels for the file's quantized blocks
//! ([`crate::engine::cpu::qdot`]), with the activations quantized once per matrix; Q, K and V
//! as one matrix, gate and up as one ([`weights`]); a cache appended in place and read in place
//! by grouped-query attention ([`attention`]); every parallel step on the one compute pool
//! ([`crate::engine::cpu::Pool`]).

pub mod attention;
pub mod config;
pub mod kv_cache;
pub mod rope;
pub mod weights;

use std::io::{Read, Seek};
use std::ops::Range;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::Device;

pub use config::LlamaConfig;
pub use kv_cache::KvCache;
pub use weights::WeightFormat;

use crate::engine::cpu::{qdot, simd, Pool, QActs, QMatrix};
use attention::Heads;
use mesh_protocol::HiddenFormat;
use rope::Rope;
use weights::vector;

/// Most prompt tokens computed in one step.
pub const PREFILL_CHUNK: usize = 128;

/// Hidden states: `rows` positions of `width` floats each.
#[derive(Debug, Clone, PartialEq)]
pub struct Hidden {
    pub rows: usize,
    pub data: Vec<f32>,
}

impl Hidden {
    /// The bytes `/mesh/stage/1` carries: little-endian values in `format`.
    pub fn encode(&self, format: HiddenFormat) -> Vec<u8> {
        match format {
            HiddenFormat::F32 => self.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            HiddenFormat::F16 => self
                .data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }

    /// `rows` positions of `width` values from `bytes` in `format`; the size must match, and
    /// every value must be finite.
    pub fn decode(
        bytes: &[u8],
        rows: usize,
        width: usize,
        format: HiddenFormat,
    ) -> Result<Hidden, String> {
        let want = rows
            .checked_mul(width)
            .and_then(|n| n.checked_mul(format.bytes()))
            .ok_or("the step's size overflows")?;
        if bytes.len() != want {
            return Err(format!(
                "{} bytes of hidden states for {rows} positions of {width} {format:?} values ({want} bytes)",
                bytes.len()
            ));
        }
        let data: Vec<f32> = match format {
            HiddenFormat::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            HiddenFormat::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        if data.iter().any(|v| !v.is_finite()) {
            return Err("hidden states must be finite numbers".into());
        }
        Ok(Hidden { rows, data })
    }
}

struct Block {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked.
    qkv: QMatrix,
    attn_out: QMatrix,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked.
    gate_up: QMatrix,
    down: QMatrix,
}

/// A loaded llama-family model, or the part of one a node holds: a range of its layers, with
/// or without its ends (the embedding before the first layer, the final norm and output head
/// after the last). Immutable: every call brings its own [`KvCache`].
pub struct Llama {
    config: LlamaConfig,
    heads: Heads,
    rope: Rope,
    /// The layers held: `blocks[i]` is model layer `layers.start + i`.
    layers: Range<usize>,
    blocks: Vec<Block>,
    ends: Option<Ends>,
    format: WeightFormat,
}

/// What comes before the first layer and after the last.
struct Ends {
    embedding: QMatrix,
    output_norm: Vec<f32>,
    /// `None`: the head is tied to the embedding.
    output: Option<QMatrix>,
}

/// Which parts of a model to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// The layers.
    pub layers: Range<usize>,
    /// Also the embedding, final norm and output head (a node that samples needs them).
    pub ends: bool,
}

/// Buffers of one forward step, sized for its rows.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attended: Vec<f32>,
    projected: Vec<f32>,
    gate_up: Vec<f32>,
    activated: Vec<f32>,
    angles: Vec<Vec<f32>>,
    acts: QActs,
}

/// `out = x · Wᵀ` for `m` rows of `x`, with `x` quantized into `acts` first.
fn linear(w: &QMatrix, x: &[f32], m: usize, out: &mut Vec<f32>, acts: &mut QActs) {
    acts.quantize(x, m, w.cols(), w.format().offset());
    out.resize(m * w.rows(), 0.0);
    qdot::matmul(w, acts, out, Pool::global());
}

impl Llama {
    /// Reads the whole model that `content` describes from `file`, converting the weights per
    /// `format`.
    pub fn load<R: Read + Seek>(
        content: &Content,
        file: &mut R,
        format: WeightFormat,
    ) -> Result<Llama, String> {
        let layers = LlamaConfig::from_gguf(content)?.layers;
        Self::load_parts(
            content,
            file,
            format,
            &Parts {
                layers: 0..layers,
                ends: true,
            },
        )
    }

    /// Reads only `parts` of the model: the other layers' weights are never read, so a node
    /// holding a range of layers takes about that share of the memory.
    pub fn load_parts<R: Read + Seek>(
        content: &Content,
        file: &mut R,
        format: WeightFormat,
        parts: &Parts,
    ) -> Result<Llama, String> {
        let config = LlamaConfig::from_gguf(content)?;
        if parts.layers.start > parts.layers.end || parts.layers.end > config.layers {
            return Err(format!(
                "layers {}..{} are not within the model's {}",
                parts.layers.start, parts.layers.end, config.layers
            ));
        }
        let mut tensor = |name: &str| -> Result<QTensor, String> {
            content
                .tensor(file, name, &Device::Cpu)
                .map_err(|e| format!("tensor {name}: {e}"))
        };
        let rope_factors = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(vector(&tensor("rope_freqs.weight")?)?),
            false => None,
        };
        let ends = if parts.ends {
            let embedding = weights::single(&tensor("token_embd.weight")?, format)?;
            if embedding.cols() != config.width {
                return Err(format!(
                    "token_embd.weight is {} wide; the metadata says {}",
                    embedding.cols(),
                    config.width
                ));
            }
            let output = match content.tensor_infos.contains_key("output.weight") {
                true => Some(weights::single(&tensor("output.weight")?, format)?),
                false => None,
            };
            Some(Ends {
                embedding,
                output_norm: vector(&tensor("output_norm.weight")?)?,
                output,
            })
        } else {
            None
        };
        let heads = Heads {
            heads: config.heads,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            scale: 1.0 / (config.head_dim as f32).sqrt(),
        };
        let mut blocks = Vec::with_capacity(parts.layers.len());
        for i in parts.layers.clone() {
            let mut t = |part: &str| tensor(&format!("blk.{i}.{part}.weight"));
            let (q, k, v) = (t("attn_q")?, t("attn_k")?, t("attn_v")?);
            let qkv = weights::fused(&[&q, &k, &v], format)?;
            let (gate, up) = (t("ffn_gate")?, t("ffn_up")?);
            let gate_up = weights::fused(&[&gate, &up], format)?;
            let block = Block {
                attn_norm: vector(&t("attn_norm")?)?,
                qkv,
                attn_out: weights::single(&t("attn_output")?, format)?,
                ffn_norm: vector(&t("ffn_norm")?)?,
                gate_up,
                down: weights::single(&t("ffn_down")?, format)?,
            };
            let want_qkv = heads.q_width() + 2 * heads.kv_width();
            if block.qkv.rows() != want_qkv
                || block.qkv.cols() != config.width
                || block.gate_up.rows() != 2 * config.ffn_width
                || block.attn_out.rows() != config.width
                || block.attn_norm.len() != config.width
                || block.down.rows() != config.width
            {
                return Err(format!(
                    "layer {i}'s tensors do not match the metadata's shape"
                ));
            }
            blocks.push(block);
        }
        let rope = Rope::new(
            config.rope_dims,
            config.rope_theta,
            config.rope_style,
            rope_factors.as_deref(),
            config.rope_linear_scale,
        );
        Ok(Llama {
            config,
            heads,
            rope,
            layers: parts.layers.clone(),
            blocks,
            ends,
            format,
        })
    }

    /// The model layers this holds.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Whether this holds the embedding and output head (it can turn tokens into logits).
    pub fn has_ends(&self) -> bool {
        self.ends.is_some()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Entries in the vocabulary (rows of the output head), if this holds it.
    pub fn vocab(&self) -> Option<usize> {
        self.ends()
            .ok()
            .map(|e| e.output.as_ref().unwrap_or(&e.embedding).rows())
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.qkv.bytes() + b.attn_out.bytes() + b.gate_up.bytes() + b.down.bytes())
            .sum();
        let ends = self.ends.as_ref().map_or(0, |e| {
            e.embedding.bytes() + e.output.as_ref().map_or(0, QMatrix::bytes)
        });
        blocks + ends
    }

    fn ends(&self) -> Result<&Ends, String> {
        self.ends
            .as_ref()
            .ok_or_else(|| "this node holds no embedding or output head of the model".into())
    }

    /// An empty cache for `layers`, with room for `capacity` positions.
    pub fn new_cache(&self, layers: Range<usize>, capacity: usize) -> KvCache {
        KvCache::new(layers, self.heads.kv_heads, self.heads.head_dim, capacity)
    }

    /// Hidden states of `tokens` before the first layer.
    pub fn embed(&self, tokens: &[u32]) -> Result<Hidden, String> {
        let width = self.config.width;
        let mut data = vec![0f32; tokens.len() * width];
        let embedding = &self.ends()?.embedding;
        for (t, id) in tokens.iter().enumerate() {
            embedding.row_f32(*id as usize, &mut data[t * width..][..width])?;
        }
        Ok(Hidden {
            rows: tokens.len(),
            data,
        })
    }

    /// Runs the cache's layers over `hidden`, whose rows are the positions from
    /// `cache.len()` on, and records their keys and values in the cache.
    pub fn forward_layers(&self, cache: &mut KvCache, hidden: &mut Hidden) -> Result<(), String> {
        let layers = cache.layers();
        let (m, start) = (hidden.rows, cache.len());
        if layers.start < self.layers.start || layers.end > self.layers.end {
            return Err(format!(
                "layers {layers:?} are not among the layers held ({:?})",
                self.layers
            ));
        }
        if hidden.data.len() != m * self.config.width {
            return Err("hidden states of the wrong width".into());
        }
        if start + m > self.config.context {
            return Err(format!(
                "positions up to {} are past the context of {}",
                start + m,
                self.config.context
            ));
        }
        let mut s = Scratch {
            angles: (0..m)
                .map(|t| {
                    let mut cs = Vec::new();
                    self.rope.angles(start + t, &mut cs);
                    cs
                })
                .collect(),
            ..Scratch::default()
        };
        for layer in layers {
            self.block(layer, cache, hidden, start, &mut s)?;
        }
        cache.set_len(start + m);
        Ok(())
    }

    fn block(
        &self,
        layer: usize,
        cache: &mut KvCache,
        hidden: &mut Hidden,
        start: usize,
        s: &mut Scratch,
    ) -> Result<(), String> {
        let b = &self.blocks[layer - self.layers.start];
        let (m, d) = (hidden.rows, self.config.width);
        let (hd, qw, kvw) = (
            self.heads.head_dim,
            self.heads.q_width(),
            self.heads.kv_width(),
        );
        let eps = self.config.rms_eps;

        s.normed.resize(m * d, 0.0);
        simd::rms_norm(&hidden.data, &b.attn_norm, eps, &mut s.normed);
        let stride = b.qkv.rows();
        linear(&b.qkv, &s.normed, m, &mut s.qkv, &mut s.acts);
        let lc = cache.layer_mut(layer);
        for t in 0..m {
            let row = &mut s.qkv[t * stride..][..stride];
            for head in row[..qw + kvw].chunks_exact_mut(hd) {
                self.rope.apply(head, &s.angles[t]);
            }
            lc.push(&row[qw..qw + kvw], &row[qw + kvw..]);
        }
        s.attended.resize(m * qw, 0.0);
        attention::attend(self.heads, &s.qkv, stride, m, start, lc, &mut s.attended);
        linear(&b.attn_out, &s.attended, m, &mut s.projected, &mut s.acts);
        simd::add_assign(&mut hidden.data, &s.projected);

        simd::rms_norm(&hidden.data, &b.ffn_norm, eps, &mut s.normed);
        let f = self.config.ffn_width;
        linear(&b.gate_up, &s.normed, m, &mut s.gate_up, &mut s.acts);
        s.activated.resize(m * f, 0.0);
        for t in 0..m {
            let (gate, up) = s.gate_up[t * 2 * f..][..2 * f].split_at(f);
            simd::silu_mul(gate, up, &mut s.activated[t * f..][..f]);
        }
        linear(&b.down, &s.activated, m, &mut s.projected, &mut s.acts);
        simd::add_assign(&mut hidden.data, &s.projected);
        Ok(())
    }

    /// The next-token logits of row `row` of `hidden` (after the last layer).
    pub fn logits(&self, hidden: &Hidden, row: usize) -> Result<Vec<f32>, String> {
        let d = self.config.width;
        if row >= hidden.rows {
            return Err(format!("row {row} of {}", hidden.rows));
        }
        let ends = self.ends()?;
        let mut normed = vec![0f32; d];
        simd::rms_norm(
            &hidden.data[row * d..][..d],
            &ends.output_norm,
            self.config.rms_eps,
            &mut normed,
        );
        let head = ends.output.as_ref().unwrap_or(&ends.embedding);
        let mut logits = Vec::new();
        linear(head, &normed, 1, &mut logits, &mut QActs::default());
        Ok(logits)
    }

    /// Runs `tokens` through the whole model at the cache's next positions (in chunks) and
    /// returns the logits after the last one. The cache must cover every layer.
    pub fn forward_tokens(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>, String> {
        if cache.layers() != (0..self.config.layers) {
            return Err("a whole-model step needs a cache of every layer".into());
        }
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let mut hidden = self.embed(chunk)?;
            self.forward_layers(cache, &mut hidden)?;
            last = Some(hidden);
        }
        let hidden = last.ok_or("no tokens to run")?;
        self.logits(&hidden, hidden.rows - 1)
    }
}
