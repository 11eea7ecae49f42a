//! Rotary position embeddings, with the settings a GGUF file declares.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
