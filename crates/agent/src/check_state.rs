//! The check state machine: results in, status out. Pure and deterministic
//! (time is an argument), so the anti-flap rules are tested without I/O.
//!
//! The thresholds are Consul's: a passing result moves a check to passing
//! only after `success_before_passing` consecutive passing results; failing
//! results (warning or critical) move it to warning after
//! `failures_before_warning` and to critical after `failures_before_critical`
//! consecutive ones. A result that breaks a run resets the other counter, so
//! results alternating faster than the thresholds change nothing (Consul
//! issues 1208 and 2890). Kinds follow Kubernetes' probes: *startup* checks
//! gate the others, which do not run until every startup check passed (and a
//! startup check stops once it passed); *readiness* gates discovery;
//! *liveness* is reported.

use std::time::{Duration, Instant};

/// Health of one check (Consul's `Status` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckStatus {
    Passing,
    Warning,
    Critical,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<CheckStatus> {
        match text {
            "passing" => Some(CheckStatus::Passing),
            "warning" => Some(CheckStatus::Warning),
            "critical" => Some(CheckStatus::Critical),
            _ => None,
        }
    }
}

/// What a check's result means for the instance (Kubernetes' probe kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// Gates discovery: the instance is served only while it passes.
    Readiness,
    /// Reported; a supervisor restarts the workload on it.
    Liveness,
    /// The other checks of the service wait until it passed once.
    Startup,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Readiness => "readiness",
            CheckKind::Liveness => "liveness",
            CheckKind::Startup => "startup",
        }
    }

    pub fn parse(text: &str) -> Option<CheckKind> {
        match text {
            "readiness" => Some(CheckKind::Readiness),
            "liveness" => Some(CheckKind::Liveness),
            "startup" => Some(CheckKind::Startup),
            _ => None,
        }
    }

    /// Whether a non-passing check of this kind takes the instance out of discovery.
    pub fn gates_discovery(self) -> bool {
        matches!(self, CheckKind::Readiness | CheckKind::Startup)
    }
}

/// Consul's anti-flap thresholds; 0 and 1 both mean "at the first result".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Thresholds {
    pub success_before_passing: u32,
    pub failures_before_warning: u32,
    pub failures_before_critical: u32,
}

/// The state of one check between results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    status: CheckStatus,
    consecutive_successes: u32,
    consecutive_failures: u32,
    /// Since when the status is critical, for `deregister_critical_service_after`.
    critical_since: Option<Instant>,
}

impl CheckState {
    /// A check that has not reported yet, with its initial status.
    pub fn new(initial_status: CheckStatus, now: Instant) -> CheckState {
        CheckState {
            status: initial_status,
            consecutive_successes: 0,
            consecutive_failures: 0,
            critical_since: (initial_status == CheckStatus::Critical).then_some(now),
        }
    }

    pub fn status(&self) -> CheckStatus {
        self.status
    }

    pub fn critical_since(&self) -> Option<Instant> {
        self.critical_since
    }

    /// Takes one result; returns the new status if it changed.
    pub fn record(
        &mut self,
        result: CheckStatus,
        thresholds: Thresholds,
        now: Instant,
    ) -> Option<CheckStatus> {
        let next = if result == CheckStatus::Passing {
            self.consecutive_failures = 0;
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            (self.consecutive_successes >= thresholds.success_before_passing)
                .then_some(CheckStatus::Passing)
        } else {
            self.consecutive_successes = 0;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if self.consecutive_failures >= thresholds.failures_before_critical {
                // The result itself: a warning result never makes a check critical.
                Some(result)
            } else if self.consecutive_failures >= thresholds.failures_before_warning {
                Some(CheckStatus::Warning)
            } else {
                None
            }
        };
        let next = next.filter(|next| *next != self.status)?;
        self.status = next;
        self.critical_since = (next == CheckStatus::Critical).then_some(now);
        Some(next)
    }

    /// Whether a service whose check is in this state should be deregistered
    /// (`deregister_critical_service_after`).
    pub fn should_deregister(&self, after: Option<Duration>, now: Instant) -> bool {
        match (after, self.critical_since) {
            (Some(after), Some(since)) => now.saturating_duration_since(since) >= after,
            _ => false,
        }
    }
}

/// Whether a service's startup checks have all passed, so its other checks run.
pub fn startup_complete(checks: impl IntoIterator<Item = (CheckKind, CheckStatus)>) -> bool {
    checks
        .into_iter()
        .all(|(kind, status)| kind != CheckKind::Startup || status == CheckStatus::Passing)
}

/// Whether a check should run now: startup checks run until they pass,
/// the others only once startup is complete.
pub fn should_run(kind: CheckKind, status: CheckStatus, startup_complete: bool) -> bool {
    match kind {
        CheckKind::Startup => status != CheckStatus::Passing,
        CheckKind::Readiness | CheckKind::Liveness => startup_complete,
    }
}

/// The status of an instance for discovery: the worst of its gating checks.
pub fn instance_status(checks: impl IntoIterator<Item = (CheckKind, CheckStatus)>) -> CheckStatus {
    checks
        .into_iter()
        .filter(|(kind, _)| kind.gates_discovery())
        .map(|(_, status)| status)
        .max()
        .unwrap_or(CheckStatus::Passing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckStatus::{Critical, Passing, Warning};

    const THRESHOLDS: Thresholds = Thresholds {
        success_before_passing: 2,
        failures_before_warning: 2,
        failures_before_critical: 3,
    };

    fn run(state: &mut CheckState, results: &[CheckStatus]) -> Vec<Option<CheckStatus>> {
        let now = Instant::now();
        results
            .iter()
            .map(|result| state.record(*result, THRESHOLDS, now))
            .collect()
    }

    #[test]
    fn thresholds_delay_each_transition() {
        let mut state = CheckState::new(Critical, Instant::now());
        assert_eq!(run(&mut state, &[Passing, Passing]), [None, Some(Passing)]);
        assert_eq!(
            run(&mut state, &[Critical, Critical, Critical]),
            [None, Some(Warning), Some(Critical)]
        );
        assert_eq!(run(&mut state, &[Passing, Passing]), [None, Some(Passing)]);
    }

    #[test]
    fn alternating_results_change_nothing() {
        let mut state = CheckState::new(Passing, Instant::now());
        let flapping: Vec<CheckStatus> = (0..100)
            .map(|index| if index % 2 == 0 { Critical } else { Passing })
            .collect();
        assert!(run(&mut state, &flapping).iter().all(Option::is_none));
        assert_eq!(state.status(), Passing);
        let mut state = CheckState::new(Critical, Instant::now());
        assert!(run(&mut state, &flapping[1..]).iter().all(Option::is_none));
        assert_eq!(state.status(), Critical);
    }

    #[test]
    fn a_warning_result_stops_at_warning() {
        let mut state = CheckState::new(Passing, Instant::now());
        assert_eq!(
            run(&mut state, &[Warning, Warning, Warning, Warning]),
            [None, Some(Warning), None, None]
        );
    }

    #[test]
    fn zero_thresholds_follow_every_result() {
        let mut state = CheckState::new(Critical, Instant::now());
        let now = Instant::now();
        let zero = Thresholds::default();
        assert_eq!(state.record(Passing, zero, now), Some(Passing));
        assert_eq!(state.record(Warning, zero, now), Some(Warning));
        assert_eq!(state.record(Critical, zero, now), Some(Critical));
        assert_eq!(state.record(Critical, zero, now), None);
    }

    #[test]
    fn deregistration_waits_for_critical_long_enough() {
        let start = Instant::now();
        let mut state = CheckState::new(Passing, start);
        let after = Some(Duration::from_secs(30));
        assert!(!state.should_deregister(after, start + Duration::from_secs(100)));
        state.record(Critical, Thresholds::default(), start);
        assert!(!state.should_deregister(after, start + Duration::from_secs(29)));
        assert!(state.should_deregister(after, start + Duration::from_secs(30)));
        assert!(!state.should_deregister(None, start + Duration::from_secs(300)));
        state.record(
            Passing,
            Thresholds::default(),
            start + Duration::from_secs(31),
        );
        assert!(!state.should_deregister(after, start + Duration::from_secs(100)));
    }

    #[test]
    fn startup_gates_the_other_kinds() {
        let before = [
            (CheckKind::Startup, Critical),
            (CheckKind::Readiness, Critical),
        ];
        assert!(!startup_complete(before));
        assert!(should_run(CheckKind::Startup, Critical, false));
        assert!(!should_run(CheckKind::Readiness, Critical, false));
        assert!(!should_run(CheckKind::Liveness, Critical, false));
        let after = [
            (CheckKind::Startup, Passing),
            (CheckKind::Readiness, Critical),
        ];
        assert!(startup_complete(after));
        assert!(!should_run(CheckKind::Startup, Passing, true));
        assert!(should_run(CheckKind::Readiness, Critical, true));
    }

    #[test]
    fn liveness_does_not_gate_discovery() {
        assert_eq!(
            instance_status([
                (CheckKind::Liveness, Critical),
                (CheckKind::Readiness, Passing)
            ]),
            Passing
        );
        assert_eq!(
            instance_status([
                (CheckKind::Readiness, Warning),
                (CheckKind::Startup, Passing)
            ]),
            Warning
        );
        assert_eq!(instance_status([]), Passing);
    }
}
