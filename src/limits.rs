//! Limits: the per-socket limits from configuration, and the token bucket behind the push rate limit
//! (per socket) and the new-connection rate limit (per instance).

use std::time::{Duration, Instant};

/// Per-socket limits, from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_message_bytes: usize,
    pub outbound_queue: usize,
    /// Close an authenticated socket when its token expires.
    pub close_on_expiry: bool,
    pub max_topics: usize,
    pub max_pushes_per_sec: u32,
    pub push_burst: u32,
    pub first_frame_timeout: Duration,
}

/// Allows `rate` events per second on average and bursts of up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5);
        bucket.last = start;
        let taken = (0..20).filter(|_| bucket.try_take_at(start)).count();
        assert_eq!(taken, 5);
        assert!(bucket.try_take_at(start + Duration::from_millis(100)));
        assert!(!bucket.try_take_at(start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(10);
        assert_eq!((0..20).filter(|_| bucket.try_take_at(later)).count(), 5);
    }
}
