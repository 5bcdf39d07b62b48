//! One watcher: a task that sends the changes to its key range, from its
//! next revision on, to its stream's response queue.
//!
//! It alternates between two ways of getting events:
//!
//! - **catching up:** while its next revision is below its feed
//!   subscription's start, it reads history from the member loop itself, in
//!   batches sized to [`WatchConfig::watcher_buffer_bytes_target`](super::WatchConfig),
//!   and reads the next batch only after the previous one is queued for the
//!   client. A watcher whose client reads slowly therefore holds one batch,
//!   however far behind it is.
//! - **following:** once caught up, it takes the feed's batches (and its
//!   spill of batches the feed dropped before it took them). If it falls so
//!   far behind that its spill overflowed, it subscribes again and catches
//!   up from history.
//!
//! `next_revision` is the watcher's one piece of progress: every change to
//! its range below it has been queued for the client (or filtered out), and
//! none at or above it has. Every step only moves it forward past what was
//! queued, which is what makes delivery gap-free and duplicate-free.

use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use keel_types::etcdserverpb::WatchResponse;
use keel_types::mvccpb::event::EventType;
use keel_types::mvccpb::Event;
use tokio::sync::{mpsc, Notify};
use tokio::time::MissedTickBehavior;
use tonic::Status;

use super::feed::{events_bytes, Feed, FeedError, FeedItem, Subscriber};
use super::response::{event_revision, fragments, group_by_revision};
use super::{read_events, BatchSizer, ReadError, Shared, COMPACTED_REASON};
use crate::member::key_in_range;

/// What a watcher watches, from its create request.
#[derive(Debug, Clone)]
pub(super) struct WatcherSpec {
    pub(super) watch_id: i64,
    pub(super) key: Vec<u8>,
    pub(super) range_end: Vec<u8>,
    /// As requested: 0 means "from now".
    pub(super) start_revision: i64,
    pub(super) prev_kv: bool,
    pub(super) no_put: bool,
    pub(super) no_delete: bool,
    pub(super) fragment: bool,
    pub(super) progress_notify: bool,
}

/// A watcher's progress as its stream's coordinator sees it.
#[derive(Debug)]
pub(super) struct WatcherPosition {
    /// The watcher's next revision, stored (with release ordering) only after
    /// every response for the revisions below it is in the stream's queue.
    next_revision: AtomicI64,
}

impl WatcherPosition {
    pub(super) fn new(next_revision: i64) -> Self {
        WatcherPosition {
            next_revision: AtomicI64::new(next_revision),
        }
    }

    /// Every event below this revision is in the stream's queue.
    pub(super) fn next_revision(&self) -> i64 {
        self.next_revision.load(Ordering::Acquire)
    }
}

/// Why a watcher task ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// It was cancelled because revisions it needed were compacted; it sent
    /// the response saying so.
    Compacted,
    /// The member is stopping.
    Stopped,
    /// The client stopped reading the stream for good.
    Disconnected,
}

/// The outbound queue of a stream.
pub(super) type Outbound = mpsc::Sender<Result<WatchResponse, Status>>;

/// A watcher task's state.
pub(super) struct Watcher {
    spec: WatcherSpec,
    next_revision: i64,
    position: Arc<WatcherPosition>,
    /// Wakes the coordinator when `position` moves (for progress requests).
    moved: Arc<Notify>,
    outbound: Outbound,
    shared: Arc<Shared>,
    feed: Arc<Feed>,
    sizer: BatchSizer,
    /// Whether events were sent since the last progress tick (etcd elides
    /// the next progress notification then).
    sent_since_tick: bool,
}

/// The stream the watcher belongs to: where responses go and whom to tell
/// about progress.
pub(super) struct StreamLink {
    pub(super) outbound: Outbound,
    pub(super) moved: Arc<Notify>,
}

impl Watcher {
    pub(super) fn new(
        spec: WatcherSpec,
        next_revision: i64,
        position: Arc<WatcherPosition>,
        link: StreamLink,
        shared: Arc<Shared>,
        feed: Arc<Feed>,
    ) -> Self {
        let sizer = BatchSizer::new(
            shared.config.watcher_buffer_bytes_target,
            shared.config.batch_events_max,
        );
        Watcher {
            spec,
            next_revision,
            position,
            moved: link.moved,
            outbound: link.outbound,
            shared,
            feed,
            sizer,
            sent_since_tick: false,
        }
    }

    /// Runs until the watcher is compacted away, the member stops or the
    /// client goes away. (A cancel request aborts the task instead.)
    /// `subscriber` is the subscription taken when the watcher was created.
    pub(super) async fn run(self, subscriber: Subscriber) -> Ending {
        match self.serve(subscriber).await {
            Err(ending) => ending,
            Ok(never) => match never {},
        }
    }

    async fn serve(mut self, subscriber: Subscriber) -> Result<Infallible, Ending> {
        let interval = self.shared.config.progress_notify_interval;
        // etcd's jitter: up to a tenth of the interval, so that watchers
        // created together do not all fire together.
        let jitter = interval.mul_f64(rand::random::<f64>() / 10.0);
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + interval + jitter,
            interval + jitter,
        );
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut subscriber = Some(subscriber);
        loop {
            let mut current = match subscriber.take() {
                Some(subscriber) => subscriber,
                None => self.feed.subscribe(&self.spec.key, &self.spec.range_end),
            };
            while self.next_revision < current.start_revision {
                self.catch_up().await?;
            }
            loop {
                tokio::select! {
                    item = current.next() => match item {
                        Ok(item) => {
                            if !self.follow(&item).await? {
                                break;
                            }
                        }
                        Err(FeedError::Lagged) => break,
                        Err(FeedError::Closed) => return Err(Ending::Stopped),
                    },
                    _ = ticker.tick(), if self.spec.progress_notify => {
                        self.progress_tick().await?;
                    }
                }
            }
        }
    }

    /// Reads one batch of history from the next revision on and sends it.
    async fn catch_up(&mut self) -> Result<(), Ending> {
        let events_max = self.shared.read_events_max(
            self.sizer.events_max(),
            self.shared.config.watcher_buffer_bytes_target,
        );
        let permit = self
            .shared
            .history_reads
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let read = read_events(
            &self.shared.services,
            self.next_revision,
            events_max,
            &self.spec.key,
            &self.spec.range_end,
        )
        .await;
        drop(permit);
        let batch = match read {
            Ok(batch) => batch,
            Err(ReadError::Compacted) => return Err(self.compacted(None).await),
            Err(ReadError::Stopped) => return Err(Ending::Stopped),
            Err(ReadError::Refused(error)) => {
                tracing::error!(%error, watch_id = self.spec.watch_id, "watch history refused");
                return Err(Ending::Stopped);
            }
        };
        debug_assert!(
            batch.next_revision > self.next_revision,
            "a read of history must advance"
        );
        self.sizer
            .observe(batch.events.len(), events_bytes(&batch.events));
        let events = self.filter(batch.events.into_iter());
        let bytes_target = self.shared.config.watcher_buffer_bytes_target;
        self.send_events(events, batch.next_revision, bytes_target)
            .await
    }

    /// Takes one feed item. Returns false when the subscription no longer
    /// fits the watcher's position and it must subscribe again.
    async fn follow(&mut self, item: &FeedItem) -> Result<bool, Ending> {
        match item {
            FeedItem::Changes {
                start_revision,
                next_revision,
                events,
            } => {
                if *next_revision <= self.next_revision {
                    return Ok(true);
                }
                if *start_revision > self.next_revision {
                    // Cannot happen: the watcher caught up to its
                    // subscription's start and batches are contiguous. Read
                    // history rather than leave a gap.
                    debug_assert!(false, "feed batch starts past the watcher");
                    return Ok(false);
                }
                let next = self.next_revision;
                let events = self.filter(
                    events
                        .iter()
                        .filter(|event| event_revision(event) >= next)
                        .filter(|event| {
                            event.kv.as_ref().is_some_and(|kv| {
                                key_in_range(&kv.key, &self.spec.key, &self.spec.range_end)
                            })
                        })
                        .cloned(),
                );
                self.send_events(events, *next_revision, 0).await?;
                Ok(true)
            }
            FeedItem::Compacted { compact_revision } => {
                if self.next_revision < *compact_revision {
                    return Err(self.compacted(Some(*compact_revision)).await);
                }
                Ok(true)
            }
        }
    }

    /// Applies the watcher's filters and drops `prev_kv` unless asked for.
    fn filter(&self, events: impl Iterator<Item = Event>) -> Vec<Event> {
        events
            .filter(|event| match event.r#type() {
                EventType::Put => !self.spec.no_put,
                EventType::Delete => !self.spec.no_delete,
            })
            .map(|mut event| {
                if !self.spec.prev_kv {
                    event.prev_kv = None;
                }
                event
            })
            .collect()
    }

    /// Sends `events` (every change to the range in `[next_revision,
    /// new_next_revision)` that passed the filters), grouped into responses
    /// of whole revisions of about `bytes_target` bytes, then moves the
    /// watcher to `new_next_revision`.
    async fn send_events(
        &mut self,
        events: Vec<Event>,
        new_next_revision: i64,
        bytes_target: usize,
    ) -> Result<(), Ending> {
        if !events.is_empty() {
            self.sent_since_tick = true;
            let header_revision = self.shared.current_revision().max(new_next_revision - 1);
            for group in group_by_revision(events, bytes_target) {
                let response = WatchResponse {
                    header: Some(self.shared.header(header_revision)),
                    watch_id: self.spec.watch_id,
                    events: group,
                    ..WatchResponse::default()
                };
                let parts = if self.spec.fragment {
                    fragments(response, self.shared.config.fragment_bytes_min)
                } else {
                    vec![response]
                };
                for part in parts {
                    self.send(part).await?;
                }
            }
        }
        self.next_revision = new_next_revision;
        self.position
            .next_revision
            .store(new_next_revision, Ordering::Release);
        self.moved.notify_one();
        Ok(())
    }

    /// A progress notification if no events were sent since the last tick
    /// and the watcher is synced, as etcd decides it: it has been sent
    /// everything up to the member's revision, and its start revision is not
    /// in the future.
    async fn progress_tick(&mut self) -> Result<(), Ending> {
        if std::mem::take(&mut self.sent_since_tick) {
            return Ok(());
        }
        let current = self.shared.current_revision();
        let synced = self.next_revision > current && current >= self.spec.start_revision;
        if synced {
            let response = WatchResponse {
                header: Some(self.shared.header(self.next_revision - 1)),
                watch_id: self.spec.watch_id,
                ..WatchResponse::default()
            };
            self.send(response).await?;
        }
        Ok(())
    }

    /// Sends the response that cancels this watcher because the revisions it
    /// needs were compacted (etcd sets `compact_revision` and `canceled`).
    async fn compacted(&mut self, compact_revision: Option<i64>) -> Ending {
        let compact_revision = match compact_revision {
            Some(revision) => revision,
            None => match self.shared.compact_revision().await {
                Some(revision) => revision,
                None => return Ending::Stopped,
            },
        };
        let response = WatchResponse {
            header: Some(self.shared.header(self.shared.current_revision())),
            watch_id: self.spec.watch_id,
            canceled: true,
            compact_revision,
            cancel_reason: COMPACTED_REASON.to_string(),
            ..WatchResponse::default()
        };
        match self.send(response).await {
            Ok(()) => Ending::Compacted,
            Err(ending) => ending,
        }
    }

    async fn send(&self, response: WatchResponse) -> Result<(), Ending> {
        self.outbound
            .send(Ok(response))
            .await
            .map_err(|_| Ending::Disconnected)
    }
}
