//! The client history's consistency: linearizability (keel-check's Wing–Gong search with
//! Lowe's memoisation), the revision invariants, and the weaker guarantee of serializable
//! reads.
//!
//! How the simulator records the history so that this check is sound:
//! - a request is recorded with the time the client sent it and the time the answer came
//!   back, both simulated;
//! - an answer that leaves the outcome unknown (a client timeout, a connection reset by a
//!   crash, "request timed out", "leader changed", "request cancelled") is recorded as an
//!   unknown outcome: the search may place it anywhere after its call, or nowhere;
//! - a request that certainly had no effect (refused before it was proposed: no leader,
//!   too many requests, invalid request, member down) is left out, which is exact;
//! - a read that failed is left out, since a read has no effect;
//! - every write to the store is in the history (the liveness probe's too), which is what
//!   the global model needs.
//!
//! The per-key model runs on every history; the global model, which also checks that
//! writes create consecutive revisions across keys, runs when the history is small enough
//! to search quickly.

use std::time::Duration;

use keel_check::{check_history, check_model, CheckOptions, CheckResult, KeyValueModel, Operation};

use crate::violation::Violation;

/// How long one search may run before the history is declared undecided (not a
/// violation, but reported).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Histories up to this many operations are also searched with the global model.
pub const GLOBAL_MODEL_OPERATIONS_MAX: usize = 400;

/// ... provided they have at most this many unknown outcomes: each one may take effect
/// anywhere after its call, and with one revision counter for the whole store the search
/// cannot split them by key, so it grows exponentially with their number.
pub const GLOBAL_MODEL_UNKNOWN_OPERATIONS_MAX: usize = 6;

/// The time limit of the global pass, which is a bonus: undecided is not a failure.
pub const GLOBAL_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of checking a history.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryVerdict {
    /// The first violation found.
    pub violation: Option<Violation>,
    /// Why a search stopped without a verdict, if one did.
    pub undecided: Option<String>,
}

/// Checks `history` with every checker.
pub fn check(history: &[Operation]) -> HistoryVerdict {
    let options = CheckOptions::with_timeout(CHECK_TIMEOUT);
    let report = match check_history(history, &KeyValueModel::per_key(), &options) {
        Ok(report) => report,
        Err(error) => {
            return HistoryVerdict {
                violation: Some(Violation::InvalidHistory(error.to_string())),
                undecided: None,
            }
        }
    };
    let mut verdict = HistoryVerdict::default();
    match &report.linearizability {
        CheckResult::Ok => {}
        CheckResult::Illegal(_) => {
            verdict.violation = Some(Violation::NotLinearizable(
                report.linearizability.to_string(),
            ));
            return verdict;
        }
        CheckResult::Unknown(reason) => verdict.undecided = Some(format!("per-key: {reason}")),
    }
    if let Err(violation) = &report.revisions {
        verdict.violation = Some(Violation::Revisions(violation.to_string()));
        return verdict;
    }
    if let Err(violation) = &report.serializable_reads {
        verdict.violation = Some(Violation::SerializableRead(violation.to_string()));
        return verdict;
    }
    let unknown_count = history
        .iter()
        .filter(|operation| operation.return_time.is_none())
        .count();
    if history.len() <= GLOBAL_MODEL_OPERATIONS_MAX
        && unknown_count <= GLOBAL_MODEL_UNKNOWN_OPERATIONS_MAX
    {
        let options = CheckOptions::with_timeout(GLOBAL_CHECK_TIMEOUT);
        match check_model(&KeyValueModel::global(), history, &options) {
            Ok(CheckResult::Ok) => {}
            Ok(result @ CheckResult::Illegal(_)) => {
                verdict.violation = Some(Violation::NotLinearizable(format!(
                    "(global model, revisions across keys) {result}"
                )));
            }
            Ok(CheckResult::Unknown(reason)) => {
                verdict.undecided = Some(format!("global: {reason}"));
            }
            Err(error) => verdict.violation = Some(Violation::InvalidHistory(error.to_string())),
        }
    }
    verdict
}
