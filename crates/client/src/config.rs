//! The client's settings: every limit, timeout and threshold has a name here
//! and a default that suits a client on the same network as the members.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::breaker::BreakerSettings;
use crate::budget::RetryBudgetSettings;
use crate::error::ClientError;

/// How many endpoints a client may be given: one channel and one breaker each.
/// A cluster has 3, 5 or 7 members; 32 leaves room for learners and proxies.
pub const ENDPOINTS_MAX: usize = 32;

/// etcd's default `--max-request-bytes` (1.5 MiB): a bigger request is refused
/// by the client before it is sent, with an error naming the size.
pub const REQUEST_BYTES_MAX: usize = 1_572_864;

/// The largest response the client decodes (a big range, a watch response of
/// one large revision): 64 MiB, well past anything a member sends for keel's
/// own tools but bounded.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The client's configuration. `ClientConfig::default()` is right for most
/// uses; change single fields with struct update syntax.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Most endpoints accepted by [`crate::Client::connect`].
    pub endpoints_max: usize,
    /// Bytes of one encoded request; larger ones fail with
    /// [`ClientError::RequestTooLarge`] before anything is sent.
    pub request_bytes_max: usize,
    /// Bytes of one decoded response message.
    pub response_bytes_max: usize,
    /// How long establishing a TCP connection to one endpoint may take.
    pub connect_timeout: Duration,
    /// The deadline of a whole request, retries and backoff included.
    pub request_timeout: Duration,
    /// The deadline of one attempt at one endpoint. A linearizable read or a
    /// write waits for a quorum, so this must cover an election.
    pub attempt_timeout: Duration,
    /// Most attempts per request, the first included.
    pub retry_attempts_max: u32,
    /// Ceiling of the first retry's backoff delay (full jitter draws below it).
    pub backoff_initial: Duration,
    /// Largest backoff ceiling.
    pub backoff_max: Duration,
    /// Retry budget: tokens each first attempt deposits (fraction of requests
    /// that may be retried in a sustained outage).
    pub retry_budget_ratio: f64,
    /// Retry budget: tokens added per second regardless of traffic.
    pub retry_budget_reserve_per_second: f64,
    /// Retry budget: most tokens held (the largest burst of retries).
    pub retry_budget_tokens_max: f64,
    /// Circuit breaker: consecutive endpoint failures that open it.
    pub breaker_failures_to_open: u32,
    /// Circuit breaker: consecutive successful probes that close it.
    pub breaker_successes_to_close: u32,
    /// Circuit breaker: how long it first stays open.
    pub breaker_open_duration: Duration,
    /// Circuit breaker: the longest it stays open after failed probes.
    pub breaker_open_duration_max: Duration,
    /// How long to wait for each member's Status when looking for the leader.
    pub leader_discovery_timeout: Duration,
    /// The least time between two leader discoveries, so that a burst of
    /// failed writes asks each member once, not once per write.
    pub leader_discovery_interval_min: Duration,
    /// HTTP/2 keep-alive ping interval on every connection: how a watch or a
    /// keep-alive stream learns that a silent member is gone.
    pub keep_alive_ping_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is dropped.
    pub keep_alive_ping_timeout: Duration,
    /// Watch responses buffered between the background task and the consumer;
    /// when full, the task stops reading and the member's stream backs up.
    pub watch_queue_max: usize,
    /// The shortest interval between two lease keep-alives (a 1 s TTL would
    /// otherwise send one every 333 ms).
    pub lease_keep_alive_interval_min: Duration,
    /// Seed of the jitter's random number generator; `None` seeds from the
    /// operating system. Tests set it to replay a schedule.
    pub random_seed: Option<u64>,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            endpoints_max: ENDPOINTS_MAX,
            request_bytes_max: REQUEST_BYTES_MAX,
            response_bytes_max: RESPONSE_BYTES_MAX,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(5),
            retry_attempts_max: 8,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            retry_budget_ratio: 0.2,
            retry_budget_reserve_per_second: 5.0,
            retry_budget_tokens_max: 20.0,
            breaker_failures_to_open: 3,
            breaker_successes_to_close: 1,
            breaker_open_duration: Duration::from_secs(1),
            breaker_open_duration_max: Duration::from_secs(8),
            leader_discovery_timeout: Duration::from_secs(1),
            leader_discovery_interval_min: Duration::from_millis(200),
            keep_alive_ping_interval: Duration::from_secs(5),
            keep_alive_ping_timeout: Duration::from_secs(5),
            watch_queue_max: 256,
            lease_keep_alive_interval_min: Duration::from_millis(300),
            random_seed: None,
        }
    }
}

impl ClientConfig {
    /// Refuses settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), ClientError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(ClientError::InvalidConfig {
                field,
                reason: reason.to_string(),
            })
        };
        if self.endpoints_max == 0 {
            return invalid("endpoints_max", "must be at least 1");
        }
        if self.request_bytes_max == 0 || self.response_bytes_max == 0 {
            return invalid("request_bytes_max", "byte limits must be positive");
        }
        if self.request_timeout.is_zero() || self.attempt_timeout.is_zero() {
            return invalid("request_timeout", "timeouts must be positive");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be positive");
        }
        if self.retry_attempts_max == 0 {
            return invalid(
                "retry_attempts_max",
                "must be at least 1 (the first attempt)",
            );
        }
        if self.backoff_initial > self.backoff_max {
            return invalid("backoff_initial", "must not exceed backoff_max");
        }
        let budget = [
            self.retry_budget_ratio,
            self.retry_budget_reserve_per_second,
            self.retry_budget_tokens_max,
        ];
        if budget
            .iter()
            .any(|value| !value.is_finite() || *value < 0.0)
        {
            return invalid(
                "retry_budget_ratio",
                "budget values must be finite and not negative",
            );
        }
        if self.breaker_failures_to_open == 0 || self.breaker_successes_to_close == 0 {
            return invalid(
                "breaker_failures_to_open",
                "breaker thresholds must be at least 1",
            );
        }
        if self.breaker_open_duration.is_zero()
            || self.breaker_open_duration > self.breaker_open_duration_max
        {
            return invalid(
                "breaker_open_duration",
                "must be positive and not exceed breaker_open_duration_max",
            );
        }
        if self.watch_queue_max == 0 {
            return invalid("watch_queue_max", "must be at least 1");
        }
        Ok(())
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.backoff_initial,
            max: self.backoff_max,
        }
    }

    pub(crate) fn breaker_settings(&self) -> BreakerSettings {
        BreakerSettings {
            failures_to_open: self.breaker_failures_to_open,
            successes_to_close: self.breaker_successes_to_close,
            open_duration: self.breaker_open_duration,
            open_duration_max: self.breaker_open_duration_max,
        }
    }

    pub(crate) fn retry_budget_settings(&self) -> RetryBudgetSettings {
        RetryBudgetSettings {
            ratio: self.retry_budget_ratio,
            reserve_per_second: self.retry_budget_reserve_per_second,
            tokens_max: self.retry_budget_tokens_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid() {
        ClientConfig::default().validate().expect("valid");
    }

    #[test]
    fn a_bad_setting_is_named() {
        let config = ClientConfig {
            retry_attempts_max: 0,
            ..ClientConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("retry_attempts_max"), "{error}");
        let config = ClientConfig {
            backoff_initial: Duration::from_secs(10),
            ..ClientConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backoff_initial"));
    }
}
