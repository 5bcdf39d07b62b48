//! The member's event feed: one task reads each newly applied revision's
//! changes (to every key) from the member loop once, and keeps the newest
//! batches for all watchers that are keeping up.
//!
//! The feed never waits for a watcher. It keeps batches up to
//! [`WatchConfig::feed_retained_bytes_max`](super::WatchConfig) bytes and
//! [`WatchConfig::feed_retained_batches_max`](super::WatchConfig) batches
//! (always the newest one). When it drops a batch that a subscriber has not
//! taken yet, it copies that subscriber's share of it (the events in its key
//! range) into the subscriber's spill, up to
//! [`WatchConfig::watcher_spill_bytes_max`](super::WatchConfig) bytes: a
//! watcher of a small key whose client is slow on a stream full of large
//! values loses nothing and keeps up as soon as its client reads. A
//! subscriber whose spill overflows learns that it
//! [lagged](FeedError::Lagged) and reads history itself instead. So the
//! feed's memory is bounded however slow watchers are, and a slow watcher
//! costs the others nothing.
//!
//! Batches are contiguous: each covers the revisions `[start_revision,
//! next_revision)` and the next one starts where it ended (a spill covers the
//! revisions of the batches it replaces). A subscriber receives every batch
//! published after it subscribed; together with its `start_revision` (the
//! feed's position at that moment) that tells a watcher exactly which
//! revisions it must read from history itself.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_types::mvccpb::Event;
use prost::Message;
use tokio::sync::watch;

use super::response::event_revision;
use super::{read_events, BatchSizer, ReadError, Shared};
use crate::member::key_in_range;

/// One thing the feed publishes.
#[derive(Debug)]
pub(super) enum FeedItem {
    /// Every change at revisions `[start_revision, next_revision)`, in order.
    Changes {
        start_revision: i64,
        next_revision: i64,
        events: Vec<Event>,
    },
    /// The feed needed revisions that were compacted before it read them: a
    /// watcher that still needs a revision below `compact_revision` cannot be
    /// served without a gap. The next batch starts at `compact_revision`.
    Compacted { compact_revision: i64 },
}

/// Why a subscriber got no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FeedError {
    /// Items this subscriber had not taken yet were dropped to bound memory.
    Lagged,
    /// The feed stopped: the member is stopping.
    Closed,
}

/// The shared feed. Created by [`Feed::start`].
pub(super) struct Feed {
    state: Mutex<FeedState>,
    /// (the sequence number the next item will get, closed), so subscribers
    /// can wait for news without holding the lock.
    published: watch::Sender<(u64, bool)>,
    retained_bytes_max: usize,
    retained_batches_max: usize,
    spill_bytes_max: usize,
}

struct FeedState {
    /// Published items still kept, oldest first.
    retained: VecDeque<Retained>,
    /// The sequence number of `retained[0]`.
    first_sequence: u64,
    /// Sum of `retained[..].bytes`.
    retained_bytes: usize,
    /// Every revision below this has been published (or nobody was listening
    /// when it was applied); the next batch starts here.
    next_revision: i64,
    /// Live subscribers by identifier. With none, the feed skips revisions
    /// without reading them.
    subscribers: HashMap<u64, SubscriberState>,
    next_subscriber_id: u64,
    closed: bool,
}

struct Retained {
    item: Arc<FeedItem>,
    bytes: usize,
}

/// What the feed knows of one subscriber.
struct SubscriberState {
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The sequence number of the next item it takes; never below the
    /// feed's `first_sequence` (dropping an item moves it past).
    sequence: u64,
    /// Its share of the items dropped before it took them.
    spill: Option<Spill>,
}

/// The events in a subscriber's range from items dropped before it took
/// them, covering the revisions `[start_revision, next_revision)`.
struct Spill {
    start_revision: i64,
    next_revision: i64,
    events: Vec<Event>,
    bytes: usize,
    /// Too large to keep: the subscriber must read history instead.
    overflowed: bool,
}

impl SubscriberState {
    /// Takes this subscriber's share of `item`, which is being dropped.
    fn absorb(&mut self, item: &FeedItem, spill_bytes_max: usize) {
        match item {
            FeedItem::Changes {
                start_revision,
                next_revision,
                events,
            } => {
                let spill = self.spill.get_or_insert_with(|| Spill {
                    start_revision: *start_revision,
                    next_revision: *start_revision,
                    events: Vec::new(),
                    bytes: 0,
                    overflowed: false,
                });
                debug_assert_eq!(spill.next_revision, *start_revision, "items are contiguous");
                spill.next_revision = *next_revision;
                if spill.overflowed {
                    return;
                }
                for event in events.iter().filter(|event| {
                    event
                        .kv
                        .as_ref()
                        .is_some_and(|kv| key_in_range(&kv.key, &self.key, &self.range_end))
                }) {
                    spill.bytes += event.encoded_len();
                    spill.events.push(event.clone());
                }
                if spill.bytes > spill_bytes_max {
                    spill.overflowed = true;
                    spill.events = Vec::new();
                }
            }
            // The subscriber reads history and meets the compaction there.
            FeedItem::Compacted { .. } => {
                let spill = self.spill.get_or_insert_with(|| Spill {
                    start_revision: 0,
                    next_revision: 0,
                    events: Vec::new(),
                    bytes: 0,
                    overflowed: true,
                });
                spill.overflowed = true;
                spill.events = Vec::new();
            }
        }
    }
}

impl Feed {
    /// Starts the feed at the member's current revision and spawns its task.
    pub(super) fn start(shared: Arc<Shared>) -> Arc<Feed> {
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState {
                retained: VecDeque::new(),
                first_sequence: 0,
                retained_bytes: 0,
                next_revision: shared.current_revision() + 1,
                subscribers: HashMap::new(),
                next_subscriber_id: 0,
                closed: false,
            }),
            published: watch::Sender::new((0, false)),
            retained_bytes_max: shared.config.feed_retained_bytes_max,
            retained_batches_max: shared.config.feed_retained_batches_max.max(1),
            spill_bytes_max: shared.config.watcher_spill_bytes_max,
        });
        tokio::spawn(Arc::clone(&feed).run(shared));
        feed
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A subscriber for the keys in `[key, range_end)` (etcd's conventions)
    /// that will receive every item published from now on.
    pub(super) fn subscribe(self: &Arc<Self>, key: &[u8], range_end: &[u8]) -> Subscriber {
        let mut state = self.lock();
        let id = state.next_subscriber_id;
        state.next_subscriber_id += 1;
        let sequence = state.first_sequence + state.retained.len() as u64;
        state.subscribers.insert(
            id,
            SubscriberState {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                sequence,
                spill: None,
            },
        );
        Subscriber {
            feed: Arc::clone(self),
            id,
            published: self.published.subscribe(),
            start_revision: state.next_revision,
        }
    }

    /// Reads each new revision's changes from the member loop and publishes
    /// them, until the member stops.
    async fn run(self: Arc<Self>, shared: Arc<Shared>) {
        let mut revision = shared.revision.clone();
        let mut sizer = BatchSizer::new(
            shared.config.feed_batch_bytes_target,
            shared.config.batch_events_max,
        );
        loop {
            let next_revision = self.lock().next_revision;
            let current = match revision.wait_for(|&current| current >= next_revision).await {
                Ok(current) => *current,
                Err(_) => break,
            };
            {
                // Nobody listens: move on without reading. A later subscriber
                // reads what it needs from history, starting from its own
                // position; this is under the lock that `subscribe` takes, so
                // no subscriber can miss the revisions skipped here.
                let mut state = self.lock();
                if state.subscribers.is_empty() {
                    state.next_revision = state.next_revision.max(current + 1);
                    continue;
                }
            }
            shared.refresh_header().await;
            match read_events(
                &shared.services,
                next_revision,
                sizer.events_max(),
                &[],
                &[0],
            )
            .await
            {
                Ok(batch) => {
                    let bytes = events_bytes(&batch.events);
                    sizer.observe(batch.events.len(), bytes);
                    if let Some(average) = bytes.checked_div(batch.events.len()) {
                        shared
                            .change_bytes_average
                            .store(average.max(1), Ordering::Relaxed);
                    }
                    debug_assert!(batch.next_revision > next_revision, "the feed must advance");
                    let item = FeedItem::Changes {
                        start_revision: next_revision,
                        next_revision: batch.next_revision,
                        events: batch.events,
                    };
                    self.publish(item, bytes, batch.next_revision);
                }
                Err(ReadError::Compacted) => {
                    let Some(compact_revision) = shared.compact_revision().await else {
                        break;
                    };
                    let compact_revision = compact_revision.max(next_revision);
                    tracing::warn!(
                        next_revision,
                        compact_revision,
                        "the watch feed fell behind a compaction"
                    );
                    self.publish(
                        FeedItem::Compacted { compact_revision },
                        0,
                        compact_revision,
                    );
                }
                Err(ReadError::Refused(error)) => {
                    tracing::error!(%error, "the watch feed cannot read history");
                    break;
                }
                Err(ReadError::Stopped) => break,
            }
        }
        self.close();
    }

    /// Appends an item, moves the feed's position to `next_revision` and drops
    /// the oldest items beyond the limits (always keeping the newest), after
    /// copying into their spills what subscribers that had not taken them
    /// need.
    fn publish(&self, item: FeedItem, bytes: usize, next_revision: i64) {
        let sequence_end = {
            let mut guard = self.lock();
            let state = &mut *guard;
            state.retained.push_back(Retained {
                item: Arc::new(item),
                bytes,
            });
            state.retained_bytes += bytes;
            state.next_revision = next_revision;
            while state.retained.len() > 1
                && (state.retained_bytes > self.retained_bytes_max
                    || state.retained.len() > self.retained_batches_max)
            {
                let dropped = state.retained.pop_front().expect("not empty");
                let dropped_sequence = state.first_sequence;
                state.retained_bytes -= dropped.bytes;
                state.first_sequence += 1;
                for subscriber in state.subscribers.values_mut() {
                    if subscriber.sequence == dropped_sequence {
                        subscriber.absorb(&dropped.item, self.spill_bytes_max);
                        subscriber.sequence += 1;
                    }
                }
            }
            state.first_sequence + state.retained.len() as u64
        };
        self.published.send_replace((sequence_end, false));
    }

    fn close(&self) {
        self.lock().closed = true;
        self.published.send_modify(|(_, closed)| *closed = true);
    }

    /// (batches, bytes) kept.
    #[cfg(test)]
    pub(super) fn retained(&self) -> (usize, usize) {
        let state = self.lock();
        (state.retained.len(), state.retained_bytes)
    }

    /// The revision the next batch starts at.
    #[cfg(test)]
    pub(super) fn next_revision(&self) -> i64 {
        self.lock().next_revision
    }

    #[cfg(test)]
    pub(super) fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }
}

/// The encoded size of events, which is what they cost in memory within a
/// small factor.
pub(super) fn events_bytes(events: &[Event]) -> usize {
    events.iter().map(Message::encoded_len).sum()
}

/// One watcher's place in the feed.
pub(super) struct Subscriber {
    feed: Arc<Feed>,
    /// Its entry in the feed's `subscribers`.
    id: u64,
    published: watch::Receiver<(u64, bool)>,
    /// The feed's position when this subscriber joined: every change at this
    /// revision or later comes through the subscription (unless it lags);
    /// earlier ones must be read from history.
    pub(super) start_revision: i64,
}

impl Subscriber {
    /// The next item, waiting for it if necessary. Cancel safe.
    pub(super) async fn next(&mut self) -> Result<Arc<FeedItem>, FeedError> {
        loop {
            let sequence = {
                let mut guard = self.feed.lock();
                let state = &mut *guard;
                let subscriber = state
                    .subscribers
                    .get_mut(&self.id)
                    .expect("a subscriber is registered until dropped");
                if let Some(spill) = subscriber.spill.take() {
                    if spill.overflowed {
                        return Err(FeedError::Lagged);
                    }
                    debug_assert!(spill
                        .events
                        .iter()
                        .all(|event| event_revision(event) >= spill.start_revision));
                    return Ok(Arc::new(FeedItem::Changes {
                        start_revision: spill.start_revision,
                        next_revision: spill.next_revision,
                        events: spill.events,
                    }));
                }
                let offset = (subscriber.sequence - state.first_sequence) as usize;
                if let Some(retained) = state.retained.get(offset) {
                    subscriber.sequence += 1;
                    return Ok(Arc::clone(&retained.item));
                }
                if state.closed {
                    return Err(FeedError::Closed);
                }
                subscriber.sequence
            };
            // The sender lives in the feed this subscriber holds, so this
            // cannot fail; a closed feed is announced through the flag.
            let _ = self
                .published
                .wait_for(|&(end, closed)| end > sequence || closed)
                .await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.feed.lock().subscribers.remove(&self.id);
    }
}
