//! The node's upload rate for model files (`--share-rate`): every piece sent waits its turn,
//! over all streams, so sharing weights never takes the whole uplink from calls.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A shared pace of `bytes_per_sec` (unlimited when `None`).
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: Option<u64>,
    /// When the bytes reserved so far will have been sent at the rate.
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: Option<u64>) -> RateLimit {
        RateLimit {
            bytes_per_sec: bytes_per_sec.filter(|r| *r > 0),
            next: Mutex::new(None),
        }
    }

    pub fn unlimited() -> RateLimit {
        RateLimit::new(None)
    }

    /// The time `bytes` take at the rate.
    fn cost(&self, bytes: usize) -> Duration {
        match self.bytes_per_sec {
            Some(rate) => Duration::from_secs_f64(bytes as f64 / rate as f64),
            None => Duration::ZERO,
        }
    }

    /// Waits until `bytes` may be sent: after the bytes others reserved before them.
    pub async fn take(&self, bytes: usize) {
        if self.bytes_per_sec.is_none() {
            return;
        }
        let start = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            // Idle time is not saved up: a burst after a pause still goes at the rate.
            let start = next.filter(|t| *t > now).unwrap_or(now);
            *next = Some(start + self.cost(bytes));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pieces_go_out_at_the_rate_over_all_takers() {
        let limit = std::sync::Arc::new(RateLimit::new(Some(8 * 1024 * 1024)));
        let begun = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move { limit.take(256 * 1024).await }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // 4 x 256 KiB at 8 MiB/s: the last one may start 96 ms after the first.
        let waited = begun.elapsed();
        assert!(waited >= Duration::from_millis(90), "{waited:?}");
        let free = RateLimit::unlimited();
        let now = Instant::now();
        free.take(1 << 30).await;
        assert!(now.elapsed() < Duration::from_millis(5));
    }
}
