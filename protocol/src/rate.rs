//! Bandwidth limits: a token bucket shared by every connection of a tunnel in one
//! direction. Bytes are taken after they are read and the reader then waits before
//! reading more, so a limited tunnel slows its senders down (TCP backpressure) and
//! holds no more than one read per connection.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The smallest burst allowed, so small limits still move whole reads.
const MIN_BURST: u64 = 16 * 1024;

#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: u64,
    burst: u64,
    /// Tokens available (negative: owed) as of the instant beside them.
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> Self {
        let bytes_per_second = bytes_per_second.max(1);
        // A tenth of a second's worth: smooth enough at a glance, and the overshoot it
        // allows over any interval is that tenth of a second at most.
        let burst = (bytes_per_second / 10).max(MIN_BURST);
        Self {
            bytes_per_second,
            burst,
            bucket: Mutex::new((burst as f64, Instant::now())),
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// The most a reader should take off a socket at once under this limit.
    pub fn largest_read(&self) -> usize {
        usize::try_from(self.burst).unwrap_or(usize::MAX)
    }

    /// Accounts for `bytes` just moved and returns how long to wait before moving
    /// more. Debt is allowed, so over any interval the bytes moved stay within the rate
    /// times the interval plus one burst and one read.
    pub fn take(&self, bytes: u64) -> Duration {
        let mut bucket = self.bucket.lock().unwrap();
        let now = Instant::now();
        let (tokens, since) = *bucket;
        let refilled = (tokens
            + now.duration_since(since).as_secs_f64() * self.bytes_per_second as f64)
            .min(self.burst as f64);
        let left = refilled - bytes as f64;
        *bucket = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.bytes_per_second as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_steady_sender_moves_the_rate_and_no_more() {
        let limit = RateLimit::new(1_000_000);
        let started = Instant::now();
        let mut moved = 0u64;
        while started.elapsed() < Duration::from_secs(5) {
            let read = limit.largest_read() as u64;
            moved += read;
            tokio::time::sleep(limit.take(read)).await;
        }
        let expected = 5_000_000f64;
        let ratio = moved as f64 / expected;
        assert!((0.98..1.05).contains(&ratio), "moved {moved} in 5 s");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_earns_only_one_burst() {
        let limit = RateLimit::new(100_000);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(limit.take(16 * 1024), Duration::ZERO);
        assert!(limit.take(100_000) > Duration::from_millis(900));
    }
}
