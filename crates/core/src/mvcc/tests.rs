//! Tests of the key space against etcd v3.5's semantics, one file per area, with the
//! request builders and assertions they share.
//!
//! Every expectation is a concrete value (revisions, versions, keys, error messages),
//! worked out from etcd's code, so a change in behaviour shows up as a precise diff.

mod compaction;
mod events;
mod hash_snapshot;
mod model;
mod put_delete;
mod range;
mod revisions;
mod txn;
mod validation;

use keel_types::etcdserverpb::{
    compare, request_op, CompactionRequest, Compare, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest,
};
use keel_types::mvccpb::KeyValue;

use super::KeySpace;

/// A key-value as etcd would return it.
fn kv(key: &str, value: &str, create_revision: i64, mod_revision: i64, version: i64) -> KeyValue {
    KeyValue {
        key: key.as_bytes().to_vec(),
        create_revision,
        mod_revision,
        version,
        value: value.as_bytes().to_vec(),
        lease: 0,
    }
}

fn put_request(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..PutRequest::default()
    }
}

fn range_request(key: &str, range_end: &str) -> RangeRequest {
    RangeRequest {
        key: key.as_bytes().to_vec(),
        range_end: range_end.as_bytes().to_vec(),
        ..RangeRequest::default()
    }
}

fn delete_request(key: &str, range_end: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: key.as_bytes().to_vec(),
        range_end: range_end.as_bytes().to_vec(),
        ..DeleteRangeRequest::default()
    }
}

fn compaction_request(revision: i64) -> CompactionRequest {
    CompactionRequest {
        revision,
        physical: false,
    }
}

/// Puts a key and checks the key space's invariants afterwards.
fn put(key_space: &mut KeySpace, key: &str, value: &str) -> PutResponse {
    let response = key_space
        .put(&put_request(key, value))
        .expect("put succeeds");
    key_space.check_invariants();
    response
}

/// Deletes a key range and checks the key space's invariants afterwards.
fn delete(key_space: &mut KeySpace, key: &str, range_end: &str) -> DeleteRangeResponse {
    let response = key_space
        .delete_range(&delete_request(key, range_end))
        .expect("delete succeeds");
    key_space.check_invariants();
    response
}

/// Reads a range at the current revision.
fn range(key_space: &KeySpace, request: &RangeRequest) -> RangeResponse {
    key_space.range(request).expect("range succeeds")
}

/// Reads one key at the current revision.
fn get(key_space: &KeySpace, key: &str) -> Option<KeyValue> {
    let mut response = range(key_space, &range_request(key, ""));
    assert!(response.kvs.len() <= 1);
    response.kvs.pop()
}

/// Reads every key at `revision` (0: current).
fn all_at(key_space: &KeySpace, revision: i64) -> Result<Vec<KeyValue>, super::KeySpaceError> {
    let request = RangeRequest {
        revision,
        ..range_request("\0", "\0")
    };
    key_space.range(&request).map(|response| response.kvs)
}

/// The revision in a response header.
fn revision_of(header: &Option<keel_types::etcdserverpb::ResponseHeader>) -> i64 {
    header.as_ref().expect("responses carry a header").revision
}

/// The keys of a list of key-values, as strings.
fn keys_of(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8(kv.key.clone()).expect("test keys are UTF-8"))
        .collect()
}

fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put_request(key, value))),
    }
}

fn range_op(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(range_request(
            key, range_end,
        ))),
    }
}

fn delete_op(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(delete_request(
            key, range_end,
        ))),
    }
}

fn txn_op(request: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestTxn(request)),
    }
}

/// A compare of `key`'s `target` against `operand` with `result`.
fn compare(
    key: &str,
    target: compare::CompareTarget,
    result: compare::CompareResult,
    operand: compare::TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(operand),
        range_end: Vec::new(),
    }
}
