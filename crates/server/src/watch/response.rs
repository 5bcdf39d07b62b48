//! Turning events into watch responses: grouping whole revisions into
//! responses, and etcd's fragmentation of responses that are too large.
//! Pure functions, so the rules are tested without a member.

use keel_types::etcdserverpb::WatchResponse;
use keel_types::mvccpb::Event;
use prost::Message;

/// The revision an event belongs to (a DELETE event's `mod_revision` is the
/// deleting revision, as in etcd).
pub(super) fn event_revision(event: &Event) -> i64 {
    event.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// The bytes `event` adds to an encoded `WatchResponse` (field 11, repeated).
fn event_field_bytes(event: &Event) -> usize {
    prost::encoding::message::encoded_len(11, event)
}

/// Splits `events` (in revision order) into groups for one response each,
/// never splitting a revision: a new group starts at a revision boundary
/// once the current group holds at least `bytes_target` bytes. With a target
/// of 0 each revision gets its own group, which is how etcd notifies watchers
/// that keep up.
pub(super) fn group_by_revision(events: Vec<Event>, bytes_target: usize) -> Vec<Vec<Event>> {
    let mut groups: Vec<Vec<Event>> = Vec::new();
    let mut group: Vec<Event> = Vec::new();
    let mut group_bytes = 0;
    for event in events {
        let revision = event_revision(&event);
        let boundary = group
            .last()
            .is_some_and(|last| event_revision(last) != revision);
        if boundary && group_bytes >= bytes_target {
            groups.push(std::mem::take(&mut group));
            group_bytes = 0;
        }
        group_bytes += event_field_bytes(&event);
        group.push(event);
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

/// etcd's `sendFragments`: a response of at least `fragment_bytes_min` bytes
/// with more than one event is split into several, each as large as fits
/// below the limit (but at least one event), all with `fragment` set except
/// the last. Other fields are repeated on every fragment.
pub(super) fn fragments(response: WatchResponse, fragment_bytes_min: usize) -> Vec<WatchResponse> {
    if response.encoded_len() < fragment_bytes_min || response.events.len() < 2 {
        return vec![response];
    }
    let template = WatchResponse {
        fragment: true,
        events: Vec::new(),
        ..response.clone()
    };
    let template_bytes = template.encoded_len();
    let mut result = Vec::new();
    let mut current = template.clone();
    let mut current_bytes = template_bytes;
    for event in response.events {
        let bytes = event_field_bytes(&event);
        if !current.events.is_empty() && current_bytes + bytes >= fragment_bytes_min {
            result.push(std::mem::replace(&mut current, template.clone()));
            current_bytes = template_bytes;
        }
        current_bytes += bytes;
        current.events.push(event);
    }
    current.fragment = false;
    result.push(current);
    result
}

#[cfg(test)]
mod tests {
    use keel_types::etcdserverpb::ResponseHeader;
    use keel_types::mvccpb::KeyValue;

    use super::*;

    fn put(key: &str, value_bytes: usize, revision: i64) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec(),
                value: vec![b'v'; value_bytes],
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn revisions(groups: &[Vec<Event>]) -> Vec<Vec<i64>> {
        groups
            .iter()
            .map(|group| group.iter().map(event_revision).collect())
            .collect()
    }

    #[test]
    fn groups_never_split_a_revision() {
        let events = vec![
            put("a", 10, 2),
            put("b", 10, 3),
            put("c", 10, 3),
            put("d", 10, 4),
        ];
        // Target 0: one response per revision, as etcd notifies synced watchers.
        assert_eq!(
            revisions(&group_by_revision(events.clone(), 0)),
            vec![vec![2], vec![3, 3], vec![4]]
        );
        // A large target: everything in one response.
        assert_eq!(
            revisions(&group_by_revision(events.clone(), 1 << 20)),
            vec![vec![2, 3, 3, 4]]
        );
        // A target of about two events: the group closes at the first
        // boundary after reaching it, so revision 3 stays whole.
        let two_events = 2 * event_field_bytes(&events[0]);
        assert_eq!(
            revisions(&group_by_revision(events, two_events)),
            vec![vec![2, 3, 3], vec![4]]
        );
        assert!(group_by_revision(Vec::new(), 0).is_empty());
    }

    fn response(events: Vec<Event>) -> WatchResponse {
        WatchResponse {
            header: Some(ResponseHeader {
                revision: 9,
                ..ResponseHeader::default()
            }),
            watch_id: 7,
            events,
            ..WatchResponse::default()
        }
    }

    #[test]
    fn small_responses_and_single_events_are_not_fragmented() {
        let small = response(vec![put("a", 10, 2), put("b", 10, 2)]);
        assert_eq!(fragments(small.clone(), 1 << 20), vec![small]);
        let single = response(vec![put("a", 5_000, 2)]);
        assert_eq!(fragments(single.clone(), 1_000), vec![single]);
    }

    #[test]
    fn large_responses_are_fragmented_like_etcd() {
        let events: Vec<Event> = (0..5)
            .map(|index| put(&format!("k{index}"), 400, 3))
            .collect();
        let whole = response(events.clone());
        // Room for two events per fragment, not three.
        let limit = response(events[..2].to_vec()).encoded_len() + 100;
        assert!(response(events[..3].to_vec()).encoded_len() >= limit);
        let parts = fragments(whole, limit);
        let sizes: Vec<usize> = parts.iter().map(|part| part.events.len()).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        let flags: Vec<bool> = parts.iter().map(|part| part.fragment).collect();
        assert_eq!(flags, vec![true, true, false]);
        for part in &parts {
            assert_eq!(part.watch_id, 7);
            assert_eq!(part.header.as_ref().map(|header| header.revision), Some(9));
            assert!(part.events.len() == 1 || part.encoded_len() < limit);
        }
        let rejoined: Vec<Event> = parts.into_iter().flat_map(|part| part.events).collect();
        assert_eq!(rejoined, events);
    }

    #[test]
    fn an_event_larger_than_the_limit_gets_a_fragment_of_its_own() {
        let events = vec![put("a", 10, 3), put("b", 5_000, 3), put("c", 10, 3)];
        let parts = fragments(response(events), 1_000);
        let sizes: Vec<usize> = parts.iter().map(|part| part.events.len()).collect();
        assert_eq!(sizes, vec![1, 1, 1]);
        assert_eq!(
            parts.iter().map(|part| part.fragment).collect::<Vec<_>>(),
            vec![true, true, false]
        );
    }
}
