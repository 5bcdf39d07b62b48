//! Transactions: compares, the branch they choose, and the operations of that branch
//! applied atomically at one revision.
//!
//! This follows etcd v3.5's applier step by step, because its order is observable:
//!
//! 1. Every compare of the txn and of the txns nested in the chosen branches is
//!    evaluated against the store as it was before the txn, giving the *path* (one
//!    boolean per txn, in the order the txns are met). Nested compares do not see the
//!    writes of operations before them.
//! 2. If the txn may write (any operation of either branch is not a range), the puts on
//!    the path are checked: `ignore_value`/`ignore_lease` need an existing key, and a
//!    lease must be known to the caller's lookup.
//! 3. The ranges on the path are checked against the revision and compaction.
//! 4. The operations on the path are applied in order. Each read sees the writes of the
//!    operations before it (its header reports the txn's new revision once something
//!    was written), and every write gets the txn's revision with the next sub-revision.
//!
//! Steps 2 and 3 reject the txn before anything changes; with the validation of
//! [`validate_txn`](super::validate_txn) they guarantee that step 4 cannot fail, which is
//! what makes a txn atomic here.

use std::cmp::Ordering;

use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::{
    request_op, response_op, Compare, RequestOp, ResponseHeader, ResponseOp, TxnRequest,
    TxnResponse,
};

use super::history::StoredVersion;
use super::key_space::{header, WriteBatch};
use super::validate::{check_txn_structure, is_txn_read_only};
use super::{KeySpace, KeySpaceError};

impl KeySpace {
    /// Applies a txn, treating every lease as granted. See
    /// [`txn_with_lease_check`](Self::txn_with_lease_check).
    pub fn txn(&mut self, request: &TxnRequest) -> Result<TxnResponse, KeySpaceError> {
        self.txn_with_lease_check(request, |_| true)
    }

    /// Applies a txn: evaluates its compares, then runs the success or failure branch
    /// atomically at one new revision (or at none, if the branch changed nothing).
    ///
    /// `lease_is_granted` answers whether a lease exists; a put on the chosen path that
    /// names an unknown lease fails the whole txn with [`KeySpaceError::LeaseNotFound`],
    /// as in etcd. The operation-count limit is not applied here (it is the server's, in
    /// [`validate_txn`](super::validate_txn)); every other validation is. The response's
    /// header holds the txn's revision; nested txn responses carry an empty header, as
    /// etcd's do.
    pub fn txn_with_lease_check(
        &mut self,
        request: &TxnRequest,
        lease_is_granted: impl Fn(i64) -> bool,
    ) -> Result<TxnResponse, KeySpaceError> {
        check_txn_structure(request)?;
        let path = self.txn_path(request);
        if !is_txn_read_only(request) {
            self.check_path(request, &path, &mut |operation| {
                self.check_put_on_path(operation, &lease_is_granted)
            })?;
        }
        self.check_path(request, &path, &mut |operation| {
            self.check_range_on_path(operation)
        })?;

        let mut batch = self.begin_write();
        let mut path_position = 0;
        let mut response = self.apply_txn(&mut batch, request, &path, &mut path_position);
        assert_eq!(path_position, path.len(), "the whole path is applied");
        let revision = self.commit_write(batch);
        response.header = header(revision);
        Ok(response)
    }

    /// Answers a read-only txn (one whose operations, in both branches, are all ranges)
    /// without changing anything, so that it can be served like a read, outside the log.
    /// Any other txn fails with [`KeySpaceError::NotReadOnly`].
    pub fn read_only_txn(&self, request: &TxnRequest) -> Result<TxnResponse, KeySpaceError> {
        check_txn_structure(request)?;
        if !is_txn_read_only(request) {
            return Err(KeySpaceError::NotReadOnly);
        }
        let path = self.txn_path(request);
        self.check_path(request, &path, &mut |operation| {
            self.check_range_on_path(operation)
        })?;
        let succeeded = path[0];
        let branch = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        let mut responses = Vec::with_capacity(branch.len());
        for operation in branch {
            let Some(request_op::Request::RequestRange(range)) = &operation.request else {
                unreachable!("a read-only txn holds only ranges");
            };
            let range_response = self
                .range_at(range, self.current_revision)
                .expect("ranges were checked against the revision before the txn");
            responses.push(ResponseOp {
                response: Some(response_op::Response::ResponseRange(range_response)),
            });
        }
        Ok(TxnResponse {
            header: header(self.current_revision),
            succeeded,
            responses,
        })
    }

    /// Evaluates the compares of `request` and of the txns nested in its chosen
    /// branches, all against the current store, in the order etcd's `compareToPath`
    /// visits them.
    fn txn_path(&self, request: &TxnRequest) -> Vec<bool> {
        let mut path = Vec::new();
        self.push_txn_path(request, &mut path);
        path
    }

    fn push_txn_path(&self, request: &TxnRequest, path: &mut Vec<bool>) {
        let succeeded = request
            .compare
            .iter()
            .all(|compare| self.compare_holds(compare, self.current_revision));
        path.push(succeeded);
        let branch = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        for operation in branch {
            if let Some(request_op::Request::RequestTxn(nested)) = &operation.request {
                self.push_txn_path(nested, path);
            }
        }
    }

    /// Runs `check` on every non-txn operation on the path, depth first, and stops at
    /// the first error (etcd's `checkRequests`).
    fn check_path(
        &self,
        request: &TxnRequest,
        path: &[bool],
        check: &mut dyn FnMut(&RequestOp) -> Result<(), KeySpaceError>,
    ) -> Result<(), KeySpaceError> {
        let mut path_position = 0;
        self.check_path_from(request, path, &mut path_position, check)
    }

    fn check_path_from(
        &self,
        request: &TxnRequest,
        path: &[bool],
        path_position: &mut usize,
        check: &mut dyn FnMut(&RequestOp) -> Result<(), KeySpaceError>,
    ) -> Result<(), KeySpaceError> {
        let succeeded = path[*path_position];
        *path_position += 1;
        let branch = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        for operation in branch {
            match &operation.request {
                Some(request_op::Request::RequestTxn(nested)) => {
                    self.check_path_from(nested, path, path_position, check)?;
                }
                _ => check(operation)?,
            }
        }
        Ok(())
    }

    /// etcd's `checkRequestPut`: against the store before the txn.
    fn check_put_on_path(
        &self,
        operation: &RequestOp,
        lease_is_granted: &impl Fn(i64) -> bool,
    ) -> Result<(), KeySpaceError> {
        let Some(request_op::Request::RequestPut(put)) = &operation.request else {
            return Ok(());
        };
        if put.ignore_value || put.ignore_lease {
            let exists = self
                .keys
                .get(put.key.as_slice())
                .and_then(|history| history.live_at(self.current_revision))
                .is_some();
            if !exists {
                return Err(KeySpaceError::KeyNotFound);
            }
        }
        if put.lease != 0 && !lease_is_granted(put.lease) {
            return Err(KeySpaceError::LeaseNotFound);
        }
        Ok(())
    }

    /// etcd's `checkRequestRange`. Note the order of its cases: a negative revision is
    /// below the compacted revision (-1 before any compaction) and so fails as
    /// compacted, although a plain range treats it as "current".
    fn check_range_on_path(&self, operation: &RequestOp) -> Result<(), KeySpaceError> {
        let Some(request_op::Request::RequestRange(range)) = &operation.request else {
            return Ok(());
        };
        if range.revision == 0 {
            Ok(())
        } else if range.revision > self.current_revision {
            Err(KeySpaceError::FutureRevision)
        } else if range.revision < self.compact_revision {
            Err(KeySpaceError::Compacted)
        } else {
            Ok(())
        }
    }

    /// Applies the branch of `request` that the path chose, and its nested txns.
    fn apply_txn(
        &mut self,
        batch: &mut WriteBatch,
        request: &TxnRequest,
        path: &[bool],
        path_position: &mut usize,
    ) -> TxnResponse {
        let succeeded = path[*path_position];
        *path_position += 1;
        let branch = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        let mut responses = Vec::with_capacity(branch.len());
        for operation in branch {
            let response = match &operation.request {
                Some(request_op::Request::RequestRange(range)) => {
                    let range_response = self
                        .range_at(range, batch.read_revision())
                        .expect("ranges were checked against the revision before the txn");
                    Some(response_op::Response::ResponseRange(range_response))
                }
                Some(request_op::Request::RequestPut(put)) => {
                    let put_response = self
                        .apply_put(batch, put)
                        .expect("puts were checked for their key before the txn");
                    Some(response_op::Response::ResponsePut(put_response))
                }
                Some(request_op::Request::RequestDeleteRange(delete)) => {
                    let delete_response = self.apply_delete_range(batch, delete);
                    Some(response_op::Response::ResponseDeleteRange(delete_response))
                }
                Some(request_op::Request::RequestTxn(nested)) => {
                    let nested_response = self.apply_txn(batch, nested, path, path_position);
                    Some(response_op::Response::ResponseTxn(nested_response))
                }
                // Validation rejects empty operations; etcd would answer with an empty
                // response for one.
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded,
            responses,
        }
    }

    /// etcd's `applyCompare`: a compare holds when every key in its range satisfies it.
    /// A range with no key compares as a key whose fields are all zero, except that a
    /// value compare on missing keys always fails (gRPC cannot tell an empty value from
    /// a missing one).
    fn compare_holds(&self, compare: &Compare, revision: i64) -> bool {
        let mut any_key = false;
        for (_, history) in self.keys_in(&compare.key, &compare.range_end) {
            let Some(version) = history.live_at(revision) else {
                continue;
            };
            any_key = true;
            if !compare_version(compare, Some(version)) {
                return false;
            }
        }
        if any_key {
            return true;
        }
        if compare.target == CompareTarget::Value as i32 {
            return false;
        }
        compare_version(compare, None)
    }
}

/// etcd's `compareKV`, for one key's version (`None`: every field zero). An operand of
/// the wrong kind for the target counts as zero (or an empty value), an unknown target
/// compares as equal, and an unknown result holds, all as in etcd.
fn compare_version(compare: &Compare, version: Option<&StoredVersion>) -> bool {
    let ordering = match CompareTarget::try_from(compare.target) {
        Ok(CompareTarget::Value) => {
            let value = version.map_or(&[][..], |version| version.value.as_slice());
            let operand = match &compare.target_union {
                Some(TargetUnion::Value(operand)) => operand.as_slice(),
                _ => &[],
            };
            value.cmp(operand)
        }
        Ok(CompareTarget::Create) => {
            let operand = match compare.target_union {
                Some(TargetUnion::CreateRevision(operand)) => operand,
                _ => 0,
            };
            version
                .map_or(0, |version| version.create_revision)
                .cmp(&operand)
        }
        Ok(CompareTarget::Mod) => {
            let operand = match compare.target_union {
                Some(TargetUnion::ModRevision(operand)) => operand,
                _ => 0,
            };
            version
                .map_or(0, |version| version.revision.main)
                .cmp(&operand)
        }
        Ok(CompareTarget::Version) => {
            let operand = match compare.target_union {
                Some(TargetUnion::Version(operand)) => operand,
                _ => 0,
            };
            version.map_or(0, |version| version.version).cmp(&operand)
        }
        Ok(CompareTarget::Lease) => {
            let operand = match compare.target_union {
                Some(TargetUnion::Lease(operand)) => operand,
                _ => 0,
            };
            version.map_or(0, |version| version.lease).cmp(&operand)
        }
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(compare.result) {
        Ok(CompareResult::Equal) => ordering == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ordering != Ordering::Equal,
        Ok(CompareResult::Greater) => ordering == Ordering::Greater,
        Ok(CompareResult::Less) => ordering == Ordering::Less,
        Err(_) => true,
    }
}
