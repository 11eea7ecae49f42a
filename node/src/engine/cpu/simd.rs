//! The f32 kernels of the engines: dot products, norms, softmax, activations, an exponential
//! and an error function that vectorize, and the quantization of a block of activations.
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

pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 2^f on f in [-0.5, 0.5]: Taylor terms of e^(f·ln 2) up to the 7th.
pub(crate) const EXP2_POLY: [f32; 7] = [
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
    0.000_015_252_73,
];

/// `e^x` to about 4e-6 relative error (1e-7 near 0; the f32 reduction `x·log2 e` costs the
/// rest at large |x|), in a form LLVM vectorizes (no libm call). Inputs are
/// clamped to the finite range of f32, so large arguments saturate rather than give inf.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let t = x.clamp(-87.0, 88.0) * LOG2E;
    let k = (t + 0.5).floor();
    let f = t - k;
    let mut p = EXP2_POLY[6];
    for c in EXP2_POLY[..6].iter().rev() {
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

dispatched! {
    /// Quantizes one block of activations to signed bytes as llama.cpp does: `q = round(x / d)`
    /// with `d = max|x| / 127`. Returns `d` and `Σq`.
    fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in q.iter_mut().zip(x) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        (d, sum)
    }
}

dispatched! {
    /// `x *= a`, elementwise.
    fn scale(x: &mut [f32], a: f32) {
        for v in x.iter_mut() {
            *v *= a;
        }
    }
}

/// `erf(x)` to about 1e-6 absolute error (Abramowitz and Stegun 7.1.26, with [`exp_approx`]),
/// in a form LLVM vectorizes.
#[inline(always)]
pub fn erf_approx(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let mut poly = A[4];
    for c in A[..4].iter().rev() {
        poly = poly * t + c;
    }
    let y = 1.0 - poly * t * exp_approx(-a * a);
    y.copysign(x)
}

dispatched! {
    /// GELU with the exact error function, in place: `x · (1 + erf(x/√2)) / 2`.
    fn gelu(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf_approx(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

dispatched! {
    /// Layer norm of each row of `x` (width `w.len()`), scaled by `w` and shifted by `b`,
    /// in place.
    fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let d = w.len();
        for row in x.chunks_exact_mut(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let mut acc = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for c in chunks {
                for i in 0..LANES {
                    acc[i] += (c[i] - mean) * (c[i] - mean);
                }
            }
            let var = (acc.iter().sum::<f32>() + rest) / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
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
    fn blocks_quantize_to_the_nearest_step_and_report_their_sum() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 10.5) * 0.25).collect();
        let mut q = [0i8; 32];
        let (d, sum) = quantize_block(&x, &mut q);
        assert_eq!(d, 5.125 / 127.0);
        assert_eq!(q[31], 127);
        for (v, q) in x.iter().zip(&q) {
            assert!((v - *q as f32 * d).abs() <= d / 2.0 + 1e-6);
        }
        assert_eq!(sum, q.iter().map(|v| *v as i32).sum::<i32>());
        let (d, sum) = quantize_block(&[0.0; 32], &mut q);
        assert_eq!((d, sum, q), (0.0, 0, [0; 32]));
    }

    #[test]
    fn erf_and_gelu_match_libm() {
        let mut worst = 0f64;
        let mut x = -3.0f32;
        while x < 3.0 {
            worst = worst.max((erf_approx(x) as f64 - libm_erf(x as f64)).abs());
            x += 0.001;
        }
        assert!(worst < 2e-6, "worst erf error {worst}");
        // Past 3, erf is within 2.3e-5 of ±1.
        for x in [3.5f32, 5.0, 9.0, 1e6] {
            assert!((erf_approx(x) - 1.0).abs() < 2.3e-5);
            assert!((erf_approx(-x) + 1.0).abs() < 2.3e-5);
        }
        let mut v = vec![-3.0f32, -1.0, 0.0, 0.5, 2.0];
        let want: Vec<f64> = v
            .iter()
            .map(|x| 0.5 * *x as f64 * (1.0 + libm_erf(*x as f64 / 2f64.sqrt())))
            .collect();
        gelu(&mut v);
        for (a, b) in v.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// erf by its Taylor series (accurate in f64 for |x| ≤ 3).
    fn libm_erf(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn layer_norm_centres_and_scales_each_row() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0];
        layer_norm(&mut x, &[1.0, 1.0, 2.0, 1.0], &[0.0, 0.5, 0.0, 0.0], 1e-12);
        let inv = 1.0 / 1.25f32.sqrt();
        assert!((x[0] + 1.5 * inv).abs() < 1e-5);
        assert!((x[1] - (-0.5 * inv + 0.5)).abs() < 1e-5);
        assert!((x[2] - 2.0 * 0.5 * inv).abs() < 1e-5);
        assert_eq!(
            &x[4..],
            &[0.0, 0.5, 0.0, 0.0],
            "a constant row becomes the shift"
        );
    }
}
