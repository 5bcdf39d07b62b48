//! The retry budget: a token bucket that bounds retries to a fraction of the
//! requests made plus a small reserve per second, so that retries cannot
//! multiply the load on a cluster that is already failing.
//!
//! The design is Finagle's `RetryBudget` (a deposit per request, a withdrawal
//! per retry, a minimum number of retries per second so a client making few
//! requests can still retry) in the bookkeeping style of gRPC's retry
//! throttling (a token count with a ceiling). Without a budget every failed
//! request becomes `retry_attempts_max` requests during an outage; with it, a
//! client sends at most `(1 + ratio) × requests + reserve × seconds`.
//!
//! Time is a value passed in, so the bucket is tested without sleeping.

use std::time::{Duration, Instant};

/// The budget's settings (the named limits live in `ClientConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetSettings {
    /// Tokens deposited by each first attempt: the fraction of requests that
    /// may be retried once the reserve is spent.
    pub ratio: f64,
    /// Tokens added per second regardless of traffic, so that a client making
    /// few requests can still retry a few.
    pub reserve_per_second: f64,
    /// The most tokens the bucket holds: the largest burst of retries after a
    /// quiet period.
    pub tokens_max: f64,
}

/// A token bucket of retries. Each retry costs one token.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    settings: RetryBudgetSettings,
    tokens: f64,
    refilled_at: Instant,
}

impl RetryBudget {
    /// A full budget at `now`: a fresh client may retry its first failures.
    pub fn new(settings: RetryBudgetSettings, now: Instant) -> RetryBudget {
        RetryBudget {
            settings,
            tokens: settings.tokens_max,
            refilled_at: now,
        }
    }

    /// Records a first attempt (not a retry): deposits `ratio` tokens.
    pub fn record_request(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + self.settings.ratio).min(self.settings.tokens_max);
    }

    /// Takes one token for a retry if there is one; `false` means the retry
    /// must not be made.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The tokens available now (for tests and diagnostics).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    fn refill(&mut self, now: Instant) {
        // A caller's `now` may be slightly older than the last one seen (two
        // tasks read the clock, then take the lock in the other order): no
        // time passed, then.
        let elapsed = now.saturating_duration_since(self.refilled_at);
        if elapsed > Duration::ZERO {
            self.tokens = (self.tokens + elapsed.as_secs_f64() * self.settings.reserve_per_second)
                .min(self.settings.tokens_max);
            self.refilled_at = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: RetryBudgetSettings = RetryBudgetSettings {
        ratio: 0.2,
        reserve_per_second: 5.0,
        tokens_max: 10.0,
    };

    #[test]
    fn a_fresh_budget_allows_a_burst_then_refuses() {
        let start = Instant::now();
        let mut budget = RetryBudget::new(SETTINGS, start);
        let allowed = (0..100).filter(|_| budget.try_withdraw(start)).count();
        assert_eq!(allowed, 10);
        assert!(!budget.try_withdraw(start));
    }

    #[test]
    fn the_reserve_refills_with_time_up_to_the_ceiling() {
        let start = Instant::now();
        let mut budget = RetryBudget::new(SETTINGS, start);
        while budget.try_withdraw(start) {}
        // 5 tokens a second: after 400 ms, two retries.
        let later = start + Duration::from_millis(400);
        assert!(budget.try_withdraw(later));
        assert!(budget.try_withdraw(later));
        assert!(!budget.try_withdraw(later));
        // A long quiet period refills no more than the ceiling.
        let much_later = later + Duration::from_secs(3_600);
        assert_eq!(budget.tokens(much_later), 10.0);
    }

    #[test]
    fn retries_are_bounded_by_the_ratio_of_requests_during_an_outage() {
        // Every request fails and wants retry_attempts_max = 10 retries, for
        // ten seconds at 100 requests per second.
        let start = Instant::now();
        let mut budget = RetryBudget::new(SETTINGS, start);
        let mut requests = 0u32;
        let mut retries = 0u32;
        for millisecond in 0..10_000u64 {
            let now = start + Duration::from_millis(millisecond);
            if millisecond % 10 == 0 {
                budget.record_request(now);
                requests += 1;
                for _ in 0..10 {
                    if budget.try_withdraw(now) {
                        retries += 1;
                    }
                }
            }
        }
        // At most ratio × requests + reserve × seconds + the initial burst.
        let bound = 0.2 * f64::from(requests) + 5.0 * 10.0 + 10.0;
        assert!(
            f64::from(retries) <= bound,
            "{retries} retries for {requests} requests (bound {bound})"
        );
        assert!(f64::from(retries) >= bound - 2.0, "{retries} retries");
    }

    #[test]
    fn a_clock_read_out_of_order_adds_nothing() {
        let start = Instant::now();
        let later = start + Duration::from_secs(1);
        let mut budget = RetryBudget::new(SETTINGS, later);
        while budget.try_withdraw(later) {}
        assert!(!budget.try_withdraw(start));
        assert_eq!(budget.tokens(start), 0.0);
    }
}
