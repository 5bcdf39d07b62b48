//! Exponential backoff with full jitter, as a pure function of the attempt
//! number and a random number generator.
//!
//! "Full jitter" (Marc Brooker, *Exponential Backoff And Jitter*, AWS
//! Architecture Blog, 2015) draws each delay uniformly from zero to the
//! exponential ceiling. Clients that failed together then retry spread over
//! the whole window instead of in synchronised waves, which is what keeps a
//! recovering member from being hit by every client at once.

use std::time::Duration;

use rand::Rng;

/// The backoff schedule: the ceiling doubles from `initial` with each retry,
/// up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry's delay.
    pub initial: Duration,
    /// The largest ceiling, whatever the attempt.
    pub max: Duration,
}

impl Backoff {
    /// The ceiling for retry number `retry` (1 for the first retry):
    /// `min(max, initial × 2^(retry − 1))`. Retry 0 (the first attempt) waits nothing.
    pub fn ceiling(&self, retry: u32) -> Duration {
        if retry == 0 {
            return Duration::ZERO;
        }
        // 2^31 × any useful initial delay is already far past any useful max:
        // clamping the exponent keeps the multiplication from overflowing.
        let factor = 1u32 << (retry - 1).min(31);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `retry`: uniform in `[0, ceiling(retry)]`.
    pub fn delay(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        let nanoseconds = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=nanoseconds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const SCHEDULE: Backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(2),
    };

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        let ceilings: Vec<u128> = (0..9)
            .map(|retry| SCHEDULE.ceiling(retry).as_millis())
            .collect();
        assert_eq!(ceilings, [0, 50, 100, 200, 400, 800, 1600, 2000, 2000]);
        // Far past the point where 2^retry overflows, the ceiling stays at max.
        assert_eq!(SCHEDULE.ceiling(40), Duration::from_secs(2));
        assert_eq!(SCHEDULE.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn delays_stay_within_the_ceiling_and_use_the_whole_window() {
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 1..12 {
            let ceiling = SCHEDULE.ceiling(retry);
            let delays: Vec<Duration> = (0..2_000)
                .map(|_| SCHEDULE.delay(retry, &mut rng))
                .collect();
            assert!(delays.iter().all(|delay| *delay <= ceiling));
            // Full jitter: both the bottom and the top tenth of the window occur.
            assert!(delays.iter().any(|delay| *delay < ceiling / 10));
            assert!(delays.iter().any(|delay| *delay > ceiling * 9 / 10));
        }
        assert_eq!(SCHEDULE.delay(0, &mut rng), Duration::ZERO);
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..8)
                .map(|retry| SCHEDULE.delay(retry, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }
}
