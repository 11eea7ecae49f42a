//! The small f32 kernels of the forward pass: dot products, RMS norm, rotary embeddings,
//! SiLU-gated products and an exponential that vectorizes.
//!
//! Each kernel is plain Rust written so that LLVM vectorizes it (fixed-width lane arrays, no
//! calls into libm in the hot loops). The same body is compiled twice: once for the baseline
//! target, and once with AVX2 and FMA enabled, chosen at run time, so a portable build still
//! runs 256-bit code on the machines that have it.

use std::sync::OnceLock;

/// Lanes of the accumulators: one AVX2 register of f32.
const LANES: usize = 8;

fn has_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines `pub fn $name` that runs `$body` compiled for AVX2+FMA when the CPU has them.
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU was checked for AVX2 and FMA above.
                return unsafe { avx2($($arg),*) };
            }
            generic($($arg),*)
        }
    };
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

dispatched! {
    /// `Σ a[i]·b[i]` over the shorter of the two.
    fn dot(a: &[f32], b: &[f32]) -> f32 { dot_lanes(a, b) }
}

dispatched! {
    /// `y += a·x`.
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }
}

dispatched! {
    /// `y += x`, elementwise.
    fn add_assign(y: &mut [f32], x: &[f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += x;
        }
    }
}

/// `e^x` to about 4e-6 relative error (1e-7 near 0; the f32 reduction `x·log2 e` costs the
/// rest at large |x|), in a form LLVM vectorizes (no libm call). Inputs are
/// clamped to the finite range of f32, so large arguments saturate rather than give inf.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 2^f on f in [-0.5, 0.5]: Taylor terms of e^(f·ln 2) up to the 7th.
    const C: [f32; 7] = [
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
        0.000_015_252_73,
    ];
    let t = x.clamp(-87.0, 88.0) * LOG2E;
    let k = (t + 0.5).floor();
    let f = t - k;
    let mut p = C[6];
    for c in C[..6].iter().rev() {
        p = p * f + c;
    }
    p = p * f + 1.0;
    let scale = f32::from_bits((((k as i32) + 127) as u32) << 23);
    p * scale
}

dispatched! {
    /// Turns `xs` into its softmax, in place; returns nothing for an empty slice.
    fn softmax(xs: &mut [f32]) {
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in xs.iter_mut() {
            *x = exp_approx(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in xs.iter_mut() {
            *x *= inv;
        }
    }
}

dispatched! {
    /// RMS norm of each row of `x` (width `w.len()`), scaled by `w`, written to `out`.
    fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mut acc = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let rest: f32 = chunks.remainder().iter().map(|v| v * v).sum();
            for c in chunks {
                for i in 0..LANES {
                    acc[i] += c[i] * c[i];
                }
            }
            let mean = (acc.iter().sum::<f32>() + rest) / d as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((o, x), w) in out.iter_mut().zip(row).zip(w) {
                *o = x * scale * w;
            }
        }
    }
}

dispatched! {
    /// `out[i] = silu(gate[i]) · up[i]`, where `silu(g) = g / (1 + e^-g)`.
    fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp_approx(-g)) * u;
        }
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's "normal" mode, used by llama GGUF files.
    Interleaved,
    /// Halves `(i, i + d/2)`: the GPT-NeoX mode of Qwen and Gemma files.
    Halves,
}

/// Rotary position embeddings: the inverse frequencies of one head's rotated dimensions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
    /// Linear position scaling (`rope.scaling.factor`): positions are divided by it.
    position_scale: f32,
}

impl Rope {
    /// `dims` rotated dimensions (even), base `theta`, optional per-frequency divisors (the
    /// `rope_freqs` tensor of Llama 3.1-style files).
    pub fn new(
        dims: usize,
        theta: f32,
        style: RopeStyle,
        factors: Option<&[f32]>,
        linear_scale: f32,
    ) -> Rope {
        let inv_freq = (0..dims / 2)
            .map(|i| {
                let f = 1.0 / (theta as f64).powf(2.0 * i as f64 / dims as f64);
                let divisor = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                (f / divisor as f64) as f32
            })
            .collect();
        Rope {
            inv_freq,
            style,
            position_scale: 1.0 / linear_scale.max(f32::MIN_POSITIVE),
        }
    }

    /// The cos and sin of each frequency at `position`, into `cs` (`[cos..., sin...]`).
    pub fn angles(&self, position: usize, cs: &mut Vec<f32>) {
        let n = self.inv_freq.len();
        cs.clear();
        cs.resize(2 * n, 0.0);
        let p = position as f64 * self.position_scale as f64;
        for (i, f) in self.inv_freq.iter().enumerate() {
            let (s, c) = (p * *f as f64).sin_cos();
            cs[i] = c as f32;
            cs[n + i] = s as f32;
        }
    }

    /// Rotates the first `2·n` dimensions of one head in place, with angles from [`Rope::angles`].
    pub fn apply(&self, head: &mut [f32], cs: &[f32]) {
        let n = self.inv_freq.len();
        let (cos, sin) = cs.split_at(n);
        match self.style {
            RopeStyle::Interleaved => {
                for i in 0..n {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos[i] - b * sin[i];
                    head[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
            RopeStyle::Halves => {
                for i in 0..n {
                    let (a, b) = (head[i], head[n + i]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[n + i] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

/// A raw pointer that may cross to the compute pool's workers, for kernels whose work items
/// write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: users write disjoint ranges only, and join before the buffer is used again.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element `i` places past the start.
    ///
    /// # Safety
    /// `i` must be within the buffer.
    pub(crate) unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// Runs `f` over `0..n` split in chunks on candle's compute pool (the same threads as the
/// quantized matmuls, so nothing else competes for the cores).
pub fn parallel_for(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if n <= 1 {
        f(0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_close_to_exp_over_the_useful_range() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let exact = (x as f64).exp();
            let rel = ((exp_approx(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-6, "worst relative error {worst}");
        assert_eq!(exp_approx(-1000.0), exp_approx(-87.0));
        assert!(exp_approx(1000.0).is_finite());
    }

    #[test]
    fn dot_and_axpy_match_the_plain_loops_at_every_length() {
        for n in [0, 1, 7, 8, 9, 64, 577] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-4, "n={n}");
            let mut y = b.clone();
            axpy(&mut y, 0.5, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut xs = vec![1.0, 3.0, -2.0, 3.5, 0.0];
        let plain: Vec<f64> = {
            let m = 3.5f64;
            let e: Vec<f64> = xs.iter().map(|x| (*x as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax(&mut xs);
        for (a, b) in xs.iter().zip(&plain) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_normalises_each_row() {
        let x = [3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let w = [1.0, 2.0, 1.0, 1.0];
        let mut out = [0f32; 8];
        rms_norm(&x, &w, 0.0, &mut out);
        // Row 0: rms = sqrt(25/4) = 2.5.
        assert_eq!(&out[..4], &[1.2, 3.2, 0.0, 0.0]);
        assert_eq!(&out[4..], &[1.0, 2.0, 1.0, 1.0]);
    }

    #[test]
    fn silu_mul_matches_its_definition() {
        let g = [-3.0f32, -0.5, 0.0, 0.5, 4.0, 30.0, -30.0];
        let u = [1.0f32, 2.0, 3.0, -1.0, 0.5, 1.0, 1.0];
        let mut out = [0f32; 7];
        silu_mul(&g, &u, &mut out);
        for i in 0..7 {
            let exact = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
            assert!(
                (out[i] as f64 - exact).abs() < 1e-6,
                "{i}: {} vs {exact}",
                out[i]
            );
        }
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_the_norm() {
        let rope = Rope::new(4, 10_000.0, RopeStyle::Interleaved, None, 1.0);
        let mut cs = Vec::new();
        rope.angles(0, &mut cs);
        let mut head = [1.0, 2.0, 3.0, 4.0];
        rope.apply(&mut head, &cs);
        assert_eq!(head, [1.0, 2.0, 3.0, 4.0], "position 0 is the identity");
        rope.angles(5, &mut cs);
        rope.apply(&mut head, &cs);
        // The first pair turns by 5 radians (frequency 1).
        let (s, c) = 5f32.sin_cos();
        assert!((head[0] - (c - 2.0 * s)).abs() < 1e-5);
        assert!((head[1] - (s + 2.0 * c)).abs() < 1e-5);
        let norm: f32 = head.iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);

        let halves = Rope::new(4, 10_000.0, RopeStyle::Halves, None, 1.0);
        let mut head = [1.0, 3.0, 2.0, 4.0];
        halves.angles(5, &mut cs);
        halves.apply(&mut head, &cs);
        assert!((head[0] - (c - 2.0 * s)).abs() < 1e-5);
        assert!((head[2] - (s + 2.0 * c)).abs() < 1e-5);

        // Linear scaling by 2 at position 10 equals position 5.
        let scaled = Rope::new(4, 10_000.0, RopeStyle::Interleaved, None, 2.0);
        let mut a = Vec::new();
        let mut b = Vec::new();
        scaled.angles(10, &mut a);
        rope.angles(5, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn parallel_for_covers_every_item_once() {
        let hits: Vec<std::sync::atomic::AtomicU32> =
            (0..1000).map(|_| Default::default()).collect();
        parallel_for(1000, |r| {
            for i in r {
                hits[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        assert!(hits
            .iter()
            .all(|h| h.load(std::sync::atomic::Ordering::Relaxed) == 1));
    }
}
