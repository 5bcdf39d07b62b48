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
//!   the global model needs;
//! - each lease gets an expiry, inserted by keel-check's `with_lease_expiries` with the
//!   bound of [`lease_expiry_bound`]: an unknown-outcome operation called at the earliest
//!   instant the lease may legally expire.
//!
//! The per-key model (per component of keys and leases) runs on every history; the global
//! model, which also checks that writes create consecutive revisions across keys, runs when
//! the history is small enough to search quickly.
//!
//! # The lease guarantee checked
//!
//! A key put with a lease stays (unless a client deletes, overwrites or revokes it) until at
//! least `call + 0.8 × TTL − 80 ms`, where `call` is when the client sent the lease's last
//! acknowledged keep-alive, or its grant. Derivation:
//!
//! - the leader's lease clock (`keel_core::lease::Lessor`) counts a TTL of `T` seconds as
//!   `10 T` ticks (100 ms ticks) from when it refreshes the lease: when it applies the grant
//!   or handles the keep-alive, both at or after the client's call;
//! - in the simulator two ticks of one member are at least `TICK_INTERVAL_NS_MIN` (80 ms)
//!   apart: drift keeps the interval within 80–200 ms, stalls and pauses only delay ticks,
//!   and ticks missed are skipped, never fired in a burst (as the server's member loop,
//!   which ticks from a monotonic clock); so `10 T` ticks take at least `(10 T − 1) × 80 ms`,
//!   the first tick possibly coming at once;
//! - across a leader change the new leader starts the lease at its checkpointed remaining
//!   TTL (rounded up, so at least what the old leader still had to count) or its full TTL,
//!   plus an election timeout of 10 ticks, which covers the tick of phase each leader may
//!   lose; so the bound holds along any chain of leaders.
//!
//! That last step assumes what the check is there to test: that a keep-alive is
//! acknowledged only when every later leader will count from it (not by a deposed leader,
//! not for a lease whose revocation is already on its way, not with an older checkpoint
//! still to land after it), and that a new leader expires nothing on stale state. How late
//! a lease may expire is not checked: that depends on how long the cluster is without a
//! leader.

use std::time::Duration;

use keel_check::{
    check_history, check_model, with_lease_expiries, CheckOptions, CheckResult, KeyValueModel,
    LeaseExpiryBound, Operation,
};

use crate::config::{SECOND_NS, TICK_INTERVAL_NS, TICK_INTERVAL_NS_MIN};
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

/// How early a lease may expire in the simulator (see the module documentation): the
/// fastest tick is `TICK_INTERVAL_NS_MIN`, 25% faster than nominal, and a tick may come at
/// once after a refresh.
pub fn lease_expiry_bound() -> LeaseExpiryBound {
    LeaseExpiryBound {
        time_units_per_second: SECOND_NS,
        clock_rate_per_mille_max: TICK_INTERVAL_NS * 1_000 / TICK_INTERVAL_NS_MIN,
        clock_resolution: TICK_INTERVAL_NS_MIN,
    }
}

/// The recorded history with each lease's expiry inserted: what the checkers search.
pub fn with_expiries(history: &[Operation]) -> Vec<Operation> {
    with_lease_expiries(history, &lease_expiry_bound())
}

/// Checks `history` with every checker.
pub fn check(history: &[Operation]) -> HistoryVerdict {
    let history = &with_expiries(history);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lives_at_least_four_fifths_of_its_ttl_less_one_fast_tick() {
        let bound = lease_expiry_bound();
        assert_eq!(
            bound.guaranteed_lifetime(5),
            4 * SECOND_NS - TICK_INTERVAL_NS_MIN
        );
    }
}
