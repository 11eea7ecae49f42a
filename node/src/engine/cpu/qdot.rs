//! Products of quantized weights and quantized activations: `out = x · Wᵀ`.
//!
//! The kernels multiply unsigned weight bytes by signed activation bytes, 32 products per
//! block summed into 8 integer lanes, then scale the lanes by the two blocks' scales in f32 and
//! add them up, as llama.cpp's kernels do. The integer accumulator of each block starts from the
//! activation block's correction (see [`super::quant::QActs`]), so the weights' offset is taken
//! out exactly.
//!
//! Which kernel runs is decided once, from what the CPU has: AVX-512 VNNI (two blocks per
//! instruction), AVX-VNNI, AVX2, or portable code. Each computes a tile of up to 4 weight rows by
//! up to 4 activation rows, so a weight row read once serves every activation row of a prefill
//! chunk, and an activation row read once serves 4 weight rows.

use std::ops::Range;
use std::sync::OnceLock;

use super::pool::Pool;
use super::quant::{QActs, QMatrix};

/// The instruction sets a kernel exists for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    AvxVnni,
    Avx2,
    Portable,
}

impl Isa {
    /// The best this CPU runs.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                    return Isa::Avx512Vnni;
                }
                if has!("avx2") && has!("fma") && has!("f16c") && has!("avxvnni") {
                    return Isa::AvxVnni;
                }
                if has!("avx2") && has!("fma") && has!("f16c") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Every kernel this CPU can run, best first (the tests compare them all).
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|i| match best {
                Isa::Avx512Vnni => true,
                Isa::AvxVnni => *i != Isa::Avx512Vnni,
                Isa::Avx2 => matches!(i, Isa::Avx2 | Isa::Portable),
                Isa::Portable => *i == Isa::Portable,
            })
            .filter(|i| {
                // A CPU with AVX-512 VNNI need not have AVX-VNNI.
                #[cfg(target_arch = "x86_64")]
                if *i == Isa::AvxVnni {
                    return std::arch::is_x86_feature_detected!("avxvnni");
                }
                true
            })
            .collect()
    }
}

/// Weight rows per work item of the pool.
const ROWS_PER_ITEM: usize = 16;

/// `out[t·W.rows + r] = Σ_i W[r][i]·x[t][i]` for every row `r` of `w` and `t` of `x`, on the
/// pool. `x` must have been quantized for `w`'s format.
pub fn matmul(w: &QMatrix, x: &QActs, out: &mut [f32], pool: &Pool) {
    matmul_with(Isa::detect(), w, x, out, pool)
}

/// [`matmul`] with a chosen kernel.
pub fn matmul_with(isa: Isa, w: &QMatrix, x: &QActs, out: &mut [f32], pool: &Pool) {
    assert_eq!(x.cols, w.cols, "activations and weights differ in width");
    assert_eq!(
        x.offset,
        w.format.offset(),
        "activations quantized for another format"
    );
    assert!(out.len() >= x.rows * w.rows);
    let dst = OutPtr(out.as_mut_ptr());
    let items = w.rows.div_ceil(ROWS_PER_ITEM);
    // A few chunks per thread: enough to even out a thread the system delays, few enough
    // that claiming them costs little. A product too small to share runs on one thread.
    let per_chunk = if x.rows * w.rows * w.cols < 1 << 16 {
        items
    } else {
        items.div_ceil(4 * pool.threads()).max(1)
    };
    pool.run(items, per_chunk, |range| {
        let rows = range.start * ROWS_PER_ITEM..(range.end * ROWS_PER_ITEM).min(w.rows);
        // SAFETY: shapes were checked above; each item writes only its own rows of `out`.
        unsafe { rows_with(isa, w, x, rows, dst) }
    });
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: work items write disjoint elements and the pool joins before `out` is used again.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// # Safety
/// `rows` within `w`, `x` of `w`'s width and format, `dst` holding `x.rows × w.rows` values.
unsafe fn rows_with(isa: Isa, w: &QMatrix, x: &QActs, rows: Range<usize>, dst: OutPtr) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => x86::rows_avx512(w, x, rows, dst.0),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => x86::rows_avx256::<true>(w, x, rows, dst.0),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::rows_avx256::<false>(w, x, rows, dst.0),
        _ => {
            let out = std::slice::from_raw_parts_mut(dst.0, x.rows * w.rows);
            w.matmul_reference(x, rows, out)
        }
    }
}

#[cfg(target_arch = "x86_64")]
// The tiles index their registers by weight row and activation row, as the hardware lays them out.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::quant::{QActs, QFormat, QMatrix, BLOCK};

    /// The Q4_1 minimums' share of one output, `Σ_b m[r][b] · d_x[b]·Σq_x[b]`, with F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn mins_term(w: &QMatrix, x: &QActs, r: usize, t: usize) -> f32 {
        if w.format != QFormat::Q4_1 {
            return 0.0;
        }
        let nb = w.cols / BLOCK;
        let m = w.mins.as_ptr().add(r * nb) as *const u16;
        let s = x.sums.as_ptr().add(t * nb);
        let mut acc = _mm256_setzero_ps();
        let mut b = 0;
        while b + 8 <= nb {
            let mins = _mm256_cvtph_ps(_mm_loadu_si128(m.add(b) as *const __m128i));
            acc = _mm256_fmadd_ps(mins, _mm256_loadu_ps(s.add(b)), acc);
            b += 8;
        }
        let mut sum = hsum256(acc);
        while b < nb {
            sum += half_to_f32(*m.add(b)) * *s.add(b);
            b += 1;
        }
        sum
    }

    /// One half-precision value, widened.
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn half_to_f32(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    const Q8: u8 = 0;
    const Q4_0: u8 = 1;
    const Q4_1: u8 = 2;

    fn code(f: QFormat) -> u8 {
        match f {
            QFormat::Q8_0 => Q8,
            QFormat::Q4_0 => Q4_0,
            QFormat::Q4_1 => Q4_1,
        }
    }

    /// Calls `$f::<FMT, R, T>` for the runtime format and tile shape.
    macro_rules! tiles {
        ($f:ident, $fmt:expr, $r:expr, $t:expr, ($($arg:expr),*)) => {
            match ($fmt, $r, $t) {
                (Q8, 4, 4) => $f::<Q8, 4, 4>($($arg),*),
                (Q8, 4, 3) => $f::<Q8, 4, 3>($($arg),*),
                (Q8, 4, 2) => $f::<Q8, 4, 2>($($arg),*),
                (Q8, 4, 1) => $f::<Q8, 4, 1>($($arg),*),
                (Q8, 1, 4) => $f::<Q8, 1, 4>($($arg),*),
                (Q8, 1, _) => $f::<Q8, 1, 1>($($arg),*),
                (Q4_0, 4, 4) => $f::<Q4_0, 4, 4>($($arg),*),
                (Q4_0, 4, 3) => $f::<Q4_0, 4, 3>($($arg),*),
                (Q4_0, 4, 2) => $f::<Q4_0, 4, 2>($($arg),*),
                (Q4_0, 4, 1) => $f::<Q4_0, 4, 1>($($arg),*),
                (Q4_0, 1, 4) => $f::<Q4_0, 1, 4>($($arg),*),
                (Q4_0, 1, _) => $f::<Q4_0, 1, 1>($($arg),*),
                (_, 4, 4) => $f::<Q4_1, 4, 4>($($arg),*),
                (_, 4, 3) => $f::<Q4_1, 4, 3>($($arg),*),
                (_, 4, 2) => $f::<Q4_1, 4, 2>($($arg),*),
                (_, 4, 1) => $f::<Q4_1, 4, 1>($($arg),*),
                (_, 1, 4) => $f::<Q4_1, 1, 4>($($arg),*),
                (_, _, _) => $f::<Q4_1, 1, 1>($($arg),*),
            }
        };
    }

    /// Walks `rows × x.rows` in tiles of 4 × 4 (smaller at the edges).
    #[inline(always)]
    fn each_tile(
        rows: Range<usize>,
        tokens: usize,
        mut tile: impl FnMut(usize, usize, usize, usize),
    ) {
        let mut r = rows.start;
        while r < rows.end {
            let rn = if rows.end - r >= 4 { 4 } else { 1 };
            let mut t = 0;
            while t < tokens {
                let tn = if rn == 1 && tokens - t < 4 {
                    1
                } else {
                    (tokens - t).min(4)
                };
                tile(r, rn, t, tn);
                t += tn;
            }
            r += rn;
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI; see `super::rows_with`.
    pub(super) unsafe fn rows_avx512(w: &QMatrix, x: &QActs, rows: Range<usize>, out: *mut f32) {
        let fmt = code(w.format);
        each_tile(rows, x.rows, |r, rn, t, tn| {
            tiles!(tile512, fmt, rn, tn, (w, x, r, t, out))
        });
    }

    /// # Safety
    /// The CPU has AVX2 and FMA (and AVX-VNNI if `VNNI`); see `super::rows_with`.
    pub(super) unsafe fn rows_avx256<const VNNI: bool>(
        w: &QMatrix,
        x: &QActs,
        rows: Range<usize>,
        out: *mut f32,
    ) {
        let fmt = code(w.format);
        each_tile(rows, x.rows, |r, rn, t, tn| {
            if VNNI {
                tiles!(tile_vnni256, fmt, rn, tn, (w, x, r, t, out))
            } else {
                tiles!(tile_avx2, fmt, rn, tn, (w, x, r, t, out))
            }
        });
    }

    /// Two blocks of row values (64 bytes) as unsigned bytes in order.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn pair512<const FMT: u8>(row: *const u8, pair: usize) -> __m512i {
        if FMT == Q8 {
            _mm512_loadu_si512(row.add(pair * 64) as *const _)
        } else {
            let v = _mm256_loadu_si256(row.add(pair * 32) as *const __m256i);
            let mask = _mm256_set1_epi8(0x0F);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        }
    }

    /// One block of row values (32 bytes) as unsigned bytes in order: block `block` when
    /// blocks are counted in whole pairs before it plus an odd tail.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block256<const FMT: u8>(row: *const u8, block: usize, tail: bool) -> __m256i {
        if FMT == Q8 {
            return _mm256_loadu_si256(row.add(block * 32) as *const __m256i);
        }
        let mask = _mm256_set1_epi8(0x0F);
        if tail {
            // An odd last block: 16 bytes, values j and j + 16 in one byte.
            let v = _mm_loadu_si128(row.add(block * 16) as *const __m128i);
            let lo = _mm_and_si128(v, _mm256_castsi256_si128(mask));
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), _mm256_castsi256_si128(mask));
            return _mm256_set_m128i(hi, lo);
        }
        // Block 2p is the low nibbles of pair p's 32 bytes, block 2p+1 the high ones.
        let v = _mm256_loadu_si256(row.add(block / 2 * 32) as *const __m256i);
        if block.is_multiple_of(2) {
            _mm256_and_si256(v, mask)
        } else {
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask)
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn hsum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Two half-precision scales (blocks `b`, `b+1`) widened and spread over the two halves
    /// of a register.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn scales2(p: *const u16) -> __m512 {
        let two = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(two))
    }

    /// A tile of `R` weight rows from `r0` by `T` activation rows from `t0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile512<const FMT: u8, const R: usize, const T: usize>(
        w: &QMatrix,
        x: &QActs,
        r0: usize,
        t0: usize,
        out: *mut f32,
    ) {
        let nb = w.cols / BLOCK;
        let pairs = nb / 2;
        let row_bytes = w.row_bytes();
        let wv = w.values.as_ptr();
        let ws = w.scales.as_ptr() as *const u16;
        let (xv, xc, xs) = (
            x.values.as_ptr() as *const u8,
            x.corrections.as_ptr(),
            x.lane_scales.as_ptr(),
        );
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for p in 0..pairs {
            let mut wpair = [_mm512_setzero_si512(); R];
            let mut wscale = [_mm512_setzero_ps(); R];
            for r in 0..R {
                wpair[r] = pair512::<FMT>(wv.add((r0 + r) * row_bytes), p);
                wscale[r] = scales2(ws.add((r0 + r) * nb + 2 * p));
            }
            for t in 0..T {
                let tok = t0 + t;
                let xa = _mm512_loadu_si512(xv.add(tok * w.cols + p * 64) as *const _);
                let lanes = (tok * nb + 2 * p) * 8;
                let start = if FMT == Q4_1 {
                    _mm512_setzero_si512()
                } else {
                    _mm512_loadu_si512(xc.add(lanes) as *const _)
                };
                let xscale = _mm512_loadu_ps(xs.add(lanes));
                for r in 0..R {
                    let dot = _mm512_dpbusd_epi32(start, wpair[r], xa);
                    let scale = _mm512_mul_ps(wscale[r], xscale);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][t]);
                }
            }
        }
        let mut tail = [[0f32; T]; R];
        if nb % 2 == 1 {
            let b = nb - 1;
            for r in 0..R {
                let wb = block256::<FMT>(wv.add((r0 + r) * row_bytes), b, true);
                let wscale = half_to_f32(*ws.add((r0 + r) * nb + b));
                for t in 0..T {
                    let tok = t0 + t;
                    let xa = _mm256_loadu_si256(xv.add(tok * w.cols + b * 32) as *const __m256i);
                    let start = if FMT == Q4_1 {
                        _mm256_setzero_si256()
                    } else {
                        _mm256_loadu_si256(xc.add((tok * nb + b) * 8) as *const __m256i)
                    };
                    let dot = _mm256_dpbusd_epi32(start, wb, xa);
                    let scale = wscale * *x.scales.as_ptr().add(tok * nb + b);
                    tail[r][t] = hsum256(_mm256_cvtepi32_ps(dot)) * scale;
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let v = hsum512(acc[r][t]) + tail[r][t] + mins_term(w, x, r0 + r, t0 + t);
                *out.add((t0 + t) * w.rows + r0 + r) = v;
            }
        }
    }

    /// Signed-by-unsigned byte products of one block summed into 8 lanes, with AVX-VNNI.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    #[inline]
    unsafe fn dot_vnni256(start: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(start, w, x)
    }

    /// The same with AVX2 alone: pairs of products in 16 bits, then in 32. A Q8_0 weight is
    /// taken back to signed and the products formed as |w| · (x with w's sign), which cannot
    /// saturate; 4-bit weights are small enough to multiply as they are.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot_avx2<const FMT: u8>(start: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        if FMT == Q8 {
            let signed = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
            let abs = _mm256_sign_epi8(signed, signed);
            let xs = _mm256_sign_epi8(x, signed);
            // The true product sum: the caller passes no correction for Q8_0.
            _mm256_add_epi32(
                start,
                _mm256_madd_epi16(_mm256_maddubs_epi16(abs, xs), ones),
            )
        } else {
            _mm256_add_epi32(start, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn tile_vnni256<const FMT: u8, const R: usize, const T: usize>(
        w: &QMatrix,
        x: &QActs,
        r0: usize,
        t0: usize,
        out: *mut f32,
    ) {
        tile256::<FMT, R, T, true>(w, x, r0, t0, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const FMT: u8, const R: usize, const T: usize>(
        w: &QMatrix,
        x: &QActs,
        r0: usize,
        t0: usize,
        out: *mut f32,
    ) {
        tile256::<FMT, R, T, false>(w, x, r0, t0, out)
    }

    /// A tile with 256-bit registers: one block per step. Compiled into its two callers,
    /// whose features it takes.
    #[inline(always)]
    unsafe fn tile256<const FMT: u8, const R: usize, const T: usize, const VNNI: bool>(
        w: &QMatrix,
        x: &QActs,
        r0: usize,
        t0: usize,
        out: *mut f32,
    ) {
        let nb = w.cols / BLOCK;
        let row_bytes = w.row_bytes();
        let wv = w.values.as_ptr();
        let ws = w.scales.as_ptr() as *const u16;
        let (xv, xc, xs) = (
            x.values.as_ptr() as *const u8,
            x.corrections.as_ptr(),
            x.lane_scales.as_ptr(),
        );
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for b in 0..nb {
            let tail = nb % 2 == 1 && b == nb - 1;
            let mut wb = [_mm256_setzero_si256(); R];
            let mut wscale = [_mm256_setzero_ps(); R];
            for r in 0..R {
                wb[r] = block256::<FMT>(wv.add((r0 + r) * row_bytes), b, tail);
                wscale[r] = _mm256_set1_ps(half_to_f32(*ws.add((r0 + r) * nb + b)));
            }
            for t in 0..T {
                let tok = t0 + t;
                let xa = _mm256_loadu_si256(xv.add(tok * w.cols + b * 32) as *const __m256i);
                let lanes = (tok * nb + b) * 8;
                // AVX2's Q8_0 products come out signed already.
                let start = if FMT == Q4_1 || (FMT == Q8 && !VNNI) {
                    _mm256_setzero_si256()
                } else {
                    _mm256_loadu_si256(xc.add(lanes) as *const __m256i)
                };
                let xscale = _mm256_loadu_ps(xs.add(lanes));
                for r in 0..R {
                    let dot = if VNNI {
                        dot_vnni256(start, wb[r], xa)
                    } else {
                        dot_avx2::<FMT>(start, wb[r], xa)
                    };
                    let scale = _mm256_mul_ps(wscale[r], xscale);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let v = hsum256(acc[r][t]) + mins_term(w, x, r0 + r, t0 + t);
                *out.add((t0 + t) * w.rows + r0 + r) = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::tests::gguf_blocks;
    use super::super::quant::QFormat;
    use super::*;

    fn inputs(m: usize, cols: usize, seed: f32) -> Vec<f32> {
        (0..m * cols)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * (1.0 + (i % 7) as f32))
            .collect()
    }

    #[test]
    fn every_kernel_equals_the_reference_for_every_format_and_shape() {
        let pool = Pool::new(2);
        for format in [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1] {
            for (rows, cols) in [(1, 32), (5, 64), (9, 96), (37, 576), (20, 1536)] {
                let w = QMatrix::from_gguf(format, &gguf_blocks(format, rows, cols, 3), rows, cols)
                    .unwrap();
                for m in [1, 2, 3, 4, 5, 9] {
                    let mut x = QActs::default();
                    x.quantize(&inputs(m, cols, rows as f32), m, cols, format.offset());
                    let mut want = vec![0f32; m * rows];
                    w.matmul_reference(&x, 0..rows, &mut want);
                    for isa in Isa::available() {
                        let mut got = vec![f32::NAN; m * rows];
                        matmul_with(isa, &w, &x, &mut got, &pool);
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            let tol = 1e-4 * (1.0 + e.abs());
                            assert!(
                                (g - e).abs() <= tol,
                                "{isa:?} {format:?} {rows}x{cols} m={m} out {i}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_product_approximates_the_float_product() {
        let (rows, cols) = (8, 256);
        let dense = inputs(rows, cols, 1.0);
        let w = QMatrix::quantize_q8_0(&dense, rows, cols).unwrap();
        let xs = inputs(1, cols, 5.0);
        let mut x = QActs::default();
        x.quantize(&xs, 1, cols, w.format().offset());
        let mut got = vec![0f32; rows];
        matmul(&w, &x, &mut got, &Pool::new(1));
        for r in 0..rows {
            let exact: f32 = (0..cols).map(|i| dense[r * cols + i] * xs[i]).sum();
            let scale: f32 = (0..cols).map(|i| (dense[r * cols + i] * xs[i]).abs()).sum();
            assert!(
                (got[r] - exact).abs() < 0.01 * scale,
                "{} vs {exact}",
                got[r]
            );
        }
    }
}
