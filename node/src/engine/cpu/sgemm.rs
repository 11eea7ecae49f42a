//! Dense f32 matrix products for the embedding engine: `out = x · Wᵀ + b`, with `W` packed once
//! at load.
//!
//! `W` (`rows × cols`, one row per output) is stored as panels of [`PANEL`] outputs: for each
//! input `k`, the panel's [`PANEL`] weights lie side by side, so the kernel reads two vectors
//! per input and multiplies them into 8 rows of `x` at once, keeping 16 accumulators in
//! registers (AVX-512). The pool splits the work by panels, so each thread streams its own
//! weights once for every row of `x`.

use super::pool::Pool;

/// Outputs per panel: two AVX-512 vectors.
pub const PANEL: usize = 32;
/// Rows of `x` per tile of the kernel.
const ROWS: usize = 8;

/// A weight matrix packed in panels, with an optional bias.
#[derive(Debug, Clone)]
pub struct Packed {
    rows: usize,
    cols: usize,
    /// `ceil(rows / PANEL)` panels of `cols × PANEL` weights (zeros past `rows`).
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl Packed {
    /// Packs `w` (`rows × cols`, row-major) and its bias (`rows`, or empty for none).
    pub fn new(w: &[f32], rows: usize, cols: usize, bias: &[f32]) -> Result<Packed, String> {
        if w.len() != rows * cols || rows == 0 || cols == 0 {
            return Err(format!("{} weights for a {rows}x{cols} matrix", w.len()));
        }
        if !bias.is_empty() && bias.len() != rows {
            return Err(format!("a bias of {} for {rows} outputs", bias.len()));
        }
        let n = rows.div_ceil(PANEL);
        let mut panels = vec![0f32; n * cols * PANEL];
        for r in 0..rows {
            let (p, c) = (r / PANEL, r % PANEL);
            for k in 0..cols {
                panels[(p * cols + k) * PANEL + c] = w[r * cols + k];
            }
        }
        let mut full_bias = vec![0f32; n * PANEL];
        full_bias[..bias.len()].copy_from_slice(bias);
        Ok(Packed {
            rows,
            cols,
            panels,
            bias: full_bias,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.panels.len() + self.bias.len())
    }

    /// `out[m × rows] = x[m × cols] · Wᵀ + b`, on the pool.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], pool: &Pool) {
        assert!(x.len() >= m * self.cols && out.len() >= m * self.rows);
        let dst = Dst(out.as_mut_ptr());
        let panels = self.rows.div_ceil(PANEL);
        // One panel per chunk: a panel is tens of microseconds of work, so the threads end
        // together; a product too small to share runs on one thread.
        let per_chunk = if m * self.rows * self.cols < 1 << 16 {
            panels
        } else {
            1
        };
        pool.run(panels, per_chunk, |range| {
            for p in range {
                // SAFETY: panel `p` writes only its own columns of `out`, sized above.
                unsafe { self.panel(p, x, m, dst) }
            }
        });
    }

    /// # Safety
    /// `dst` holds `m × rows` outputs; `x` holds `m × cols` inputs.
    unsafe fn panel(&self, p: usize, x: &[f32], m: usize, dst: Dst) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return x86::panel(self, p, x, m, dst.0);
        }
        self.panel_portable(p, x, m, dst.0)
    }

    /// One panel for every row of `x`, in plain Rust.
    ///
    /// # Safety
    /// As [`Packed::panel`].
    unsafe fn panel_portable(&self, p: usize, x: &[f32], m: usize, out: *mut f32) {
        let (k, width) = (self.cols, (self.rows - p * PANEL).min(PANEL));
        let panel = &self.panels[p * k * PANEL..][..k * PANEL];
        for i in 0..m {
            let mut acc = [0f32; PANEL];
            acc.copy_from_slice(&self.bias[p * PANEL..][..PANEL]);
            for (kk, xv) in x[i * k..][..k].iter().enumerate() {
                let w = &panel[kk * PANEL..][..PANEL];
                for c in 0..PANEL {
                    acc[c] += xv * w[c];
                }
            }
            let row = out.add(i * self.rows + p * PANEL);
            std::ptr::copy_nonoverlapping(acc.as_ptr(), row, width);
        }
    }
}

#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: work items write disjoint columns, and the pool joins before `out` is used again.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

#[cfg(target_arch = "x86_64")]
// Registers are indexed by row of `x` and half of the panel, as the hardware lays them out.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Packed, PANEL, ROWS};

    /// # Safety
    /// The CPU has AVX-512 F; see `Packed::panel`.
    pub(super) unsafe fn panel(w: &Packed, p: usize, x: &[f32], m: usize, out: *mut f32) {
        let mut i = 0;
        while i < m {
            match m - i {
                1 => tile::<1>(w, p, x, i, out),
                2 => tile::<2>(w, p, x, i, out),
                3 => tile::<3>(w, p, x, i, out),
                4 => tile::<4>(w, p, x, i, out),
                5 => tile::<5>(w, p, x, i, out),
                6 => tile::<6>(w, p, x, i, out),
                7 => tile::<7>(w, p, x, i, out),
                _ => tile::<ROWS>(w, p, x, i, out),
            }
            i += ROWS;
        }
    }

    /// Rows `i0..i0 + R` of `x` through panel `p`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(w: &Packed, p: usize, x: &[f32], i0: usize, out: *mut f32) {
        let k = w.cols;
        let panel = w.panels.as_ptr().add(p * k * PANEL);
        let bias = w.bias.as_ptr().add(p * PANEL);
        let (b0, b1) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)));
        let mut acc = [[b0, b1]; R];
        let xs: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((i0 + r) * k));
        for kk in 0..k {
            let w0 = _mm512_loadu_ps(panel.add(kk * PANEL));
            let w1 = _mm512_loadu_ps(panel.add(kk * PANEL + 16));
            for r in 0..R {
                let a = _mm512_set1_ps(*xs[r].add(kk));
                acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
            }
        }
        let width = (w.rows - p * PANEL).min(PANEL);
        let mask = |lo: usize| -> __mmask16 {
            let n = width.saturating_sub(lo).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        for r in 0..R {
            let row = out.add((i0 + r) * w.rows + p * PANEL);
            _mm512_mask_storeu_ps(row, mask(0), acc[r][0]);
            _mm512_mask_storeu_ps(row.add(16), mask(16), acc[r][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_the_plain_loop_for_every_shape() {
        let pool = Pool::new(2);
        for (rows, cols, m) in [
            (1, 1, 1),
            (32, 8, 3),
            (45, 17, 9),
            (384, 384, 13),
            (70, 5, 17),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..rows).map(|i| i as f32 * 0.01).collect();
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.11).cos()).collect();
            let packed = Packed::new(&w, rows, cols, &b).unwrap();
            let mut out = vec![f32::NAN; m * rows];
            packed.matmul(&x, m, &mut out, &pool);
            let mut portable = vec![f32::NAN; m * rows];
            for p in 0..rows.div_ceil(PANEL) {
                // SAFETY: sizes as `matmul` checks them.
                unsafe { packed.panel_portable(p, &x, m, portable.as_mut_ptr()) };
            }
            for i in 0..m {
                for r in 0..rows {
                    let want: f32 = b[r]
                        + (0..cols)
                            .map(|k| x[i * cols + k] * w[r * cols + k])
                            .sum::<f32>();
                    let tol = 1e-4 * (1.0 + cols as f32).sqrt();
                    assert!(
                        (out[i * rows + r] - want).abs() < tol,
                        "{rows}x{cols} m={m}"
                    );
                    assert!((portable[i * rows + r] - want).abs() < tol);
                }
            }
        }
        assert!(Packed::new(&[0.0; 5], 2, 3, &[]).is_err());
        assert!(Packed::new(&[0.0; 6], 2, 3, &[1.0]).is_err());
    }
}
