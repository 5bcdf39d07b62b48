//! Thin builders for transactions: etcd's `Compare` and `RequestOp` from
//! `keel_types`, so that `Client::txn` reads like the guard it is.
//!
//! ```
//! use keel_client::txn::{self, CompareResult};
//! use keel_types::etcdserverpb::TxnRequest;
//!
//! // Create "lock" only if it does not exist yet.
//! let request = TxnRequest {
//!     compare: vec![txn::compare_create_revision("lock", CompareResult::Equal, 0)],
//!     success: vec![txn::put("lock", "me")],
//!     failure: vec![txn::get("lock")],
//! };
//! assert_eq!(request.success.len(), 1);
//! ```

use keel_types::etcdserverpb::compare::{CompareTarget, TargetUnion};
use keel_types::etcdserverpb::request_op::Request;
use keel_types::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

pub use keel_types::etcdserverpb::compare::CompareResult;

use crate::prefix_end;

fn compare(
    key: impl Into<Vec<u8>>,
    result: CompareResult,
    target: CompareTarget,
    operand: TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: Vec::new(),
        target_union: Some(operand),
    }
}

/// Compares the key's value.
pub fn compare_value(
    key: impl Into<Vec<u8>>,
    result: CompareResult,
    value: impl Into<Vec<u8>>,
) -> Compare {
    compare(
        key,
        result,
        CompareTarget::Value,
        TargetUnion::Value(value.into()),
    )
}

/// Compares the key's version (0: the key does not exist).
pub fn compare_version(key: impl Into<Vec<u8>>, result: CompareResult, version: i64) -> Compare {
    compare(
        key,
        result,
        CompareTarget::Version,
        TargetUnion::Version(version),
    )
}

/// Compares the key's create revision (0: the key does not exist). A leader
/// election's fencing token is its key's create revision: guard every write
/// with `compare_create_revision(leader_key, Equal, token)`.
pub fn compare_create_revision(
    key: impl Into<Vec<u8>>,
    result: CompareResult,
    revision: i64,
) -> Compare {
    compare(
        key,
        result,
        CompareTarget::Create,
        TargetUnion::CreateRevision(revision),
    )
}

/// Compares the key's last modification revision.
pub fn compare_mod_revision(
    key: impl Into<Vec<u8>>,
    result: CompareResult,
    revision: i64,
) -> Compare {
    compare(
        key,
        result,
        CompareTarget::Mod,
        TargetUnion::ModRevision(revision),
    )
}

/// Compares the lease the key is attached to (0: none).
pub fn compare_lease(key: impl Into<Vec<u8>>, result: CompareResult, lease: i64) -> Compare {
    compare(key, result, CompareTarget::Lease, TargetUnion::Lease(lease))
}

/// Reads `key`.
pub fn get(key: impl Into<Vec<u8>>) -> RequestOp {
    range(RangeRequest {
        key: key.into(),
        ..RangeRequest::default()
    })
}

/// Reads every key starting with `prefix`.
pub fn get_prefix(prefix: impl Into<Vec<u8>>) -> RequestOp {
    let key = prefix.into();
    let range_end = prefix_end(&key);
    range(RangeRequest {
        key,
        range_end,
        ..RangeRequest::default()
    })
}

/// A Range as given.
pub fn range(request: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(request)),
    }
}

/// Writes `value` at `key`.
pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> RequestOp {
    put_request(PutRequest {
        key: key.into(),
        value: value.into(),
        ..PutRequest::default()
    })
}

/// Writes `value` at `key` attached to `lease`.
pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> RequestOp {
    put_request(PutRequest {
        key: key.into(),
        value: value.into(),
        lease,
        ..PutRequest::default()
    })
}

/// A Put as given.
pub fn put_request(request: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(request)),
    }
}

/// Deletes `key`.
pub fn delete(key: impl Into<Vec<u8>>) -> RequestOp {
    delete_range(DeleteRangeRequest {
        key: key.into(),
        ..DeleteRangeRequest::default()
    })
}

/// Deletes every key starting with `prefix`.
pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> RequestOp {
    let key = prefix.into();
    let range_end = prefix_end(&key);
    delete_range(DeleteRangeRequest {
        key,
        range_end,
        ..DeleteRangeRequest::default()
    })
}

/// A DeleteRange as given.
pub fn delete_range(request: DeleteRangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(request)),
    }
}

/// A nested transaction.
pub fn nested(request: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(request)),
    }
}
