//! Measurement helpers for `mesh-bench`.

pub mod gateway;
pub mod hostile;
pub mod kernels;
pub mod load;
pub mod models;
pub mod network;
pub mod split;

/// Calls completed per second with `in_flight` workers calling `call` back to back until
/// `for_how_long` is up.
pub async fn calls_per_second<F, Fut>(
    in_flight: usize,
    for_how_long: std::time::Duration,
    call: F,
) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = std::time::Instant::now();
    let deadline = start + for_how_long;
    let workers = (0..in_flight).map(|_| async {
        let mut done = 0u64;
        while std::time::Instant::now() < deadline {
            call().await?;
            done += 1;
        }
        anyhow::Ok(done)
    });
    let total: u64 = futures::future::try_join_all(workers)
        .await?
        .into_iter()
        .sum();
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

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
