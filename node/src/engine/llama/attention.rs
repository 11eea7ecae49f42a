//! Causal grouped-query attention over a layer's cache, without copying keys or values.
//!
//! The query heads of one key-value head (a group) are computed together, so each tile of
//! keys and each row of values is read once per group. Keys come in tiles of
//! [`TILE`] positions (see [`super::kv_cache`]): a query's scores for a tile are `head_dim`
//! vector multiply-adds. The softmax is taken online, tile by tile, so memory stays bounded
//! however long the context is.
//!
//! Work on the pool: a prefill chunk splits by group and by blocks of query rows; a single
//! query (a decode step) splits by group and by spans of keys, whose partial results are
//! merged at the end, so both threads work even on one token. Both take keys in the same
//! fixed spans ([`KEY_SPAN`]), so their results are the same to the bit.

use std::cell::RefCell;

use half::slice::HalfFloatSliceExt;

use super::kv_cache::{LayerCache, TILE};
use crate::engine::cpu::simd::{exp_approx, EXP2_POLY, LOG2E};
use crate::engine::cpu::Pool;

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

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Query rows per work item of a prefill chunk.
const ROW_BLOCK: usize = 4;
/// Keys are taken in spans of this many positions (from position 0), each span's softmax
/// state merged into the row's in order. A decode step spreads its spans over the threads;
/// a prefill chunk takes them in turn. Either way every row sums the same numbers in the
/// same order, so a position's output does not depend on how the prompt was cut, on whether
/// it was decoded or prefilled, or on the thread count.
const KEY_SPAN: usize = 256;

/// The running softmax of one query head, as `STATE_HEAD + head_dim` floats: its largest score,
/// the sum of exponentials, and the weighted sum of values, both relative to that score.
const STATE_HEAD: usize = 2;

fn new_states(n: usize, head_dim: usize) -> Vec<f32> {
    let mut v = vec![0f32; n * (STATE_HEAD + head_dim)];
    for s in v.chunks_exact_mut(STATE_HEAD + head_dim) {
        s[0] = f32::NEG_INFINITY;
    }
    v
}

/// Folds the state `other`, computed over other keys, into `state`.
fn merge(state: &mut [f32], other: &[f32]) {
    if other[0] == f32::NEG_INFINITY {
        return;
    }
    let max = state[0].max(other[0]);
    let (a, b) = (exp_approx(state[0] - max), exp_approx(other[0] - max));
    state[1] = state[1] * a + other[1] * b;
    for (o, p) in state[STATE_HEAD..].iter_mut().zip(&other[STATE_HEAD..]) {
        *o = *o * a + p * b;
    }
    state[0] = max;
}

/// Buffers of one thread: a tile of keys and one of values, as f32 (the portable kernel).
#[derive(Default)]
struct Tiles {
    keys: Vec<f32>,
    values: Vec<f32>,
}

thread_local! {
    static TILES: RefCell<Tiles> = RefCell::new(Tiles::default());
}

/// What one work item computes: one group's query rows over a range of keys.
struct Span<'a> {
    heads: Heads,
    cache: &'a LayerCache,
    /// The key-value head.
    g: usize,
    /// Each row's `group` query heads of `head_dim`.
    queries: &'a [&'a [f32]],
    /// Row `r` sees the keys before position `limits[r]`.
    limits: &'a [usize],
    keys: std::ops::Range<usize>,
}

impl Span<'_> {
    /// The tiles the span covers, each with its lanes in the span.
    fn tiles(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        (self.keys.start / TILE..self.keys.end.div_ceil(TILE)).map(move |tile| {
            let first = (tile * TILE).max(self.keys.start) - tile * TILE;
            let last = ((tile + 1) * TILE).min(self.keys.end) - tile * TILE;
            (tile, first..last)
        })
    }

    /// The lanes of `tile` that row `r` sees.
    fn visible(
        &self,
        tile: usize,
        lanes: &std::ops::Range<usize>,
        r: usize,
    ) -> std::ops::Range<usize> {
        lanes.start..lanes.end.min(self.limits[r].saturating_sub(tile * TILE))
    }

    /// Folds the span's keys into `states` (`queries.len() × group` heads), portably.
    fn run_portable(&self, states: &mut [f32], tiles: &mut Tiles) {
        let (hd, group) = (self.heads.head_dim, self.heads.group());
        tiles.keys.resize(hd * TILE, 0.0);
        tiles.values.resize(TILE * hd, 0.0);
        let mut scores = [0f32; TILE];
        for (tile, lanes) in self.tiles() {
            let keys = &self.cache.keys[self.g][tile * hd * TILE..][..hd * TILE];
            keys.convert_to_f32_slice(&mut tiles.keys);
            let n = lanes.end;
            self.cache.values[self.g][tile * TILE * hd..][..n * hd]
                .convert_to_f32_slice(&mut tiles.values[..n * hd]);
            for (r, q) in self.queries.iter().enumerate() {
                let visible = self.visible(tile, &lanes, r);
                if visible.is_empty() {
                    continue;
                }
                for h in 0..group {
                    let q = &q[h * hd..][..hd];
                    scores.fill(0.0);
                    for (d, qd) in q.iter().enumerate() {
                        let k = &tiles.keys[d * TILE..][..TILE];
                        for l in 0..TILE {
                            scores[l] += qd * k[l];
                        }
                    }
                    let state =
                        &mut states[(r * group + h) * (STATE_HEAD + hd)..][..STATE_HEAD + hd];
                    let mut max = state[0];
                    for s in &mut scores[visible.clone()] {
                        *s *= self.heads.scale;
                        max = max.max(*s);
                    }
                    let correction = exp_approx(state[0] - max);
                    state[1] *= correction;
                    for o in state[STATE_HEAD..].iter_mut() {
                        *o *= correction;
                    }
                    for l in visible.clone() {
                        let p = exp_approx(scores[l] - max);
                        state[1] += p;
                        let v = &tiles.values[l * hd..][..hd];
                        for (o, v) in state[STATE_HEAD..].iter_mut().zip(v) {
                            *o += p * v;
                        }
                    }
                    state[0] = max;
                }
            }
        }
    }

    /// The same with AVX-512: up to `HG` heads of a group at once, a tile's 16 scores in one
    /// register per head, and each head's output (`NV` registers of 16) kept in registers
    /// over the tile, so a row of keys or values is read once for all of them.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `head_dim == 16 · NV`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    // Registers are indexed by head and by 16 dimensions, as the hardware lays them out.
    #[allow(clippy::needless_range_loop)]
    unsafe fn run_avx512<const NV: usize, const HG: usize>(&self, states: &mut [f32]) {
        use std::arch::x86_64::*;
        let (hd, group) = (self.heads.head_dim, self.heads.group());
        debug_assert_eq!(hd, 16 * NV);
        let keys = self.cache.keys[self.g].as_ptr() as *const u16;
        let values = self.cache.values[self.g].as_ptr() as *const u16;
        let scale = _mm512_set1_ps(self.heads.scale);
        let state_len = STATE_HEAD + hd;
        for (tile, lanes) in self.tiles() {
            let kt = keys.add(tile * hd * TILE);
            let vt = values.add(tile * TILE * hd);
            for (r, q) in self.queries.iter().enumerate() {
                let visible = self.visible(tile, &lanes, r);
                if visible.is_empty() {
                    continue;
                }
                let mask = (((1u32 << visible.end) - 1) & !((1u32 << visible.start) - 1)) as u16;
                for first in (0..group).step_by(HG) {
                    let qs: [*const f32; HG] =
                        std::array::from_fn(|h| q.as_ptr().add((first + h) * hd));
                    let st: [*mut f32; HG] = std::array::from_fn(|h| {
                        states.as_mut_ptr().add((r * group + first + h) * state_len)
                    });
                    let mut sc = [_mm512_setzero_ps(); HG];
                    for d in 0..hd {
                        let k = _mm512_cvtph_ps(_mm256_loadu_si256(kt.add(d * TILE) as *const _));
                        for h in 0..HG {
                            sc[h] = _mm512_fmadd_ps(_mm512_set1_ps(*qs[h].add(d)), k, sc[h]);
                        }
                    }
                    let mut p = [[0f32; TILE]; HG];
                    let mut out = [[_mm512_setzero_ps(); NV]; HG];
                    for h in 0..HG {
                        let s = _mm512_mul_ps(sc[h], scale);
                        let max = (*st[h]).max(_mm512_mask_reduce_max_ps(mask, s));
                        let e =
                            _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(s, _mm512_set1_ps(max))));
                        let correction = exp_approx(*st[h] - max);
                        *st[h].add(1) = *st[h].add(1) * correction + _mm512_reduce_add_ps(e);
                        *st[h] = max;
                        _mm512_storeu_ps(p[h].as_mut_ptr(), e);
                        let c = _mm512_set1_ps(correction);
                        for j in 0..NV {
                            out[h][j] =
                                _mm512_mul_ps(_mm512_loadu_ps(st[h].add(STATE_HEAD + 16 * j)), c);
                        }
                    }
                    for l in visible.clone() {
                        let v = vt.add(l * hd);
                        for j in 0..NV {
                            let vv = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(16 * j) as *const _));
                            for h in 0..HG {
                                out[h][j] = _mm512_fmadd_ps(_mm512_set1_ps(p[h][l]), vv, out[h][j]);
                            }
                        }
                    }
                    for h in 0..HG {
                        for j in 0..NV {
                            _mm512_storeu_ps(st[h].add(STATE_HEAD + 16 * j), out[h][j]);
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 kernel for this shape, if there is one: `head_dim` 64 or 128, and the
    /// group taken in pieces that keep every output in a register.
    #[cfg(target_arch = "x86_64")]
    fn avx512_kernel(&self) -> Option<unsafe fn(&Self, &mut [f32])> {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return None;
        }
        let group = self.heads.group();
        Some(match (self.heads.head_dim, group) {
            (64, g) if g % 4 == 0 => Self::run_avx512::<4, 4>,
            (64, g) if g % 3 == 0 => Self::run_avx512::<4, 3>,
            (64, g) if g % 2 == 0 => Self::run_avx512::<4, 2>,
            (64, _) => Self::run_avx512::<4, 1>,
            (128, g) if g % 2 == 0 => Self::run_avx512::<8, 2>,
            (128, _) => Self::run_avx512::<8, 1>,
            _ => return None,
        })
    }

    /// Folds the span's keys into `states` with the best kernel at hand.
    fn run(&self, states: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = self.avx512_kernel() {
            // SAFETY: `avx512_kernel` checked the CPU and the head width.
            return unsafe { kernel(self, states) };
        }
        TILES.with(|t| self.run_portable(states, &mut t.borrow_mut()))
    }
}

/// `e^x` for 16 lanes: [`exp_approx`]'s polynomial, with the power of two applied by `scalef`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let t = _mm512_mul_ps(x, _mm512_set1_ps(LOG2E));
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, k);
    let mut p = _mm512_set1_ps(EXP2_POLY[6]);
    for c in EXP2_POLY[..6].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
    _mm512_scalef_ps(p, k)
}

/// `out`'s start, shared by the work items of one step, which write disjoint heads.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: items write disjoint ranges only, and the pool joins before `out` is used again.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// `[i, i + n)` within the buffer and written by one item only.
    unsafe fn slice(self, i: usize, n: usize) -> &'static mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(i), n)
    }
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
    let (hd, group, q_width) = (heads.head_dim, heads.group(), heads.q_width());
    assert!(out.len() >= rows * q_width);
    assert!(cache.len() >= start + rows);
    let pool = Pool::global();
    let dst = SharedMut(out.as_mut_ptr());
    let state_len = STATE_HEAD + hd;
    let finish = |t: usize, g: usize, states: &[f32]| {
        for (h, s) in states.chunks_exact(state_len).enumerate() {
            // SAFETY: (t, g, h) names one head of one row, written by this item alone.
            let o = unsafe { dst.slice(t * q_width + (g * group + h) * hd, hd) };
            let inv = if s[1] > 0.0 { 1.0 / s[1] } else { 0.0 };
            for (o, v) in o.iter_mut().zip(&s[STATE_HEAD..]) {
                *o = v * inv;
            }
        }
    };
    if rows == 1 {
        // One query: the spans of keys are the work items, so that every thread works.
        let context = start + 1;
        let spans = context.div_ceil(KEY_SPAN);
        let items = heads.kv_heads * spans;
        let mut partials = new_states(items * group, hd);
        let part = SharedMut(partials.as_mut_ptr());
        pool.run(items, 1, |range| {
            for item in range {
                let (g, span) = (item / spans, item % spans);
                let queries = [&q[g * group * hd..][..group * hd]];
                let span = Span {
                    heads,
                    cache,
                    g,
                    queries: &queries,
                    limits: &[context],
                    keys: span * KEY_SPAN..((span + 1) * KEY_SPAN).min(context),
                };
                // SAFETY: item `item` alone writes its `group` states.
                let states = unsafe { part.slice(item * group * state_len, group * state_len) };
                span.run(states);
            }
        });
        let mut states = new_states(group, hd);
        for g in 0..heads.kv_heads {
            states.copy_from_slice(&new_states(group, hd));
            let parts = &partials[g * spans * group * state_len..][..spans * group * state_len];
            for part in parts.chunks_exact(group * state_len) {
                for (s, p) in states
                    .chunks_exact_mut(state_len)
                    .zip(part.chunks_exact(state_len))
                {
                    merge(s, p);
                }
            }
            finish(0, g, &states);
        }
        return;
    }
    let blocks = rows.div_ceil(ROW_BLOCK);
    pool.run(heads.kv_heads * blocks, 1, |items| {
        for item in items {
            let (g, block) = (item / blocks, item % blocks);
            let ts = block * ROW_BLOCK..((block + 1) * ROW_BLOCK).min(rows);
            let queries: Vec<&[f32]> = ts
                .clone()
                .map(|t| &q[t * q_stride + g * group * hd..][..group * hd])
                .collect();
            let limits: Vec<usize> = ts.clone().map(|t| start + t + 1).collect();
            let end = start + ts.end;
            let mut states = new_states(ts.len() * group, hd);
            let mut partial = new_states(ts.len() * group, hd);
            for first in (0..end).step_by(KEY_SPAN) {
                partial.copy_from_slice(&new_states(ts.len() * group, hd));
                let span = Span {
                    heads,
                    cache,
                    g,
                    queries: &queries,
                    limits: &limits,
                    keys: first..(first + KEY_SPAN).min(end),
                };
                span.run(&mut partial);
                for (s, p) in states
                    .chunks_exact_mut(state_len)
                    .zip(partial.chunks_exact(state_len))
                {
                    merge(s, p);
                }
            }
            for (i, t) in ts.enumerate() {
                finish(t, g, &states[i * group * state_len..][..group * state_len]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::kv_cache::KvCache;
    use super::*;

    /// Attention written the obvious way, in f64, with K and V repeated for every query head.
    fn naive(heads: Heads, q: &[f32], rows: usize, start: usize, cache: &LayerCache) -> Vec<f32> {
        let hd = heads.head_dim;
        let mut out = vec![0f32; rows * heads.q_width()];
        for t in 0..rows {
            for h in 0..heads.heads {
                let g = h / heads.group();
                let qv = &q[t * heads.q_width() + h * hd..][..hd];
                let s: Vec<f64> = (0..=start + t)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qv[d] as f64 * cache.key(g, j, d) as f64)
                            .sum::<f64>()
                            * heads.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[t * heads.q_width() + h * hd + d] +=
                            (w / z * cache.value(g, j, d) as f64) as f32;
                    }
                }
            }
        }
        out
    }

    fn filled(heads: Heads, n: usize) -> KvCache {
        let val = |i: usize, k: f32| ((i as f32) * k).sin();
        let mut cache = KvCache::new(0..1, heads.kv_heads, heads.head_dim, n);
        for p in 0..n {
            let w = heads.kv_width();
            let key: Vec<f32> = (0..w).map(|i| val(p * w + i, 0.7)).collect();
            let value: Vec<f32> = (0..w).map(|i| val(p * w + i, 1.3)).collect();
            cache.layer_mut(0).push(&key, &value);
        }
        cache.set_len(n);
        cache
    }

    #[test]
    fn the_portable_kernel_matches_the_naive_form_too() {
        let heads = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 0.3,
        };
        let (start, rows) = (19, 6);
        let cache = filled(heads, start + rows);
        let q: Vec<f32> = (0..rows * heads.q_width())
            .map(|i| (i as f32 * 0.3).sin())
            .collect();
        let want = naive(heads, &q, rows, start, cache.layer(0));
        let (hd, group) = (heads.head_dim, heads.group());
        for g in 0..heads.kv_heads {
            let queries: Vec<&[f32]> = (0..rows)
                .map(|t| &q[t * heads.q_width() + g * group * hd..][..group * hd])
                .collect();
            let limits: Vec<usize> = (0..rows).map(|t| start + t + 1).collect();
            let mut states = new_states(rows * group, hd);
            let span = Span {
                heads,
                cache: cache.layer(0),
                g,
                queries: &queries,
                limits: &limits,
                keys: 0..start + rows,
            };
            span.run_portable(&mut states, &mut Tiles::default());
            for (i, s) in states.chunks_exact(STATE_HEAD + hd).enumerate() {
                let (t, h) = (i / group, g * group + i % group);
                for d in 0..hd {
                    let got = s[STATE_HEAD + d] / s[1];
                    let w = want[t * heads.q_width() + h * hd + d];
                    assert!((got - w).abs() < 2e-4, "t{t} h{h} d{d}: {got} vs {w}");
                }
            }
        }
    }

    fn check(heads: Heads, start: usize, rows: usize) {
        let n = start + rows;
        let val = |i: usize, k: f32| ((i as f32) * k).sin();
        let cache = filled(heads, n);
        let q: Vec<f32> = (0..rows * heads.q_width()).map(|i| val(i, 0.3)).collect();
        let mut out = vec![0f32; rows * heads.q_width()];
        attend(
            heads,
            &q,
            heads.q_width(),
            rows,
            start,
            cache.layer(0),
            &mut out,
        );
        let want = naive(heads, &q, rows, start, cache.layer(0));
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 2e-4,
                "start {start} rows {rows} [{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn grouped_attention_matches_the_naive_form() {
        let heads = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
        };
        // Prefill chunks that start mid-tile and cross tiles; single queries short and long
        // enough to be split across work items.
        for (start, rows) in [(0, 1), (5, 4), (0, 9), (13, 20), (40, 1), (700, 1), (3, 1)] {
            check(heads, start, rows);
        }
        let heads = Heads {
            head_dim: 64,
            ..heads
        };
        for (start, rows) in [(0, 3), (17, 33), (900, 1)] {
            check(heads, start, rows);
        }
        let wide = Heads {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            scale: 0.125,
        };
        check(wide, 30, 7);
        check(wide, 600, 1);
        // Every shape the vector kernel has: head widths 64 and 128, groups of 1 to 8.
        for (heads, kv_heads, head_dim) in
            [(8, 2, 64), (4, 2, 64), (2, 2, 64), (8, 1, 128), (3, 3, 128)]
        {
            let h = Heads {
                heads,
                kv_heads,
                head_dim,
                scale: 0.1,
            };
            check(h, 21, 5);
            check(h, 300, 1);
        }
    }
}
