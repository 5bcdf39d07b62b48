//! Revision invariants that need no search, checked on histories of any size.
//!
//! The per-key model cannot compare revisions across keys, and the global model is too slow
//! for big histories, so the invariants that hold pairwise are checked here directly, in
//! O(n log n):
//!
//! - every write that changed the store (a put, a delete that deleted a key, a successful
//!   compare-and-swap) created a revision no other write created;
//! - an answer's revision is never below the revision of an operation that returned before it
//!   was called, and a write's is strictly above it (the write raised the counter after that
//!   operation took effect). Serializable reads may be stale, so they are exempt as the later
//!   operation; as the earlier one they count, because a member applies only committed
//!   revisions;
//! - a read's `mod_revision` is never above its `revision`.

use std::collections::BTreeMap;

use crate::history::{Operation, Output};
use crate::key_value::describe_operation;
use crate::linearizability::ExplainedOperation;

/// A broken revision invariant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevisionViolation {
    /// Two writes created the same revision.
    #[error("two writes created revision {revision}: {first} and {second}")]
    DuplicateRevision {
        /// The revision created twice.
        revision: u64,
        /// The first write, by history position.
        first: Box<ExplainedOperation>,
        /// The second write.
        second: Box<ExplainedOperation>,
    },
    /// An answer's revision is below (or, for a write, not above) the revision of an
    /// operation that returned before it was called.
    #[error(
        "revision went backwards in real time: {later} was called after {earlier} returned, \
         but its revision is {relation} {earlier_revision}"
    )]
    RevisionWentBackwards {
        /// The operation that returned first, with the highest revision of those that did.
        earlier: Box<ExplainedOperation>,
        /// Its revision.
        earlier_revision: u64,
        /// The operation called after it returned.
        later: Box<ExplainedOperation>,
        /// Its revision.
        later_revision: u64,
        /// "below" for any answer, "not above" for a write.
        relation: &'static str,
    },
    /// A read's mod_revision is above its revision.
    #[error("{read} has mod_revision {mod_revision} above its revision {revision}")]
    ModRevisionAboveRevision {
        /// The read.
        read: Box<ExplainedOperation>,
        /// Its mod_revision.
        mod_revision: u64,
        /// Its revision.
        revision: u64,
    },
}

/// Checks the revision invariants of the module documentation, reporting the first violation
/// (reads first, then duplicates in history order, then real time in call order).
pub fn check_revisions(history: &[Operation]) -> Result<(), RevisionViolation> {
    check_mod_revisions(history)?;
    check_unique_write_revisions(history)?;
    check_real_time_order(history)
}

/// Describes one operation of a key-value history for a violation report.
pub(crate) fn explain(history: &[Operation], index: usize) -> ExplainedOperation {
    let operation = &history[index];
    ExplainedOperation {
        index,
        client_id: operation.client_id,
        call_time: operation.call_time,
        return_time: operation.return_time,
        description: describe_operation(&operation.input, &operation.output),
    }
}

fn check_mod_revisions(history: &[Operation]) -> Result<(), RevisionViolation> {
    for (index, operation) in history.iter().enumerate() {
        if let Output::Get {
            mod_revision,
            revision,
            ..
        } = operation.output
        {
            if mod_revision > revision {
                return Err(RevisionViolation::ModRevisionAboveRevision {
                    read: Box::new(explain(history, index)),
                    mod_revision,
                    revision,
                });
            }
        }
    }
    Ok(())
}

fn check_unique_write_revisions(history: &[Operation]) -> Result<(), RevisionViolation> {
    let mut writer_by_revision: BTreeMap<u64, usize> = BTreeMap::new();
    for (index, operation) in history.iter().enumerate() {
        let Some(revision) = operation.write_revision() else {
            continue;
        };
        if let Some(first) = writer_by_revision.insert(revision, index) {
            return Err(RevisionViolation::DuplicateRevision {
                revision,
                first: Box::new(explain(history, first)),
                second: Box::new(explain(history, index)),
            });
        }
    }
    Ok(())
}

/// Sweeps operations in call order while a second cursor admits, in return order, every
/// operation that returned strictly before the current call, keeping the highest revision
/// admitted so far.
fn check_real_time_order(history: &[Operation]) -> Result<(), RevisionViolation> {
    let mut returned: Vec<(u64, u64, usize)> = history
        .iter()
        .enumerate()
        .filter_map(|(index, operation)| {
            Some((operation.return_time?, operation.output.revision()?, index))
        })
        .collect();
    returned.sort_unstable();
    let mut called: Vec<(u64, usize)> = history
        .iter()
        .enumerate()
        .filter(|(_, operation)| {
            operation.output.revision().is_some() && !operation.input.is_serializable_read()
        })
        .map(|(index, operation)| (operation.call_time, index))
        .collect();
    called.sort_unstable();

    let mut cursor = 0;
    // (highest revision returned so far, the operation that returned it)
    let mut highest: Option<(u64, usize)> = None;
    for (call_time, index) in called {
        while cursor < returned.len() && returned[cursor].0 < call_time {
            let (_, revision, returned_index) = returned[cursor];
            if highest.is_none_or(|(highest_revision, _)| revision > highest_revision) {
                highest = Some((revision, returned_index));
            }
            cursor += 1;
        }
        let Some((earlier_revision, earlier)) = highest else {
            continue;
        };
        let operation = &history[index];
        let later_revision = operation
            .output
            .revision()
            .expect("only answered operations are swept");
        let is_write = operation.write_revision().is_some();
        let violated = if is_write {
            later_revision <= earlier_revision
        } else {
            later_revision < earlier_revision
        };
        if violated {
            return Err(RevisionViolation::RevisionWentBackwards {
                earlier: Box::new(explain(history, earlier)),
                earlier_revision,
                later: Box::new(explain(history, index)),
                later_revision,
                relation: if is_write { "not above" } else { "below" },
            });
        }
    }
    Ok(())
}
