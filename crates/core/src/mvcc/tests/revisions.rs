//! Revisions, versions and create revisions across puts, deletes and re-creation, and
//! reads of the history at past revisions.

use super::*;
use crate::mvcc::KeySpaceError;

#[test]
fn empty_store_is_at_revision_one_and_never_compacted() {
    let key_space = KeySpace::new();
    key_space.check_invariants();
    assert_eq!(key_space.current_revision(), 1);
    assert_eq!(key_space.compact_revision(), -1);
    assert_eq!(key_space.key_count(), 0);
    assert_eq!(key_space.version_count(), 0);
    assert_eq!(key_space.approximate_bytes(), 0);
    let response = range(&key_space, &range_request("\0", "\0"));
    assert_eq!(response.kvs, vec![]);
    assert_eq!(response.count, 0);
    assert!(!response.more);
    assert_eq!(revision_of(&response.header), 1);
    // Reading at revision 1 is reading the present.
    assert_eq!(all_at(&key_space, 1), Ok(vec![]));
}

#[test]
fn each_put_advances_the_revision_by_one() {
    let mut key_space = KeySpace::new();
    let first = put(&mut key_space, "a", "1");
    assert_eq!(revision_of(&first.header), 2);
    assert_eq!(first.prev_kv, None);
    assert_eq!(get(&key_space, "a"), Some(kv("a", "1", 2, 2, 1)));

    let second = put(&mut key_space, "a", "2");
    assert_eq!(revision_of(&second.header), 3);
    assert_eq!(get(&key_space, "a"), Some(kv("a", "2", 2, 3, 2)));

    let third = put(&mut key_space, "b", "x");
    assert_eq!(revision_of(&third.header), 4);
    assert_eq!(get(&key_space, "b"), Some(kv("b", "x", 4, 4, 1)));
    assert_eq!(key_space.current_revision(), 4);
    assert_eq!(key_space.key_count(), 2);
    assert_eq!(key_space.version_count(), 3);
}

#[test]
fn putting_the_same_value_still_makes_a_new_version() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "same");
    put(&mut key_space, "a", "same");
    assert_eq!(get(&key_space, "a"), Some(kv("a", "same", 2, 3, 2)));
}

#[test]
fn delete_resets_the_version_and_recreation_gets_a_new_create_revision() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    put(&mut key_space, "a", "2"); // 3
    let deleted = delete(&mut key_space, "a", ""); // 4
    assert_eq!(deleted.deleted, 1);
    assert_eq!(revision_of(&deleted.header), 4);
    assert_eq!(get(&key_space, "a"), None);
    assert_eq!(key_space.key_count(), 0);

    put(&mut key_space, "a", "3"); // 5
    assert_eq!(get(&key_space, "a"), Some(kv("a", "3", 5, 5, 1)));
    put(&mut key_space, "a", "4"); // 6
    assert_eq!(get(&key_space, "a"), Some(kv("a", "4", 5, 6, 2)));
    assert_eq!(key_space.key_count(), 1);
}

#[test]
fn a_delete_that_deletes_nothing_does_not_advance_the_revision() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    let missing = delete(&mut key_space, "b", "");
    assert_eq!(missing.deleted, 0);
    assert_eq!(revision_of(&missing.header), 2);
    let empty_range = delete(&mut key_space, "x", "z");
    assert_eq!(empty_range.deleted, 0);
    assert_eq!(revision_of(&empty_range.header), 2);
    assert_eq!(key_space.current_revision(), 2);

    delete(&mut key_space, "a", ""); // 3
    let again = delete(&mut key_space, "a", "");
    assert_eq!(again.deleted, 0);
    assert_eq!(revision_of(&again.header), 3);
}

#[test]
fn a_range_delete_removes_every_key_at_one_revision() {
    let mut key_space = KeySpace::new();
    for key in ["a", "b", "c", "d"] {
        put(&mut key_space, key, key); // 2..=5
    }
    let response = delete(&mut key_space, "b", "d"); // 6
    assert_eq!(response.deleted, 2);
    assert_eq!(revision_of(&response.header), 6);
    assert_eq!(keys_of(&all_at(&key_space, 0).unwrap()), ["a", "d"]);
    // Both deletions share revision 6; the history just before still has them.
    assert_eq!(
        keys_of(&all_at(&key_space, 5).unwrap()),
        ["a", "b", "c", "d"]
    );
}

#[test]
fn historical_reads_see_the_store_as_it_was() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    put(&mut key_space, "b", "1"); // 3
    put(&mut key_space, "a", "2"); // 4
    delete(&mut key_space, "b", ""); // 5
    put(&mut key_space, "b", "2"); // 6
    delete(&mut key_space, "a", ""); // 7

    let expected: [(i64, Vec<KeyValue>); 7] = [
        (1, vec![]),
        (2, vec![kv("a", "1", 2, 2, 1)]),
        (3, vec![kv("a", "1", 2, 2, 1), kv("b", "1", 3, 3, 1)]),
        (4, vec![kv("a", "2", 2, 4, 2), kv("b", "1", 3, 3, 1)]),
        (5, vec![kv("a", "2", 2, 4, 2)]),
        (6, vec![kv("a", "2", 2, 4, 2), kv("b", "2", 6, 6, 1)]),
        (7, vec![kv("b", "2", 6, 6, 1)]),
    ];
    for (revision, kvs) in expected {
        assert_eq!(
            all_at(&key_space, revision),
            Ok(kvs),
            "at revision {revision}"
        );
    }
    // Revision 0 and negative revisions read the present.
    assert_eq!(all_at(&key_space, 0), Ok(vec![kv("b", "2", 6, 6, 1)]));
    assert_eq!(all_at(&key_space, -3), Ok(vec![kv("b", "2", 6, 6, 1)]));

    // A historical single-key read, and its header, which reports the current revision.
    let request = RangeRequest {
        revision: 3,
        ..range_request("a", "")
    };
    let response = range(&key_space, &request);
    assert_eq!(response.kvs, vec![kv("a", "1", 2, 2, 1)]);
    assert_eq!(response.count, 1);
    assert_eq!(revision_of(&response.header), 7);
}

#[test]
fn reading_a_future_revision_fails() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    let error = all_at(&key_space, 3).unwrap_err();
    assert_eq!(error, KeySpaceError::FutureRevision);
    assert_eq!(
        error.to_string(),
        "mvcc: required revision is a future revision"
    );
    assert_eq!(all_at(&key_space, 2).map(|kvs| kvs.len()), Ok(1));
}

#[test]
fn the_lease_is_stored_with_the_version() {
    let mut key_space = KeySpace::new();
    let request = PutRequest {
        lease: 0x1234,
        ..put_request("a", "1")
    };
    key_space.put(&request).unwrap();
    assert_eq!(
        get(&key_space, "a"),
        Some(KeyValue {
            lease: 0x1234,
            ..kv("a", "1", 2, 2, 1)
        })
    );
    // A later put without a lease detaches it.
    put(&mut key_space, "a", "2");
    assert_eq!(get(&key_space, "a").unwrap().lease, 0);
}

#[test]
fn approximate_bytes_counts_keys_values_and_overhead() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "key", "value"); // 3 + 5
    delete(&mut key_space, "key", ""); // 3
    let overhead = crate::mvcc::VERSION_OVERHEAD_BYTES;
    assert_eq!(key_space.approximate_bytes(), 8 + 3 + 2 * overhead);
}

#[test]
fn the_key_space_can_move_between_threads() {
    fn assert_send_and_sync<T: Send + Sync>() {}
    assert_send_and_sync::<KeySpace>();
}
