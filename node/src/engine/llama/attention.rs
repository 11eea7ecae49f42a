//! Causal grouped-query attention over a layer's cache, without copying keys or values.
//!
//! A query head `h` reads key-value head `h / (heads / kv_heads)` in place in the cache rows.
//! Each (query position, head) pair is one work item on the compute pool; each needs only a
//! row of scores, so memory stays bounded however long the context is.

use std::cell::RefCell;

use super::kernels::{axpy, dot, parallel_for, softmax, SharedMut};
use super::kv_cache::LayerCache;

/// The shape of attention in one model.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the scores (usually `1/√head_dim`).
    pub scale: f32,
}

impl Heads {
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Attention for `rows` queries at positions `start..start + rows`, whose keys and values are
/// already in `cache` (which holds at least `start + rows` positions).
///
/// `q` holds row `t`'s query heads at `q[t·q_stride..][..heads·head_dim]`; the result goes to
/// `out` as `rows × heads·head_dim`.
pub fn attend(
    heads: Heads,
    q: &[f32],
    q_stride: usize,
    rows: usize,
    start: usize,
    cache: &LayerCache,
    out: &mut [f32],
) {
    let Heads {
        heads: n_heads,
        kv_heads,
        head_dim,
        scale,
    } = heads;
    let group = n_heads / kv_heads;
    let kv_width = heads.kv_width();
    let q_width = heads.q_width();
    assert!(out.len() >= rows * q_width);
    assert!(cache.keys.len() >= (start + rows) * kv_width);
    let out_ptr = SharedMut(out.as_mut_ptr());
    parallel_for(rows * n_heads, |items| {
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            for item in items {
                let (t, h) = (item / n_heads, item % n_heads);
                let g = h / group;
                let context = start + t + 1;
                let query = &q[t * q_stride + h * head_dim..][..head_dim];
                scores.clear();
                scores.extend((0..context).map(|j| {
                    dot(
                        query,
                        &cache.keys[j * kv_width + g * head_dim..][..head_dim],
                    ) * scale
                }));
                softmax(&mut scores);
                // SAFETY: item (t, h) alone writes this head_dim-long range of `out`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.at(t * q_width + h * head_dim), head_dim)
                };
                dst.fill(0.0);
                for (j, w) in scores.iter().enumerate() {
                    axpy(
                        dst,
                        *w,
                        &cache.values[j * kv_width + g * head_dim..][..head_dim],
                    );
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention written the obvious way, with K and V repeated for every query head.
    fn naive(
        heads: Heads,
        q: &[f32],
        rows: usize,
        start: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Vec<f32> {
        let (hd, kvw) = (heads.head_dim, heads.kv_width());
        let mut out = vec![0f32; rows * heads.q_width()];
        for t in 0..rows {
            for h in 0..heads.heads {
                let g = h * heads.kv_heads / heads.heads;
                let qv = &q[t * heads.q_width() + h * hd..][..hd];
                let s: Vec<f64> = (0..=start + t)
                    .map(|j| {
                        let k = &keys[j * kvw + g * hd..][..hd];
                        qv.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            * heads.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[t * heads.q_width() + h * hd + d] +=
                            (w / z * values[j * kvw + g * hd + d] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn grouped_attention_matches_the_naive_form() {
        let heads = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
        };
        let (start, rows) = (5, 4);
        let n = start + rows;
        let val = |i: usize, k: f32| ((i as f32) * k).sin();
        let keys: Vec<f32> = (0..n * heads.kv_width()).map(|i| val(i, 0.7)).collect();
        let values: Vec<f32> = (0..n * heads.kv_width()).map(|i| val(i, 1.3)).collect();
        let q: Vec<f32> = (0..rows * heads.q_width()).map(|i| val(i, 0.3)).collect();
        let cache = LayerCache {
            keys: keys.clone(),
            values: values.clone(),
        };
        let mut out = vec![0f32; rows * heads.q_width()];
        attend(heads, &q, heads.q_width(), rows, start, &cache, &mut out);
        let want = naive(heads, &q, rows, start, &keys, &values);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
