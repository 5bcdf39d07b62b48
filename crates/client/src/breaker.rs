//! The per-endpoint circuit breaker: closed, open, half-open (Nygard,
//! *Release It!*), as a state machine that takes time as a value.
//!
//! **Closed**: requests flow; `failures_to_open` consecutive failures open it.
//! **Open**: the endpoint is skipped until `open_duration` has passed, so a
//! dead member costs its clients nothing (no connect timeout per request).
//! **Half-open**: one probe at a time may pass; a probe that fails opens the
//! breaker again for twice as long (up to `open_duration_max`), and
//! `successes_to_close` successful probes in a row close it.
//!
//! A "failure" is the endpoint failing (refused connection, broken stream,
//! timeout, "no leader"), not a request the member answered with an error:
//! a member that says "key not found" is healthy.

use std::time::{Duration, Instant};

/// The breaker's thresholds (the named limits live in `ClientConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open a closed breaker.
    pub failures_to_open: u32,
    /// Consecutive successful probes that close a half-open breaker.
    pub successes_to_close: u32,
    /// How long the breaker stays open the first time.
    pub open_duration: Duration,
    /// The longest it stays open after repeated failed probes.
    pub open_duration_max: Duration,
}

/// Where the breaker is, for diagnostics and status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests are refused until the instant given.
    Open,
    /// Single probes are let through.
    HalfOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
        /// How long it was opened for, doubled on the next failed probe.
        duration: Duration,
    },
    HalfOpen {
        /// No probe is let through before this instant: one probe is in
        /// flight (or was lost) until then.
        next_probe_at: Instant,
        consecutive_successes: u32,
        /// The open duration to use if a probe fails.
        duration: Duration,
    },
}

/// One endpoint's circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    state: State,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> CircuitBreaker {
        CircuitBreaker {
            settings,
            state: State::Closed {
                consecutive_failures: 0,
            },
        }
    }

    /// The state at `now` (an open breaker whose time is up reads half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until, .. } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request would be let through at `now`, without taking the
    /// probe slot (for choosing among endpoints).
    pub fn would_allow(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until, .. } => now >= until,
            State::HalfOpen { next_probe_at, .. } => now >= next_probe_at,
        }
    }

    /// Asks to send one request at `now`. In half-open, the request becomes
    /// the probe and no other passes until it reports, or until
    /// `open_duration` has passed (a probe whose outcome was never reported,
    /// say because its caller gave up, must not close the endpoint forever).
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until, duration } => {
                if now < until {
                    return false;
                }
                self.state = State::HalfOpen {
                    next_probe_at: now + self.settings.open_duration,
                    consecutive_successes: 0,
                    duration,
                };
                true
            }
            State::HalfOpen {
                next_probe_at,
                consecutive_successes,
                duration,
            } => {
                if now < next_probe_at {
                    return false;
                }
                self.state = State::HalfOpen {
                    next_probe_at: now + self.settings.open_duration,
                    consecutive_successes,
                    duration,
                };
                true
            }
        }
    }

    /// The endpoint answered (whatever the answer).
    pub fn record_success(&mut self, now: Instant) {
        match self.state {
            State::Closed { .. } => {
                self.state = State::Closed {
                    consecutive_failures: 0,
                }
            }
            // A late answer from before the breaker opened changes nothing:
            // the breaker waits for its own probe.
            State::Open { .. } => {}
            State::HalfOpen {
                consecutive_successes,
                duration,
                ..
            } => {
                let consecutive_successes = consecutive_successes + 1;
                self.state = if consecutive_successes >= self.settings.successes_to_close {
                    State::Closed {
                        consecutive_failures: 0,
                    }
                } else {
                    // The probe came back: the next one may go at once.
                    State::HalfOpen {
                        next_probe_at: now,
                        consecutive_successes,
                        duration,
                    }
                };
            }
        }
    }

    /// The endpoint failed (refused, broke, timed out, had no leader).
    pub fn record_failure(&mut self, now: Instant) {
        match self.state {
            State::Closed {
                consecutive_failures,
            } => {
                let consecutive_failures = consecutive_failures + 1;
                self.state = if consecutive_failures >= self.settings.failures_to_open {
                    State::Open {
                        until: now + self.settings.open_duration,
                        duration: self.settings.open_duration,
                    }
                } else {
                    State::Closed {
                        consecutive_failures,
                    }
                };
            }
            State::Open { .. } => {}
            State::HalfOpen { duration, .. } => {
                let duration = duration
                    .saturating_mul(2)
                    .min(self.settings.open_duration_max);
                self.state = State::Open {
                    until: now + duration,
                    duration,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: BreakerSettings = BreakerSettings {
        failures_to_open: 3,
        successes_to_close: 2,
        open_duration: Duration::from_secs(1),
        open_duration_max: Duration::from_secs(4),
    };

    fn at(start: Instant, milliseconds: u64) -> Instant {
        start + Duration::from_millis(milliseconds)
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(SETTINGS);
        breaker.record_failure(start);
        breaker.record_failure(start);
        breaker.record_success(start);
        breaker.record_failure(start);
        breaker.record_failure(start);
        assert_eq!(breaker.state(start), BreakerState::Closed);
        assert!(breaker.try_acquire(start));
        breaker.record_failure(start);
        assert_eq!(breaker.state(start), BreakerState::Open);
        assert!(!breaker.would_allow(at(start, 999)));
        assert!(!breaker.try_acquire(at(start, 999)));
    }

    #[test]
    fn half_open_lets_one_probe_through_and_closes_after_enough_successes() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(SETTINGS);
        for _ in 0..3 {
            breaker.record_failure(start);
        }
        let probe_time = at(start, 1_000);
        assert_eq!(breaker.state(probe_time), BreakerState::HalfOpen);
        assert!(breaker.try_acquire(probe_time));
        // While the probe is out, nobody else passes.
        assert!(!breaker.try_acquire(at(start, 1_010)));
        breaker.record_success(at(start, 1_020));
        // One success of the two needed: the next probe may go at once.
        assert!(breaker.try_acquire(at(start, 1_020)));
        assert_eq!(breaker.state(at(start, 1_020)), BreakerState::HalfOpen);
        breaker.record_success(at(start, 1_030));
        assert_eq!(breaker.state(at(start, 1_030)), BreakerState::Closed);
        assert!(breaker.try_acquire(at(start, 1_030)));
        assert!(breaker.try_acquire(at(start, 1_030)));
    }

    #[test]
    fn a_failed_probe_reopens_for_twice_as_long_up_to_the_maximum() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(SETTINGS);
        for _ in 0..3 {
            breaker.record_failure(start);
        }
        let mut now = at(start, 1_000);
        let mut open_for = Vec::new();
        for _ in 0..4 {
            assert!(breaker.try_acquire(now));
            breaker.record_failure(now);
            // Find when it lets a probe through again, in 10 ms steps.
            let opened_at = now;
            while !breaker.would_allow(now) {
                now += Duration::from_millis(10);
            }
            open_for.push((now - opened_at).as_millis());
        }
        assert_eq!(open_for, [2_000, 4_000, 4_000, 4_000]);
    }

    #[test]
    fn a_lost_probe_does_not_keep_the_endpoint_closed_forever() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(SETTINGS);
        for _ in 0..3 {
            breaker.record_failure(start);
        }
        assert!(breaker.try_acquire(at(start, 1_000)));
        // The probe's caller gave up and never reported.
        assert!(!breaker.try_acquire(at(start, 1_500)));
        assert!(breaker.try_acquire(at(start, 2_000)));
    }

    #[test]
    fn late_answers_while_open_change_nothing() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(SETTINGS);
        for _ in 0..3 {
            breaker.record_failure(start);
        }
        breaker.record_success(at(start, 10));
        breaker.record_failure(at(start, 20));
        assert_eq!(breaker.state(at(start, 500)), BreakerState::Open);
        assert_eq!(breaker.state(at(start, 1_000)), BreakerState::HalfOpen);
    }
}
