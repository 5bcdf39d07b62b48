//! Put's prev_kv, ignore_value and ignore_lease; delete's prev_kv; and the lease
//! revocation delete.

use super::*;
use crate::mvcc::KeySpaceError;

fn with_lease(key: &str, value: &str, lease: i64) -> PutRequest {
    PutRequest {
        lease,
        ..put_request(key, value)
    }
}

#[test]
fn put_returns_the_previous_key_value_when_asked() {
    let mut key_space = KeySpace::new();
    let request = PutRequest {
        prev_kv: true,
        ..put_request("a", "1")
    };
    let first = key_space.put(&request).unwrap();
    assert_eq!(first.prev_kv, None);
    let second = key_space
        .put(&PutRequest {
            prev_kv: true,
            ..put_request("a", "2")
        })
        .unwrap();
    assert_eq!(second.prev_kv, Some(kv("a", "1", 2, 2, 1)));
    // Without prev_kv, nothing is returned.
    assert_eq!(put(&mut key_space, "a", "3").prev_kv, None);
    // After a delete there is no previous key-value.
    delete(&mut key_space, "a", "");
    let recreated = key_space
        .put(&PutRequest {
            prev_kv: true,
            ..put_request("a", "4")
        })
        .unwrap();
    assert_eq!(recreated.prev_kv, None);
}

#[test]
fn ignore_value_keeps_the_value_and_takes_the_new_lease() {
    let mut key_space = KeySpace::new();
    key_space.put(&with_lease("a", "kept", 5)).unwrap(); // 2
    let request = PutRequest {
        ignore_value: true,
        lease: 6,
        prev_kv: true,
        ..put_request("a", "")
    };
    let response = key_space.put(&request).unwrap(); // 3
    key_space.check_invariants();
    assert_eq!(revision_of(&response.header), 3);
    assert_eq!(
        response.prev_kv,
        Some(KeyValue {
            lease: 5,
            ..kv("a", "kept", 2, 2, 1)
        })
    );
    assert_eq!(
        get(&key_space, "a"),
        Some(KeyValue {
            lease: 6,
            ..kv("a", "kept", 2, 3, 2)
        })
    );
}

#[test]
fn ignore_lease_keeps_the_lease_and_takes_the_new_value() {
    let mut key_space = KeySpace::new();
    key_space.put(&with_lease("a", "old", 5)).unwrap(); // 2
    let request = PutRequest {
        ignore_lease: true,
        ..put_request("a", "new")
    };
    key_space.put(&request).unwrap(); // 3
    assert_eq!(
        get(&key_space, "a"),
        Some(KeyValue {
            lease: 5,
            ..kv("a", "new", 2, 3, 2)
        })
    );
    let both = PutRequest {
        ignore_lease: true,
        ignore_value: true,
        ..put_request("a", "")
    };
    key_space.put(&both).unwrap(); // 4
    assert_eq!(
        get(&key_space, "a"),
        Some(KeyValue {
            lease: 5,
            ..kv("a", "new", 2, 4, 3)
        })
    );
}

#[test]
fn ignore_flags_need_an_existing_key() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "gone", "1"); // 2
    delete(&mut key_space, "gone", ""); // 3
    for key in ["missing", "gone"] {
        for (ignore_value, ignore_lease) in [(true, false), (false, true), (true, true)] {
            let request = PutRequest {
                ignore_value,
                ignore_lease,
                ..put_request(key, "")
            };
            let error = key_space.put(&request).unwrap_err();
            assert_eq!(error, KeySpaceError::KeyNotFound);
            assert_eq!(error.to_string(), "etcdserver: key not found");
        }
    }
    // The failed puts changed nothing.
    key_space.check_invariants();
    assert_eq!(key_space.current_revision(), 3);
    assert_eq!(key_space.version_count(), 2);
}

#[test]
fn put_validation_errors() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1");
    let empty_key = key_space.put(&put_request("", "v")).unwrap_err();
    assert_eq!(empty_key, KeySpaceError::EmptyKey);
    assert_eq!(empty_key.to_string(), "etcdserver: key is not provided");

    let value_and_ignore = PutRequest {
        ignore_value: true,
        ..put_request("a", "v")
    };
    let error = key_space.put(&value_and_ignore).unwrap_err();
    assert_eq!(error, KeySpaceError::ValueProvided);
    assert_eq!(error.to_string(), "etcdserver: value is provided");

    let lease_and_ignore = PutRequest {
        ignore_lease: true,
        ..with_lease("a", "v", 3)
    };
    let error = key_space.put(&lease_and_ignore).unwrap_err();
    assert_eq!(error, KeySpaceError::LeaseProvided);
    assert_eq!(error.to_string(), "etcdserver: lease is provided");
    assert_eq!(key_space.current_revision(), 2);
}

#[test]
fn delete_returns_the_deleted_key_values_when_asked() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    put(&mut key_space, "b", "2"); // 3
    put(&mut key_space, "b", "3"); // 4
    put(&mut key_space, "c", "4"); // 5
    let request = DeleteRangeRequest {
        prev_kv: true,
        ..delete_request("a", "c")
    };
    let response = key_space.delete_range(&request).unwrap(); // 6
    key_space.check_invariants();
    assert_eq!(response.deleted, 2);
    assert_eq!(revision_of(&response.header), 6);
    assert_eq!(
        response.prev_kvs,
        vec![kv("a", "1", 2, 2, 1), kv("b", "3", 3, 4, 2)]
    );
    // Without prev_kv the count is still given.
    let from_key = delete(&mut key_space, "a", "\0"); // 7
    assert_eq!(from_key.deleted, 1);
    assert_eq!(from_key.prev_kvs, vec![]);
    assert_eq!(key_space.key_count(), 0);
    assert_eq!(
        key_space.delete_range(&delete_request("", "")),
        Err(KeySpaceError::EmptyKey)
    );
}

#[test]
fn delete_keys_removes_a_revoked_lease_keys_at_one_revision() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "b", "1"); // 2
    put(&mut key_space, "a", "1"); // 3
    put(&mut key_space, "c", "1"); // 4
    let response = key_space.delete_keys(&["c", "a", "missing", "a"]); // 5
    key_space.check_invariants();
    assert_eq!(response.deleted, 2);
    assert_eq!(revision_of(&response.header), 5);
    assert_eq!(keys_of(&all_at(&key_space, 0).unwrap()), ["b"]);
    // In key order: "a" got sub-revision 0 and "c" sub-revision 1.
    let events = key_space.events(5, 10).unwrap().events;
    assert_eq!(
        events
            .iter()
            .map(|event| event.kv.as_ref().unwrap().key.clone())
            .collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"c".to_vec()]
    );
    // Nothing to delete: no new revision.
    let nothing = key_space.delete_keys(&["a", "zzz"]);
    assert_eq!(nothing.deleted, 0);
    assert_eq!(revision_of(&nothing.header), 5);
    assert_eq!(key_space.current_revision(), 5);
}
