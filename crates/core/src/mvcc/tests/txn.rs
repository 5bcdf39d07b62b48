//! Transactions: compares, branches, nested txns, reads of a txn's own writes, the
//! revisions in their responses, and what makes a txn fail as a whole.

use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::{response_op, ResponseHeader, ResponseOp, TxnResponse};

use super::*;
use crate::mvcc::KeySpaceError;

/// A store with "a" = "m" (create 2, mod 3, version 2, lease 7) and "b" = "x" (create 4,
/// mod 4, version 1, no lease), at revision 4.
fn store() -> KeySpace {
    let mut key_space = KeySpace::new();
    key_space
        .put(&PutRequest {
            lease: 7,
            ..put_request("a", "k")
        })
        .unwrap(); // 2
    key_space
        .put(&PutRequest {
            lease: 7,
            ..put_request("a", "m")
        })
        .unwrap(); // 3
    put(&mut key_space, "b", "x"); // 4
    key_space
}

/// Whether a txn with one compare takes its success branch.
fn holds(key_space: &mut KeySpace, compare: Compare) -> bool {
    let request = TxnRequest {
        compare: vec![compare],
        ..TxnRequest::default()
    };
    let response = key_space.txn(&request).unwrap();
    key_space.check_invariants();
    response.succeeded
}

fn put_response(response: &ResponseOp) -> &PutResponse {
    match &response.response {
        Some(response_op::Response::ResponsePut(put)) => put,
        other => panic!("expected a put response, got {other:?}"),
    }
}

fn range_response(response: &ResponseOp) -> &RangeResponse {
    match &response.response {
        Some(response_op::Response::ResponseRange(range)) => range,
        other => panic!("expected a range response, got {other:?}"),
    }
}

fn delete_response(response: &ResponseOp) -> &DeleteRangeResponse {
    match &response.response {
        Some(response_op::Response::ResponseDeleteRange(delete)) => delete,
        other => panic!("expected a delete response, got {other:?}"),
    }
}

fn txn_response(response: &ResponseOp) -> &TxnResponse {
    match &response.response {
        Some(response_op::Response::ResponseTxn(txn)) => txn,
        other => panic!("expected a txn response, got {other:?}"),
    }
}

#[test]
fn compare_each_target_with_each_result() {
    use CompareResult::{Equal, Greater, Less, NotEqual};
    use CompareTarget::{Create, Lease, Mod, Value, Version};
    let value = |bytes: &str| TargetUnion::Value(bytes.as_bytes().to_vec());
    let cases = [
        (Value, Equal, value("m"), true),
        (Value, Equal, value("n"), false),
        (Value, NotEqual, value("n"), true),
        (Value, NotEqual, value("m"), false),
        (Value, Greater, value("l"), true),
        (Value, Greater, value("m"), false),
        (Value, Less, value("mm"), true),
        (Value, Less, value("m"), false),
        (Version, Equal, TargetUnion::Version(2), true),
        (Version, Greater, TargetUnion::Version(1), true),
        (Version, Less, TargetUnion::Version(2), false),
        (Version, NotEqual, TargetUnion::Version(3), true),
        (Create, Equal, TargetUnion::CreateRevision(2), true),
        (Create, Less, TargetUnion::CreateRevision(3), true),
        (Create, Greater, TargetUnion::CreateRevision(2), false),
        (Create, NotEqual, TargetUnion::CreateRevision(2), false),
        (Mod, Equal, TargetUnion::ModRevision(3), true),
        (Mod, Greater, TargetUnion::ModRevision(2), true),
        (Mod, Less, TargetUnion::ModRevision(3), false),
        (Mod, NotEqual, TargetUnion::ModRevision(4), true),
        (Lease, Equal, TargetUnion::Lease(7), true),
        (Lease, Greater, TargetUnion::Lease(6), true),
        (Lease, Less, TargetUnion::Lease(8), true),
        (Lease, NotEqual, TargetUnion::Lease(7), false),
    ];
    let mut key_space = store();
    for (target, result, operand, expected) in cases {
        let description = format!("{target:?} {result:?} {operand:?}");
        assert_eq!(
            holds(&mut key_space, compare("a", target, result, operand)),
            expected,
            "{description}"
        );
    }
    // Compares alone never write.
    assert_eq!(key_space.current_revision(), 4);
}

#[test]
fn a_missing_key_compares_as_zero_and_never_matches_a_value() {
    use CompareResult::{Equal, Greater, Less, NotEqual};
    use CompareTarget::{Create, Lease, Mod, Value, Version};
    let cases = [
        (Version, Equal, TargetUnion::Version(0), true),
        (Version, Greater, TargetUnion::Version(-1), true),
        (Version, Less, TargetUnion::Version(1), true),
        (Create, Equal, TargetUnion::CreateRevision(0), true),
        (Mod, Equal, TargetUnion::ModRevision(0), true),
        (Mod, NotEqual, TargetUnion::ModRevision(0), false),
        (Lease, Equal, TargetUnion::Lease(0), true),
        // A value compare on a missing key fails whatever the operand and result.
        (Value, Equal, TargetUnion::Value(vec![]), false),
        (Value, NotEqual, TargetUnion::Value(b"x".to_vec()), false),
        (Value, Less, TargetUnion::Value(b"x".to_vec()), false),
    ];
    let mut key_space = store();
    delete(&mut key_space, "b", ""); // 5: a deleted key is missing too
    for key in ["missing", "b"] {
        for (target, result, operand, expected) in cases.clone() {
            let description = format!("{key} {target:?} {result:?} {operand:?}");
            assert_eq!(
                holds(&mut key_space, compare(key, target, result, operand)),
                expected,
                "{description}"
            );
        }
    }
}

#[test]
fn an_operand_of_the_wrong_kind_counts_as_zero() {
    let mut key_space = store();
    // Target VERSION with a mod_revision operand: compares version 2 with 0.
    let mismatched = compare(
        "a",
        CompareTarget::Version,
        CompareResult::Greater,
        TargetUnion::ModRevision(100),
    );
    assert!(holds(&mut key_space, mismatched));
    // Target VALUE with no operand compares against the empty value.
    let no_operand = Compare {
        target_union: None,
        ..compare(
            "a",
            CompareTarget::Value,
            CompareResult::Greater,
            TargetUnion::Value(vec![]),
        )
    };
    assert!(holds(&mut key_space, no_operand));
}

#[test]
fn a_range_compare_needs_every_key_to_match() {
    let mut key_space = store();
    put(&mut key_space, "c", "x"); // 5
    let ranged = |key: &str, range_end: &str, target, result, operand| Compare {
        range_end: range_end.as_bytes().to_vec(),
        ..compare(key, target, result, operand)
    };
    // Every key in [a, d) has version > 0.
    assert!(holds(
        &mut key_space,
        ranged(
            "a",
            "d",
            CompareTarget::Version,
            CompareResult::Greater,
            TargetUnion::Version(0)
        )
    ));
    // Only b and c have value "x".
    let value_x = || TargetUnion::Value(b"x".to_vec());
    assert!(!holds(
        &mut key_space,
        ranged(
            "a",
            "d",
            CompareTarget::Value,
            CompareResult::Equal,
            value_x()
        )
    ));
    assert!(holds(
        &mut key_space,
        ranged(
            "b",
            "\0",
            CompareTarget::Value,
            CompareResult::Equal,
            value_x()
        )
    ));
    // An empty range compares like a missing key.
    assert!(holds(
        &mut key_space,
        ranged(
            "x",
            "z",
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(0)
        )
    ));
    assert!(!holds(
        &mut key_space,
        ranged(
            "x",
            "z",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(vec![])
        )
    ));
    // All compares must hold.
    let request = TxnRequest {
        compare: vec![
            compare(
                "a",
                CompareTarget::Version,
                CompareResult::Equal,
                TargetUnion::Version(2),
            ),
            compare(
                "b",
                CompareTarget::Version,
                CompareResult::Equal,
                TargetUnion::Version(9),
            ),
        ],
        ..TxnRequest::default()
    };
    assert!(!key_space.txn(&request).unwrap().succeeded);
    // No compare at all holds.
    assert!(key_space.txn(&TxnRequest::default()).unwrap().succeeded);
}

#[test]
fn the_success_branch_writes_at_one_revision() {
    let mut key_space = store();
    let request = TxnRequest {
        compare: vec![compare(
            "a",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(b"m".to_vec()),
        )],
        success: vec![put_op("a", "n"), put_op("c", "1"), delete_op("b", "")],
        failure: vec![put_op("never", "1")],
    };
    let response = key_space.txn(&request).unwrap(); // 5
    key_space.check_invariants();
    assert!(response.succeeded);
    assert_eq!(revision_of(&response.header), 5);
    assert_eq!(response.responses.len(), 3);
    assert_eq!(revision_of(&put_response(&response.responses[0]).header), 5);
    assert_eq!(revision_of(&put_response(&response.responses[1]).header), 5);
    let deleted = delete_response(&response.responses[2]);
    assert_eq!(deleted.deleted, 1);
    assert_eq!(revision_of(&deleted.header), 5);

    assert_eq!(key_space.current_revision(), 5);
    assert_eq!(
        all_at(&key_space, 0).unwrap(),
        vec![kv("a", "n", 2, 5, 3), kv("c", "1", 5, 5, 1)]
    );
    // The three changes have sub-revisions 0, 1, 2 in operation order.
    let events = key_space.events(5, 100).unwrap().events;
    let keys: Vec<&[u8]> = events
        .iter()
        .map(|event| event.kv.as_ref().unwrap().key.as_slice())
        .collect();
    assert_eq!(keys, [&b"a"[..], b"c", b"b"]);
}

#[test]
fn the_failure_branch_runs_when_a_compare_fails() {
    let mut key_space = store();
    let request = TxnRequest {
        compare: vec![compare(
            "a",
            CompareTarget::Version,
            CompareResult::Equal,
            TargetUnion::Version(1),
        )],
        success: vec![put_op("never", "1")],
        failure: vec![put_op("b", "y"), range_op("b", "")],
    };
    let response = key_space.txn(&request).unwrap(); // 5
    assert!(!response.succeeded);
    assert_eq!(revision_of(&response.header), 5);
    assert_eq!(response.responses.len(), 2);
    assert_eq!(
        range_response(&response.responses[1]).kvs,
        vec![kv("b", "y", 4, 5, 2)]
    );
    assert_eq!(get(&key_space, "never"), None);
}

#[test]
fn a_read_only_txn_does_not_advance_the_revision() {
    let mut key_space = store();
    let request = TxnRequest {
        success: vec![range_op("a", "c"), range_op("b", "")],
        ..TxnRequest::default()
    };
    let response = key_space.txn(&request).unwrap();
    assert!(response.succeeded);
    assert_eq!(revision_of(&response.header), 4);
    assert_eq!(key_space.current_revision(), 4);
    assert_eq!(range_response(&response.responses[0]).count, 2);
    assert_eq!(
        revision_of(&range_response(&response.responses[0]).header),
        4
    );
    // read_only_txn answers it identically without a mutable borrow.
    assert_eq!(key_space.read_only_txn(&request), Ok(response));
}

#[test]
fn read_only_txn_refuses_txns_that_may_write() {
    let key_space = store();
    for operation in [
        put_op("a", "1"),
        delete_op("a", ""),
        txn_op(TxnRequest::default()),
    ] {
        // A write in either branch makes the txn a write, whichever branch would run.
        let request = TxnRequest {
            success: vec![range_op("a", "")],
            failure: vec![operation],
            ..TxnRequest::default()
        };
        let error = key_space.read_only_txn(&request).unwrap_err();
        assert_eq!(error, KeySpaceError::NotReadOnly);
    }
}

#[test]
fn a_txn_whose_writes_change_nothing_keeps_the_revision() {
    let mut key_space = store();
    let request = TxnRequest {
        success: vec![delete_op("missing", ""), range_op("a", "")],
        ..TxnRequest::default()
    };
    let response = key_space.txn(&request).unwrap();
    assert_eq!(revision_of(&response.header), 4);
    assert_eq!(delete_response(&response.responses[0]).deleted, 0);
    assert_eq!(
        revision_of(&delete_response(&response.responses[0]).header),
        4
    );
    assert_eq!(key_space.current_revision(), 4);
}

#[test]
fn reads_in_a_txn_see_its_earlier_writes() {
    let mut key_space = store();
    let request = TxnRequest {
        success: vec![
            range_op("a", ""),
            put_op("a", "new"),
            range_op("a", ""),
            delete_op("b", ""),
            range_op("a", "z"),
            put_op("c", "1"),
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    prev_kv: true,
                    ..put_request("d", "1")
                })),
            },
            range_op("c", "e"),
        ],
        ..TxnRequest::default()
    };
    let response = key_space.txn(&request).unwrap(); // 5
    key_space.check_invariants();
    let responses = &response.responses;
    // Before any write, a read reports the revision the txn began at.
    let before = range_response(&responses[0]);
    assert_eq!(
        before.kvs,
        vec![KeyValue {
            lease: 7,
            ..kv("a", "m", 2, 3, 2)
        }]
    );
    assert_eq!(revision_of(&before.header), 4);
    // After a write, reads see it and report the txn's revision.
    let after_put = range_response(&responses[2]);
    assert_eq!(after_put.kvs, vec![kv("a", "new", 2, 5, 3)]);
    assert_eq!(revision_of(&after_put.header), 5);
    let after_delete = range_response(&responses[4]);
    assert_eq!(keys_of(&after_delete.kvs), ["a"]);
    assert_eq!(after_delete.count, 1);
    assert_eq!(put_response(&responses[6]).prev_kv, None);
    assert_eq!(
        range_response(&responses[7]).kvs,
        vec![kv("c", "1", 5, 5, 1), kv("d", "1", 5, 5, 1)]
    );
    // Reads inside the txn can also look at the past.
    let mut historical = range_request("a", "");
    historical.revision = 2;
    let request = TxnRequest {
        success: vec![
            put_op("a", "newer"),
            RequestOp {
                request: Some(request_op::Request::RequestRange(historical)),
            },
        ],
        ..TxnRequest::default()
    };
    let response = key_space.txn(&request).unwrap(); // 6
    let past = range_response(&response.responses[1]);
    assert_eq!(
        past.kvs,
        vec![KeyValue {
            lease: 7,
            ..kv("a", "k", 2, 2, 1)
        }]
    );
    assert_eq!(revision_of(&past.header), 6);
}

#[test]
fn nested_txns_choose_their_branch_against_the_store_before_the_txn() {
    let mut key_space = store();
    let a_is = |value: &str| {
        compare(
            "a",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(value.as_bytes().to_vec()),
        )
    };
    let request = TxnRequest {
        compare: vec![a_is("m")],
        success: vec![
            put_op("a", "changed"),
            // Evaluated before the put above: a is still "m", so success runs.
            txn_op(TxnRequest {
                compare: vec![a_is("m")],
                success: vec![put_op("inner", "saw-old"), range_op("a", "")],
                failure: vec![put_op("inner", "saw-new")],
            }),
            // And this one fails for the same reason.
            txn_op(TxnRequest {
                compare: vec![a_is("changed")],
                success: vec![put_op("second", "saw-new")],
                failure: vec![
                    put_op("second", "saw-old"),
                    txn_op(TxnRequest {
                        success: vec![put_op("deepest", "1")],
                        ..TxnRequest::default()
                    }),
                ],
            }),
        ],
        failure: vec![],
    };
    let response = key_space.txn(&request).unwrap(); // 5
    key_space.check_invariants();
    assert!(response.succeeded);
    assert_eq!(revision_of(&response.header), 5);
    assert_eq!(
        get(&key_space, "inner"),
        Some(kv("inner", "saw-old", 5, 5, 1))
    );
    assert_eq!(
        get(&key_space, "second"),
        Some(kv("second", "saw-old", 5, 5, 1))
    );
    assert_eq!(
        get(&key_space, "deepest"),
        Some(kv("deepest", "1", 5, 5, 1))
    );

    let first_nested = txn_response(&response.responses[1]);
    assert!(first_nested.succeeded);
    // Nested txn responses carry an empty header, as etcd's do.
    assert_eq!(first_nested.header, Some(ResponseHeader::default()));
    // The read inside the nested txn sees the outer put.
    assert_eq!(
        range_response(&first_nested.responses[1]).kvs,
        vec![kv("a", "changed", 2, 5, 3)]
    );
    let second_nested = txn_response(&response.responses[2]);
    assert!(!second_nested.succeeded);
    assert_eq!(second_nested.responses.len(), 2);
    assert!(txn_response(&second_nested.responses[1]).succeeded);
    // Every write of the txn tree shares revision 5.
    assert_eq!(key_space.events(5, 100).unwrap().events.len(), 4);
    assert_eq!(key_space.current_revision(), 5);
}

#[test]
fn a_failing_put_check_rejects_the_whole_txn() {
    let mut key_space = store();
    let before = key_space.clone();
    let request = TxnRequest {
        success: vec![
            put_op("new", "1"),
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    ignore_value: true,
                    ..put_request("missing", "")
                })),
            },
        ],
        ..TxnRequest::default()
    };
    assert_eq!(key_space.txn(&request), Err(KeySpaceError::KeyNotFound));
    assert_eq!(key_space, before);

    // The check follows the path: the same put in the branch not taken is fine.
    let request = TxnRequest {
        success: vec![put_op("new", "1")],
        failure: request.success.clone(),
        ..TxnRequest::default()
    };
    assert!(key_space.txn(&request).unwrap().succeeded);
}

#[test]
fn a_lease_the_caller_does_not_know_rejects_the_whole_txn() {
    let mut key_space = store();
    let before = key_space.clone();
    let with_lease = |lease| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            lease,
            ..put_request("k", "v")
        })),
    };
    let granted = |lease: i64| lease == 7;
    let request = TxnRequest {
        success: vec![put_op("other", "1"), with_lease(9)],
        failure: vec![with_lease(9)],
        ..TxnRequest::default()
    };
    let error = key_space
        .txn_with_lease_check(&request, granted)
        .unwrap_err();
    assert_eq!(error, KeySpaceError::LeaseNotFound);
    assert_eq!(error.to_string(), "etcdserver: requested lease not found");
    assert_eq!(key_space, before);

    // Only the path is checked: an unknown lease in the failure branch is fine.
    let request = TxnRequest {
        success: vec![with_lease(7)],
        failure: vec![with_lease(9)],
        ..TxnRequest::default()
    };
    let response = key_space.txn_with_lease_check(&request, granted).unwrap();
    assert!(response.succeeded);
    assert_eq!(get(&key_space, "k").unwrap().lease, 7);
}

#[test]
fn ranges_in_a_txn_are_checked_against_the_revision_before_it() {
    let mut key_space = store();
    let before = key_space.clone();
    let at = |revision| {
        let mut request = range_request("a", "");
        request.revision = revision;
        RequestOp {
            request: Some(request_op::Request::RequestRange(request)),
        }
    };
    // Revision 5 is the txn's own revision, but it is in the future when checked.
    let request = TxnRequest {
        success: vec![put_op("a", "1"), at(5)],
        ..TxnRequest::default()
    };
    assert_eq!(key_space.txn(&request), Err(KeySpaceError::FutureRevision));
    // etcd's check puts a negative revision below the compact revision (-1 here).
    let request = TxnRequest {
        success: vec![at(-2)],
        ..TxnRequest::default()
    };
    assert_eq!(key_space.txn(&request), Err(KeySpaceError::Compacted));
    assert_eq!(
        key_space.read_only_txn(&request),
        Err(KeySpaceError::Compacted)
    );
    assert_eq!(key_space, before);
    // -1 is not below -1, so it reads the present, like a plain range.
    let request = TxnRequest {
        success: vec![at(-1)],
        ..TxnRequest::default()
    };
    let response = key_space.txn(&request).unwrap();
    assert_eq!(range_response(&response.responses[0]).kvs.len(), 1);

    key_space.compact(&compaction_request(3)).unwrap();
    let request = TxnRequest {
        success: vec![put_op("z", "1"), at(2)],
        ..TxnRequest::default()
    };
    let error = key_space.txn(&request).unwrap_err();
    assert_eq!(
        error.to_string(),
        "mvcc: required revision has been compacted"
    );
    assert_eq!(key_space.current_revision(), 4);
}

#[test]
fn a_txn_that_fails_validation_changes_nothing() {
    let mut key_space = store();
    let before = key_space.clone();
    let invalid = [
        (
            TxnRequest {
                success: vec![put_op("x", "1"), put_op("x", "2")],
                ..TxnRequest::default()
            },
            KeySpaceError::DuplicateKey,
        ),
        (
            TxnRequest {
                success: vec![put_op("x", "1"), put_op("", "2")],
                ..TxnRequest::default()
            },
            KeySpaceError::EmptyKey,
        ),
        (
            TxnRequest {
                success: vec![put_op("x", "1"), RequestOp { request: None }],
                ..TxnRequest::default()
            },
            KeySpaceError::KeyNotFound,
        ),
    ];
    for (request, error) in invalid {
        assert_eq!(key_space.txn(&request), Err(error));
        assert_eq!(key_space, before);
    }
}
