//! HashKV (etcd's exact byte layout and its compaction rules) and snapshot round trips.

use keel_types::keelpb::StateMachineSnapshot;
use prost::Message;

use super::*;
use crate::mvcc::KeySpaceError;

/// etcd's backend key for a change: main revision, `_`, sub-revision, `t` if deleted.
fn backend_key(main: u8, sub: u8, deleted: bool) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0, 0, 0, 0, 0, main, b'_', 0, 0, 0, 0, 0, 0, 0, sub];
    if deleted {
        bytes.push(b't');
    }
    bytes
}

/// The hash of the bucket name followed by the given byte strings.
fn expected_hash(parts: &[&[u8]]) -> u32 {
    let mut bytes = b"key".to_vec();
    for part in parts {
        bytes.extend_from_slice(part);
    }
    crc32c::crc32c(&bytes)
}

/// Puts, overwrites, deletes, a txn and a compaction, for round-trip tests.
fn busy_history() -> KeySpace {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    key_space
        .put(&PutRequest {
            lease: 42,
            ..put_request("b", "1")
        })
        .unwrap(); // 3
    put(&mut key_space, "a", "2"); // 4
    delete(&mut key_space, "b", ""); // 5
    let request = TxnRequest {
        success: vec![put_op("c", "1"), put_op("d", "1"), delete_op("a", "")],
        ..TxnRequest::default()
    };
    key_space.txn(&request).unwrap(); // 6
    put(&mut key_space, "a", "3"); // 7
    put(&mut key_space, "e", ""); // 8
    key_space.compact(&compaction_request(6)).unwrap();
    put(&mut key_space, "c", "2"); // 9
    key_space.check_invariants();
    key_space
}

#[test]
fn the_hash_of_an_empty_store_covers_only_the_bucket_name() {
    let key_space = KeySpace::new();
    let response = key_space.hash_kv(0).unwrap();
    assert_eq!(response.hash, crc32c::crc32c(b"key"));
    assert_eq!(response.compact_revision, -1);
    assert_eq!(response.hash_revision, 1);
    assert_eq!(revision_of(&response.header), 1);
}

#[test]
fn the_hash_covers_etcds_backend_bytes_in_revision_order() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    delete(&mut key_space, "a", ""); // 3

    // mvccpb.KeyValue{key: "a", create_revision: 2, mod_revision: 2, version: 1,
    // value: "1"} and, for the tombstone, mvccpb.KeyValue{key: "a"}.
    let put_value: &[u8] = &[0x0a, 1, b'a', 0x10, 2, 0x18, 2, 0x20, 1, 0x2a, 1, b'1'];
    let tombstone_value: &[u8] = &[0x0a, 1, b'a'];
    let put_key = backend_key(2, 0, false);
    let tombstone_key = backend_key(3, 0, true);
    let response = key_space.hash_kv(0).unwrap();
    assert_eq!(
        response.hash,
        expected_hash(&[&put_key, put_value, &tombstone_key, tombstone_value])
    );
    assert_eq!(response.hash_revision, 3);
    // At revision 2 the tombstone is not yet part of the history.
    assert_eq!(
        key_space.hash_kv(2).unwrap().hash,
        expected_hash(&[&put_key, put_value])
    );
    assert_eq!(key_space.hash_kv(1).unwrap().hash, expected_hash(&[]));
}

#[test]
fn the_hash_at_a_revision_does_not_change_with_later_writes() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1");
    put(&mut key_space, "b", "1");
    delete(&mut key_space, "a", "");
    let hashes: Vec<u32> = (1..=4)
        .map(|revision| key_space.hash_kv(revision).unwrap().hash)
        .collect();
    put(&mut key_space, "a", "2");
    put(&mut key_space, "c", "1");
    let later: Vec<u32> = (1..=4)
        .map(|revision| key_space.hash_kv(revision).unwrap().hash)
        .collect();
    assert_eq!(hashes, later);
    // Distinct histories hash differently.
    let mut distinct = hashes.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 4);
}

#[test]
fn equal_histories_hash_equally_and_different_ones_do_not() {
    let build = |value: &str, lease: i64| {
        let mut key_space = KeySpace::new();
        put(&mut key_space, "a", "1");
        key_space
            .put(&PutRequest {
                lease,
                ..put_request("b", value)
            })
            .unwrap();
        key_space.hash_kv(0).unwrap().hash
    };
    assert_eq!(build("x", 0), build("x", 0));
    assert_ne!(build("x", 0), build("y", 0));
    assert_ne!(build("x", 0), build("x", 5));
}

#[test]
fn hash_revision_bounds() {
    let mut key_space = busy_history(); // current 9, compacted at 6
    let error = key_space.hash_kv(10).unwrap_err();
    assert_eq!(error, KeySpaceError::FutureRevision);
    let error = key_space.hash_kv(5).unwrap_err();
    assert_eq!(error, KeySpaceError::Compacted);
    assert_eq!(
        error.to_string(),
        "mvcc: required revision has been compacted"
    );
    // The compact revision itself can be hashed.
    let at_compaction = key_space.hash_kv(6).unwrap();
    assert_eq!(at_compaction.compact_revision, 6);
    assert_eq!(at_compaction.hash_revision, 6);
    assert_eq!(revision_of(&at_compaction.header), 9);
    // A negative revision hashes no change, as in etcd.
    let negative = key_space.hash_kv(-1).unwrap();
    assert_eq!(negative.hash, crc32c::crc32c(b"key"));
    assert_eq!(negative.hash_revision, -1);

    // After compaction, hashes at revisions from the compact revision on are stable.
    let hashes: Vec<u32> = (6..=9)
        .map(|revision| key_space.hash_kv(revision).unwrap().hash)
        .collect();
    put(&mut key_space, "z", "1");
    delete(&mut key_space, "c", "");
    let later: Vec<u32> = (6..=9)
        .map(|revision| key_space.hash_kv(revision).unwrap().hash)
        .collect();
    assert_eq!(hashes, later);
}

#[test]
fn compacted_changes_are_hashed_only_if_etcd_keeps_them() {
    let a_at_2: &[u8] = &[0x0a, 1, b'a', 0x10, 2, 0x18, 2, 0x20, 1, 0x2a, 1, b'1'];
    let a_tombstone: &[u8] = &[0x0a, 1, b'a'];
    let b_at_4: &[u8] = &[0x0a, 1, b'b', 0x10, 4, 0x18, 4, 0x20, 1, 0x2a, 1, b'1'];

    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    key_space.compact(&compaction_request(2)).unwrap();
    // a@2 is the newest change of a at revision 2 and a put: hashed.
    assert_eq!(
        key_space.hash_kv(2).unwrap().hash,
        expected_hash(&[&backend_key(2, 0, false), a_at_2])
    );
    delete(&mut key_space, "a", ""); // 3

    // At revision 3 no key exists, and etcd then skips nothing: a@2 is hashed.
    assert_eq!(
        key_space.hash_kv(3).unwrap().hash,
        expected_hash(&[
            &backend_key(2, 0, false),
            a_at_2,
            &backend_key(3, 0, true),
            a_tombstone
        ])
    );
    put(&mut key_space, "b", "1"); // 4

    // At revision 4 b exists, so a@2 (not a's newest change) is skipped.
    assert_eq!(
        key_space.hash_kv(4).unwrap().hash,
        expected_hash(&[
            &backend_key(3, 0, true),
            a_tombstone,
            &backend_key(4, 0, false),
            b_at_4
        ])
    );

    // A tombstone exactly at the compact revision is retained but never hashed.
    key_space.compact(&compaction_request(3)).unwrap();
    key_space.check_invariants();
    assert_eq!(key_space.version_count(), 2);
    assert_eq!(key_space.hash_kv(3).unwrap().hash, expected_hash(&[]));
    assert_eq!(
        key_space.hash_kv(4).unwrap().hash,
        expected_hash(&[&backend_key(4, 0, false), b_at_4])
    );
}

#[test]
fn identical_logs_give_identical_hashes_after_compaction() {
    let first = busy_history();
    let second = busy_history();
    assert_eq!(first, second);
    for revision in 6..=9 {
        assert_eq!(first.hash_kv(revision), second.hash_kv(revision));
    }
}

#[test]
fn a_snapshot_round_trip_rebuilds_an_equal_key_space() {
    let key_space = busy_history();
    let mut snapshot = StateMachineSnapshot {
        applied_index: 77,
        ..StateMachineSnapshot::default()
    };
    key_space.write_snapshot(&mut snapshot);
    assert_eq!(snapshot.current_revision, 9);
    assert_eq!(snapshot.compact_revision, 6);
    assert_eq!(
        snapshot.applied_index, 77,
        "the caller's fields are left alone"
    );
    assert_eq!(snapshot.versions.len(), key_space.version_count());

    // Through the wire encoding and back.
    let decoded = StateMachineSnapshot::decode(snapshot.encode_to_vec().as_slice()).unwrap();
    let mut restored = KeySpace::from_snapshot(&decoded).unwrap();
    restored.check_invariants();
    assert_eq!(restored, key_space);
    assert_eq!(restored.key_count(), key_space.key_count());
    assert_eq!(restored.approximate_bytes(), key_space.approximate_bytes());
    for revision in 6..=9 {
        assert_eq!(restored.hash_kv(revision), key_space.hash_kv(revision));
        assert_eq!(all_at(&restored, revision), all_at(&key_space, revision));
    }
    assert_eq!(restored.events(6, 100), key_space.events(6, 100));

    // Both continue identically.
    let mut original = key_space;
    for key_space in [&mut original, &mut restored] {
        put(key_space, "a", "4");
        delete(key_space, "d", "");
        key_space.compact(&compaction_request(8)).unwrap();
    }
    assert_eq!(restored, original);
    assert_eq!(restored.hash_kv(0), original.hash_kv(0));
}

#[test]
fn an_empty_key_space_round_trips() {
    let key_space = KeySpace::new();
    let mut snapshot = StateMachineSnapshot::default();
    key_space.write_snapshot(&mut snapshot);
    assert_eq!(snapshot.current_revision, 1);
    assert_eq!(snapshot.compact_revision, -1);
    assert_eq!(KeySpace::from_snapshot(&snapshot), Ok(key_space));
}

#[test]
fn corrupt_snapshots_are_refused() {
    let mut valid = StateMachineSnapshot::default();
    busy_history().write_snapshot(&mut valid);
    assert!(KeySpace::from_snapshot(&valid).is_ok());
    type Corruption = fn(&mut StateMachineSnapshot);
    let corruptions: [(&str, Corruption); 12] = [
        ("current revision 0", |s| s.current_revision = 0),
        ("compact revision above current", |s| {
            s.compact_revision = 10
        }),
        ("compact revision below -1", |s| s.compact_revision = -2),
        ("revision above current", |s| s.current_revision = 8),
        ("keys out of order", |s| s.versions.swap(0, 3)),
        ("versions out of order", |s| s.versions.swap(0, 1)),
        ("empty key", |s| s.versions[0].key.clear()),
        ("duplicate revision", |s| {
            let last = s.versions.len() - 1;
            // Give e (the last key) d's revision, consistently otherwise.
            s.versions[last].mod_revision = s.versions[last - 1].mod_revision;
            s.versions[last].create_revision = s.versions[last - 1].mod_revision;
            s.versions[last].sub_revision = s.versions[last - 1].sub_revision;
        }),
        ("version gap", |s| s.versions[1].version += 1),
        ("create revision changed", |s| {
            s.versions[1].create_revision = 1
        }),
        ("tombstone with a value", |s| {
            let tombstone = s.versions.iter_mut().find(|v| v.deleted).unwrap();
            tombstone.value = b"x".to_vec();
        }),
        ("history starting with a tombstone", |s| {
            // e's only version, at 8, above the compact revision.
            let last = s.versions.last_mut().unwrap();
            *last = keel_types::keelpb::KeyVersion {
                key: last.key.clone(),
                mod_revision: last.mod_revision,
                deleted: true,
                ..Default::default()
            };
        }),
    ];
    for (description, corrupt) in corruptions {
        let mut snapshot = valid.clone();
        corrupt(&mut snapshot);
        let result = KeySpace::from_snapshot(&snapshot);
        assert!(
            matches!(result, Err(KeySpaceError::CorruptSnapshot(_))),
            "{description}: {result:?}"
        );
    }
}
