//! A GGUF file's matrices as the forward pass holds them: in a block type mesh has a kernel
//! for ([`QFormat`]), and fused where several matrices share one input.
//!
//! [`WeightFormat`] says what a tensor becomes at load. ADR 0010 has the measurements behind
//! the default.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::engine::cpu::{QFormat, QMatrix};

/// What quantized weights become when a model loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Keep every tensor whose type mesh has a kernel for (Q8_0, Q4_0, Q4_1) as the file has
    /// it; convert the others to Q8_0.
    #[default]
    Original,
    /// Convert every tensor to Q8_0.
    Q8_0,
    /// Convert every tensor to Q4_0 (smaller, but a second 4-bit rounding).
    Q4_0,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(WeightFormat::Q8_0),
            "q4_0" => Ok(WeightFormat::Q4_0),
            "original" | "keep" => Ok(WeightFormat::Original),
            _ => Err(format!(
                "unknown weight format {s:?} (expected original, q8_0 or q4_0)"
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

/// mesh's kernel format for a GGUF block type, if it has one.
fn kernel_format(dtype: GgmlDType) -> Option<QFormat> {
    match dtype {
        GgmlDType::Q8_0 => Some(QFormat::Q8_0),
        GgmlDType::Q4_0 => Some(QFormat::Q4_0),
        GgmlDType::Q4_1 => Some(QFormat::Q4_1),
        _ => None,
    }
}

/// The format a tensor of `dtype` is held in under `format`.
pub fn held_format(dtype: GgmlDType, format: WeightFormat) -> QFormat {
    match format {
        WeightFormat::Q8_0 => QFormat::Q8_0,
        WeightFormat::Q4_0 => QFormat::Q4_0,
        WeightFormat::Original => kernel_format(dtype).unwrap_or(QFormat::Q8_0),
    }
}

type Result<T> = std::result::Result<T, String>;

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

/// One tensor of shape `(rows, cols)` as a matrix in `to`.
fn matrix(t: &QTensor, to: QFormat) -> Result<QMatrix> {
    let (rows, cols) = t.shape().dims2().map_err(err)?;
    if kernel_format(t.dtype()) == Some(to) {
        return QMatrix::from_gguf(to, &t.data().map_err(err)?, rows, cols);
    }
    let dense: Vec<f32> = t
        .dequantize(&Device::Cpu)
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_vec1())
        .map_err(err)?;
    match to {
        QFormat::Q8_0 => QMatrix::quantize_q8_0(&dense, rows, cols),
        QFormat::Q4_0 => QMatrix::quantize_q4_0(&dense, rows, cols),
        QFormat::Q4_1 => Err("conversion to Q4_1 is not offered".into()),
    }
}

/// The matrices `parts`, all over the same inputs, stacked into one, whose output is each
/// part's output in turn. Parts held in different formats are all held as Q8_0.
pub fn fused(parts: &[&QTensor], format: WeightFormat) -> Result<QMatrix> {
    let first = parts.first().ok_or("no tensor to load")?;
    let mut to = held_format(first.dtype(), format);
    if parts.iter().any(|p| held_format(p.dtype(), format) != to) {
        to = QFormat::Q8_0;
    }
    let matrices = parts
        .iter()
        .map(|p| matrix(p, to))
        .collect::<Result<Vec<_>>>()?;
    QMatrix::stack(matrices)
}

/// One matrix.
pub fn single(t: &QTensor, format: WeightFormat) -> Result<QMatrix> {
    matrix(t, held_format(t.dtype(), format))
}

/// A 1-D tensor (norm weights, biases) as f32.
pub fn vector(t: &QTensor) -> Result<Vec<f32>> {
    let dense: Tensor = t.dequantize(&Device::Cpu).map_err(err)?;
    dense.flatten_all().and_then(|d| d.to_vec1()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::{qdot, Pool, QActs};

    fn tensor(rows: usize, cols: usize, seed: f32, dtype: GgmlDType) -> (Vec<f32>, QTensor) {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        let t = Tensor::from_vec(data.clone(), (rows, cols), &Device::Cpu).unwrap();
        (data, QTensor::quantize(&t, dtype).unwrap())
    }

    fn product(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
        let mut a = QActs::default();
        a.quantize(x, m, w.cols(), w.format().offset());
        let mut out = vec![0f32; m * w.rows()];
        qdot::matmul(w, &a, &mut out, &Pool::new(1));
        out
    }

    #[test]
    fn formats_with_a_kernel_are_kept_and_others_converted() {
        use GgmlDType::*;
        let original = WeightFormat::Original;
        assert_eq!(held_format(Q4_1, original), QFormat::Q4_1);
        assert_eq!(held_format(Q8_0, original), QFormat::Q8_0);
        assert_eq!(held_format(Q4K, original), QFormat::Q8_0);
        assert_eq!(held_format(F32, original), QFormat::Q8_0);
        assert_eq!(held_format(Q4_1, WeightFormat::Q8_0), QFormat::Q8_0);
        assert_eq!(held_format(Q8_0, WeightFormat::Q4_0), QFormat::Q4_0);
        assert_eq!("Q8_0".parse::<WeightFormat>().unwrap(), WeightFormat::Q8_0);
        assert!("q3".parse::<WeightFormat>().is_err());
    }

    #[test]
    fn a_fused_matrix_gives_each_part_in_turn() {
        let (_, a) = tensor(8, 64, 0.0, GgmlDType::Q8_0);
        let (_, b) = tensor(4, 64, 9.0, GgmlDType::Q4_1);
        let fused = fused(&[&a, &b], WeightFormat::Original).unwrap();
        assert_eq!(fused.format(), QFormat::Q8_0, "mixed parts are held alike");
        assert_eq!((fused.rows(), fused.cols()), (12, 64));
        let m = 3;
        let x: Vec<f32> = (0..m * 64).map(|i| (i as f32 * 0.05).cos()).collect();
        let out = product(&fused, &x, m);
        let ra = product(&single(&a, WeightFormat::Q8_0).unwrap(), &x, m);
        let rb = product(&single(&b, WeightFormat::Q8_0).unwrap(), &x, m);
        for t in 0..m {
            assert_eq!(&out[t * 12..][..8], &ra[t * 8..][..8]);
            assert_eq!(&out[t * 12 + 8..][..4], &rb[t * 4..][..4]);
        }
    }

    #[test]
    fn every_format_stays_close_to_the_files_values() {
        let (_, q41) = tensor(16, 128, 1.0, GgmlDType::Q4_1);
        // The values the file holds, as f32.
        let file: Vec<f32> = q41
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.21).sin()).collect();
        // Relative to Σ|w·x|: the 8-bit activations alone; one more 8-bit rounding of the
        // weights; a second 4-bit rounding of them.
        for (format, tol) in [
            (WeightFormat::Original, 0.01),
            (WeightFormat::Q8_0, 0.015),
            (WeightFormat::Q4_0, 0.1),
        ] {
            let w = single(&q41, format).unwrap();
            let got = product(&w, &x, 1);
            for r in 0..16 {
                let exact: f32 = (0..128).map(|i| file[r * 128 + i] * x[i]).sum();
                let size: f32 = (0..128).map(|i| (file[r * 128 + i] * x[i]).abs()).sum();
                assert!(
                    (got[r] - exact).abs() < tol * size,
                    "{format}: {} vs {exact}",
                    got[r]
                );
            }
        }
    }
}
