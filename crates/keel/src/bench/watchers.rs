//! The watch workload: watchers spread over gRPC streams (each stream on one
//! connection, round-robin), created and confirmed before the first put;
//! then the writers (the ordinary client tasks, see `clients.rs`) put values
//! that carry their intended send time, and every watcher's every event is
//! timed on receipt. After the last put the run waits, at most
//! `--request-timeout`, until every watcher has received every acknowledged
//! put.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keel_server::api::etcdserverpb::watch_client::WatchClient;
use keel_types::etcdserverpb::watch_request::RequestUnion;
use keel_types::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use keel_types::mvccpb::event::EventType;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Connection;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use super::report::{OperationError, Recorder, Timings};
use super::{clients, Plan, KEY_PREFIX, TIMESTAMP_BYTES};

/// Create requests queued on one stream: one, because each waits for its
/// confirmation before the next is sent (so the server never holds a backlog
/// of them, and a refusal is known at once).
const WATCH_REQUEST_QUEUE_MAX: usize = 1;

/// Aborts the stream tasks however the run ends.
struct StreamTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for StreamTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs the watch workload; see the module documentation. `epoch` is the
/// origin of the send times carried in the values.
pub async fn run(
    plan: &Arc<Plan>,
    channels: &[Channel],
    recorder: &Arc<Recorder>,
    epoch: Instant,
    watchers: usize,
    streams: usize,
    prefix: bool,
) -> anyhow::Result<Timings> {
    let (key, range_end) = if prefix {
        let key = KEY_PREFIX.as_bytes().to_vec();
        let range_end = crate::kv::prefix_end(&key);
        (key, range_end)
    } else {
        (plan.key(0), Vec::new())
    };
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key,
            range_end,
            ..WatchCreateRequest::default()
        })),
    };
    let mut tasks = StreamTasks(Vec::with_capacity(streams));
    let mut confirmations = Vec::with_capacity(streams);
    for stream_index in 0..streams {
        let watchers_on_stream =
            watchers / streams + usize::from(stream_index < watchers % streams);
        let (confirmed, confirmation) = oneshot::channel();
        tasks.0.push(tokio::spawn(watch_stream(
            channels[stream_index % channels.len()].clone(),
            watchers_on_stream,
            create.clone(),
            recorder.clone(),
            epoch,
            plan.request_timeout,
            confirmed,
        )));
        confirmations.push(confirmation);
    }
    for (stream_index, confirmation) in confirmations.into_iter().enumerate() {
        match confirmation.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => anyhow::bail!(
                "creating the watchers of stream {stream_index}: {} {}: {}",
                error.request,
                error.code,
                error.message
            ),
            Err(_) => anyhow::bail!("the task of watch stream {stream_index} ended early"),
        }
    }
    let writers_start = Instant::now();
    let connections: Vec<Connection> = channels.iter().cloned().map(Connection::Etcd).collect();
    let timings = clients::run(plan, &connections, recorder, epoch).await;
    // Every acknowledged put is committed, so every watcher must see it.
    let expected = recorder.operation_latency.count() * watchers as u64;
    let deadline = Instant::now() + plan.request_timeout;
    loop {
        // Taken before the check, so an increment in between is not missed
        // (notify_one leaves a permit when no one waits).
        let changed = recorder.events_delivered_changed.notified();
        if recorder.events_delivered.load(Ordering::Relaxed) >= expected {
            break;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            break;
        }
    }
    let events = writers_start.elapsed();
    drop(tasks);
    Ok(Timings {
        operations: timings.operations,
        events: Some(events),
    })
}

/// One watch stream: creates its watchers one by one, says so on
/// `confirmed`, then times every event until the task is aborted (or the
/// stream fails, which is recorded as an error).
async fn watch_stream(
    channel: Channel,
    watchers: usize,
    create: WatchRequest,
    recorder: Arc<Recorder>,
    epoch: Instant,
    request_timeout: Duration,
    confirmed: oneshot::Sender<Result<(), OperationError>>,
) {
    let (_requests, mut responses) =
        match create_watchers(channel, watchers, create, request_timeout).await {
            Ok(stream) => {
                let _ = confirmed.send(Ok(()));
                stream
            }
            Err(error) => {
                let _ = confirmed.send(Err(error));
                return;
            }
        };
    loop {
        match responses.message().await {
            Ok(Some(response)) if response.canceled => {
                recorder.record_error(OperationError::new(
                    "watch",
                    "Cancelled",
                    &response.cancel_reason,
                ));
                return;
            }
            Ok(Some(response)) => record_events(&response, &recorder, epoch),
            Ok(None) => {
                recorder.record_error(OperationError::new(
                    "watch",
                    "Unavailable",
                    "the watch stream ended",
                ));
                return;
            }
            Err(status) => {
                recorder.record_error(OperationError::status("watch", &status));
                return;
            }
        }
    }
}

/// Counts and times the put events of one response.
fn record_events(response: &WatchResponse, recorder: &Recorder, epoch: Instant) {
    let received = Instant::now();
    let mut delivered = 0;
    for event in &response.events {
        if event.r#type != EventType::Put as i32 {
            continue;
        }
        delivered += 1;
        let timestamp = event
            .kv
            .as_ref()
            .and_then(|key_value| key_value.value.get(..TIMESTAMP_BYTES))
            .and_then(|bytes| <[u8; TIMESTAMP_BYTES]>::try_from(bytes).ok());
        if let Some(timestamp) = timestamp {
            let sent = epoch + Duration::from_nanos(u64::from_be_bytes(timestamp));
            recorder
                .event_latency
                .record(received.saturating_duration_since(sent));
        }
    }
    if delivered > 0 {
        recorder
            .events_delivered
            .fetch_add(delivered, Ordering::Relaxed);
        recorder.events_delivered_changed.notify_one();
    }
}

/// Opens a watch stream and creates `watchers` watchers on it, each
/// confirmed by the server before the next is asked for. Returns the request
/// sender (which must stay open: closing it ends the stream) and the
/// responses.
async fn create_watchers(
    channel: Channel,
    watchers: usize,
    create: WatchRequest,
    request_timeout: Duration,
) -> Result<(mpsc::Sender<WatchRequest>, Streaming<WatchResponse>), OperationError> {
    let timed_out = || {
        OperationError::new(
            "watch",
            "DeadlineExceeded",
            &format!("no answer within --request-timeout {request_timeout:?}"),
        )
    };
    let closed = || OperationError::new("watch", "Unavailable", "the watch stream ended");
    let mut client = WatchClient::new(channel);
    let (requests, receiver) = mpsc::channel(WATCH_REQUEST_QUEUE_MAX);
    // Queued before the call: some servers send their response headers only
    // with the first response, and the call completes on the headers.
    requests.send(create.clone()).await.map_err(|_| closed())?;
    let mut responses =
        tokio::time::timeout(request_timeout, client.watch(ReceiverStream::new(receiver)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|status| OperationError::status("watch", &status))?
            .into_inner();
    for index in 0..watchers {
        if index > 0 {
            requests.send(create.clone()).await.map_err(|_| closed())?;
        }
        loop {
            let response = tokio::time::timeout(request_timeout, responses.message())
                .await
                .map_err(|_| timed_out())?
                .map_err(|status| OperationError::status("watch", &status))?
                .ok_or_else(closed)?;
            if response.canceled {
                return Err(OperationError::new(
                    "watch",
                    "Cancelled",
                    &response.cancel_reason,
                ));
            }
            // Anything else before the confirmation (there are no puts yet)
            // is not this watcher's business.
            if response.created {
                break;
            }
        }
    }
    Ok((requests, responses))
}
