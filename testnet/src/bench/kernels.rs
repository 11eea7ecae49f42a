//! mesh's quantized matrix kernels alone, on SmolLM2's shapes: the time of one product, the
//! weight bytes streamed per second and the multiply-adds per second, for one token (decode)
//! and for a prefill chunk, per block format and per kernel the CPU has; and, first, the
//! memory bandwidth the threads can read at, a model's size and past the caches.

use std::time::Instant;

use mesh_node::engine::cpu::qdot::{self, Isa};
use mesh_node::engine::cpu::{Pool, QActs, QFormat, QMatrix};

/// SmolLM2-135M's matrices: (name, rows, cols).
const SHAPES: &[(&str, usize, usize)] = &[
    ("qkv", 960, 576),
    ("attn_out", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("head", 49152, 576),
];

fn matrix(format: QFormat, rows: usize, cols: usize) -> QMatrix {
    let dense: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32) * 0.618).sin())
        .collect();
    let q8 = QMatrix::quantize_q8_0(&dense, rows, cols).expect("shape");
    match format {
        QFormat::Q8_0 => q8,
        QFormat::Q4_0 => QMatrix::quantize_q4_0(&dense, rows, cols).expect("shape"),
        // Q4_1 from GGUF blocks built here (mesh converts only to Q8_0 and Q4_0).
        QFormat::Q4_1 => {
            let mut blocks = Vec::with_capacity(rows * cols / 32 * 20);
            for b in dense.chunks_exact(32) {
                let (lo, hi) = b
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
                let d = (hi - lo) / 15.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                blocks.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                blocks.extend_from_slice(&half::f16::from_f32(lo).to_le_bytes());
                for j in 0..16 {
                    let q = |v: f32| (((v - lo) * id + 0.5) as u8).min(15);
                    blocks.push(q(b[j]) | (q(b[j + 16]) << 4));
                }
            }
            QMatrix::from_gguf(QFormat::Q4_1, &blocks, rows, cols).expect("shape")
        }
    }
}

/// Reads of a buffer of `mib` MiB by every thread of the pool: the memory bandwidth a decode
/// step (which streams every weight once) can use at best.
fn read_bandwidth(pool: &Pool, mib: usize) -> f64 {
    let data: Vec<u64> = (0..mib << 17).map(|i| i as u64).collect();
    let chunk = 1 << 14;
    let mut best = Vec::new();
    for _ in 0..5 {
        let sums: Vec<std::sync::atomic::AtomicU64> = (0..data.len() / chunk)
            .map(|_| Default::default())
            .collect();
        let start = Instant::now();
        pool.run(data.len() / chunk, 16, |range| {
            for c in range {
                let mut acc = [0u64; 8];
                for w in data[c * chunk..][..chunk].chunks_exact(8) {
                    for i in 0..8 {
                        acc[i] = acc[i].wrapping_add(w[i]);
                    }
                }
                sums[c].store(acc.iter().sum(), std::sync::atomic::Ordering::Relaxed);
            }
        });
        best.push(start.elapsed().as_secs_f64());
        std::hint::black_box(&sums);
    }
    best.sort_by(f64::total_cmp);
    (mib << 20) as f64 / best[best.len() / 2] / 1e9
}

/// One JSON line per (format, kernel, shape, rows of activations), after the memory bandwidth.
pub fn run(threads: usize, millis: u64) -> Vec<serde_json::Value> {
    let pool = Pool::new(threads);
    let mut lines = Vec::new();
    for mib in [96, 1024] {
        lines.push(serde_json::json!({
            "bench": "memory", "threads": threads, "buffer_mib": mib,
            "read_gb_per_s": (read_bandwidth(&pool, mib) * 100.0).round() / 100.0,
        }));
    }
    for format in [QFormat::Q4_1, QFormat::Q8_0, QFormat::Q4_0] {
        for isa in Isa::available() {
            if isa == Isa::Portable {
                continue;
            }
            for &(name, rows, cols) in SHAPES {
                let w = matrix(format, rows, cols);
                for m in [1usize, 42] {
                    let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).cos()).collect();
                    let mut acts = QActs::default();
                    acts.quantize(&x, m, cols, format.offset());
                    let mut out = vec![0f32; m * rows];
                    let mut times = Vec::new();
                    let start = Instant::now();
                    while start.elapsed().as_millis() < millis as u128 || times.len() < 5 {
                        let t = Instant::now();
                        qdot::matmul_with(isa, &w, &acts, &mut out, &pool);
                        times.push(t.elapsed().as_secs_f64());
                    }
                    times.sort_by(f64::total_cmp);
                    let median = times[times.len() / 2];
                    lines.push(serde_json::json!({
                        "bench": "kernels",
                        "format": format.name(),
                        "isa": format!("{isa:?}"),
                        "matrix": name,
                        "rows": rows,
                        "cols": cols,
                        "m": m,
                        "threads": threads,
                        "median_us": (median * 1e6 * 10.0).round() / 10.0,
                        "weight_gb_per_s": (w.bytes() as f64 / median / 1e9 * 100.0).round() / 100.0,
                        "gmac_per_s": ((m * rows * cols) as f64 / median / 1e9 * 10.0).round() / 10.0,
                    }));
                }
            }
        }
    }
    lines
}
