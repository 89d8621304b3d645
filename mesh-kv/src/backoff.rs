//! The one backoff of the mesh: exponential with full jitter.

use std::time::Duration;

/// A uniformly random delay in `[0, min(cap, base * 2^attempt)]`, `unit` being the random draw
/// in `[0, 1]` (a parameter, so that the bound is testable).
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    exp.min(cap).mul_f64(unit.clamp(0.0, 1.0))
}

/// Exponential backoff with full jitter, reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `base` up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next wait: random in `[0, min(cap, base * 2^n)]` for the n-th failure in a row.
    pub fn next_delay(&mut self) -> Duration {
        let d = backoff_delay(self.attempt, self.base, self.cap, rand::random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Failures in a row so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first attempt after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let b = Duration::from_millis(100);
        let cap = Duration::from_secs(10);
        assert_eq!(backoff_delay(0, b, cap, 1.0), b);
        assert_eq!(backoff_delay(3, b, cap, 1.0), Duration::from_millis(800));
        assert_eq!(backoff_delay(30, b, cap, 1.0), cap);
        assert_eq!(backoff_delay(5, b, cap, 0.0), Duration::ZERO);
        assert_eq!(backoff_delay(3, b, cap, 0.5), Duration::from_millis(400));
    }

    #[test]
    fn the_struct_grows_then_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
