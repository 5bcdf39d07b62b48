//! The event feed that watches are built on.

use keel_types::mvccpb::{event::EventType, Event};

use super::*;
use crate::mvcc::KeySpaceError;

fn event(event_type: EventType, kv: KeyValue, prev_kv: Option<KeyValue>) -> Event {
    Event {
        r#type: event_type as i32,
        kv: Some(kv),
        prev_kv,
    }
}

/// The key-value etcd puts in a DELETE event: the key and the deleting revision.
fn deleted(key: &str, mod_revision: i64) -> KeyValue {
    KeyValue {
        mod_revision,
        ..kv(key, "", 0, 0, 0)
    }
}

#[test]
fn events_describe_each_change_with_its_previous_key_value() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    put(&mut key_space, "a", "2"); // 3
    delete(&mut key_space, "a", ""); // 4
    put(&mut key_space, "a", "3"); // 5
    let batch = key_space.events(2, 100).unwrap();
    assert_eq!(
        batch.events,
        vec![
            event(EventType::Put, kv("a", "1", 2, 2, 1), None),
            event(
                EventType::Put,
                kv("a", "2", 2, 3, 2),
                Some(kv("a", "1", 2, 2, 1))
            ),
            event(
                EventType::Delete,
                deleted("a", 4),
                Some(kv("a", "2", 2, 3, 2))
            ),
            event(EventType::Put, kv("a", "3", 5, 5, 1), None),
        ]
    );
    assert_eq!(batch.next_revision, 6);
    // From a later revision, only what follows.
    assert_eq!(key_space.events(5, 100).unwrap().events.len(), 1);
}

#[test]
fn a_batch_never_splits_a_revision() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    let request = TxnRequest {
        success: vec![put_op("b", "1"), put_op("c", "1"), put_op("d", "1")],
        ..TxnRequest::default()
    };
    key_space.txn(&request).unwrap(); // 3
    put(&mut key_space, "e", "1"); // 4

    // One event per batch: revision 2 fills the first batch...
    let first = key_space.events(2, 1).unwrap();
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.next_revision, 3);
    // ...and revision 3's three changes come whole, beyond the maximum.
    let second = key_space.events(first.next_revision, 1).unwrap();
    assert_eq!(second.events.len(), 3, "one revision is returned whole");
    assert_eq!(second.next_revision, 4);
    let third = key_space.events(second.next_revision, 1).unwrap();
    assert_eq!(third.events.len(), 1);
    assert_eq!(third.next_revision, 5);
    // A batch stops at the first revision boundary at or after the maximum.
    let larger = key_space.events(2, 2).unwrap();
    assert_eq!(larger.events.len(), 4);
    assert_eq!(larger.next_revision, 4);
    // A start past the present waits there.
    let future = key_space.events(9, 2).unwrap();
    assert_eq!(future.events, vec![]);
    assert_eq!(future.next_revision, 9);
    // events_max 0 returns nothing and moves nowhere.
    let nothing = key_space.events(2, 0).unwrap();
    assert_eq!(nothing.events, vec![]);
    assert_eq!(nothing.next_revision, 2);
}

#[test]
fn events_below_the_compact_revision_are_gone() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    put(&mut key_space, "a", "2"); // 3
    put(&mut key_space, "a", "3"); // 4
    key_space.compact(&compaction_request(3)).unwrap();
    assert_eq!(key_space.events(2, 10), Err(KeySpaceError::Compacted));
    // From the compact revision on, the feed is complete; the previous key-value of the
    // change at 3 was compacted away.
    assert_eq!(
        key_space.events(3, 10).unwrap().events,
        vec![
            event(EventType::Put, kv("a", "2", 2, 3, 2), None),
            event(
                EventType::Put,
                kv("a", "3", 2, 4, 3),
                Some(kv("a", "2", 2, 3, 2))
            ),
        ]
    );
}

#[test]
fn events_matching_skips_other_keys_but_counts_them_as_scanned() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "1"); // 2
    put(&mut key_space, "b", "1"); // 3
    put(&mut key_space, "b", "2"); // 4
    put(&mut key_space, "a", "2"); // 5
    let only_a = |key: &[u8]| key == b"a";
    // Two changes scanned (revisions 2 and 3), one of them kept.
    let first = key_space.events_matching(2, 2, only_a).unwrap();
    assert_eq!(
        first.events,
        vec![event(EventType::Put, kv("a", "1", 2, 2, 1), None)]
    );
    assert_eq!(first.next_revision, 4);
    let second = key_space
        .events_matching(first.next_revision, 10, only_a)
        .unwrap();
    assert_eq!(
        second.events,
        vec![event(
            EventType::Put,
            kv("a", "2", 2, 5, 2),
            Some(kv("a", "1", 2, 2, 1))
        )]
    );
    assert_eq!(second.next_revision, 6);
    // Matching everything is `events`.
    assert_eq!(
        key_space.events_matching(2, 3, |_| true),
        key_space.events(2, 3)
    );
}
