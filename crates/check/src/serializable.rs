//! The check for serializable reads, which are allowed to be stale but not made up.
//!
//! A serializable read is served from one member's local state without a quorum round, so it
//! may return any value the key held at some point, however old. What it must not do is return
//! a value nobody wrote: a read of `value` at `mod_revision` is accepted when it is absent (the
//! initial state, or a deletion), or when some put or compare-and-swap of that key and value
//! was called before the read returned (a write called later cannot have been applied yet) and
//! did not fail, and that write created `mod_revision` or its answer never came.

use std::collections::BTreeMap;

use crate::bytes::Bytes;
use crate::history::{Input, Operation, Output};
use crate::linearizability::ExplainedOperation;
use crate::revisions::explain;

/// A serializable read that no write explains.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SerializableReadViolation {
    /// No put or compare-and-swap of the value was called before the read returned.
    #[error("{read} returned a value that no write called before it returned wrote")]
    ValueNeverWritten {
        /// The read.
        read: Box<ExplainedOperation>,
    },
    /// Writes of the value exist, but none created the read's mod_revision.
    #[error(
        "{read} returned a value written before it, but no such write created its mod_revision"
    )]
    ModRevisionNotWritten {
        /// The read.
        read: Box<ExplainedOperation>,
    },
}

/// A write that may have put a value: its call time and, when its answer came, its revision.
struct Candidate {
    call_time: u64,
    revision: Option<u64>,
}

/// Checks every answered serializable read of `history`; the first failing one, in history
/// order, is reported.
pub fn check_serializable_reads(history: &[Operation]) -> Result<(), SerializableReadViolation> {
    let mut writes: BTreeMap<(&Bytes, &Bytes), Vec<Candidate>> = BTreeMap::new();
    for operation in history {
        let (key, value) = match &operation.input {
            Input::Put { key, value } | Input::PutWithLease { key, value, .. } => (key, value),
            Input::CompareAndSwap { key, new_value, .. } => (key, new_value),
            _ => continue,
        };
        let revision = match operation.output {
            Output::Put { revision } => Some(revision),
            Output::CompareAndSwap {
                succeeded: true,
                revision,
            } => Some(revision),
            Output::Unknown => None,
            _ => continue,
        };
        writes.entry((key, value)).or_default().push(Candidate {
            call_time: operation.call_time,
            revision,
        });
    }

    for (index, operation) in history.iter().enumerate() {
        let Input::Get {
            key,
            serializable: true,
        } = &operation.input
        else {
            continue;
        };
        let (
            Some(return_time),
            Output::Get {
                value: Some(value),
                mod_revision,
                ..
            },
        ) = (operation.return_time, &operation.output)
        else {
            continue;
        };
        let earlier: Vec<&Candidate> = writes
            .get(&(key, value))
            .into_iter()
            .flatten()
            .filter(|candidate| candidate.call_time <= return_time)
            .collect();
        if earlier.is_empty() {
            return Err(SerializableReadViolation::ValueNeverWritten {
                read: Box::new(explain(history, index)),
            });
        }
        let explained = earlier.iter().any(|candidate| {
            candidate
                .revision
                .is_none_or(|revision| revision == *mod_revision)
        });
        if !explained {
            return Err(SerializableReadViolation::ModRevisionNotWritten {
                read: Box::new(explain(history, index)),
            });
        }
    }
    Ok(())
}
