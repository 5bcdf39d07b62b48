//! Stateless txn validation: the operation-count limit, empty keys and etcd's rules for
//! keys written twice.

use super::*;
use crate::mvcc::{
    is_txn_read_only, validate_delete_range, validate_put, validate_range, validate_txn,
    KeySpaceError, TXN_OPERATIONS_MAX_DEFAULT,
};

fn branch(operations: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        success: operations,
        ..TxnRequest::default()
    }
}

fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    txn_op(TxnRequest {
        success,
        failure,
        ..TxnRequest::default()
    })
}

fn check(request: &TxnRequest) -> Result<(), KeySpaceError> {
    validate_txn(request, TXN_OPERATIONS_MAX_DEFAULT)
}

#[test]
fn the_default_limit_is_etcds() {
    assert_eq!(TXN_OPERATIONS_MAX_DEFAULT, 128);
}

#[test]
fn too_many_operations() {
    let puts = |count: usize| -> Vec<RequestOp> {
        (0..count)
            .map(|index| put_op(&format!("k{index}"), "v"))
            .collect()
    };
    assert_eq!(check(&branch(puts(128))), Ok(()));
    let error = check(&branch(puts(129))).unwrap_err();
    assert_eq!(error, KeySpaceError::TooManyOperations);
    assert_eq!(
        error.to_string(),
        "etcdserver: too many operations in txn request"
    );
    // The limit applies to compares, success and failure separately, not to their sum.
    let key_compare = |index: usize| {
        compare(
            &format!("k{index}"),
            compare::CompareTarget::Version,
            compare::CompareResult::Equal,
            compare::TargetUnion::Version(0),
        )
    };
    let full = TxnRequest {
        compare: (0..128).map(key_compare).collect(),
        success: puts(128),
        failure: puts(128),
    };
    assert_eq!(check(&full), Ok(()));
    let too_many_compares = TxnRequest {
        compare: (0..129).map(key_compare).collect(),
        ..TxnRequest::default()
    };
    assert_eq!(
        check(&too_many_compares),
        Err(KeySpaceError::TooManyOperations)
    );
    assert_eq!(
        validate_txn(&branch(puts(3)), 2),
        Err(KeySpaceError::TooManyOperations)
    );

    // A nested txn gets what its parent leaves: 128 minus the parent's largest count.
    let nested_puts = |count: usize| -> Vec<RequestOp> {
        (0..count)
            .map(|index| put_op(&format!("n{index}"), "v"))
            .collect()
    };
    let mut parent = puts(126);
    parent.push(nested(nested_puts(1), vec![]));
    assert_eq!(check(&branch(parent)), Ok(()));
    let mut parent = puts(126);
    parent.push(nested(nested_puts(2), vec![]));
    assert_eq!(
        check(&branch(parent)),
        Err(KeySpaceError::TooManyOperations)
    );
    let mut parent = puts(127);
    parent.push(nested(vec![], vec![]));
    assert_eq!(check(&branch(parent)), Ok(()));

    // The key space itself does not apply the limit: it is the server's configuration.
    let mut key_space = KeySpace::new();
    assert!(key_space.txn(&branch(puts(200))).unwrap().succeeded);
    assert_eq!(key_space.key_count(), 200);
    assert_eq!(key_space.current_revision(), 2);
}

#[test]
fn empty_keys_and_empty_operations() {
    let empty_compare_key = TxnRequest {
        compare: vec![compare(
            "",
            compare::CompareTarget::Version,
            compare::CompareResult::Equal,
            compare::TargetUnion::Version(0),
        )],
        ..TxnRequest::default()
    };
    assert_eq!(check(&empty_compare_key), Err(KeySpaceError::EmptyKey));
    assert_eq!(
        check(&branch(vec![range_op("", "")])),
        Err(KeySpaceError::EmptyKey)
    );
    assert_eq!(
        check(&branch(vec![delete_op("", "z")])),
        Err(KeySpaceError::EmptyKey)
    );
    let in_failure = TxnRequest {
        failure: vec![put_op("", "v")],
        ..TxnRequest::default()
    };
    assert_eq!(check(&in_failure), Err(KeySpaceError::EmptyKey));
    assert_eq!(
        check(&branch(vec![nested(vec![put_op("", "v")], vec![])])),
        Err(KeySpaceError::EmptyKey)
    );
    assert_eq!(
        check(&branch(vec![RequestOp { request: None }])),
        Err(KeySpaceError::KeyNotFound)
    );
    let bad_sort = RangeRequest {
        sort_order: 9,
        ..range_request("a", "")
    };
    let bad_sort_op = RequestOp {
        request: Some(request_op::Request::RequestRange(bad_sort)),
    };
    assert_eq!(
        check(&branch(vec![bad_sort_op])),
        Err(KeySpaceError::InvalidSortOption)
    );
}

#[test]
fn duplicate_keys_follow_etcds_check_intervals() {
    let duplicate = Err(KeySpaceError::DuplicateKey);
    let cases: Vec<(&str, Vec<RequestOp>, Result<(), KeySpaceError>)> = vec![
        (
            "two puts of a key",
            vec![put_op("a", "1"), put_op("a", "2")],
            duplicate.clone(),
        ),
        (
            "put then delete",
            vec![put_op("a", "1"), delete_op("a", "")],
            duplicate.clone(),
        ),
        (
            "delete then put",
            vec![delete_op("a", ""), put_op("a", "1")],
            duplicate.clone(),
        ),
        (
            "put inside a deleted range",
            vec![delete_op("a", "c"), put_op("b", "1")],
            duplicate.clone(),
        ),
        (
            "put at a range's exclusive end",
            vec![delete_op("a", "c"), put_op("c", "1")],
            Ok(()),
        ),
        (
            "different keys",
            vec![put_op("a", "1"), put_op("b", "1"), delete_op("c", "")],
            Ok(()),
        ),
        (
            "overlapping deletes",
            vec![delete_op("a", "c"), delete_op("b", "d"), delete_op("b", "")],
            Ok(()),
        ),
        (
            "reads of written keys",
            vec![put_op("a", "1"), range_op("a", ""), range_op("\0", "\0")],
            Ok(()),
        ),
        // etcd takes "\0" literally here, so a from-key delete conflicts with no put.
        (
            "from-key delete and a put",
            vec![delete_op("a", "\0"), put_op("b", "1")],
            Ok(()),
        ),
        (
            "inverted range and a put",
            vec![delete_op("c", "a"), put_op("b", "1")],
            Ok(()),
        ),
        (
            "the same key in both branches of a nested txn",
            vec![nested(vec![put_op("a", "1")], vec![put_op("a", "2")])],
            Ok(()),
        ),
        (
            "a nested put of a key the parent puts",
            vec![put_op("a", "1"), nested(vec![put_op("a", "2")], vec![])],
            duplicate.clone(),
        ),
        (
            "a nested failure-branch put of a key the parent puts",
            vec![nested(vec![], vec![put_op("a", "2")]), put_op("a", "1")],
            duplicate.clone(),
        ),
        (
            "a nested put of a key the parent deletes",
            vec![delete_op("a", "b"), nested(vec![put_op("a", "2")], vec![])],
            duplicate.clone(),
        ),
        (
            "a put of a key a nested txn deletes",
            vec![nested(vec![], vec![delete_op("a", "")]), put_op("a", "1")],
            duplicate.clone(),
        ),
        (
            "two nested txns putting one key",
            vec![
                nested(vec![put_op("a", "1")], vec![]),
                nested(vec![], vec![put_op("a", "2")]),
            ],
            duplicate.clone(),
        ),
        (
            "a nested delete before a nested put",
            vec![
                nested(vec![delete_op("a", "")], vec![]),
                nested(vec![put_op("a", "2")], vec![]),
            ],
            duplicate.clone(),
        ),
        // etcd checks a nested txn's puts only against deletes collected before it.
        (
            "a nested put before a nested delete",
            vec![
                nested(vec![put_op("a", "2")], vec![]),
                nested(vec![delete_op("a", "")], vec![]),
            ],
            Ok(()),
        ),
        (
            "a duplicate deep inside",
            vec![nested(
                vec![nested(vec![put_op("a", "1"), put_op("a", "2")], vec![])],
                vec![],
            )],
            duplicate.clone(),
        ),
    ];
    for (description, operations, expected) in cases {
        assert_eq!(check(&branch(operations)), expected, "{description}");
    }
    // Success and failure are checked separately: a key may appear in both.
    let both_branches = TxnRequest {
        success: vec![put_op("a", "1")],
        failure: vec![put_op("a", "2"), delete_op("b", "")],
        ..TxnRequest::default()
    };
    assert_eq!(check(&both_branches), Ok(()));
    let error = check(&branch(vec![put_op("a", "1"), put_op("a", "2")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "etcdserver: duplicate key given in txn request"
    );
}

#[test]
fn txns_etcd_accepts_with_a_key_written_twice_apply_in_order() {
    // A put in one nested txn and a delete of the same key in a later one pass etcd's
    // check; both changes land at one revision, in order.
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "0"); // 2
    let request = branch(vec![
        nested(vec![put_op("a", "1")], vec![]),
        nested(vec![delete_op("a", "")], vec![]),
    ]);
    key_space.txn(&request).unwrap(); // 3
    key_space.check_invariants();
    assert_eq!(get(&key_space, "a"), None);
    assert_eq!(all_at(&key_space, 2).unwrap(), vec![kv("a", "0", 2, 2, 1)]);
    assert_eq!(key_space.current_revision(), 3);

    // A from-key delete followed by a put re-creates the key at the same revision.
    put(&mut key_space, "b", "0"); // 4
    let request = branch(vec![delete_op("a", "\0"), put_op("b", "1")]);
    key_space.txn(&request).unwrap(); // 5
    key_space.check_invariants();
    assert_eq!(get(&key_space, "b"), Some(kv("b", "1", 5, 5, 1)));
}

#[test]
fn single_request_validation() {
    assert_eq!(validate_range(&range_request("a", "")), Ok(()));
    assert_eq!(
        validate_range(&range_request("", "")),
        Err(KeySpaceError::EmptyKey)
    );
    assert_eq!(validate_put(&put_request("a", "")), Ok(()));
    assert_eq!(
        validate_put(&put_request("", "v")),
        Err(KeySpaceError::EmptyKey)
    );
    assert_eq!(validate_delete_range(&delete_request("a", "\0")), Ok(()));
    assert_eq!(
        validate_delete_range(&delete_request("", "")),
        Err(KeySpaceError::EmptyKey)
    );
}

#[test]
fn read_only_txns_hold_only_ranges() {
    assert!(is_txn_read_only(&TxnRequest::default()));
    assert!(is_txn_read_only(&TxnRequest {
        success: vec![range_op("a", "")],
        failure: vec![range_op("b", "")],
        ..TxnRequest::default()
    }));
    assert!(!is_txn_read_only(&TxnRequest {
        failure: vec![put_op("b", "")],
        ..TxnRequest::default()
    }));
    assert!(!is_txn_read_only(&branch(vec![nested(
        vec![range_op("a", "")],
        vec![]
    )])));
}
