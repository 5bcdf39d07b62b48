//! What a run records while it goes ([`Recorder`], shared by every task) and
//! what it reports at the end ([`Report`]: the JSON object of `-o json`,
//! whose field names are stable, and the table printed otherwise).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use super::histogram::Histogram;
use super::{Plan, Workload};

/// Distinct kinds of error kept apart; more are counted together as one
/// "other" kind, so a server that puts ids in its messages cannot grow the
/// tally without bound.
const ERROR_KINDS_MAX: usize = 32;
/// Characters of an error message kept, for the same reason.
const ERROR_MESSAGE_CHARACTERS_MAX: usize = 200;

/// One failed request, as it is grouped in the report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OperationError {
    /// The request that failed: "put", "range", "txn", "grant", "keep-alive", "watch".
    pub request: &'static str,
    /// The gRPC status code's name, e.g. "Unavailable" ("DeadlineExceeded"
    /// also when the bench itself gave up after --request-timeout).
    pub code: String,
    /// The status message.
    pub message: String,
}

impl OperationError {
    /// An error with its message cut to [`ERROR_MESSAGE_CHARACTERS_MAX`].
    pub fn new(request: &'static str, code: &str, message: &str) -> OperationError {
        OperationError {
            request,
            code: code.to_string(),
            message: message.chars().take(ERROR_MESSAGE_CHARACTERS_MAX).collect(),
        }
    }

    /// The error a gRPC status stands for.
    pub fn status(request: &'static str, status: &tonic::Status) -> OperationError {
        OperationError::new(request, &format!("{:?}", status.code()), status.message())
    }
}

/// Counts of errors by kind, bounded by [`ERROR_KINDS_MAX`].
#[derive(Default)]
struct ErrorTally {
    counts: BTreeMap<OperationError, u64>,
    /// Errors of kinds beyond the first [`ERROR_KINDS_MAX`].
    other: u64,
}

/// Everything the tasks of one run record; shared by all of them.
#[derive(Default)]
pub struct Recorder {
    /// Latency of each operation answered without error.
    pub operation_latency: Histogram,
    /// Latency of each keep-alive round trip (lease).
    pub keep_alive_latency: Histogram,
    /// Latency of each delivered event (watch).
    pub event_latency: Histogram,
    /// Operations finished, with or without error (read by the progress line).
    pub completed: Arc<AtomicU64>,
    /// Transactions whose compare failed (txn).
    pub conflicts: AtomicU64,
    /// Events received by all watchers together (watch).
    pub events_delivered: AtomicU64,
    /// Notified whenever `events_delivered` grew, for the wait after the last put.
    pub events_delivered_changed: Notify,
    errors: Mutex<ErrorTally>,
}

impl Recorder {
    /// Counts one failed request.
    pub fn record_error(&self, error: OperationError) {
        let mut tally = self
            .errors
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = tally.counts.get_mut(&error) {
            *count += 1;
        } else if tally.counts.len() < ERROR_KINDS_MAX {
            tally.counts.insert(error, 1);
        } else {
            tally.other += 1;
        }
    }

    /// Errors by kind, most frequent first.
    fn errors_by_kind(&self) -> Vec<ErrorCount> {
        let tally = self
            .errors
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut errors: Vec<ErrorCount> = tally
            .counts
            .iter()
            .map(|(error, &count)| ErrorCount {
                request: error.request.to_string(),
                code: error.code.clone(),
                message: error.message.clone(),
                count,
            })
            .collect();
        if tally.other > 0 {
            errors.push(ErrorCount {
                request: "*".to_string(),
                code: "Other".to_string(),
                message: format!("errors of more than {ERROR_KINDS_MAX} kinds"),
                count: tally.other,
            });
        }
        // Stable order: by count, then by kind.
        errors.sort_by_key(|error| std::cmp::Reverse(error.count));
        errors
    }
}

/// How long the parts of a run took.
pub struct Timings {
    /// From the first operation sent to the last one answered.
    pub operations: Duration,
    /// Watch: from the first put sent to the last event received (or to
    /// giving up on the missing ones).
    pub events: Option<Duration>,
}

/// One kind of error and how often it happened.
#[derive(Debug, Serialize)]
pub struct ErrorCount {
    request: String,
    code: String,
    message: String,
    count: u64,
}

/// Latency figures of one histogram, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    latency_milliseconds_mean: f64,
    latency_milliseconds_p50: f64,
    latency_milliseconds_p90: f64,
    latency_milliseconds_p99: f64,
    latency_milliseconds_p999: f64,
    latency_milliseconds_max: f64,
}

impl Latency {
    fn of(histogram: &Histogram) -> Latency {
        let milliseconds = |duration: Duration| duration.as_secs_f64() * 1_000.0;
        Latency {
            latency_milliseconds_mean: milliseconds(histogram.mean()),
            latency_milliseconds_p50: milliseconds(histogram.value_at_quantile(0.50)),
            latency_milliseconds_p90: milliseconds(histogram.value_at_quantile(0.90)),
            latency_milliseconds_p99: milliseconds(histogram.value_at_quantile(0.99)),
            latency_milliseconds_p999: milliseconds(histogram.value_at_quantile(0.999)),
            latency_milliseconds_max: milliseconds(histogram.max()),
        }
    }

    /// The figures as table cells, mean first.
    fn cells(&self) -> [f64; 6] {
        [
            self.latency_milliseconds_mean,
            self.latency_milliseconds_p50,
            self.latency_milliseconds_p90,
            self.latency_milliseconds_p99,
            self.latency_milliseconds_p999,
            self.latency_milliseconds_max,
        ]
    }
}

/// The txn workload's outcome.
#[derive(Debug, Serialize)]
pub struct TxnReport {
    successes: u64,
    conflicts: u64,
}

/// The watch workload's outcome.
#[derive(Debug, Serialize)]
pub struct WatchReport {
    watchers: usize,
    streams: usize,
    prefix: bool,
    events_expected: u64,
    events_delivered: u64,
    events_per_second: f64,
    #[serde(flatten)]
    latency: Latency,
}

/// The lease workload's keep-alives.
#[derive(Debug, Serialize)]
pub struct LeaseReport {
    ttl_seconds: u64,
    keep_alives_per_operation: u32,
    keep_alives: u64,
    keep_alives_per_second: f64,
    #[serde(flatten)]
    latency: Latency,
}

/// The report of one run; see `JSON_FIELDS_HELP` for the fields.
#[derive(Debug, Serialize)]
pub struct Report {
    workload: &'static str,
    endpoints: Vec<String>,
    connections: usize,
    clients: usize,
    key_space_size: u64,
    key_size_bytes: usize,
    value_size_bytes: usize,
    rate_target_per_second: Option<u64>,
    operations: u64,
    errors: u64,
    errors_by_kind: Vec<ErrorCount>,
    seconds: f64,
    operations_per_second: f64,
    #[serde(flatten)]
    latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    txn: Option<TxnReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    watch: Option<WatchReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseReport>,
}

/// "1 client", "2 clients".
fn counted(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// `count` per second of `duration`, or zero for an instant run.
fn per_second(count: u64, duration: Duration) -> f64 {
    let seconds = duration.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

impl Report {
    /// The report of a finished run.
    pub(super) fn new(plan: &Plan, recorder: &Recorder, timings: Timings) -> Report {
        let operations = recorder.operation_latency.count();
        let errors_by_kind = recorder.errors_by_kind();
        let txn = matches!(plan.workload, Workload::Txn).then(|| {
            let conflicts = recorder.conflicts.load(Ordering::Relaxed);
            TxnReport {
                successes: operations - conflicts,
                conflicts,
            }
        });
        let watch = match plan.workload {
            Workload::Watch {
                watchers,
                streams,
                prefix,
            } => {
                let events_delivered = recorder.events_delivered.load(Ordering::Relaxed);
                Some(WatchReport {
                    watchers,
                    streams,
                    prefix,
                    events_expected: operations * watchers as u64,
                    events_delivered,
                    events_per_second: per_second(
                        events_delivered,
                        timings.events.unwrap_or(timings.operations),
                    ),
                    latency: Latency::of(&recorder.event_latency),
                })
            }
            _ => None,
        };
        let lease = match plan.workload {
            Workload::Lease { ttl, keep_alives } => {
                let count = recorder.keep_alive_latency.count();
                Some(LeaseReport {
                    ttl_seconds: ttl.as_secs(),
                    keep_alives_per_operation: keep_alives,
                    keep_alives: count,
                    keep_alives_per_second: per_second(count, timings.operations),
                    latency: Latency::of(&recorder.keep_alive_latency),
                })
            }
            _ => None,
        };
        Report {
            workload: plan.workload.name(),
            endpoints: plan.endpoints.clone(),
            connections: plan.connections,
            clients: plan.clients,
            key_space_size: plan.key_space_size,
            key_size_bytes: plan.key_size,
            value_size_bytes: plan.value_size,
            rate_target_per_second: plan.rate_per_second,
            operations,
            errors: errors_by_kind.iter().map(|error| error.count).sum(),
            errors_by_kind,
            seconds: timings.operations.as_secs_f64(),
            operations_per_second: per_second(operations, timings.operations),
            latency: Latency::of(&recorder.operation_latency),
            txn,
            watch,
            lease,
        }
    }

    /// The report as a human-readable table.
    pub fn table(&self) -> String {
        let mut text = String::new();
        let load = match self.rate_target_per_second {
            Some(rate) => format!("open loop at {rate} operations/s"),
            None => "closed loop".to_string(),
        };
        let _ = writeln!(
            text,
            "{}: {} operations in {:.3} s = {:.0} operations/s, {} errors \
             ({} on {}, {load})",
            self.workload,
            self.operations,
            self.seconds,
            self.operations_per_second,
            self.errors,
            counted(self.clients, "client"),
            counted(self.connections, "connection"),
        );
        if let Some(txn) = &self.txn {
            let _ = writeln!(
                text,
                "txn: {} swaps succeeded, {} conflicts (the key changed between read and txn)",
                txn.successes, txn.conflicts
            );
        }
        if let Some(watch) = &self.watch {
            let _ = writeln!(
                text,
                "watch: {} of {} events delivered to {} watchers on {} streams{} = {:.0} events/s",
                watch.events_delivered,
                watch.events_expected,
                watch.watchers,
                watch.streams,
                if watch.prefix { " (prefix)" } else { "" },
                watch.events_per_second
            );
        }
        if let Some(lease) = &self.lease {
            let _ = writeln!(
                text,
                "lease: {} keep-alives ({} per grant of a {} s TTL) = {:.0} keep-alives/s",
                lease.keep_alives,
                lease.keep_alives_per_operation,
                lease.ttl_seconds,
                lease.keep_alives_per_second
            );
        }
        let _ = writeln!(text);
        let _ = writeln!(
            text,
            "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "LATENCY (ms)", "COUNT", "MEAN", "P50", "P90", "P99", "P99.9", "MAX"
        );
        let operation_name = match self.workload {
            "range-linearizable" | "range-serializable" => "range",
            "txn" => "read + txn",
            "watch" => "put",
            "lease" => "grant",
            other => other,
        };
        let mut rows = vec![(operation_name, self.operations, &self.latency)];
        if let Some(watch) = &self.watch {
            rows.push(("event delivery", watch.events_delivered, &watch.latency));
        }
        if let Some(lease) = &self.lease {
            rows.push(("keep-alive", lease.keep_alives, &lease.latency));
        }
        for (name, count, latency) in rows {
            let _ = write!(text, "{name:<16} {count:>9}");
            for cell in latency.cells() {
                let _ = write!(text, " {cell:>9.3}");
            }
            let _ = writeln!(text);
        }
        if !self.errors_by_kind.is_empty() {
            let _ = writeln!(text);
            let _ = writeln!(
                text,
                "{:>9}  {:<12} {:<18} MESSAGE",
                "ERRORS", "REQUEST", "CODE"
            );
            for error in &self.errors_by_kind {
                let _ = writeln!(
                    text,
                    "{:>9}  {:<12} {:<18} {}",
                    error.count, error.request, error.code, error.message
                );
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_grouped_and_bounded() {
        let recorder = Recorder::default();
        for _ in 0..3 {
            recorder.record_error(OperationError::new("put", "Unavailable", "no leader"));
        }
        recorder.record_error(OperationError::new("put", "DeadlineExceeded", "slow"));
        for index in 0..ERROR_KINDS_MAX + 5 {
            recorder.record_error(OperationError::new(
                "range",
                "Internal",
                &format!("{index}"),
            ));
        }
        let errors = recorder.errors_by_kind();
        assert_eq!(errors.len(), ERROR_KINDS_MAX + 1);
        // Two kinds came first; the 32 kept leave room for 30 of the 37
        // range kinds, and the other 7 errors are counted together.
        assert_eq!(errors[0].code, "Other");
        assert_eq!(errors[0].count, 7);
        assert_eq!(errors[1].message, "no leader");
        assert_eq!(errors[1].count, 3);
        assert!(errors.windows(2).all(|pair| pair[0].count >= pair[1].count));
        assert_eq!(
            errors.iter().map(|error| error.count).sum::<u64>(),
            3 + 1 + 37
        );
    }

    #[test]
    fn long_messages_are_cut() {
        let error = OperationError::new("put", "Internal", &"x".repeat(1_000));
        assert_eq!(error.message.len(), ERROR_MESSAGE_CHARACTERS_MAX);
    }
}
