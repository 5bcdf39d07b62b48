//! etcd's Watch service: one bidirectional gRPC stream carries any number of
//! watchers, each following the changes to a key or a key range from a start
//! revision on, served from this member's applied state (as etcd serves
//! watches from the member the client is connected to).
//!
//! # Guarantees
//!
//! For every watcher:
//!
//! - **Ordered:** events arrive in revision order, and within a revision in
//!   the order the write made its changes.
//! - **No gaps:** every change to the watched range at or after the start
//!   revision is delivered (unless a filter drops it), until the watcher is
//!   cancelled. A watcher that cannot be served without a gap, because the
//!   revisions it still needs were compacted, is cancelled instead, with
//!   `compact_revision` set, exactly as etcd does.
//! - **No duplicates:** each change is delivered once.
//! - **Atomic revisions:** all events of one revision are in one response.
//!   Only a watcher created with `fragment` may get one revision split over
//!   several responses, all but the last marked `fragment`, when the response
//!   would exceed the request size limit (etcd's rule).
//! - **Resumable:** a client that saw revision R on a stream that broke can
//!   create a watcher with `start_revision` R + 1, on any member, and get
//!   exactly the events it missed, as long as R + 1 is not compacted.
//! - **Progress:** a response without events (a periodic `progress_notify`
//!   or the answer to a `RequestProgress`) with `header.revision` R means the
//!   watcher (for `RequestProgress`: every watcher on the stream, `watch_id`
//!   -1) has been sent every event up to and including R. A `RequestProgress`
//!   is answered once every watcher on the stream has caught up with the
//!   revision the member had when the request arrived; etcd 3.5 waits for the
//!   same condition.
//!
//! # How
//!
//! - The [`feed`] (one per member) reads each newly applied revision's
//!   changes from the member loop once and keeps the newest few batches, up
//!   to a byte limit, for every watcher to share. This is etcd's "synced
//!   watchers" path: a write costs one read of the member loop however many
//!   watchers there are. When the feed drops a batch a watcher has not taken
//!   yet, it keeps that watcher's own events from it in a small spill, so a
//!   watcher of a quiet key does not fall behind because other keys are busy.
//! - Each watcher is a task ([`watcher`]). While it keeps up, it takes the
//!   feed's batches; when it falls further behind (its client reads slowly,
//!   or it started at an old revision) it reads history itself, in batches
//!   sized to a byte target, and rejoins the feed once caught up: etcd's
//!   "unsynced" path, but pulled at the pace the client reads instead of
//!   pushed into buffers. A slow watcher therefore holds at most one batch
//!   and one spill, never delays the feed or other watchers, and the
//!   member's memory does not grow with how far it lags.
//! - Each stream has one coordinator task ([`stream`]) that reads requests,
//!   creates and cancels watcher tasks and answers progress requests. All
//!   responses of a stream go through one bounded queue; its waiting senders
//!   are served first come, first served, so a watcher with a long backlog
//!   sends one response at a time and a watcher with a new event waits for at
//!   most one response from each other watcher of the stream.
//!
//! Header fields other than the revision (cluster, member, term) come from
//! the member's status, refreshed at most every [`HEADER_REFRESH_INTERVAL`].
//!
//! # Bounds
//!
//! Per stream: [`STREAM_RESPONSES_MAX`] queued responses (each one revision,
//! or whole revisions up to [`WATCHER_BUFFER_BYTES_TARGET`], or a fragment)
//! and [`WATCHERS_PER_STREAM_MAX`] watchers. Per watcher: one batch of about
//! [`WATCHER_BUFFER_BYTES_TARGET`] bytes (more only if one revision is
//! larger) and a spill of [`WATCHER_SPILL_BYTES_MAX`]. Per member: the
//! feed's [`FEED_RETAINED_BYTES_MAX`] (or its one newest batch), and at most
//! [`HISTORY_READS_IN_FLIGHT_MAX`] reads of history queued at the member
//! loop. Beyond these, HTTP/2 flow control stops a stream whose client does
//! not read.
//!
//! # Differences from etcd
//!
//! - Order between different watchers of a stream is not guaranteed (each
//!   watcher's own order is). etcd happens to interleave them by revision.
//! - A watcher cancelled by compaction is forgotten at once: a later cancel
//!   request for its ID gets no answer, and the ID may be reused.
//! - A `RequestProgress` on a stream with no watchers is answered (etcd 3.5
//!   since 3.5.8 ignores it); one on a stream whose watchers lag is answered
//!   once they caught up, with the revision they all reached.
//! - A compaction applied before the feed read the revisions it removes
//!   cancels the watchers that still needed them (etcd's watchers that keep
//!   up receive events as they are written and never meet a compaction).
//!   Compacting revisions younger than a few milliseconds is rare.
//! - The response that cancels a watcher for compaction carries the member's
//!   revision in its header and etcd's message in `cancel_reason` (etcd
//!   leaves both empty; clients look at `compact_revision`).
//! - A watcher cancelled while it was sending a fragmented revision may have
//!   sent only its first fragments; the `canceled` response follows them.

mod feed;
mod response;
mod stream;
mod watcher;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use keel_core::mvcc::{EventBatch, KeySpaceError};
use keel_types::etcdserverpb::{ResponseHeader, WatchRequest, WatchResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Status};

use crate::grpc::Services;
use crate::member::Input;

use feed::Feed;

/// etcd's default interval between progress notifications to an idle watcher
/// that asked for them (`progress_notify`). etcd adds up to a tenth of it as
/// jitter so watchers created together do not all fire together; so does keel.
pub const PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// etcd's default request size limit (`--max-request-bytes`, 1.5 MiB).
pub const REQUEST_BYTES_MAX_DEFAULT: usize = 1536 * 1024;

/// What etcd adds to the request size limit for gRPC framing; a response of
/// at least the sum is split into fragments for watchers that allow it.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Watchers one stream may have at once. etcd has no limit; keel has one so
/// that one client cannot make a member hold an unbounded number of batches.
pub const WATCHERS_PER_STREAM_MAX: usize = 1_024;

/// Responses queued on one stream for the client to read. This queue is what
/// makes watchers on a stream take turns; beyond it, HTTP/2 flow control
/// holds back the rest.
pub const STREAM_RESPONSES_MAX: usize = 16;

/// The most changes (of any key) one read of history may scan: etcd's bound
/// on the revisions one catch-up batch covers is 1,000 as well.
pub const BATCH_EVENTS_MAX: usize = 1_000;

/// About how many bytes of events one watcher holds at a time while it
/// catches up from history: its buffer. Batches are sized from the events
/// seen so far to stay near this; a single revision is never split, so a
/// batch may exceed it by one revision's events.
pub const WATCHER_BUFFER_BYTES_TARGET: usize = 1024 * 1024;

/// About how many bytes the feed reads from the member loop at once.
pub const FEED_BATCH_BYTES_TARGET: usize = 1024 * 1024;

/// Bytes of recent batches the feed keeps for watchers that are a little
/// behind; a watcher that falls further behind reads history instead.
pub const FEED_RETAINED_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Batches the feed keeps at most, however small they are.
pub const FEED_RETAINED_BATCHES_MAX: usize = 1_024;

/// Bytes of its own events a watcher keeps from feed batches dropped before
/// it took them (its client was slow). A watcher of rarely changing keys
/// thereby survives a burst of large values to other keys without reading
/// history; one that needs more reads history instead.
pub const WATCHER_SPILL_BYTES_MAX: usize = 256 * 1024;

/// Reads of history by catching-up watchers that may wait in the member
/// loop's input queue at once, across all streams: thousands of lagging
/// watchers take turns instead of crowding out client requests.
pub const HISTORY_READS_IN_FLIGHT_MAX: usize = 64;

/// How often response headers pick up a new term from the member's status.
pub const HEADER_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How long to wait before asking again when the member loop's input queue
/// is full. Watches never fail because the member is busy; they slow down.
const MEMBER_BUSY_RETRY_DELAY: Duration = Duration::from_millis(5);

/// The message etcd sends when a watcher's start revision was compacted.
const COMPACTED_REASON: &str = "etcdserver: mvcc: required revision has been compacted";

/// Limits and intervals of the Watch service. `Default` gives etcd's
/// defaults and keel's named limits; tests shorten the intervals.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Interval between progress notifications to idle watchers that asked
    /// for them ([`PROGRESS_NOTIFY_INTERVAL`]).
    pub progress_notify_interval: Duration,
    /// A response at least this large is fragmented for watchers that allow
    /// it: the request size limit plus [`GRPC_OVERHEAD_BYTES`], as in etcd.
    pub fragment_bytes_min: usize,
    /// [`WATCHERS_PER_STREAM_MAX`].
    pub watchers_per_stream_max: usize,
    /// [`STREAM_RESPONSES_MAX`].
    pub stream_responses_max: usize,
    /// [`BATCH_EVENTS_MAX`].
    pub batch_events_max: usize,
    /// [`WATCHER_BUFFER_BYTES_TARGET`].
    pub watcher_buffer_bytes_target: usize,
    /// [`FEED_BATCH_BYTES_TARGET`].
    pub feed_batch_bytes_target: usize,
    /// [`FEED_RETAINED_BYTES_MAX`].
    pub feed_retained_bytes_max: usize,
    /// [`FEED_RETAINED_BATCHES_MAX`].
    pub feed_retained_batches_max: usize,
    /// [`WATCHER_SPILL_BYTES_MAX`].
    pub watcher_spill_bytes_max: usize,
    /// [`HISTORY_READS_IN_FLIGHT_MAX`].
    pub history_reads_in_flight_max: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            progress_notify_interval: PROGRESS_NOTIFY_INTERVAL,
            fragment_bytes_min: REQUEST_BYTES_MAX_DEFAULT + GRPC_OVERHEAD_BYTES,
            watchers_per_stream_max: WATCHERS_PER_STREAM_MAX,
            stream_responses_max: STREAM_RESPONSES_MAX,
            batch_events_max: BATCH_EVENTS_MAX,
            watcher_buffer_bytes_target: WATCHER_BUFFER_BYTES_TARGET,
            feed_batch_bytes_target: FEED_BATCH_BYTES_TARGET,
            feed_retained_bytes_max: FEED_RETAINED_BYTES_MAX,
            feed_retained_batches_max: FEED_RETAINED_BATCHES_MAX,
            watcher_spill_bytes_max: WATCHER_SPILL_BYTES_MAX,
            history_reads_in_flight_max: HISTORY_READS_IN_FLIGHT_MAX,
        }
    }
}

impl WatchConfig {
    /// The defaults, with fragments sized for a member whose request size
    /// limit is `request_bytes_max` (its `--max-request-bytes`).
    pub fn with_request_bytes_max(request_bytes_max: usize) -> Self {
        WatchConfig {
            fragment_bytes_min: request_bytes_max + GRPC_OVERHEAD_BYTES,
            ..WatchConfig::default()
        }
    }
}

/// The Watch service over one member.
#[derive(Clone)]
pub struct WatchService {
    shared: Arc<Shared>,
}

/// What every stream and watcher of a member shares.
struct Shared {
    services: Services,
    config: WatchConfig,
    /// The member's published revision: every change at or below it is
    /// applied and readable.
    revision: tokio::sync::watch::Receiver<i64>,
    /// Started by the first stream, from inside the runtime.
    feed: OnceLock<Arc<Feed>>,
    /// The identity fields of response headers, and when they were read.
    header: Mutex<(ResponseHeader, Option<Instant>)>,
    /// Tells watcher tasks apart even when a stream reuses a watch ID.
    next_watcher_serial: AtomicU64,
    /// The average encoded size of a change (to any key) in the feed's last
    /// batch; 0 before the first. See [`Shared::read_events_max`].
    change_bytes_average: AtomicUsize,
    /// Permits for watchers' reads of history
    /// ([`WatchConfig::history_reads_in_flight_max`]).
    history_reads: tokio::sync::Semaphore,
}

impl WatchService {
    /// A Watch service reading history and revisions through `services`,
    /// with the default limits.
    pub fn new(services: Services) -> Self {
        WatchService::with_config(services, WatchConfig::default())
    }

    /// A Watch service with the given limits and intervals.
    pub fn with_config(services: Services, config: WatchConfig) -> Self {
        assert!(
            config.batch_events_max > 0,
            "a batch must be allowed at least one event"
        );
        assert!(
            config.stream_responses_max > 0,
            "a stream must be allowed at least one queued response"
        );
        let revision = services.revision();
        let history_reads = tokio::sync::Semaphore::new(config.history_reads_in_flight_max.max(1));
        WatchService {
            shared: Arc::new(Shared {
                services,
                config,
                revision,
                feed: OnceLock::new(),
                header: Mutex::new((ResponseHeader::default(), None)),
                next_watcher_serial: AtomicU64::new(0),
                change_bytes_average: AtomicUsize::new(0),
                history_reads,
            }),
        }
    }

    /// Serves one watch stream: `requests` are the client's, the returned
    /// stream is what the client reads. Every watcher task of the stream ends
    /// when the client stops reading for good (drops the returned stream) or
    /// its request stream fails.
    pub fn serve<S>(&self, requests: S) -> ReceiverStream<Result<WatchResponse, Status>>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        let (outbound, responses) = mpsc::channel(self.shared.config.stream_responses_max);
        let feed = self.shared.feed();
        tokio::spawn(stream::serve(
            requests,
            outbound,
            Arc::clone(&self.shared),
            feed,
        ));
        ReceiverStream::new(responses)
    }
}

#[tonic::async_trait]
impl crate::api::etcdserverpb::watch_server::Watch for WatchService {
    async fn watch(
        &self,
        request: Request<tonic::Streaming<WatchRequest>>,
    ) -> Result<tonic::Response<tonic::codegen::BoxStream<WatchResponse>>, Status> {
        let responses = self.serve(request.into_inner());
        Ok(tonic::Response::new(Box::pin(responses)))
    }
}

impl Shared {
    fn feed(self: &Arc<Self>) -> Arc<Feed> {
        Arc::clone(self.feed.get_or_init(|| Feed::start(Arc::clone(self))))
    }

    /// The member's newest published revision.
    fn current_revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// A response header at `revision`.
    fn header(&self, revision: i64) -> ResponseHeader {
        let guard = self.header.lock().unwrap_or_else(PoisonError::into_inner);
        ResponseHeader {
            revision,
            ..guard.0
        }
    }

    /// Reads the member's identity and term again if they are unknown or
    /// older than [`HEADER_REFRESH_INTERVAL`].
    async fn refresh_header(&self) {
        let fresh = {
            let guard = self.header.lock().unwrap_or_else(PoisonError::into_inner);
            guard
                .1
                .is_some_and(|read_at| read_at.elapsed() < HEADER_REFRESH_INTERVAL)
        };
        if fresh {
            return;
        }
        if let Ok((status, _)) = self.services.status().await {
            let mut guard = self.header.lock().unwrap_or_else(PoisonError::into_inner);
            *guard = (
                ResponseHeader {
                    cluster_id: status.cluster_id,
                    member_id: status.member_id,
                    revision: 0,
                    raft_term: status.term,
                },
                Some(Instant::now()),
            );
        }
    }

    /// The member's compacted revision, for the response that cancels a
    /// watcher whose next revision was compacted.
    async fn compact_revision(&self) -> Option<i64> {
        self.services
            .status()
            .await
            .ok()
            .map(|(status, _)| status.compact_revision)
    }

    /// How many changes a watcher may ask the member loop to scan, given
    /// what its own batch sizer wants. The member loop builds an event, value
    /// included, for every change it scans before keeping those in the
    /// watcher's range, so a watcher of a small key behind many large values
    /// of other keys must still ask for few changes at a time: the scan is
    /// also bounded by `bytes_target` over the size of the changes the feed
    /// saw last.
    fn read_events_max(&self, wanted: usize, bytes_target: usize) -> usize {
        match self.change_bytes_average.load(Ordering::Relaxed) {
            0 => wanted,
            average => wanted.min((bytes_target / average).max(1)),
        }
    }

    fn next_watcher_serial(&self) -> u64 {
        self.next_watcher_serial.fetch_add(1, Ordering::Relaxed)
    }
}

/// Why history could not be read.
#[derive(Debug)]
enum ReadError {
    /// The start revision is below the compacted revision.
    Compacted,
    /// The member loop is gone: the member is stopping.
    Stopped,
    /// The key space refused the read for another reason.
    Refused(KeySpaceError),
}

/// Reads changes at `start_revision` and later to `[key, range_end)` from the
/// member loop, scanning at most about `events_max` changes. Waits and asks
/// again while the member's input queue is full.
async fn read_events(
    services: &Services,
    start_revision: i64,
    events_max: usize,
    key: &[u8],
    range_end: &[u8],
) -> Result<EventBatch, ReadError> {
    loop {
        let (reply, answer) = oneshot::channel();
        let input = Input::Events {
            start_revision,
            events_max,
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            reply,
        };
        match services.send_input(input) {
            Ok(()) => {}
            Err(status) if status.code() == Code::ResourceExhausted => {
                tokio::time::sleep(MEMBER_BUSY_RETRY_DELAY).await;
                continue;
            }
            Err(_) => return Err(ReadError::Stopped),
        }
        return match answer.await {
            Ok(Ok(batch)) => Ok(batch),
            Ok(Err(KeySpaceError::Compacted)) => Err(ReadError::Compacted),
            Ok(Err(error)) => Err(ReadError::Refused(error)),
            Err(_) => Err(ReadError::Stopped),
        };
    }
}

/// Chooses how many changes to ask the member loop for at once so that a
/// batch holds about `bytes_target` bytes whatever the size of values: many
/// small events per round trip, few large ones. It grows at most twofold per
/// batch, so a run of tiny events followed by huge ones overshoots the
/// target by a bounded factor only.
#[derive(Debug, Clone)]
struct BatchSizer {
    events_max: usize,
    events_limit: usize,
    bytes_target: usize,
}

/// Changes asked for in the first batch, before any size is known.
const BATCH_EVENTS_INITIAL: usize = 64;

impl BatchSizer {
    fn new(bytes_target: usize, events_limit: usize) -> Self {
        BatchSizer {
            events_max: BATCH_EVENTS_INITIAL.min(events_limit).max(1),
            events_limit: events_limit.max(1),
            bytes_target,
        }
    }

    fn events_max(&self) -> usize {
        self.events_max
    }

    /// Records a batch of `events` events taking `bytes` bytes.
    fn observe(&mut self, events: usize, bytes: usize) {
        let grown = self.events_max.saturating_mul(2);
        let fitting = match bytes.checked_div(events) {
            None => grown,
            Some(average) => (self.bytes_target / average.max(1)).max(1),
        };
        self.events_max = fitting.min(grown).min(self.events_limit).max(1);
    }
}
