//! Choosing the next token from a model's logits: greedy, or sampled with temperature, top-k
//! and top-p.
//!
//! A sampled step draws exactly one number from the call's random generator (greedy draws
//! none), so the generator's state after `n` tokens depends only on the seed and `n`. That is
//! what lets another node carry on a seeded call from its `n`th token ([`Sampler::skip`]) and
//! pick the same tokens the first node would have.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mesh_protocol::SamplingParams;

/// How a call picks its tokens.
pub struct Sampler {
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    rng: StdRng,
    /// Scratch: (token, probability) candidates.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `params`, its generator seeded with `seed`.
    pub fn new(params: &SamplingParams, seed: u64) -> Sampler {
        Sampler {
            temperature: params.temperature,
            top_k: params.top_k.map(|k| k as usize),
            top_p: params.top_p.filter(|p| *p < 1.0),
            rng: StdRng::seed_from_u64(seed),
            candidates: Vec::new(),
        }
    }

    fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Moves the generator past `n` tokens already sampled (by this call elsewhere).
    pub fn skip(&mut self, n: usize) {
        if !self.greedy() {
            for _ in 0..n {
                let _: f64 = self.rng.gen();
            }
        }
    }

    /// The next token. Logits that are NaN never win.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.greedy() || logits.len() < 2 {
            return argmax(logits);
        }
        let u: f64 = self.rng.gen();
        let inv_t = 1.0 / self.temperature;
        let max = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, l)| {
            let p = if l.is_nan() {
                0.0
            } else {
                ((l - max) * inv_t).exp()
            };
            (i as u32, p)
        }));
        if let Some(k) = self.top_k.filter(|k| *k < c.len()) {
            c.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
            c.truncate(k);
        }
        if let Some(p) = self.top_p {
            keep_nucleus(c, p);
        }
        let total: f32 = c.iter().map(|(_, p)| p).sum();
        let mut target = u as f32 * total;
        for (id, p) in c.iter() {
            if target < *p {
                return *id;
            }
            target -= p;
        }
        c.iter()
            .rev()
            .find(|(_, p)| *p > 0.0)
            .map_or(0, |(id, _)| *id)
    }
}

/// The index of the largest logit (the first of equals), NaN never chosen.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, l) in logits.iter().enumerate() {
        if *l > best.1 {
            best = (i as u32, *l);
        }
    }
    best.0
}

/// Keeps the most probable candidates whose share of the mass reaches `p`, in order of
/// probability. Only candidates above a falling threshold are sorted, so a vocabulary of tens
/// of thousands costs a few hundred comparisons, not a full sort.
fn keep_nucleus(c: &mut Vec<(u32, f32)>, p: f32) {
    let total: f32 = c.iter().map(|(_, q)| q).sum();
    if total <= 0.0 {
        return;
    }
    let need = p * total;
    let max = c.iter().fold(0f32, |m, (_, q)| m.max(*q));
    let mut threshold = max / 2.0;
    loop {
        let kept: f32 = c
            .iter()
            .filter(|(_, q)| *q >= threshold)
            .map(|(_, q)| q)
            .sum();
        if kept >= need || threshold < f32::MIN_POSITIVE {
            break;
        }
        threshold /= 8.0;
    }
    c.retain(|(_, q)| *q >= threshold);
    c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut acc = 0f32;
    let mut keep = c.len();
    for (i, (_, q)) in c.iter().enumerate() {
        acc += q;
        if acc >= need {
            keep = i + 1;
            break;
        }
    }
    c.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<u32>, top_p: Option<f32>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_never_a_nan() {
        let mut s = Sampler::new(&params(0.0, None, None), 1);
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.9]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -1.0]), 1, "the first of equals");
    }

    #[test]
    fn a_seed_repeats_and_skipping_equals_sampling() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let p = params(0.8, Some(20), Some(0.9));
        let run = |seed| {
            let mut s = Sampler::new(&p, seed);
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        // A second sampler that skips the first 10 draws picks what the first picked next.
        let mut later = Sampler::new(&p, 42);
        later.skip(10);
        let rest: Vec<u32> = (0..20).map(|_| later.sample(&logits)).collect();
        assert_eq!(rest, a[10..]);
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_likely() {
        // Token 0 has almost all the mass; 1 and 2 a little; the rest nothing to speak of.
        let mut logits = vec![-30.0f32; 1000];
        logits[0] = 10.0;
        logits[1] = 8.0;
        logits[2] = 7.5;
        let mut k1 = Sampler::new(&params(1.0, Some(1), None), 3);
        assert!((0..100).all(|_| k1.sample(&logits) == 0));
        let mut k2 = Sampler::new(&params(1.0, Some(2), None), 3);
        let picks: Vec<u32> = (0..400).map(|_| k2.sample(&logits)).collect();
        assert!(picks.iter().all(|t| *t < 2) && picks.contains(&1));
        let mut nucleus = Sampler::new(&params(1.0, None, Some(0.5)), 3);
        assert!((0..100).all(|_| nucleus.sample(&logits) == 0));
        let mut wide = Sampler::new(&params(1.0, None, Some(0.99)), 3);
        let picks: Vec<u32> = (0..2000).map(|_| wide.sample(&logits)).collect();
        assert!(picks.iter().all(|t| *t < 3), "the tail is never sampled");
        assert!(picks.contains(&2));
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, (2f32).ln(), (3f32).ln()]; // probabilities 1/6, 2/6, 3/6
        let mut s = Sampler::new(&params(1.0, None, None), 9);
        let mut counts = [0u32; 3];
        for _ in 0..6000 {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (i, want) in [1000.0, 2000.0, 3000.0].iter().enumerate() {
            assert!((counts[i] as f64 - want).abs() < 150.0, "{counts:?}");
        }
    }
}
