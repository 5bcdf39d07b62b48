//! Open-loop pacing for `--rate`: each client sends on a fixed schedule,
//! whether or not its previous request has been answered yet.
//!
//! The schedule is computed, not accumulated: the n-th send is intended at
//! `first + n × period`, so rounding never drifts and a client that fell
//! behind (a slow answer, a late timer) sends its missed requests at once
//! until it has caught up. The bench measures latency from the intended send
//! time, not the actual one, so time spent waiting behind a slow request is
//! counted against the system instead of being left out ("coordinated
//! omission").

use std::time::Duration;

use tokio::time::Instant;

/// The intended send times of one client.
pub struct Pacer {
    first: Instant,
    period_nanoseconds: f64,
    sent: u64,
}

impl Pacer {
    /// A schedule of `rate_per_second` sends per second for client
    /// `client_index` of `clients`, starting at `start`. Clients are spread
    /// over the first period, so that together they send evenly instead of
    /// in bursts of one request per client.
    pub fn new(start: Instant, rate_per_second: f64, client_index: usize, clients: usize) -> Pacer {
        assert!(rate_per_second > 0.0, "a pacer needs a positive rate");
        assert!(client_index < clients, "client {client_index} of {clients}");
        let period_nanoseconds = 1e9 / rate_per_second;
        let offset_nanoseconds = period_nanoseconds * client_index as f64 / clients as f64;
        Pacer {
            first: start + Duration::from_nanos(offset_nanoseconds.round() as u64),
            period_nanoseconds,
            sent: 0,
        }
    }

    /// The intended time of the next send; moves the schedule on by one.
    pub fn next_intended(&mut self) -> Instant {
        let intended = self.first
            + Duration::from_nanos((self.sent as f64 * self.period_nanoseconds).round() as u64);
        self.sent += 1;
        intended
    }

    /// Waits until the next intended send time (not at all when it has
    /// passed) and returns it, or returns `None` at once if that time is not
    /// before `deadline` (the end of `--duration`).
    pub async fn wait(&mut self, deadline: Option<Instant>) -> Option<Instant> {
        let intended = self.next_intended();
        if deadline.is_some_and(|deadline| intended >= deadline) {
            return None;
        }
        if intended > Instant::now() {
            tokio::time::sleep_until(intended).await;
        }
        Some(intended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_evenly_spaced_without_drift() {
        let start = Instant::now();
        // One per 3 ms: a period that is not a whole number of nanoseconds
        // at other rates would drift if it were added up.
        let mut pacer = Pacer::new(start, 1_000.0 / 3.0, 0, 1);
        let intended: Vec<Duration> = (0..4).map(|_| pacer.next_intended() - start).collect();
        assert_eq!(
            intended,
            [0, 3, 6, 9].map(Duration::from_millis),
            "one send every 3 ms"
        );
        let mut pacer = Pacer::new(start, 3.0, 0, 1);
        for _ in 0..3_000 {
            pacer.next_intended();
        }
        let after_a_thousand_seconds = pacer.next_intended() - start;
        assert!(
            after_a_thousand_seconds.abs_diff(Duration::from_secs(1_000))
                < Duration::from_micros(1),
            "{after_a_thousand_seconds:?}"
        );
    }

    #[test]
    fn clients_are_spread_over_one_period() {
        let start = Instant::now();
        // 4 clients at 100/s each: 400/s together, one send every 2.5 ms.
        let mut firsts: Vec<Duration> = (0..4)
            .map(|client_index| Pacer::new(start, 100.0, client_index, 4).next_intended() - start)
            .collect();
        firsts.sort();
        assert_eq!(firsts, [0, 2_500, 5_000, 7_500].map(Duration::from_micros));
    }

    #[tokio::test]
    async fn a_client_that_fell_behind_sends_at_once_with_its_intended_times() {
        // The schedule started a second ago: every send up to now is due,
        // and each reports the time it was meant for, not when it went out.
        let start = Instant::now() - Duration::from_secs(1);
        let mut pacer = Pacer::new(start, 10.0, 0, 1);
        for expected_milliseconds in [0, 100, 200, 300] {
            let intended = tokio::time::timeout(Duration::from_secs(5), pacer.wait(None))
                .await
                .expect("a send that is due does not wait")
                .expect("no deadline");
            assert_eq!(
                intended - start,
                Duration::from_millis(expected_milliseconds)
            );
        }
    }

    #[tokio::test]
    async fn no_send_is_intended_at_or_after_the_deadline() {
        let start = Instant::now() - Duration::from_secs(1);
        let mut pacer = Pacer::new(start, 10.0, 0, 1);
        let deadline = Some(start + Duration::from_millis(250));
        for _ in 0..3 {
            assert!(pacer.wait(deadline).await.is_some());
        }
        assert_eq!(
            pacer.wait(deadline).await,
            None,
            "300 ms is past the deadline"
        );
    }
}
