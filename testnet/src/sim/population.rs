//! Which models the simulated nodes host: a catalogue whose popularity follows a Zipf law, so a
//! few models have many providers and most have few. A plain struct, tested without a network.

use rand::Rng;

/// The catalogue of model names, most popular first, and the law to draw them by.
#[derive(Debug, Clone)]
pub struct Population {
    names: Vec<String>,
    /// Cumulative popularity, ending at 1.
    cdf: Vec<f64>,
    /// Most models one node hosts.
    max_per_node: usize,
}

impl Population {
    /// `models` names (`m000`, `m001`, … by falling popularity), the `k`-th weighted
    /// `1 / k^exponent`; a node hosts 0 to `max_per_node` of them.
    pub fn new(models: usize, exponent: f64, max_per_node: usize) -> Population {
        let models = models.max(1);
        let width = models.to_string().len().max(3);
        let names = (0..models).map(|i| format!("m{i:0width$}")).collect();
        let weights: Vec<f64> = (1..=models)
            .map(|k| 1.0 / (k as f64).powf(exponent))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        *cdf.last_mut().expect("at least one model") = 1.0;
        Population {
            names,
            cdf,
            max_per_node: max_per_node.min(models),
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The share of draws that name model `index`.
    pub fn popularity(&self, index: usize) -> f64 {
        let below = if index == 0 { 0.0 } else { self.cdf[index - 1] };
        self.cdf[index] - below
    }

    /// One model, by popularity.
    pub fn pick(&self, rng: &mut impl Rng) -> usize {
        let x: f64 = rng.gen();
        self.cdf
            .partition_point(|c| *c < x)
            .min(self.names.len() - 1)
    }

    /// The models one node hosts: 0 to `max_per_node` (uniformly), distinct, by popularity.
    pub fn draw_for_node(&self, rng: &mut impl Rng) -> Vec<String> {
        let count = rng.gen_range(0..=self.max_per_node);
        let mut chosen: Vec<usize> = Vec::with_capacity(count);
        // Rejection keeps the draw by popularity; the cap on tries ends it for tiny catalogues.
        let mut tries = 0;
        while chosen.len() < count && tries < 100 * (count + 1) {
            tries += 1;
            let i = self.pick(rng);
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
        chosen.sort_unstable();
        chosen.into_iter().map(|i| self.names[i].clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn popularity_falls_as_a_zipf_law_and_sums_to_one() {
        let p = Population::new(100, 1.0, 3);
        let sum: f64 = (0..100).map(|i| p.popularity(i)).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        // Under exponent 1 the first is twice the second and ten times the tenth.
        assert!((p.popularity(0) / p.popularity(1) - 2.0).abs() < 1e-9);
        assert!((p.popularity(0) / p.popularity(9) - 10.0).abs() < 1e-9);
        assert_eq!(p.names()[0], "m000");
        assert_eq!(p.names()[99], "m099");
    }

    #[test]
    fn draws_follow_the_popularity() {
        let p = Population::new(50, 1.0, 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0u32; 50];
        for _ in 0..100_000 {
            counts[p.pick(&mut rng)] += 1;
        }
        let share = |i: usize| f64::from(counts[i]) / 100_000.0;
        for i in [0, 1, 4, 20] {
            let expected = p.popularity(i);
            assert!(
                (share(i) - expected).abs() < 0.1 * expected + 0.002,
                "model {i}: {} against {expected}",
                share(i)
            );
        }
    }

    #[test]
    fn a_node_hosts_zero_to_max_distinct_models() {
        let p = Population::new(20, 1.2, 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut sizes = [0u32; 4];
        for _ in 0..2_000 {
            let models = p.draw_for_node(&mut rng);
            let mut unique = models.clone();
            unique.dedup();
            assert_eq!(unique, models, "distinct and sorted");
            sizes[models.len()] += 1;
        }
        assert!(sizes.iter().all(|n| *n > 300), "{sizes:?}");
        let tiny = Population::new(2, 1.0, 3);
        for _ in 0..100 {
            assert!(tiny.draw_for_node(&mut rng).len() <= 2);
        }
    }
}
