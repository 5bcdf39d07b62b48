//! Stateless request validation, as etcd's gRPC layer does it before proposing.
//!
//! These checks depend only on the request, so the server runs them before a request
//! enters the Raft log, and the key space runs them again when applying (all but the
//! operation-count limit, which is configuration: two members configured differently
//! must still apply the log identically).

use std::collections::BTreeSet;

use keel_types::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_types::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use super::KeySpaceError;

/// etcd's default for `--max-txn-ops`: how many compares, success operations or failure
/// operations one txn may hold.
pub const TXN_OPERATIONS_MAX_DEFAULT: usize = 128;

/// Checks a range request: a non-empty key and known sort options (etcd 3.6's check;
/// etcd 3.5 crashes on an unknown sort target instead).
pub fn validate_range(request: &RangeRequest) -> Result<(), KeySpaceError> {
    if request.key.is_empty() {
        return Err(KeySpaceError::EmptyKey);
    }
    if SortOrder::try_from(request.sort_order).is_err()
        || SortTarget::try_from(request.sort_target).is_err()
    {
        return Err(KeySpaceError::InvalidSortOption);
    }
    Ok(())
}

/// Checks a put request: a non-empty key, and no value (lease) beside `ignore_value`
/// (`ignore_lease`).
pub fn validate_put(request: &PutRequest) -> Result<(), KeySpaceError> {
    if request.key.is_empty() {
        return Err(KeySpaceError::EmptyKey);
    }
    if request.ignore_value && !request.value.is_empty() {
        return Err(KeySpaceError::ValueProvided);
    }
    if request.ignore_lease && request.lease != 0 {
        return Err(KeySpaceError::LeaseProvided);
    }
    Ok(())
}

/// Checks a delete request: a non-empty key.
pub fn validate_delete_range(request: &DeleteRangeRequest) -> Result<(), KeySpaceError> {
    if request.key.is_empty() {
        return Err(KeySpaceError::EmptyKey);
    }
    Ok(())
}

/// Checks a txn request as etcd's `kvServer.Txn` does, in its order: the operation
/// count, compare keys and every operation (recursively, a nested txn getting what is
/// left of the limit after its parent's count), then writes that overlap.
///
/// A txn holds at most `txn_operations_max` compares, and at most that many operations
/// in each branch. It may not put a key twice on one path, nor put a key that it also
/// deletes (etcd's `checkIntervals`, whose exact rules are kept: the success and failure
/// branches of a nested txn may put the same key; a delete whose `range_end` is `"\0"`
/// or not after its key conflicts with no put; a put in a nested txn is checked only
/// against deletes in the txns before it, not after).
pub fn validate_txn(request: &TxnRequest, txn_operations_max: usize) -> Result<(), KeySpaceError> {
    let operations_max = i64::try_from(txn_operations_max).unwrap_or(i64::MAX);
    check_txn_request(request, operations_max)?;
    // etcd checks overlaps after the per-operation checks to avoid quadratic work on a
    // request that is rejected anyway.
    check_intervals(&request.success)?;
    check_intervals(&request.failure)?;
    Ok(())
}

/// Whether a txn can be answered without writing: all its operations, in both branches,
/// are ranges (a nested txn counts as a write, as in etcd's `isTxnReadonly`).
pub fn is_txn_read_only(request: &TxnRequest) -> bool {
    request
        .success
        .iter()
        .chain(&request.failure)
        .all(|operation| {
            matches!(
                operation.request,
                Some(request_op::Request::RequestRange(_))
            )
        })
}

/// Every check of [`validate_txn`] except the operation-count limit.
pub(super) fn check_txn_structure(request: &TxnRequest) -> Result<(), KeySpaceError> {
    validate_txn(request, usize::MAX)
}

/// etcd's `checkTxnRequest`.
fn check_txn_request(request: &TxnRequest, operations_max: i64) -> Result<(), KeySpaceError> {
    let operation_count = request
        .compare
        .len()
        .max(request.success.len())
        .max(request.failure.len());
    let operation_count = i64::try_from(operation_count).unwrap_or(i64::MAX);
    if operation_count > operations_max {
        return Err(KeySpaceError::TooManyOperations);
    }
    if request.compare.iter().any(|compare| compare.key.is_empty()) {
        return Err(KeySpaceError::EmptyKey);
    }
    for operation in request.success.iter().chain(&request.failure) {
        check_request_operation(operation, operations_max - operation_count)?;
    }
    Ok(())
}

/// etcd's `checkRequestOp`.
fn check_request_operation(
    operation: &RequestOp,
    operations_max: i64,
) -> Result<(), KeySpaceError> {
    match &operation.request {
        Some(request_op::Request::RequestRange(range)) => validate_range(range),
        Some(request_op::Request::RequestPut(put)) => validate_put(put),
        Some(request_op::Request::RequestDeleteRange(delete)) => validate_delete_range(delete),
        Some(request_op::Request::RequestTxn(nested)) => check_txn_request(nested, operations_max),
        // etcd answers an empty operation with "key not found".
        None => Err(KeySpaceError::KeyNotFound),
    }
}

/// The key intervals deleted by a list of operations and the txns nested in them.
///
/// Like etcd's interval tree of `[key, range_end)` strings, an interval is taken
/// literally: a point delete covers its key, and a range delete covers the keys `k` with
/// `key <= k < range_end` byte-wise, so a `"\0"` end (or any end not after the key)
/// covers nothing here. Point deletes are looked up in a set; range deletes are scanned,
/// which is bounded by the operation-count limit.
#[derive(Default)]
struct DeletedIntervals<'a> {
    points: BTreeSet<&'a [u8]>,
    ranges: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> DeletedIntervals<'a> {
    fn insert(&mut self, delete: &'a DeleteRangeRequest) {
        if delete.range_end.is_empty() {
            self.points.insert(&delete.key);
        } else {
            self.ranges.push((&delete.key, &delete.range_end));
        }
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.points.contains(key)
            || self
                .ranges
                .iter()
                .any(|&(start, end)| start <= key && key < end)
    }

    fn union(&mut self, other: DeletedIntervals<'a>) {
        self.points.extend(other.points);
        self.ranges.extend(other.ranges);
    }
}

/// etcd's `checkIntervals`: fails if the operations put a key twice or put a key they
/// also delete; otherwise returns the keys put and the intervals deleted, for the
/// parent txn's check.
fn check_intervals(
    operations: &[RequestOp],
) -> Result<(BTreeSet<&[u8]>, DeletedIntervals<'_>), KeySpaceError> {
    // This level's deletes come first, so that puts in nested txns are checked
    // against them.
    let mut deletes = DeletedIntervals::default();
    for operation in operations {
        if let Some(request_op::Request::RequestDeleteRange(delete)) = &operation.request {
            deletes.insert(delete);
        }
    }

    let mut puts: BTreeSet<&[u8]> = BTreeSet::new();
    for operation in operations {
        let Some(request_op::Request::RequestTxn(nested)) = &operation.request else {
            continue;
        };
        let (puts_success, deletes_success) = check_intervals(&nested.success)?;
        let (puts_failure, deletes_failure) = check_intervals(&nested.failure)?;
        for &key in &puts_success {
            if puts.contains(key) || deletes.contains(key) {
                return Err(KeySpaceError::DuplicateKey);
            }
            puts.insert(key);
        }
        for &key in &puts_failure {
            // Only one branch of the nested txn runs, so the same key in both is safe.
            if puts.contains(key) && !puts_success.contains(key) {
                return Err(KeySpaceError::DuplicateKey);
            }
            if deletes.contains(key) {
                return Err(KeySpaceError::DuplicateKey);
            }
            puts.insert(key);
        }
        deletes.union(deletes_success);
        deletes.union(deletes_failure);
    }

    for operation in operations {
        let Some(request_op::Request::RequestPut(put)) = &operation.request else {
            continue;
        };
        let key = put.key.as_slice();
        if puts.contains(key) || deletes.contains(key) {
            return Err(KeySpaceError::DuplicateKey);
        }
        puts.insert(key);
    }
    Ok((puts, deletes))
}
