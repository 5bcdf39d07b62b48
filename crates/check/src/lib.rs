//! Consistency checkers for keel's key-value histories, used by the simulator and by the
//! multi-process fault tests.
//!
//! A test records a [`History`] of what its clients saw (with [`HistoryRecorder`], or by
//! building [`Operation`]s directly) and asks three questions of it:
//!
//! - [`check`] / [`check_model`]: is it linearizable? The search is Wing and Gong's with
//!   Lowe's memoisation, after Porcupine, over a pluggable [`Model`]; requests whose answer
//!   never came may take effect at any time after their call, or never.
//! - [`check_revisions`]: do revisions behave as etcd's do (unique per write, monotonic in
//!   real time)?
//! - [`check_serializable_reads`]: did every serializable read return a value somebody wrote?
//!
//! [`check_history`] asks all three. Which key-value model to search with is explained in
//! [`key_value`]: per key (per component of keys and leases) for big histories, global for
//! small ones. The `keel-check` binary asks them of a history dumped as JSON
//! ([`History::write_json`]).
//!
//! Histories may hold leases (grants, puts with a lease, keep-alives, revocations). No client
//! sees a lease expire, so before checking such a history, add each lease's expiry with
//! [`with_lease_expiries`]: an unknown-outcome operation called at the earliest instant the
//! lease may expire, given how fast the store's clock may run ([`LeaseExpiryBound`]; see
//! [`leases`]). Without it, every key that vanished with an expired lease is a violation.
//!
//! ```
//! use std::time::Duration;
//! use keel_check::{check, CheckResult, HistoryRecorder, Input, Output};
//!
//! let mut recorder = HistoryRecorder::new(1_000);
//! let put = Input::Put { key: "k".into(), value: "v".into() };
//! let call = recorder.record_call(1, 10, put)?;
//! recorder.record_return(call, 20, Output::Put { revision: 2 });
//! let get = Input::Get { key: "k".into(), serializable: false };
//! let call = recorder.record_call(2, 30, get)?;
//! let value = Some("v".into());
//! recorder.record_return(call, 40, Output::Get { value, mod_revision: 2, revision: 2 });
//! // A request that never gets an answer is left pending: its outcome is unknown.
//! let _lost = recorder.record_call(3, 50, Input::Delete { key: "k".into() })?;
//! let history = recorder.finish();
//! assert_eq!(check(&history.operations, Duration::from_secs(1))?, CheckResult::Ok);
//! # Ok::<(), keel_check::HistoryError>(())
//! ```
//!
//! Architecture invariant: this crate depends on no other keel crate, so that histories from
//! real etcd-protocol clients and from the simulator are checked by the same code, and the
//! checker cannot share a bug with the system it checks. Its results are deterministic; the
//! clock is read only to enforce the time limit.

#![deny(missing_docs)]

mod bitset;
pub mod bytes;
pub mod history;
pub mod key_value;
pub mod leases;
pub mod linearizability;
pub mod model;
pub mod revisions;
pub mod serializable;

use std::fmt;
use std::time::Duration;

pub use crate::bytes::Bytes;
pub use crate::history::{
    History, HistoryError, HistoryRecorder, Input, Operation, Output, PendingCall,
    OPERATIONS_MAX_DEFAULT,
};
pub use crate::key_value::{KeyValueModel, RevisionChecking};
pub use crate::leases::{with_lease_expiries, LeaseExpiryBound};
pub use crate::linearizability::{
    check_model, CheckOptions, CheckResult, ExplainedOperation, Explanation, UnknownReason,
};
pub use crate::model::{Model, NondeterministicModel, PowersetModel};
pub use crate::revisions::{check_revisions, RevisionViolation};
pub use crate::serializable::{check_serializable_reads, SerializableReadViolation};

/// Checks that a key-value history is linearizable with the per-key model (right for
/// histories of any size) and the default limits, giving up after `timeout`.
pub fn check(history: &[Operation], timeout: Duration) -> Result<CheckResult, HistoryError> {
    let options = CheckOptions::with_timeout(timeout);
    history::validate(history, options.operations_max)?;
    check_model(&KeyValueModel::per_key(), history, &options)
}

/// The answers of every checker for one history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryReport {
    /// The linearizability verdict.
    pub linearizability: CheckResult,
    /// The revision invariants.
    pub revisions: Result<(), RevisionViolation>,
    /// The serializable reads.
    pub serializable_reads: Result<(), SerializableReadViolation>,
}

impl HistoryReport {
    /// Whether every check passed.
    pub fn is_ok(&self) -> bool {
        self.linearizability.is_ok() && self.revisions.is_ok() && self.serializable_reads.is_ok()
    }

    /// Whether some check found a violation (an undecided search is not one).
    pub fn has_violation(&self) -> bool {
        self.linearizability.is_illegal()
            || self.revisions.is_err()
            || self.serializable_reads.is_err()
    }
}

impl fmt::Display for HistoryReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(formatter, "linearizability: {}", self.linearizability)?;
        match &self.revisions {
            Ok(()) => writeln!(formatter, "revisions: ok")?,
            Err(violation) => writeln!(formatter, "revisions: {violation}")?,
        }
        match &self.serializable_reads {
            Ok(()) => write!(formatter, "serializable reads: ok"),
            Err(violation) => write!(formatter, "serializable reads: {violation}"),
        }
    }
}

/// Runs every checker on a key-value history: linearizability with `model`, the revision
/// invariants and the serializable reads.
pub fn check_history(
    history: &[Operation],
    model: &KeyValueModel,
    options: &CheckOptions,
) -> Result<HistoryReport, HistoryError> {
    history::validate(history, options.operations_max)?;
    Ok(HistoryReport {
        linearizability: check_model(model, history, options)?,
        revisions: check_revisions(history),
        serializable_reads: check_serializable_reads(history),
    })
}
