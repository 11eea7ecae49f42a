//! mesh's own BERT forward pass (all-MiniLM-L6-v2 and its kin), over packed sequences.
//!
//! The texts of a batch are not padded to a common length: their tokens are laid end to end,
//! every matrix product runs over all of them at once, and only attention looks at each text
//! apart. So no work is spent on padding, however much the lengths differ.
//!
//! Per layer: Q, K and V as one matrix; attention per text and head; the output projection and
//! a layer norm; the feed-forward block with the exact (erf) GELU and a layer norm. Products
//! run on [`crate::engine::cpu::sgemm`], everything else on the same compute pool.

use std::ops::Range;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::engine::cpu::sgemm::Packed;
use crate::engine::cpu::{simd, Pool};

/// What the forward pass needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn_width: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
}

impl BertConfig {
    /// Reads the config; an unsupported or impossible value is an error that names it.
    pub fn from_json(v: &serde_json::Value) -> Result<BertConfig, String> {
        let size = |key: &str| -> Result<usize, String> {
            v[key]
                .as_u64()
                .filter(|n| (1..=1 << 20).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| format!("config.json has no usable {key}"))
        };
        let act = v["hidden_act"].as_str().unwrap_or("gelu");
        if act != "gelu" {
            return Err(format!("hidden_act {act:?} is not supported (only gelu)"));
        }
        let position = v["position_embedding_type"].as_str().unwrap_or("absolute");
        if position != "absolute" {
            return Err(format!(
                "position_embedding_type {position:?} is not supported"
            ));
        }
        let c = BertConfig {
            width: size("hidden_size")?,
            layers: size("num_hidden_layers")?,
            heads: size("num_attention_heads")?,
            ffn_width: size("intermediate_size")?,
            vocab: size("vocab_size")?,
            max_positions: size("max_position_embeddings")?,
            type_vocab: v["type_vocab_size"].as_u64().unwrap_or(2).max(1) as usize,
            eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32,
        };
        if !c.width.is_multiple_of(c.heads) {
            return Err(format!(
                "{} heads do not divide a width of {}",
                c.heads, c.width
            ));
        }
        Ok(c)
    }

    fn head_dim(&self) -> usize {
        self.width / self.heads
    }
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    qkv: Packed,
    attn_out: Packed,
    attn_norm: Norm,
    up: Packed,
    down: Packed,
    out_norm: Norm,
}

/// A loaded BERT model.
pub struct BertModel {
    config: BertConfig,
    words: Vec<f32>,
    positions: Vec<f32>,
    types: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

/// A tensor as f32, whatever float type the file stores.
fn floats(t: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let data = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("weights of type {other:?} are not supported")),
    })
}

impl BertModel {
    /// Reads the weights from a safetensors file's bytes.
    pub fn load(bytes: &[u8], config: BertConfig) -> Result<BertModel, String> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| format!("model.safetensors is corrupt or truncated: {e}"))?;
        // Files exported from a task model name the encoder's tensors under `bert.`.
        let prefix = if st.names().iter().any(|n| n.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let full = format!("{prefix}{name}");
            let t = st
                .tensor(&full)
                .map_err(|_| format!("model.safetensors has no tensor {full}"))?;
            if t.shape() != shape {
                return Err(format!(
                    "{full} has shape {:?}; the config says {shape:?}",
                    t.shape()
                ));
            }
            floats(&t)
        };
        let (d, f) = (config.width, config.ffn_width);
        let norm = |name: &str| -> Result<Norm, String> {
            Ok(Norm {
                weight: get(&format!("{name}.weight"), &[d])?,
                bias: get(&format!("{name}.bias"), &[d])?,
            })
        };
        let linear = |names: &[&str], rows: usize, cols: usize| -> Result<Packed, String> {
            let (mut w, mut b) = (Vec::new(), Vec::new());
            for n in names {
                w.extend(get(&format!("{n}.weight"), &[rows, cols])?);
                b.extend(get(&format!("{n}.bias"), &[rows])?);
            }
            Packed::new(&w, rows * names.len(), cols, &b)
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let at = |part: &str| format!("encoder.layer.{i}.{part}");
            let (q, k, v) = (
                at("attention.self.query"),
                at("attention.self.key"),
                at("attention.self.value"),
            );
            layers.push(Layer {
                qkv: linear(&[&q, &k, &v], d, d)?,
                attn_out: linear(&[&at("attention.output.dense")], d, d)?,
                attn_norm: norm(&at("attention.output.LayerNorm"))?,
                up: linear(&[&at("intermediate.dense")], f, d)?,
                down: linear(&[&at("output.dense")], d, f)?,
                out_norm: norm(&at("output.LayerNorm"))?,
            });
        }
        Ok(BertModel {
            words: get("embeddings.word_embeddings.weight", &[config.vocab, d])?,
            positions: get(
                "embeddings.position_embeddings.weight",
                &[config.max_positions, d],
            )?,
            types: get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab, d],
            )?,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
            config,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The last hidden states of `texts` (each a sequence of token ids, at most
    /// `max_positions` long), laid end to end: one row of `width` per token.
    pub fn forward(&self, texts: &[&[u32]]) -> Result<Vec<f32>, String> {
        let c = &self.config;
        let d = c.width;
        let mut spans = Vec::with_capacity(texts.len());
        let mut total = 0;
        for t in texts {
            if t.len() > c.max_positions {
                return Err(format!(
                    "a text of {} tokens is past the {} positions",
                    t.len(),
                    c.max_positions
                ));
            }
            spans.push(total..total + t.len());
            total += t.len();
        }
        let mut x = vec![0f32; total * d];
        for (span, ids) in spans.iter().zip(texts) {
            for (p, id) in ids.iter().enumerate() {
                let id = *id as usize;
                if id >= c.vocab {
                    return Err(format!(
                        "token id {id} is past the vocabulary ({})",
                        c.vocab
                    ));
                }
                let row = &mut x[(span.start + p) * d..][..d];
                let (w, pos) = (&self.words[id * d..][..d], &self.positions[p * d..][..d]);
                for i in 0..d {
                    row[i] = w[i] + pos[i] + self.types[i];
                }
            }
        }
        let pool = Pool::global();
        layer_norm_rows(&mut x, &self.embed_norm, c.eps, pool);
        let mut s = Scratch::default();
        for layer in &self.layers {
            self.layer(layer, &mut x, total, &spans, &mut s, pool);
        }
        Ok(x)
    }

    fn layer(
        &self,
        l: &Layer,
        x: &mut [f32],
        n: usize,
        spans: &[Range<usize>],
        s: &mut Scratch,
        pool: &Pool,
    ) {
        let c = &self.config;
        let d = c.width;
        s.qkv.resize(n * 3 * d, 0.0);
        l.qkv.matmul(x, n, &mut s.qkv, pool);
        s.context.resize(n * d, 0.0);
        attention(c, &s.qkv, spans, &mut s.context, pool);
        s.projected.resize(n * d, 0.0);
        l.attn_out.matmul(&s.context, n, &mut s.projected, pool);
        simd::add_assign(x, &s.projected);
        layer_norm_rows(x, &l.attn_norm, c.eps, pool);
        s.up.resize(n * c.ffn_width, 0.0);
        l.up.matmul(x, n, &mut s.up, pool);
        let up = Rows(s.up.as_mut_ptr());
        let fw = c.ffn_width;
        pool.run(n, 16, |rows| {
            // SAFETY: each chunk of rows is its own part of `s.up`.
            let part = unsafe { up.rows(rows, fw) };
            simd::gelu(part);
        });
        l.down.matmul(&s.up, n, &mut s.projected, pool);
        simd::add_assign(x, &s.projected);
        layer_norm_rows(x, &l.out_norm, c.eps, pool);
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.attn_out.bytes() + l.up.bytes() + l.down.bytes())
            .sum();
        layers + 4 * (self.words.len() + self.positions.len() + self.types.len())
    }
}

#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    context: Vec<f32>,
    projected: Vec<f32>,
    up: Vec<f32>,
}

/// Rows of one buffer handed to the pool's work items, which take disjoint rows.
#[derive(Clone, Copy)]
struct Rows(*mut f32);
// SAFETY: items take disjoint rows, and the pool joins before the buffer is used again.
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    /// # Safety
    /// `rows` within the buffer, taken by one work item only.
    unsafe fn rows(self, rows: Range<usize>, width: usize) -> &'static mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(rows.start * width), rows.len() * width)
    }
}

fn layer_norm_rows(x: &mut [f32], norm: &Norm, eps: f32, pool: &Pool) {
    let d = norm.weight.len();
    let n = x.len() / d;
    let rows = Rows(x.as_mut_ptr());
    pool.run(n, 32, |range| {
        // SAFETY: each chunk of rows is its own part of `x`.
        let part = unsafe { rows.rows(range, d) };
        simd::layer_norm(part, &norm.weight, &norm.bias, eps);
    });
}

/// Self-attention of each text over its own tokens, for every head: `qkv` holds each token's
/// Q, K and V side by side; the result goes to `out` (`tokens × width`).
fn attention(c: &BertConfig, qkv: &[f32], spans: &[Range<usize>], out: &mut [f32], pool: &Pool) {
    let (d, heads, hd) = (c.width, c.heads, c.head_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    let dst = Rows(out.as_mut_ptr());
    pool.run(spans.len() * heads, 1, |items| {
        let mut scores = Vec::new();
        for item in items {
            let (span, h) = (&spans[item / heads], item % heads);
            let len = span.len();
            for i in span.clone() {
                let q = &qkv[i * 3 * d + h * hd..][..hd];
                scores.clear();
                scores.extend(
                    span.clone()
                        .map(|j| simd::dot(q, &qkv[j * 3 * d + d + h * hd..][..hd]) * scale),
                );
                simd::softmax(&mut scores);
                // SAFETY: (token i, head h) is written by this item alone.
                let o = unsafe { &mut dst.rows(i..i + 1, d)[h * hd..][..hd] };
                o.fill(0.0);
                for (j, p) in span.clone().zip(&scores[..len]) {
                    simd::axpy(o, *p, &qkv[j * 3 * d + 2 * d + h * hd..][..hd]);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_what_they_cannot_use() {
        let ok = serde_json::json!({
            "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
            "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512,
            "layer_norm_eps": 1e-12, "hidden_act": "gelu"
        });
        let c = BertConfig::from_json(&ok).unwrap();
        assert_eq!((c.head_dim(), c.type_vocab), (32, 2));
        let mut bad = ok.clone();
        bad["hidden_act"] = "relu".into();
        assert!(BertConfig::from_json(&bad).unwrap_err().contains("relu"));
        let mut bad = ok.clone();
        bad["num_attention_heads"] = 5.into();
        assert!(BertConfig::from_json(&bad).unwrap_err().contains("heads"));
        let mut bad = ok;
        bad.as_object_mut().unwrap().remove("hidden_size");
        assert!(BertConfig::from_json(&bad)
            .unwrap_err()
            .contains("hidden_size"));
    }
}
