//! Compaction: what it refuses, what reads fail afterwards, and exactly which history
//! it keeps.

use super::*;
use crate::mvcc::KeySpaceError;

/// a: put 2, put 3, put 5; b: put 4, delete 6; c: put 7. Current revision 7.
fn history() -> KeySpace {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    put(&mut key_space, "a", "2"); // 3
    put(&mut key_space, "b", "1"); // 4
    put(&mut key_space, "a", "3"); // 5
    delete(&mut key_space, "b", ""); // 6
    put(&mut key_space, "c", "1"); // 7
    key_space
}

#[test]
fn compaction_refuses_old_and_future_revisions() {
    let mut key_space = history();
    let error = key_space.compact(&compaction_request(8)).unwrap_err();
    assert_eq!(error, KeySpaceError::FutureRevision);
    assert_eq!(
        error.to_string(),
        "mvcc: required revision is a future revision"
    );

    let response = key_space.compact(&compaction_request(4)).unwrap();
    key_space.check_invariants();
    assert_eq!(revision_of(&response.header), 7);
    assert_eq!(key_space.compact_revision(), 4);
    assert_eq!(key_space.current_revision(), 7, "compaction is not a write");

    for revision in [4, 3, -5] {
        let error = key_space
            .compact(&compaction_request(revision))
            .unwrap_err();
        assert_eq!(error, KeySpaceError::Compacted);
        assert_eq!(
            error.to_string(),
            "mvcc: required revision has been compacted"
        );
    }
    // The current revision itself can be compacted.
    key_space.compact(&compaction_request(7)).unwrap();
    key_space.check_invariants();
    assert_eq!(key_space.compact_revision(), 7);
}

#[test]
fn a_fresh_store_can_compact_revision_zero_and_one() {
    // etcd's compact revision starts at -1, so 0 and 1 are both above it.
    let mut key_space = KeySpace::new();
    key_space.compact(&compaction_request(0)).unwrap();
    assert_eq!(key_space.compact_revision(), 0);
    key_space.compact(&compaction_request(1)).unwrap();
    assert_eq!(key_space.compact_revision(), 1);
    assert_eq!(all_at(&key_space, 1), Ok(vec![]));
}

#[test]
fn reads_below_the_compact_revision_fail_and_reads_at_or_after_it_are_unchanged() {
    let uncompacted = history();
    let mut key_space = history();
    key_space.compact(&compaction_request(5)).unwrap();
    key_space.check_invariants();
    for revision in 1..5 {
        let error = all_at(&key_space, revision).unwrap_err();
        assert_eq!(error, KeySpaceError::Compacted, "at revision {revision}");
        assert_eq!(
            error.to_string(),
            "mvcc: required revision has been compacted"
        );
    }
    for revision in 5..=7 {
        assert_eq!(
            all_at(&key_space, revision),
            all_at(&uncompacted, revision),
            "at revision {revision}"
        );
    }
    assert_eq!(
        all_at(&key_space, 5).unwrap(),
        vec![kv("a", "3", 2, 5, 3), kv("b", "1", 4, 4, 1)]
    );
    // Counting and single-key reads at the compact revision work too.
    let mut request = range_request("b", "");
    request.revision = 5;
    assert_eq!(range(&key_space, &request).kvs, vec![kv("b", "1", 4, 4, 1)]);
    request.count_only = true;
    assert_eq!(range(&key_space, &request).count, 1);
}

#[test]
fn compaction_keeps_only_the_newest_version_at_or_before_it() {
    let mut key_space = history();
    assert_eq!(key_space.version_count(), 6);
    let bytes_before = key_space.approximate_bytes();
    key_space.compact(&compaction_request(4)).unwrap();
    key_space.check_invariants();
    // a keeps its version at 3 (newest at or before 4) and the one at 5; b keeps its
    // put at 4 and its delete at 6; c is untouched.
    let versions: Vec<(String, i64, bool)> = key_space
        .snapshot_versions()
        .into_iter()
        .map(|version| {
            (
                String::from_utf8(version.key).unwrap(),
                version.mod_revision,
                version.deleted,
            )
        })
        .collect();
    assert_eq!(
        versions,
        vec![
            ("a".to_owned(), 3, false),
            ("a".to_owned(), 5, false),
            ("b".to_owned(), 4, false),
            ("b".to_owned(), 6, true),
            ("c".to_owned(), 7, false),
        ]
    );
    assert!(key_space.approximate_bytes() < bytes_before);
    assert_eq!(key_space.key_count(), 2);
}

#[test]
fn a_deleted_keys_history_goes_entirely() {
    let mut key_space = history();
    key_space.compact(&compaction_request(7)).unwrap();
    key_space.check_invariants();
    // b was deleted at 6, before the compact revision: nothing of it remains.
    let keys: Vec<Vec<u8>> = key_space
        .snapshot_versions()
        .into_iter()
        .map(|version| version.key)
        .collect();
    assert_eq!(keys, vec![b"a".to_vec(), b"c".to_vec()]);
    assert_eq!(key_space.version_count(), 2);
    assert_eq!(
        all_at(&key_space, 7).unwrap(),
        vec![kv("a", "3", 2, 5, 3), kv("c", "1", 7, 7, 1)]
    );
}

#[test]
fn a_tombstone_at_the_compact_revision_stays_until_the_next_compaction() {
    let mut key_space = history();
    key_space.compact(&compaction_request(6)).unwrap();
    key_space.check_invariants();
    // etcd (since 3.5.16) keeps b's tombstone at 6, so a watch from 6 sees the delete.
    let b_versions: Vec<(i64, bool)> = key_space
        .snapshot_versions()
        .into_iter()
        .filter(|version| version.key == b"b")
        .map(|version| (version.mod_revision, version.deleted))
        .collect();
    assert_eq!(b_versions, vec![(6, true)]);
    let events = key_space.events(6, 10).unwrap().events;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kv.as_ref().unwrap().key, b"b");
    assert_eq!(all_at(&key_space, 6).unwrap().len(), 1);

    key_space.compact(&compaction_request(7)).unwrap();
    key_space.check_invariants();
    assert!(key_space
        .snapshot_versions()
        .iter()
        .all(|version| version.key != b"b"));

    // A key re-created after its tombstone at the compact revision keeps both until the
    // next compaction.
    let mut key_space = history();
    key_space.compact(&compaction_request(6)).unwrap();
    put(&mut key_space, "b", "again"); // 8
    key_space.compact(&compaction_request(7)).unwrap();
    key_space.check_invariants();
    assert_eq!(get(&key_space, "b"), Some(kv("b", "again", 8, 8, 1)));
    assert_eq!(key_space.version_count(), 3);
}

#[test]
fn repeated_compactions_only_revisit_what_changed() {
    let mut key_space = KeySpace::new();
    for round in 0..5 {
        for key in ["a", "b", "c"] {
            put(&mut key_space, key, &round.to_string());
        }
        let revision = key_space.current_revision();
        key_space
            .compact(&compaction_request(revision - 1))
            .unwrap();
        key_space.check_invariants();
    }
    // Each key keeps its newest version at or before the compaction, plus newer ones.
    assert_eq!(key_space.version_count(), 4);
    assert_eq!(get(&key_space, "c"), Some(kv("c", "4", 4, 16, 5)));
    key_space.compact(&compaction_request(16)).unwrap();
    assert_eq!(key_space.version_count(), 3);
}

#[test]
fn writes_continue_normally_after_compaction() {
    let mut key_space = history();
    key_space.compact(&compaction_request(7)).unwrap();
    put(&mut key_space, "a", "4"); // 8
    assert_eq!(get(&key_space, "a"), Some(kv("a", "4", 2, 8, 4)));
    put(&mut key_space, "b", "2"); // 9
    assert_eq!(get(&key_space, "b"), Some(kv("b", "2", 9, 9, 1)));
    delete(&mut key_space, "c", ""); // 10
    assert_eq!(
        all_at(&key_space, 7).unwrap(),
        vec![kv("a", "3", 2, 5, 3), kv("c", "1", 7, 7, 1)]
    );
}
