//! One watch stream. Its coordinator task reads the client's requests,
//! creates and cancels watcher tasks, answers progress requests, and stops
//! every watcher task of the stream when the stream ends.
//!
//! Ordering on the stream: a watcher's `created` response is queued before
//! its task starts, so it precedes the watcher's events; a `canceled`
//! response is queued after the task has stopped, so no event of the
//! watcher follows it; a progress response for the stream (`watch_id` -1)
//! is queued only after every watcher has queued everything up to the
//! revision it reports.

use std::collections::HashMap;
use std::sync::Arc;

use keel_types::etcdserverpb::watch_create_request::FilterType;
use keel_types::etcdserverpb::watch_request::RequestUnion;
use keel_types::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::feed::Feed;
use super::watcher::{Ending, Outbound, StreamLink, Watcher, WatcherPosition, WatcherSpec};
use super::{Shared, COMPACTED_REASON};

/// The watch ID of responses that belong to no single watcher (etcd's
/// `InvalidWatchID`): refused creates and stream-wide progress.
const NO_WATCH_ID: i64 = -1;

/// etcd's message for a create whose key is not below its range end.
const EMPTY_RANGE_REASON: &str = "mvcc: watcher range is empty";

/// etcd's message for a create that reuses a live watch ID.
const DUPLICATE_ID_REASON: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// The client stopped reading the stream for good.
struct Disconnected;

/// A watcher task as the coordinator holds it.
struct WatcherHandle {
    /// Distinguishes this task from earlier ones that had the same watch ID.
    serial: u64,
    task: JoinHandle<()>,
    position: Arc<WatcherPosition>,
}

/// A watcher task's last word: (watch ID, serial, why it ended).
type Finished = (i64, u64, Ending);

struct Coordinator {
    shared: Arc<Shared>,
    feed: Arc<Feed>,
    outbound: Outbound,
    watchers: HashMap<i64, WatcherHandle>,
    /// The next automatically assigned watch ID (etcd starts at 0).
    next_watch_id: i64,
    /// The member's revision when the oldest unanswered progress request
    /// arrived; later requests are answered by the same response.
    progress_wanted: Option<i64>,
    /// Notified whenever a watcher's position moves.
    moved: Arc<Notify>,
    finished: mpsc::Sender<Finished>,
}

/// Serves one stream until the client goes away (or its request stream
/// fails), then stops every watcher task of the stream.
pub(super) async fn serve<S>(
    mut requests: S,
    outbound: Outbound,
    shared: Arc<Shared>,
    feed: Arc<Feed>,
) where
    S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
{
    shared.refresh_header().await;
    // Every watcher sends at most one message, and there are never more than
    // the limit alive, so this never holds a watcher back for long.
    let (finished_sender, mut finished) =
        mpsc::channel::<Finished>(shared.config.watchers_per_stream_max.max(1));
    let moved = Arc::new(Notify::new());
    let mut coordinator = Coordinator {
        shared,
        feed,
        outbound: outbound.clone(),
        watchers: HashMap::new(),
        next_watch_id: 0,
        progress_wanted: None,
        moved: Arc::clone(&moved),
        finished: finished_sender,
    };
    // A client that half-closes its side still gets events, as with etcd,
    // until it stops reading.
    let mut requests_open = true;
    loop {
        let step = tokio::select! {
            request = requests.next(), if requests_open => match request {
                Some(Ok(request)) => coordinator.handle(request).await,
                Some(Err(status)) => {
                    tracing::debug!(%status, "watch stream ended by the client");
                    Err(Disconnected)
                }
                None => {
                    requests_open = false;
                    Ok(())
                }
            },
            Some(message) = finished.recv() => coordinator.finished(message).await,
            _ = outbound.closed() => Err(Disconnected),
            _ = moved.notified(), if coordinator.progress_wanted.is_some() => {
                coordinator.answer_progress().await
            }
        };
        if step.is_err() {
            break;
        }
    }
    coordinator.stop_all().await;
}

impl Coordinator {
    async fn handle(&mut self, request: WatchRequest) -> Result<(), Disconnected> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => self.cancel(cancel.watch_id).await,
            Some(RequestUnion::ProgressRequest(_)) => {
                let current = self.shared.current_revision();
                self.progress_wanted = Some(self.progress_wanted.unwrap_or(current));
                self.answer_progress().await
            }
            // etcd ignores requests it does not understand rather than end
            // the stream.
            None => Ok(()),
        }
    }

    async fn create(&mut self, create: WatchCreateRequest) -> Result<(), Disconnected> {
        // etcd's conventions: an empty key is the smallest key, "\0".
        let key = if create.key.is_empty() {
            vec![0]
        } else {
            create.key
        };
        let range_end = create.range_end;
        if create.start_revision < 0 {
            return self.refuse(COMPACTED_REASON.to_string()).await;
        }
        if !range_end.is_empty() && range_end != [0] && key >= range_end {
            return self.refuse(EMPTY_RANGE_REASON.to_string()).await;
        }
        let watch_id = if create.watch_id == 0 {
            while self.watchers.contains_key(&self.next_watch_id) {
                self.next_watch_id += 1;
            }
            self.next_watch_id += 1;
            self.next_watch_id - 1
        } else if self.watchers.contains_key(&create.watch_id) {
            return self.refuse(DUPLICATE_ID_REASON.to_string()).await;
        } else {
            create.watch_id
        };
        let watchers_max = self.shared.config.watchers_per_stream_max;
        if self.watchers.len() >= watchers_max {
            return self
                .refuse(format!(
                    "keel: too many watchers on one stream (at most {watchers_max}); \
                     cancel some or open another stream"
                ))
                .await;
        }

        let subscriber = self.feed.subscribe(&key, &range_end);
        let current = self.shared.current_revision();
        // "From now" starts after what the member has applied and the feed
        // has published, whichever is newer, and the created response says
        // so: every event after its header revision will be delivered.
        let (next_revision, header_revision) = if create.start_revision == 0 {
            let next_revision = subscriber.start_revision.max(current + 1);
            (next_revision, next_revision - 1)
        } else {
            (create.start_revision, current)
        };
        let spec = WatcherSpec {
            watch_id,
            key,
            range_end,
            start_revision: create.start_revision,
            prev_kv: create.prev_kv,
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
            fragment: create.fragment,
            progress_notify: create.progress_notify,
        };
        tracing::debug!(watch_id, next_revision, "watcher created");
        self.send(WatchResponse {
            header: Some(self.shared.header(header_revision)),
            watch_id,
            created: true,
            ..WatchResponse::default()
        })
        .await?;

        let position = Arc::new(WatcherPosition::new(next_revision));
        let serial = self.shared.next_watcher_serial();
        let link = StreamLink {
            outbound: self.outbound.clone(),
            moved: Arc::clone(&self.moved),
        };
        let watcher = Watcher::new(
            spec,
            next_revision,
            Arc::clone(&position),
            link,
            Arc::clone(&self.shared),
            Arc::clone(&self.feed),
        );
        let finished = self.finished.clone();
        let task = tokio::spawn(async move {
            let ending = watcher.run(subscriber).await;
            let _ = finished.send((watch_id, serial, ending)).await;
        });
        self.watchers.insert(
            watch_id,
            WatcherHandle {
                serial,
                task,
                position,
            },
        );
        Ok(())
    }

    /// etcd's answer to a create it refuses: created and canceled at once,
    /// with watch ID -1 and the reason.
    async fn refuse(&mut self, reason: String) -> Result<(), Disconnected> {
        self.send(WatchResponse {
            header: Some(self.shared.header(self.shared.current_revision())),
            watch_id: NO_WATCH_ID,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..WatchResponse::default()
        })
        .await
    }

    /// Stops the watcher and then confirms; an unknown ID gets no answer, as
    /// in etcd.
    async fn cancel(&mut self, watch_id: i64) -> Result<(), Disconnected> {
        let Some(handle) = self.watchers.remove(&watch_id) else {
            return Ok(());
        };
        handle.task.abort();
        // Wait until the task has really stopped, so that none of its
        // responses can follow the canceled one.
        let _ = handle.task.await;
        tracing::debug!(watch_id, "watcher canceled");
        self.send(WatchResponse {
            header: Some(self.shared.header(self.shared.current_revision())),
            watch_id,
            canceled: true,
            ..WatchResponse::default()
        })
        .await?;
        self.answer_progress().await
    }

    async fn finished(&mut self, (watch_id, serial, ending): Finished) -> Result<(), Disconnected> {
        if self
            .watchers
            .get(&watch_id)
            .is_some_and(|handle| handle.serial == serial)
        {
            self.watchers.remove(&watch_id);
        }
        match ending {
            Ending::Compacted => self.answer_progress().await,
            Ending::Disconnected => Err(Disconnected),
            Ending::Stopped => {
                let _ = self
                    .outbound
                    .send(Err(Status::unavailable("etcdserver: server stopped")))
                    .await;
                Err(Disconnected)
            }
        }
    }

    /// Answers a pending progress request once every watcher has queued
    /// everything up to the revision the member had when it arrived. The
    /// response reports the newest revision up to which that holds for all.
    async fn answer_progress(&mut self) -> Result<(), Disconnected> {
        let Some(wanted) = self.progress_wanted else {
            return Ok(());
        };
        let revision = self
            .watchers
            .values()
            .map(|handle| handle.position.next_revision() - 1)
            .min()
            .unwrap_or_else(|| self.shared.current_revision().max(wanted));
        if revision < wanted {
            return Ok(());
        }
        self.progress_wanted = None;
        self.send(WatchResponse {
            header: Some(self.shared.header(revision)),
            watch_id: NO_WATCH_ID,
            ..WatchResponse::default()
        })
        .await
    }

    async fn send(&self, response: WatchResponse) -> Result<(), Disconnected> {
        self.outbound
            .send(Ok(response))
            .await
            .map_err(|_| Disconnected)
    }

    /// Stops every watcher task and waits until they have stopped, so none
    /// outlives its stream.
    async fn stop_all(&mut self) {
        let handles: Vec<WatcherHandle> = self.watchers.drain().map(|(_, handle)| handle).collect();
        for handle in &handles {
            handle.task.abort();
        }
        for handle in handles {
            let _ = handle.task.await;
        }
    }
}
