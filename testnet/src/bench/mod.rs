//! Measurement helpers for `mesh-bench`.

pub mod gateway;
pub mod models;
pub mod network;

/// Latency percentiles of a set of samples.
#[derive(Debug, Clone)]
pub struct Stats {
    pub n: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub mean_us: u64,
}

impl Stats {
    pub fn of(samples: &[std::time::Duration]) -> Stats {
        let mut us: Vec<u64> = samples.iter().map(|d| d.as_micros() as u64).collect();
        us.sort_unstable();
        let at = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
        Stats {
            n: us.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            mean_us: us.iter().sum::<u64>() / us.len().max(1) as u64,
        }
    }
}
