//! The per-allocation policies as pure functions: what the supervisor does
//! when a task ends (`restart`), when a failed allocation may move and after
//! how long (`reschedule`), when an agent cut off from the store stops its
//! allocations (`disconnect.stop_on_client_after`), and whether an allocation
//! turned healthy in time (`update`, `migrate`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::{Allocation, ClientStatus, RescheduleEvent};
use crate::spec::{
    DelayFunction, Disconnect, JobType, ReschedulePolicy, RestartMode, RestartPolicy,
};
use crate::time::Time;

/// How a task ended, as the supervisor saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskEnd {
    /// The process exited with this code.
    Exited {
        /// The exit code.
        exit_code: i32,
    },
    /// The process was killed by a signal it did not ask for.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// Its liveness check turned critical and the supervisor killed it.
    LivenessCritical,
    /// It could not be started (no such command, permission denied…).
    StartFailed,
}

/// The supervisor's next step for a task that ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RestartDecision {
    /// Start it again after `delay`.
    Restart {
        /// The wait before starting.
        #[serde(with = "crate::time::duration_text")]
        delay: Duration,
    },
    /// Give up: the allocation is failed (the controller may reschedule it).
    Fail,
    /// A batch task finished successfully: the allocation is complete.
    Complete,
}

/// What the supervisor remembers of one task's restarts: Nomad's restart
/// tracker, as a value. Persist it with the allocation's status so that an
/// agent restart does not grant fresh attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartTracker {
    /// When the current interval began (at its first counted failure).
    pub interval_started_at: Option<Time>,
    /// Failures counted in the current interval.
    pub failures_in_interval: u32,
}

impl RestartTracker {
    /// Decides what to do about a task that ended at `now`, and returns the
    /// tracker to keep. A service task is restarted after any end (exit 0
    /// included: a service is not supposed to end); a batch task that exits 0
    /// completes. Failures are counted per `interval`, which starts at the
    /// first failure after the previous interval ended; within it, up to
    /// `attempts` restarts wait `delay`. Past that, mode `fail` fails the
    /// allocation and mode `delay` waits for the interval to end (at least
    /// `delay`) and starts afresh.
    pub fn on_task_end(
        self,
        policy: &RestartPolicy,
        job_type: JobType,
        end: TaskEnd,
        now: Time,
    ) -> (RestartTracker, RestartDecision) {
        if job_type == JobType::Batch && end == (TaskEnd::Exited { exit_code: 0 }) {
            return (self, RestartDecision::Complete);
        }
        if policy.attempts == 0 {
            return (self, RestartDecision::Fail);
        }
        let mut tracker = self;
        let interval_over = match tracker.interval_started_at {
            Some(start) => now >= start.after(policy.interval),
            None => true,
        };
        if interval_over {
            tracker = RestartTracker {
                interval_started_at: Some(now),
                failures_in_interval: 0,
            };
        }
        tracker.failures_in_interval += 1;
        if tracker.failures_in_interval <= policy.attempts {
            return (
                tracker,
                RestartDecision::Restart {
                    delay: policy.delay,
                },
            );
        }
        match policy.mode {
            RestartMode::Fail => (tracker, RestartDecision::Fail),
            RestartMode::Delay => {
                let interval_end = tracker
                    .interval_started_at
                    .unwrap_or(now)
                    .after(policy.interval);
                (
                    tracker,
                    RestartDecision::Restart {
                        delay: interval_end.since(now).max(policy.delay),
                    },
                )
            }
        }
    }
}

/// Whether a failed allocation may be rescheduled: always when `unlimited`,
/// otherwise when fewer than `attempts` reschedules of its chain happened in
/// the `interval` before the failure.
pub fn reschedule_eligible(
    policy: &ReschedulePolicy,
    events: &[RescheduleEvent],
    failed_at: Time,
) -> bool {
    if policy.unlimited {
        return true;
    }
    let window_start = failed_at
        .0
        .saturating_sub(crate::time::duration_milliseconds(policy.interval));
    let recent = events
        .iter()
        .filter(|event| event.at.0 > window_start)
        .count();
    recent < policy.attempts as usize
}

/// The wait before rescheduling an allocation that failed at `failed_at`,
/// given its chain's previous reschedules (Nomad's semantics):
/// `constant` always waits `delay`; `exponential` doubles the previous wait;
/// `fibonacci` adds the two previous waits. The wait never exceeds
/// `max_delay`, and once it has reached the ceiling, an allocation that ran
/// longer than `max_delay` before failing starts the series again from
/// `delay` (it was healthy for a while: this failure is a new story).
pub fn next_reschedule_delay(
    policy: &ReschedulePolicy,
    events: &[RescheduleEvent],
    failed_at: Time,
) -> Duration {
    let Some(last) = events.last() else {
        return policy.delay;
    };
    let grown = match policy.delay_function {
        DelayFunction::Constant => return policy.delay,
        DelayFunction::Exponential => last.delay.saturating_mul(2),
        DelayFunction::Fibonacci => match events.len() {
            1 => last.delay,
            length => {
                let before_last = events[length - 2].delay;
                // A series that was reset (ceiling then `delay`) starts over.
                if before_last == policy.max_delay && last.delay == policy.delay {
                    last.delay
                } else {
                    last.delay.saturating_add(before_last)
                }
            }
        },
    };
    if grown <= policy.max_delay {
        return grown.max(policy.delay);
    }
    if failed_at.since(last.at) > policy.max_delay {
        policy.delay
    } else {
        policy.max_delay
    }
}

/// Whether an agent that last reached the store at `last_store_contact`
/// must stop the group's allocations by itself (`stop_on_client_after`).
pub fn stop_after_client_disconnect(
    disconnect: &Disconnect,
    last_store_contact: Time,
    now: Time,
) -> bool {
    disconnect
        .stop_on_client_after
        .is_some_and(|after| now >= last_store_contact.after(after))
}

/// Whether an allocation turned healthy in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "health", rename_all = "lowercase")]
pub enum Health {
    /// Ready for `min_healthy_time` before the deadline.
    Healthy,
    /// Failed, or not healthy by the deadline.
    Unhealthy,
    /// Not decided yet; it will be by `decided_by` at the latest.
    Pending {
        /// When to look again.
        decided_by: Time,
    },
}

/// Health of an allocation under `min_healthy_time` and `healthy_deadline`,
/// both counted from `watched_from` (its placement, or the start of the
/// deployment that took it in, whichever is later). A decision already
/// recorded in `deployment_healthy` stands.
pub fn allocation_health(
    allocation: &Allocation,
    min_healthy_time: Duration,
    healthy_deadline: Duration,
    watched_from: Time,
    now: Time,
) -> Health {
    if let Some(healthy) = allocation.deployment_healthy {
        return if healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
    }
    if matches!(
        allocation.client.status,
        ClientStatus::Failed | ClientStatus::Complete
    ) {
        return Health::Unhealthy;
    }
    let start = watched_from.max(allocation.created_at);
    let deadline = start.after(healthy_deadline);
    let healthy_at = allocation
        .client
        .ready_since
        .map(|ready| ready.after(min_healthy_time));
    if let Some(healthy_at) = healthy_at {
        if healthy_at <= now && healthy_at <= deadline {
            return Health::Healthy;
        }
    }
    if now >= deadline {
        return Health::Unhealthy;
    }
    Health::Pending {
        decided_by: healthy_at.map_or(deadline, |healthy_at| healthy_at.min(deadline)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::AllocationId;

    fn seconds(count: u64) -> Duration {
        Duration::from_secs(count)
    }

    fn at(count: u64) -> Time {
        Time(count * 1000)
    }

    fn restart_policy(mode: RestartMode) -> RestartPolicy {
        RestartPolicy {
            attempts: 2,
            interval: seconds(60),
            delay: seconds(5),
            mode,
        }
    }

    #[test]
    fn restarts_within_attempts_then_fails() {
        let policy = restart_policy(RestartMode::Fail);
        let failed = TaskEnd::Exited { exit_code: 1 };
        let (tracker, first) =
            RestartTracker::default().on_task_end(&policy, JobType::Service, failed, at(0));
        assert_eq!(first, RestartDecision::Restart { delay: seconds(5) });
        let (tracker, second) =
            tracker.on_task_end(&policy, JobType::Service, TaskEnd::LivenessCritical, at(10));
        assert_eq!(second, RestartDecision::Restart { delay: seconds(5) });
        let (_, third) = tracker.on_task_end(&policy, JobType::Service, failed, at(20));
        assert_eq!(third, RestartDecision::Fail);
        // After the interval, attempts are fresh.
        let (_, later) = tracker.on_task_end(&policy, JobType::Service, failed, at(61));
        assert_eq!(later, RestartDecision::Restart { delay: seconds(5) });
    }

    #[test]
    fn delay_mode_waits_out_the_interval() {
        let policy = restart_policy(RestartMode::Delay);
        let failed = TaskEnd::Signaled { signal: 9 };
        let (tracker, _) =
            RestartTracker::default().on_task_end(&policy, JobType::Service, failed, at(0));
        let (tracker, _) = tracker.on_task_end(&policy, JobType::Service, failed, at(10));
        let (tracker, third) = tracker.on_task_end(&policy, JobType::Service, failed, at(20));
        assert_eq!(third, RestartDecision::Restart { delay: seconds(40) });
        let (_, fourth) = tracker.on_task_end(&policy, JobType::Service, failed, at(60));
        assert_eq!(
            fourth,
            RestartDecision::Restart { delay: seconds(5) },
            "a new interval began"
        );
    }

    #[test]
    fn batch_success_completes_and_service_success_restarts() {
        let policy = restart_policy(RestartMode::Fail);
        let success = TaskEnd::Exited { exit_code: 0 };
        assert_eq!(
            RestartTracker::default()
                .on_task_end(&policy, JobType::Batch, success, at(0))
                .1,
            RestartDecision::Complete
        );
        assert_eq!(
            RestartTracker::default()
                .on_task_end(&policy, JobType::Service, success, at(0))
                .1,
            RestartDecision::Restart { delay: seconds(5) }
        );
        let no_restarts = RestartPolicy {
            attempts: 0,
            ..policy
        };
        assert_eq!(
            RestartTracker::default()
                .on_task_end(&no_restarts, JobType::Service, TaskEnd::StartFailed, at(0))
                .1,
            RestartDecision::Fail
        );
    }

    fn event(at_seconds: u64, delay_seconds: u64) -> RescheduleEvent {
        RescheduleEvent {
            at: at(at_seconds),
            previous_allocation: AllocationId("a".into()),
            previous_node: "n".into(),
            delay: seconds(delay_seconds),
        }
    }

    fn reschedule_policy(delay_function: DelayFunction) -> ReschedulePolicy {
        ReschedulePolicy {
            attempts: 0,
            interval: Duration::ZERO,
            delay: seconds(5),
            delay_function,
            max_delay: seconds(60),
            unlimited: true,
        }
    }

    #[test]
    fn exponential_delays_double_up_to_the_ceiling() {
        let policy = reschedule_policy(DelayFunction::Exponential);
        let mut events = Vec::new();
        let mut delays = Vec::new();
        let mut now = 0;
        for _ in 0..6 {
            let delay = next_reschedule_delay(&policy, &events, at(now));
            delays.push(delay.as_secs());
            now += delay.as_secs() + 1;
            events.push(event(now, delay.as_secs()));
        }
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn fibonacci_delays_add_up() {
        let policy = ReschedulePolicy {
            max_delay: seconds(100),
            ..reschedule_policy(DelayFunction::Fibonacci)
        };
        let mut events = Vec::new();
        let mut delays = Vec::new();
        for step in 0..7 {
            let delay = next_reschedule_delay(&policy, &events, at(step * 10));
            delays.push(delay.as_secs());
            events.push(event(step * 10 + 1, delay.as_secs()));
        }
        assert_eq!(delays, [5, 5, 10, 15, 25, 40, 65]);
        assert_eq!(
            next_reschedule_delay(
                &reschedule_policy(DelayFunction::Constant),
                &events,
                at(100)
            ),
            seconds(5)
        );
    }

    #[test]
    fn a_long_healthy_run_resets_the_delay_at_the_ceiling() {
        let policy = reschedule_policy(DelayFunction::Exponential);
        let events = vec![event(0, 40), event(100, 60)];
        assert_eq!(
            next_reschedule_delay(&policy, &events, at(130)),
            seconds(60),
            "ran 30s: stays at the ceiling"
        );
        assert_eq!(
            next_reschedule_delay(&policy, &events, at(200)),
            seconds(5),
            "ran 100s > max_delay: starts over"
        );
    }

    #[test]
    fn limited_attempts_count_within_the_interval() {
        let policy = ReschedulePolicy {
            attempts: 2,
            interval: seconds(100),
            unlimited: false,
            ..reschedule_policy(DelayFunction::Constant)
        };
        assert!(reschedule_eligible(&policy, &[], at(0)));
        assert!(reschedule_eligible(&policy, &[event(10, 5)], at(20)));
        assert!(!reschedule_eligible(
            &policy,
            &[event(10, 5), event(30, 5)],
            at(40)
        ));
        assert!(
            reschedule_eligible(&policy, &[event(10, 5), event(30, 5)], at(115)),
            "the first fell out of the window"
        );
        let none = ReschedulePolicy {
            attempts: 0,
            ..policy
        };
        assert!(!reschedule_eligible(&none, &[], at(0)));
    }

    #[test]
    fn an_agent_stops_its_allocations_after_the_disconnect_timeout() {
        let disconnect = Disconnect {
            lost_after: seconds(30),
            stop_on_client_after: Some(seconds(20)),
        };
        assert!(!stop_after_client_disconnect(&disconnect, at(100), at(119)));
        assert!(stop_after_client_disconnect(&disconnect, at(100), at(120)));
        assert!(!stop_after_client_disconnect(
            &Disconnect::default(),
            at(0),
            at(10_000)
        ));
    }
}
