//! A llama-family model's shape, read from GGUF metadata (the keys llama.cpp writes).

use candle_core::quantized::gguf_file::{Content, Value};

use super::rope::RopeStyle;

/// What the forward pass needs to know about a model, from its file.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub layers: usize,
    pub width: usize,
    pub ffn_width: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_dims: usize,
    pub rope_style: RopeStyle,
    /// Linear position scaling (`rope.scaling.type = linear`), 1 when absent.
    pub rope_linear_scale: f32,
    /// The context the file declares, in tokens.
    pub context: usize,
}

/// Architectures this forward pass computes.
pub const SUPPORTED: &[&str] = &["llama"];

/// Looks a metadata value up as a number, whatever integer or float type the file used.
pub(crate) fn number(ct: &Content, key: &str) -> Option<f64> {
    let v = ct.metadata.get(key)?;
    match v {
        Value::U8(x) => Some(*x as f64),
        Value::I8(x) => Some(*x as f64),
        Value::U16(x) => Some(*x as f64),
        Value::I16(x) => Some(*x as f64),
        Value::U32(x) => Some(*x as f64),
        Value::I32(x) => Some(*x as f64),
        Value::U64(x) => Some(*x as f64),
        Value::I64(x) => Some(*x as f64),
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

fn text<'a>(ct: &'a Content, key: &str) -> Option<&'a str> {
    ct.metadata.get(key)?.to_string().ok().map(String::as_str)
}

impl LlamaConfig {
    /// Reads the shape; a missing or impossible value is an error that names the key.
    pub fn from_gguf(ct: &Content) -> Result<LlamaConfig, String> {
        let arch = text(ct, "general.architecture")
            .ok_or("the GGUF file names no general.architecture")?
            .to_string();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(format!(
                "architecture {arch:?} is not computed by mesh's forward pass"
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| -> Result<usize, String> {
            let v =
                number(ct, &key(k)).ok_or_else(|| format!("the GGUF file has no {}", key(k)))?;
            if !(1.0..=1e9).contains(&v) || v.fract() != 0.0 {
                return Err(format!("{} = {v} is not a usable size", key(k)));
            }
            Ok(v as usize)
        };
        let layers = need("block_count")?;
        let width = need("embedding_length")?;
        let ffn_width = need("feed_forward_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = number(ct, &key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "{heads} attention heads cannot share {kv_heads} key-value heads"
            ));
        }
        let head_dim = number(ct, &key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(width / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > 1024 {
            return Err(format!("a head width of {head_dim} is not usable"));
        }
        let rope_dims = number(ct, &key("rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if rope_dims == 0 || rope_dims > head_dim || !rope_dims.is_multiple_of(2) {
            return Err(format!(
                "{} = {rope_dims} does not fit a head of {head_dim}",
                key("rope.dimension_count")
            ));
        }
        let rope_linear_scale = match text(ct, &key("rope.scaling.type")) {
            None | Some("none") => 1.0,
            Some("linear") => number(ct, &key("rope.scaling.factor")).unwrap_or(1.0) as f32,
            Some(other) => return Err(format!("RoPE scaling {other:?} is not supported")),
        };
        let context = crate::engine::gguf_meta::context_length(ct, &arch)? as usize;
        Ok(LlamaConfig {
            rms_eps: number(ct, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
            rope_theta: number(ct, &key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rope_style: RopeStyle::Interleaved,
            architecture: arch,
            layers,
            width,
            ffn_width,
            heads,
            kv_heads,
            head_dim,
            rope_dims,
            rope_linear_scale,
            context,
        })
    }

    /// Floats in one position's keys (or values) for one layer.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of cache per position over all layers.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.layers * self.kv_width() * 2 * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    fn content(entries: &[(&str, Value)]) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    fn smollm2() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(30)),
            ("llama.embedding_length", Value::U32(576)),
            ("llama.feed_forward_length", Value::U32(1536)),
            ("llama.attention.head_count", Value::U32(9)),
            ("llama.attention.head_count_kv", Value::U32(3)),
            ("llama.rope.freq_base", Value::F32(100_000.0)),
            ("llama.context_length", Value::U32(8192)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ]
    }

    #[test]
    fn smollm2s_shape_comes_from_its_metadata() {
        let c = LlamaConfig::from_gguf(&content(&smollm2())).unwrap();
        assert_eq!(
            (c.layers, c.width, c.heads, c.kv_heads, c.head_dim),
            (30, 576, 9, 3, 64)
        );
        assert_eq!(
            (c.rope_dims, c.rope_theta, c.context),
            (64, 100_000.0, 8192)
        );
        assert_eq!(c.kv_bytes_per_position(), 30 * 192 * 8);
    }

    #[test]
    fn impossible_or_missing_values_are_named() {
        let mut m = smollm2();
        m.retain(|(k, _)| *k != "llama.block_count");
        assert!(LlamaConfig::from_gguf(&content(&m))
            .unwrap_err()
            .contains("llama.block_count"));
        let mut m = smollm2();
        m.push(("llama.attention.head_count_kv", Value::U32(4)));
        m.swap_remove(5);
        assert!(LlamaConfig::from_gguf(&content(&m))
            .unwrap_err()
            .contains("cannot share"));
        let mut m = smollm2();
        m[0] = ("general.architecture", Value::String("mamba".into()));
        assert!(LlamaConfig::from_gguf(&content(&m)).is_err());
        let mut m = smollm2();
        m.push(("llama.rope.scaling.type", Value::String("yarn".into())));
        assert!(LlamaConfig::from_gguf(&content(&m))
            .unwrap_err()
            .contains("yarn"));
        // A context of 0, past 16 Mi tokens, or not whole is refused, not truncated.
        for bad in [Value::U32(0), Value::U64(1 << 40), Value::F32(8.5)] {
            let mut m = smollm2();
            m.retain(|(k, _)| *k != "llama.context_length");
            m.push(("llama.context_length", bad));
            assert!(LlamaConfig::from_gguf(&content(&m))
                .unwrap_err()
                .contains("llama.context_length"));
        }
    }
}
