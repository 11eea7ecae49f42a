//! Quantized weight matrices as the forward pass uses them: converted at load to a type with
//! a SIMD kernel, and fused where several matrices share one input.
//!
//! candle 0.11 has AVX2 dot products for Q4_0, Q8_0 and the K-quants, but runs Q4_1, Q5_0, Q5_1
//! and Q8_1 with a scalar loop. [`WeightFormat`] says what those become at load (ADR 0010 has
//! the measurements behind the default). Matrices are multiplied through candle's quantized
//! matmul on plain slices, into buffers the caller owns.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor, QuantizedType};
use candle_core::{Device, Tensor};

/// What quantized weights without a fast kernel are turned into when a model loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Q8_0: near-lossless (one more rounding, at most a sixteenth of a Q4_1 step).
    #[default]
    Q8_0,
    /// Q4_0: smaller and faster, but a second 4-bit rounding that changes answers.
    Q4_0,
    /// Keep every tensor as the file has it.
    Original,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(WeightFormat::Q8_0),
            "q4_0" => Ok(WeightFormat::Q4_0),
            "original" | "keep" => Ok(WeightFormat::Original),
            _ => Err(format!(
                "unknown weight format {s:?} (expected q8_0, q4_0 or original)"
            )),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Original => "original",
        })
    }
}

/// Types candle multiplies with a scalar loop only.
fn lacks_simd(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

fn target(format: WeightFormat) -> Option<GgmlDType> {
    match format {
        WeightFormat::Q8_0 => Some(GgmlDType::Q8_0),
        WeightFormat::Q4_0 => Some(GgmlDType::Q4_0),
        WeightFormat::Original => None,
    }
}

/// The type a tensor of `dtype` is held in under `format`.
pub fn held_type(dtype: GgmlDType, format: WeightFormat) -> GgmlDType {
    match target(format) {
        Some(t) if lacks_simd(dtype) => t,
        _ => dtype,
    }
}

/// A matrix of `rows` outputs over `cols` inputs, as quantized blocks, row-major.
pub struct QLinear {
    blocks: Box<dyn QuantizedType>,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QLinear({:?}, {}x{})", self.dtype, self.rows, self.cols)
    }
}

type Result<T> = std::result::Result<T, String>;

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

/// The tensor's blocks in type `to`: its own bytes, or dequantized and quantized again.
fn blocks_as(t: &QTensor, to: GgmlDType) -> Result<Vec<u8>> {
    if t.dtype() == to {
        return Ok(t.data().map_err(err)?.into_owned());
    }
    let dense = t.dequantize(&Device::Cpu).map_err(err)?;
    let q = QTensor::quantize(&dense, to).map_err(err)?;
    Ok(q.data().map_err(err)?.into_owned())
}

impl QLinear {
    /// One matrix from a GGUF tensor of shape `(rows, cols)`.
    pub fn new(t: &QTensor, format: WeightFormat) -> Result<QLinear> {
        Self::fused(&[t], format)
    }

    /// The matrices `parts`, all over the same inputs, stacked into one: its output is each
    /// part's output in turn. Every part is held in the first part's held type, so callers
    /// fuse only parts that share a type (a part of another type would be requantized).
    pub fn fused(parts: &[&QTensor], format: WeightFormat) -> Result<QLinear> {
        let first = parts.first().ok_or("no tensor to load")?;
        let to = held_type(first.dtype(), format);
        let (_, cols) = first.shape().dims2().map_err(err)?;
        let mut bytes = Vec::new();
        let mut rows = 0;
        for p in parts {
            let (r, c) = p.shape().dims2().map_err(err)?;
            if c != cols {
                return Err(format!("fused matrices differ in width: {c} and {cols}"));
            }
            bytes.extend_from_slice(&blocks_as(p, to)?);
            rows += r;
        }
        if cols % to.block_size() != 0 {
            return Err(format!(
                "a row of {cols} is not a whole number of {to:?} blocks"
            ));
        }
        Ok(QLinear {
            blocks: to.from_data(Cow::Owned(bytes)),
            dtype: to,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    /// `out[m × rows] = x[m × cols] · Wᵀ`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        if x.len() != m * self.cols || out.len() < m * self.rows {
            return Err(format!(
                "matmul shapes: {} inputs for {m}x{}, {} outputs for {m}x{}",
                x.len(),
                self.cols,
                out.len(),
                self.rows
            ));
        }
        self.blocks
            .matmul_t((m, self.cols, self.rows), x, &mut out[..m * self.rows])
            .map_err(err)
    }

    /// Row `row` as f32 (an embedding lookup).
    pub fn row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows {
            return Err(format!(
                "token id {row} is past the vocabulary ({})",
                self.rows
            ));
        }
        let storage = self
            .blocks
            .embedding(&[row as u32], self.rows, self.cols)
            .map_err(err)?;
        match storage {
            candle_core::CpuStorage::F32(v) => {
                out[..self.cols].copy_from_slice(&v);
                Ok(())
            }
            _ => Err("embedding rows come back as f32".into()),
        }
    }
}

/// A 1-D tensor (norm weights, biases) as f32.
pub fn vector(t: &QTensor) -> Result<Vec<f32>> {
    let dense: Tensor = t.dequantize(&Device::Cpu).map_err(err)?;
    dense.flatten_all().and_then(|d| d.to_vec1()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: f32, dtype: GgmlDType) -> QTensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    fn reference(t: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let w = t.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::from_vec(x.to_vec(), (m, w.dim(1).unwrap()), &Device::Cpu).unwrap();
        x.matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn types_without_simd_are_converted_and_others_kept() {
        assert_eq!(
            held_type(GgmlDType::Q4_1, WeightFormat::Q8_0),
            GgmlDType::Q8_0
        );
        assert_eq!(
            held_type(GgmlDType::Q5_0, WeightFormat::Q4_0),
            GgmlDType::Q4_0
        );
        assert_eq!(
            held_type(GgmlDType::Q4_1, WeightFormat::Original),
            GgmlDType::Q4_1
        );
        assert_eq!(
            held_type(GgmlDType::Q4K, WeightFormat::Q8_0),
            GgmlDType::Q4K
        );
        assert_eq!(
            held_type(GgmlDType::Q8_0, WeightFormat::Q4_0),
            GgmlDType::Q8_0
        );
        assert_eq!("Q8_0".parse::<WeightFormat>().unwrap(), WeightFormat::Q8_0);
        assert!("q3".parse::<WeightFormat>().is_err());
    }

    #[test]
    fn a_fused_matrix_gives_each_part_in_turn() {
        let (a, b) = (
            matrix(8, 64, 0.0, GgmlDType::Q8_0),
            matrix(4, 64, 9.0, GgmlDType::Q8_0),
        );
        let fused = QLinear::fused(&[&a, &b], WeightFormat::Q8_0).unwrap();
        assert_eq!((fused.rows(), fused.cols()), (12, 64));
        let m = 3;
        let x: Vec<f32> = (0..m * 64).map(|i| (i as f32 * 0.05).cos()).collect();
        let mut out = vec![0f32; m * 12];
        fused.forward(&x, m, &mut out).unwrap();
        let (ra, rb) = (reference(&a, &x, m), reference(&b, &x, m));
        for t in 0..m {
            for i in 0..8 {
                assert!((out[t * 12 + i] - ra[t * 8 + i]).abs() < 0.05);
            }
            for i in 0..4 {
                assert!((out[t * 12 + 8 + i] - rb[t * 4 + i]).abs() < 0.05);
            }
        }
    }

    #[test]
    fn q4_1_converted_to_q8_0_stays_close_to_the_original() {
        let w = matrix(16, 128, 1.0, GgmlDType::Q4_1);
        let original = QLinear::new(&w, WeightFormat::Original).unwrap();
        let converted = QLinear::new(&w, WeightFormat::Q8_0).unwrap();
        assert_eq!(original.dtype(), GgmlDType::Q4_1);
        assert_eq!(converted.dtype(), GgmlDType::Q8_0);
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.21).sin()).collect();
        let (mut a, mut b) = (vec![0f32; 16], vec![0f32; 16]);
        original.forward(&x, 1, &mut a).unwrap();
        converted.forward(&x, 1, &mut b).unwrap();
        let want = reference(&w, &x, 1);
        for i in 0..16 {
            // Both quantize the activations to 8 bits; the weights differ by one rounding.
            assert!((a[i] - want[i]).abs() < 0.1, "{} vs {}", a[i], want[i]);
            assert!((b[i] - a[i]).abs() < 0.1, "{} vs {}", b[i], a[i]);
        }
    }

    #[test]
    fn rows_and_shapes_are_checked() {
        let w = matrix(4, 32, 0.0, GgmlDType::Q8_0);
        let l = QLinear::new(&w, WeightFormat::Q8_0).unwrap();
        let mut row = vec![0f32; 32];
        l.row(3, &mut row).unwrap();
        let dense = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(row, dense[3]);
        assert!(l
            .row(4, &mut row)
            .unwrap_err()
            .contains("past the vocabulary"));
        let mut out = vec![0f32; 4];
        assert!(l.forward(&[0.0; 31], 1, &mut out).is_err());
    }
}
