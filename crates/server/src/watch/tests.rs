//! The Watch service against a fake member loop: a thread that owns a real
//! MVCC key space and answers the member inputs watches use. Writes are
//! applied directly by the test, which then publishes the new revision as the
//! member loop does. Every wait is bounded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::mvcc::KeySpace;
use keel_core::NodeStatus;
use keel_types::etcdserverpb::request_op::Request as Operation;
use keel_types::etcdserverpb::watch_create_request::FilterType;
use keel_types::etcdserverpb::watch_request::RequestUnion;
use keel_types::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use keel_types::mvccpb::event::EventType;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Status;

use super::response::event_revision;
use super::*;
use crate::member::key_in_range;

/// How long any single expected response may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A member loop stand-in over a real key space.
struct FakeMember {
    key_space: Arc<Mutex<KeySpace>>,
    revision: tokio::sync::watch::Sender<i64>,
    services: Services,
    /// Reads of history by watchers (not by the feed, which reads all keys).
    history_reads: Arc<AtomicUsize>,
}

impl FakeMember {
    fn start() -> FakeMember {
        FakeMember::with_queue(64)
    }

    fn with_queue(input_queue_max: usize) -> FakeMember {
        let key_space = Arc::new(Mutex::new(KeySpace::new()));
        let (input, inputs) = sync_channel(input_queue_max);
        let (revision, revision_receiver) = tokio::sync::watch::channel(1);
        let thread_key_space = Arc::clone(&key_space);
        let history_reads = Arc::new(AtomicUsize::new(0));
        let thread_history_reads = Arc::clone(&history_reads);
        std::thread::spawn(move || answer_inputs(inputs, thread_key_space, thread_history_reads));
        FakeMember {
            key_space,
            revision,
            services: Services::new(
                input,
                revision_receiver,
                Default::default(),
                Default::default(),
            ),
            history_reads,
        }
    }

    fn service(&self, config: WatchConfig) -> WatchService {
        WatchService::with_config(self.services.clone(), config)
    }

    fn publish(&self) {
        let current = self.key_space.lock().unwrap().current_revision();
        self.revision.send_replace(current);
    }

    fn put(&self, key: &str, value: &str) -> i64 {
        self.put_bytes(key, value.as_bytes().to_vec())
    }

    fn put_bytes(&self, key: &str, value: Vec<u8>) -> i64 {
        let response = self
            .key_space
            .lock()
            .unwrap()
            .put(&PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                ..PutRequest::default()
            })
            .unwrap();
        self.publish();
        response.header.unwrap().revision
    }

    fn delete(&self, key: &str, range_end: &[u8]) -> i64 {
        let response = self
            .key_space
            .lock()
            .unwrap()
            .delete_range(&DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                range_end: range_end.to_vec(),
                ..DeleteRangeRequest::default()
            })
            .unwrap();
        self.publish();
        response.header.unwrap().revision
    }

    /// One revision that puts every `(key, value)`.
    fn put_all(&self, pairs: &[(&str, Vec<u8>)]) -> i64 {
        let success = pairs
            .iter()
            .map(|(key, value)| RequestOp {
                request: Some(Operation::RequestPut(PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.clone(),
                    ..PutRequest::default()
                })),
            })
            .collect();
        let response = self
            .key_space
            .lock()
            .unwrap()
            .txn(&TxnRequest {
                success,
                ..TxnRequest::default()
            })
            .unwrap();
        self.publish();
        response.header.unwrap().revision
    }

    fn compact(&self, revision: i64) {
        self.key_space
            .lock()
            .unwrap()
            .compact(&CompactionRequest {
                revision,
                physical: false,
            })
            .unwrap();
        self.publish();
    }
}

/// Answers the inputs watches send, as `member::handle_input` does.
fn answer_inputs(
    inputs: Receiver<Input>,
    key_space: Arc<Mutex<KeySpace>>,
    history_reads: Arc<AtomicUsize>,
) {
    for input in inputs {
        match input {
            Input::Events {
                start_revision,
                events_max,
                key,
                range_end,
                reply,
            } => {
                if !(key.is_empty() && range_end == [0]) {
                    history_reads.fetch_add(1, Ordering::Relaxed);
                }
                let result = key_space
                    .lock()
                    .unwrap()
                    .events(start_revision, events_max)
                    .map(|mut batch| {
                        batch.events.retain(|event| {
                            event
                                .kv
                                .as_ref()
                                .is_some_and(|kv| key_in_range(&kv.key, &key, &range_end))
                        });
                        batch
                    });
                let _ = reply.send(result);
            }
            Input::Status { reply } => {
                let key_space = key_space.lock().unwrap();
                let status = NodeStatus {
                    member_id: 0x11,
                    cluster_id: 0x22,
                    leader_id: 0x11,
                    term: 3,
                    commit_index: 0,
                    applied_index: 0,
                    last_index: 0,
                    revision: key_space.current_revision(),
                    compact_revision: key_space.compact_revision(),
                    key_space_bytes: 0,
                    is_leader: true,
                    is_learner: false,
                    alarms: Vec::new(),
                };
                let _ = reply.send((status, Vec::new()));
            }
            _ => {}
        }
    }
}

/// The client's end of one stream.
struct Client {
    requests: mpsc::Sender<Result<WatchRequest, Status>>,
    responses: ReceiverStream<Result<WatchResponse, Status>>,
}

impl Client {
    fn open(service: &WatchService) -> Client {
        let (requests, request_receiver) = mpsc::channel(16);
        let responses = service.serve(ReceiverStream::new(request_receiver));
        Client {
            requests,
            responses,
        }
    }

    async fn send(&self, request: RequestUnion) {
        self.requests
            .send(Ok(WatchRequest {
                request_union: Some(request),
            }))
            .await
            .expect("the stream takes requests");
    }

    async fn create(&mut self, create: WatchCreateRequest) -> WatchResponse {
        self.send(RequestUnion::CreateRequest(create)).await;
        let response = self.next().await;
        assert!(
            response.created,
            "expected a created response: {response:?}"
        );
        response
    }

    async fn next(&mut self) -> WatchResponse {
        tokio::time::timeout(RESPONSE_TIMEOUT, self.responses.next())
            .await
            .expect("a response within the timeout")
            .expect("the stream is open")
            .expect("not an error")
    }

    /// Responses until one satisfies `done` (included).
    async fn until(&mut self, done: impl Fn(&WatchResponse) -> bool) -> Vec<WatchResponse> {
        let mut responses = Vec::new();
        loop {
            let response = self.next().await;
            let finished = done(&response);
            responses.push(response);
            if finished {
                return responses;
            }
        }
    }
}

fn watch(key: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        ..WatchCreateRequest::default()
    }
}

fn watch_prefix(prefix: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: prefix_end(prefix.as_bytes()),
        ..WatchCreateRequest::default()
    }
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().unwrap() += 1;
    end
}

/// (type, key, value, revision) of every event, for compact assertions.
fn summary(responses: &[WatchResponse]) -> Vec<(&'static str, String, String, i64)> {
    responses
        .iter()
        .flat_map(|response| response.events.iter())
        .map(|event| {
            let kv = event.kv.as_ref().unwrap();
            let kind = match event.r#type() {
                EventType::Put => "PUT",
                EventType::Delete => "DELETE",
            };
            (
                kind,
                String::from_utf8_lossy(&kv.key).into_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.mod_revision,
            )
        })
        .collect()
}

fn test_config() -> WatchConfig {
    WatchConfig {
        progress_notify_interval: Duration::from_secs(3600),
        ..WatchConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_from_now_see_new_changes_with_etcd_ids_and_headers() {
    let member = FakeMember::start();
    member.put("a", "before");
    let service = member.service(test_config());
    let mut client = Client::open(&service);
    let created = client.create(watch("a")).await;
    assert_eq!(created.watch_id, 0, "etcd's first automatic watch ID is 0");
    let header = created.header.unwrap();
    assert_eq!(
        (
            header.cluster_id,
            header.member_id,
            header.raft_term,
            header.revision
        ),
        (0x22, 0x11, 3, 2)
    );
    let second = client.create(watch_prefix("b")).await;
    assert_eq!(second.watch_id, 1);

    let revision = member.put("a", "after");
    member.put("b1", "x");
    // Each watcher's events are in order; two watchers' responses may
    // interleave either way.
    let mut responses = [client.next().await, client.next().await];
    responses.sort_by_key(|response| response.watch_id);
    assert_eq!(
        summary(&responses[..1]),
        vec![("PUT", "a".into(), "after".into(), revision)]
    );
    assert_eq!(
        summary(&responses[1..]),
        vec![("PUT", "b1".into(), "x".into(), revision + 1)]
    );
    assert!(responses[0].header.as_ref().unwrap().revision >= revision);
    assert!(responses[1].header.as_ref().unwrap().revision > revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_replayed_with_filters_and_prev_kv_on_request() {
    let member = FakeMember::start();
    member.put("k", "1"); // 2
    member.put("k", "2"); // 3
    member.delete("k", &[]); // 4
    member.put("other", "x"); // 5
    member.put("k", "3"); // 6
    let service = member.service(test_config());
    let mut client = Client::open(&service);

    client
        .create(WatchCreateRequest {
            start_revision: 2,
            ..watch("k")
        })
        .await;
    let responses = client
        .until(|response| {
            summary(std::slice::from_ref(response))
                .iter()
                .any(|e| e.3 == 6)
        })
        .await;
    assert_eq!(
        summary(&responses),
        vec![
            ("PUT", "k".into(), "1".into(), 2),
            ("PUT", "k".into(), "2".into(), 3),
            ("DELETE", "k".into(), "".into(), 4),
            ("PUT", "k".into(), "3".into(), 6),
        ]
    );
    assert!(responses
        .iter()
        .flat_map(|r| &r.events)
        .all(|event| event.prev_kv.is_none()));

    client
        .create(WatchCreateRequest {
            start_revision: 3,
            prev_kv: true,
            filters: vec![FilterType::Noput as i32],
            ..watch("k")
        })
        .await;
    let response = client.next().await;
    assert_eq!(
        summary(std::slice::from_ref(&response)),
        vec![("DELETE", "k".into(), "".into(), 4)]
    );
    let previous = response.events[0].prev_kv.as_ref().unwrap();
    assert_eq!(
        (previous.value.as_slice(), previous.mod_revision),
        (&b"2"[..], 3)
    );

    client
        .create(WatchCreateRequest {
            start_revision: 2,
            filters: vec![FilterType::Nodelete as i32],
            ..watch("k")
        })
        .await;
    let responses = client
        .until(|response| response.events.iter().any(|e| event_revision(e) == 6))
        .await;
    assert_eq!(
        summary(&responses)
            .iter()
            .map(|event| event.3)
            .collect::<Vec<_>>(),
        vec![2, 3, 6]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_revision_is_one_response() {
    let member = FakeMember::start();
    let service = member.service(test_config());
    let mut client = Client::open(&service);
    client.create(watch_prefix("t")).await;
    let revision = member.put_all(&[
        ("t1", b"a".to_vec()),
        ("t2", b"b".to_vec()),
        ("t3", b"c".to_vec()),
    ]);
    let response = client.next().await;
    assert_eq!(response.events.len(), 3);
    assert!(response
        .events
        .iter()
        .all(|event| event_revision(event) == revision));
    assert!(!response.fragment);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_revisions_are_fragmented_only_when_asked() {
    let member = FakeMember::start();
    let config = WatchConfig {
        fragment_bytes_min: 10_000,
        ..test_config()
    };
    let service = member.service(config);
    let mut client = Client::open(&service);
    let whole = client.create(watch_prefix("f")).await.watch_id;
    let fragmented = client
        .create(WatchCreateRequest {
            fragment: true,
            ..watch_prefix("f")
        })
        .await
        .watch_id;
    let pairs: Vec<(&str, Vec<u8>)> = ["f1", "f2", "f3", "f4"]
        .into_iter()
        .map(|key| (key, vec![b'x'; 4_000]))
        .collect();
    member.put_all(&pairs);
    let mut whole_responses = Vec::new();
    let mut fragments = Vec::new();
    while whole_responses.is_empty()
        || fragments
            .last()
            .is_none_or(|last: &WatchResponse| last.fragment)
    {
        let response = client.next().await;
        if response.watch_id == whole {
            whole_responses.push(response);
        } else {
            assert_eq!(response.watch_id, fragmented);
            fragments.push(response);
        }
    }
    assert_eq!(whole_responses.len(), 1);
    assert_eq!(whole_responses[0].events.len(), 4);
    assert!(!whole_responses[0].fragment);
    // Two 4 kB events fit under 10 kB, three do not.
    let sizes: Vec<usize> = fragments.iter().map(|part| part.events.len()).collect();
    assert_eq!(sizes, vec![2, 2]);
    assert!(fragments[0].fragment && !fragments[1].fragment);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_start_revision_cancels_with_compact_revision() {
    let member = FakeMember::start();
    for value in ["1", "2", "3", "4"] {
        member.put("c", value); // 2..=5
    }
    member.compact(4);
    let service = member.service(test_config());
    let mut client = Client::open(&service);
    let created = client
        .create(WatchCreateRequest {
            start_revision: 2,
            ..watch("c")
        })
        .await;
    let response = client.next().await;
    assert_eq!(response.watch_id, created.watch_id);
    assert!(response.canceled);
    assert_eq!(response.compact_revision, 4);
    assert!(response.events.is_empty());

    // From the compact revision on, history is complete.
    client
        .create(WatchCreateRequest {
            start_revision: 4,
            ..watch("c")
        })
        .await;
    let responses = client
        .until(|response| response.events.iter().any(|e| event_revision(e) == 5))
        .await;
    assert_eq!(
        summary(&responses).iter().map(|e| e.3).collect::<Vec<_>>(),
        vec![4, 5]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_creates_are_created_and_canceled_with_etcd_reasons() {
    let member = FakeMember::start();
    let config = WatchConfig {
        watchers_per_stream_max: 2,
        ..test_config()
    };
    let service = member.service(config);
    let mut client = Client::open(&service);
    let chosen = client
        .create(WatchCreateRequest {
            watch_id: 42,
            ..watch("a")
        })
        .await;
    assert_eq!((chosen.watch_id, chosen.canceled), (42, false));

    let cases = [
        (
            WatchCreateRequest {
                watch_id: 42,
                ..watch("b")
            },
            "mvcc: duplicate watch ID provided on the WatchStream",
        ),
        (
            WatchCreateRequest {
                range_end: b"a".to_vec(),
                ..watch("b")
            },
            "mvcc: watcher range is empty",
        ),
        (
            WatchCreateRequest {
                start_revision: -1,
                ..watch("b")
            },
            "etcdserver: mvcc: required revision has been compacted",
        ),
    ];
    for (request, reason) in cases {
        let response = client.create(request).await;
        assert!(response.canceled);
        assert_eq!(response.watch_id, -1);
        assert_eq!(response.cancel_reason, reason);
    }
    let automatic = client.create(watch("c")).await;
    assert_eq!((automatic.watch_id, automatic.canceled), (0, false));
    let over = client.create(watch("d")).await;
    assert!(over.canceled);
    assert_eq!(over.watch_id, -1);
    assert!(over.cancel_reason.contains("too many watchers"), "{over:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_confirms_and_stops_events() {
    let member = FakeMember::start();
    let service = member.service(test_config());
    let mut client = Client::open(&service);
    let cancelled = client.create(watch("x")).await.watch_id;
    let kept = client.create(watch("y")).await.watch_id;
    client
        .send(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: cancelled,
        }))
        .await;
    let response = client.next().await;
    assert_eq!((response.watch_id, response.canceled), (cancelled, true));
    // Unknown IDs get no answer, as in etcd.
    client
        .send(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: 99,
        }))
        .await;
    member.put("x", "1");
    let revision = member.put("y", "1");
    let response = client.next().await;
    assert_eq!(response.watch_id, kept);
    assert_eq!(event_revision(&response.events[0]), revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_requests_report_a_revision_every_watcher_has_reached() {
    let member = FakeMember::start();
    let service = member.service(test_config());
    let mut client = Client::open(&service);
    // No watcher: answered at once with the member's revision.
    member.put("p", "1");
    client
        .send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
        .await;
    let response = client.next().await;
    assert_eq!(response.watch_id, -1);
    assert_eq!(response.header.unwrap().revision, 2);

    client.create(watch("p")).await;
    client.create(watch("q")).await;
    let revision = member.put("p", "2");
    client
        .send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
        .await;
    let responses = client.until(|response| response.watch_id == -1).await;
    // The event comes first, then the progress at or after its revision.
    assert_eq!(
        summary(&responses).iter().map(|e| e.3).collect::<Vec<_>>(),
        vec![revision]
    );
    let progress = responses.last().unwrap();
    assert!(progress.events.is_empty());
    assert!(progress.header.as_ref().unwrap().revision >= revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watchers_that_asked_get_progress_notifications() {
    let member = FakeMember::start();
    let config = WatchConfig {
        progress_notify_interval: Duration::from_millis(50),
        ..test_config()
    };
    let service = member.service(config);
    let mut client = Client::open(&service);
    member.put("other", "1"); // 2
    let created = client
        .create(WatchCreateRequest {
            progress_notify: true,
            ..watch("n")
        })
        .await;
    member.put("other", "2"); // 3
    let response = client
        .until(|response| response.header.as_ref().unwrap().revision >= 3)
        .await
        .pop()
        .unwrap();
    assert_eq!(response.watch_id, created.watch_id);
    assert!(response.events.is_empty());
    assert_eq!(response.header.unwrap().revision, 3);
}

/// Waits until the feed has published `revision`.
async fn wait_for_feed(feed: &feed::Feed, revision: i64) {
    let deadline = tokio::time::Instant::now() + RESPONSE_TIMEOUT;
    while feed.next_revision() <= revision {
        assert!(tokio::time::Instant::now() < deadline, "the feed is stuck");
        tokio::task::yield_now().await;
    }
}

/// Reads until the client has seen every revision up to `last` for its
/// prefix; checks order, no gaps (against `expected`), no duplicates.
fn assert_exactly(responses: &[WatchResponse], expected: &[i64]) {
    let revisions: Vec<i64> = responses
        .iter()
        .flat_map(|response| response.events.iter().map(event_revision))
        .collect();
    assert_eq!(revisions, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_catches_up_from_history_without_gaps() {
    let member = FakeMember::start();
    // A tiny feed and spill, so the watcher that is not read falls out of
    // the feed at once and must read history.
    let config = WatchConfig {
        feed_retained_batches_max: 2,
        feed_retained_bytes_max: 1_000,
        watcher_spill_bytes_max: 1_000,
        stream_responses_max: 1,
        ..test_config()
    };
    let service = member.service(config);
    let mut lagging = Client::open(&service);
    lagging.create(watch_prefix("l")).await;
    // One revision per feed batch, so the feed drops batches the watcher
    // has not taken.
    let feed = service.shared.feed();
    let mut expected = Vec::new();
    for index in 0..300 {
        expected.push(member.put(&format!("l{}", index % 7), &"v".repeat(100)));
        let revision = member.put("unrelated", "x");
        wait_for_feed(&feed, revision).await;
    }
    let last = *expected.last().unwrap();
    let responses = lagging
        .until(|response| response.events.iter().any(|e| event_revision(e) == last))
        .await;
    assert_exactly(&responses, &expected);
    assert!(
        member.history_reads.load(Ordering::Relaxed) > 0,
        "history was read"
    );
    let (batches, bytes) = service.shared.feed().retained();
    assert!(
        batches == 1 || bytes <= 1_000,
        "the feed keeps {batches} batches, {bytes} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_watcher_behind_a_slow_client_keeps_its_events_in_its_spill() {
    let member = FakeMember::start();
    // A feed that keeps two 5 kB values at most, a queue of one response.
    let config = WatchConfig {
        feed_retained_bytes_max: 10_000,
        stream_responses_max: 1,
        ..test_config()
    };
    let service = member.service(config);
    let mut client = Client::open(&service);
    client.create(watch("ping")).await;
    // Not read while 250 kB of other values pass through the feed, one
    // revision per batch.
    let feed = service.shared.feed();
    let mut pings = Vec::new();
    for index in 0..50 {
        let revision = member.put_bytes(&format!("big/{index}"), vec![b'b'; 5_000]);
        wait_for_feed(&feed, revision).await;
        if index % 5 == 4 {
            let revision = member.put("ping", &index.to_string());
            wait_for_feed(&feed, revision).await;
            pings.push(revision);
        }
    }
    let last = *pings.last().unwrap();
    let responses = client
        .until(|response| response.events.iter().any(|e| event_revision(e) == last))
        .await;
    assert_exactly(&responses, &pings);
    assert_eq!(
        member.history_reads.load(Ordering::Relaxed),
        0,
        "the watcher never needed history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlogged_watcher_does_not_hold_back_others_on_its_stream() {
    let member = FakeMember::start();
    let config = WatchConfig {
        watcher_buffer_bytes_target: 10_000,
        ..test_config()
    };
    let service = member.service(config);
    // 800 kB of history under "slow/" in 2 kB values: about 80 responses.
    let mut history = Vec::new();
    for index in 0..400 {
        history.push(member.put_bytes(&format!("slow/{index}"), vec![b's'; 2_000]));
    }
    let mut client = Client::open(&service);
    let fast = client.create(watch("ping")).await.watch_id;
    let slow = client
        .create(WatchCreateRequest {
            start_revision: 1,
            ..watch_prefix("slow/")
        })
        .await
        .watch_id;
    // The client reads nothing while the ping is written, so the slow
    // watcher's backlog is all there is to send.
    let ping = member.put("ping", "1");
    wait_for_feed(&service.shared.feed(), ping).await;
    let mut slow_responses_before_ping = 0;
    let mut slow_revisions = Vec::new();
    loop {
        let response = client.next().await;
        if response.watch_id == fast {
            assert_eq!(event_revision(&response.events[0]), ping);
            break;
        }
        assert_eq!(response.watch_id, slow);
        slow_responses_before_ping += 1;
        slow_revisions.extend(response.events.iter().map(event_revision));
    }
    // The queue's worth, the response each watcher holds, and the few the
    // slow watcher may queue while the ping's watcher task has not run yet
    // (on a loaded machine): not the 80 responses the whole backlog takes.
    assert!(
        slow_responses_before_ping <= STREAM_RESPONSES_MAX + 8,
        "{slow_responses_before_ping} slow responses before the ping"
    );
    eprintln!("{slow_responses_before_ping} slow responses before the ping");
    assert!(slow_revisions.len() < history.len());
    let last = *history.last().unwrap();
    if slow_revisions.last() != Some(&last) {
        let rest = client
            .until(|response| response.events.iter().any(|e| event_revision(e) == last))
            .await;
        slow_revisions.extend(
            rest.iter()
                .flat_map(|r| r.events.iter().map(event_revision)),
        );
    }
    assert_eq!(slow_revisions, history);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_stops_its_watchers() {
    let member = FakeMember::start();
    let service = member.service(test_config());
    let mut client = Client::open(&service);
    for index in 0..5 {
        client.create(watch(&format!("gone{index}"))).await;
    }
    let feed = service.shared.feed();
    assert_eq!(feed.subscriber_count(), 5);
    drop(client);
    let deadline = tokio::time::Instant::now() + RESPONSE_TIMEOUT;
    while feed.subscriber_count() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchers outlived their stream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_member_slows_watches_down_without_failing_them() {
    // An input queue of one: most reads find it full and are retried.
    let member = FakeMember::with_queue(1);
    let service = member.service(test_config());
    let mut clients: Vec<Client> = (0..4).map(|_| Client::open(&service)).collect();
    let mut expected = Vec::new();
    for index in 0..20 {
        expected.push(member.put("busy", &index.to_string()));
    }
    for client in &mut clients {
        client
            .create(WatchCreateRequest {
                start_revision: 2,
                ..watch("busy")
            })
            .await;
    }
    let last = *expected.last().unwrap();
    for client in &mut clients {
        let responses = client
            .until(|response| response.events.iter().any(|e| event_revision(e) == last))
            .await;
        assert_exactly(&responses, &expected);
    }
}

#[test]
fn batch_sizes_follow_the_byte_target() {
    let mut sizer = BatchSizer::new(10_000, 1_000);
    assert_eq!(sizer.events_max(), BATCH_EVENTS_INITIAL);
    // Small events: grows, at most twofold per batch, up to the limit.
    sizer.observe(64, 64 * 10);
    assert_eq!(sizer.events_max(), 128);
    for _ in 0..10 {
        sizer.observe(100, 1_000);
    }
    assert_eq!(sizer.events_max(), 1_000);
    // Large events: shrinks at once to what fits the target, never below one.
    sizer.observe(10, 10 * 5_000);
    assert_eq!(sizer.events_max(), 2);
    sizer.observe(1, 1_000_000);
    assert_eq!(sizer.events_max(), 1);
}

/// Prints how long an event takes from the member's publication of its
/// revision to the client, through the feed, a watcher task and the stream's
/// queue (no network). Asserts only a loose bound: this is a measurement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_latency_is_measured() {
    let member = FakeMember::start();
    let service = member.service(test_config());
    let mut client = Client::open(&service);
    client.create(watch("latency")).await;
    // Other watchers on other streams, so the feed fans out as in real use.
    let mut others = Vec::new();
    for index in 0..100 {
        let mut other = Client::open(&service);
        other.create(watch(&format!("other{index}"))).await;
        others.push(other);
    }
    let mut latencies = Vec::new();
    for index in 0..500 {
        let published = std::time::Instant::now();
        let revision = member.put("latency", &index.to_string());
        let response = client.next().await;
        latencies.push(published.elapsed());
        assert_eq!(event_revision(&response.events[0]), revision);
    }
    latencies.sort();
    let percentile = |fraction: f64| latencies[((latencies.len() - 1) as f64 * fraction) as usize];
    eprintln!(
        "watch delivery latency (publication to client, 101 watchers): p50 {:?}, p99 {:?}, max {:?}",
        percentile(0.5),
        percentile(0.99),
        percentile(1.0)
    );
    assert!(percentile(0.5) < Duration::from_secs(1));
}
