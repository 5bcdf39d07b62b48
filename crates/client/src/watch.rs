//! Watches that survive member failures: [`Watcher`] reads one watch from a
//! background task which, when its stream breaks, opens a new one on another
//! member starting at the revision after the last one delivered.
//!
//! keel's (and etcd's) watch guarantees per watcher, ordered, no gaps, no
//! duplicates and resumable from any revision on any member, make this exact:
//! the consumer sees every revision once. The task also drops any event older
//! than the next expected revision, so a member that replays a little too
//! much cannot produce a duplicate. A member that can no longer serve the
//! needed revision (it was compacted) ends the watch with
//! [`ClientError::Compacted`].

use keel_types::etcdserverpb::watch_create_request::FilterType;
use keel_types::etcdserverpb::watch_request::RequestUnion;
use keel_types::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::api::etcdserverpb::watch_client::WatchClient;
use crate::error::{classify, ClientError, Failure};
use crate::selection::Route;
use crate::{prefix_end, Client};

/// Requests queued on one watch stream: the create request, nothing after.
const WATCH_REQUEST_QUEUE_MAX: usize = 1;

/// What to watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// The key, or the start of the range.
    pub key: Vec<u8>,
    /// The end of the range (exclusive); empty for the key alone.
    pub range_end: Vec<u8>,
    /// The first revision to deliver; 0 for "from now".
    pub start_revision: i64,
    /// Include each event's previous key-value.
    pub prev_kv: bool,
    /// Deliver the member's progress notifications (responses without events
    /// whose header revision says how far the watch is complete).
    pub progress_notify: bool,
    /// Event types the member leaves out.
    pub filters: Vec<FilterType>,
}

impl WatchOptions {
    /// Watch one key.
    pub fn key(key: impl Into<Vec<u8>>) -> WatchOptions {
        WatchOptions {
            key: key.into(),
            ..WatchOptions::default()
        }
    }

    /// Watch every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> WatchOptions {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        WatchOptions {
            key,
            range_end,
            ..WatchOptions::default()
        }
    }

    /// Start at `revision` (replaying history since then).
    pub fn from_revision(self, revision: i64) -> WatchOptions {
        WatchOptions {
            start_revision: revision,
            ..self
        }
    }

    /// Include previous key-values.
    pub fn with_prev_kv(self) -> WatchOptions {
        WatchOptions {
            prev_kv: true,
            ..self
        }
    }

    /// Deliver progress notifications.
    pub fn with_progress_notify(self) -> WatchOptions {
        WatchOptions {
            progress_notify: true,
            ..self
        }
    }

    fn create_request(&self, start_revision: i64) -> WatchRequest {
        WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: self.key.clone(),
                range_end: self.range_end.clone(),
                start_revision,
                progress_notify: self.progress_notify,
                filters: self.filters.iter().map(|filter| *filter as i32).collect(),
                prev_kv: self.prev_kv,
                ..WatchCreateRequest::default()
            })),
        }
    }
}

/// A watch that resumes across member failures. Yields the member's
/// responses that carry events (and progress notifications, if asked for);
/// ends with an error if the watch cannot go on (compaction, cancellation).
/// Dropping it stops the watch.
#[derive(Debug)]
pub struct Watcher {
    responses: mpsc::Receiver<Result<WatchResponse, ClientError>>,
    start_revision: i64,
    /// The endpoint the watch's current stream is open on.
    endpoint: watch::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// The next response, `None` after the watch ended with an error already
    /// delivered.
    pub async fn next(&mut self) -> Option<Result<WatchResponse, ClientError>> {
        self.responses.recv().await
    }

    /// The first revision this watch covers: the one asked for, or for a
    /// watch "from now" the revision after the store's when it was created.
    pub fn start_revision(&self) -> i64 {
        self.start_revision
    }

    /// The endpoint the watch is reading from now (it changes when the watch
    /// resumes on another member).
    pub fn endpoint(&self) -> String {
        self.endpoint.borrow().clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One open watch stream.
struct OpenWatch {
    index: usize,
    /// Kept so the member does not see the client close its side.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl Client {
    /// Starts a watch. The first stream is opened before this returns, with
    /// the retries of a read; after that, the watch reconnects by itself.
    pub async fn watch(&self, options: WatchOptions) -> Result<Watcher, ClientError> {
        let create = options.create_request(options.start_revision);
        self.check_size(&create)?;
        let started = Instant::now();
        let deadline = started + self.config().request_timeout;
        let mut tried = vec![false; self.inner.endpoints.len()];
        let mut attempts = 0;
        let (open, created) = loop {
            attempts += 1;
            let error = match self
                .open_watch(&options, options.start_revision, &mut tried)
                .await
            {
                Ok(opened) => break opened,
                Err((Failure::Answered, error)) => return Err(error),
                Err((_, error)) => error,
            };
            if attempts >= self.config().retry_attempts_max {
                return Err(ClientError::AttemptsExhausted {
                    attempts,
                    last: Box::new(error),
                    outcome_unknown: false,
                });
            }
            let delay = self.backoff_delay(attempts);
            if Instant::now() + delay >= deadline {
                return Err(ClientError::DeadlineExceeded {
                    timeout: self.config().request_timeout,
                    attempts,
                    last: Box::new(error),
                    outcome_unknown: false,
                });
            }
            if !self.withdraw_retry() {
                return Err(ClientError::RetryBudgetExhausted {
                    last: Box::new(error),
                });
            }
            tokio::time::sleep(delay).await;
        };
        let start_revision = if options.start_revision > 0 {
            options.start_revision
        } else {
            created.header.as_ref().map_or(0, |header| header.revision) + 1
        };
        let (sender, responses) = mpsc::channel(self.config().watch_queue_max);
        let (endpoint_sender, endpoint) =
            watch::channel(self.inner.endpoints[open.index].url.clone());
        let task = tokio::spawn(watch_task(
            self.clone(),
            options,
            start_revision,
            open,
            sender,
            endpoint_sender,
        ));
        Ok(Watcher {
            responses,
            start_revision,
            endpoint,
            task,
        })
    }

    /// Opens one watch stream at `start_revision` on an endpoint not yet
    /// tried, and waits for the member to confirm it was created.
    async fn open_watch(
        &self,
        options: &WatchOptions,
        start_revision: i64,
        tried: &mut [bool],
    ) -> Result<(OpenWatch, WatchResponse), (Failure, ClientError)> {
        let Some(index) = self.acquire_endpoint(Route::Any, tried) else {
            tried.fill(false);
            return Err((Failure::NotSent, ClientError::NoEndpointAvailable));
        };
        tried[index] = true;
        let endpoint = &self.inner.endpoints[index];
        let mut client = WatchClient::new(endpoint.channel.clone())
            .max_decoding_message_size(self.config().response_bytes_max);
        let (requests, receiver) = mpsc::channel(WATCH_REQUEST_QUEUE_MAX);
        let _ = requests.send(options.create_request(start_revision)).await;
        let attempt_timeout = self.config().attempt_timeout;
        let opened = tokio::time::timeout(attempt_timeout, async {
            let mut responses = client
                .watch(ReceiverStream::new(receiver))
                .await?
                .into_inner();
            let created = responses.message().await?.ok_or_else(|| {
                tonic::Status::unavailable("the watch stream ended before it was created")
            })?;
            Ok::<_, tonic::Status>((responses, created))
        })
        .await;
        let (responses, created) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(status)) => {
                let (failure, error) = classify(&endpoint.url, &status);
                self.record_outcome(index, Route::Any, Err(failure));
                return Err((failure, error));
            }
            Err(_) => {
                self.record_outcome(index, Route::Any, Err(Failure::NoAnswer));
                return Err((
                    Failure::NoAnswer,
                    ClientError::NoAnswer {
                        endpoint: endpoint.url.clone(),
                        code: tonic::Code::DeadlineExceeded,
                        message: format!("the watch was not created within {attempt_timeout:?}"),
                    },
                ));
            }
        };
        self.record_outcome(index, Route::Any, Ok(created.header.as_ref()));
        if created.canceled {
            return Err((Failure::Answered, cancellation(&created, start_revision)));
        }
        if !created.created {
            return Err((
                Failure::NoAnswer,
                ClientError::Protocol {
                    endpoint: endpoint.url.clone(),
                    message: "the first watch response did not confirm creation".to_string(),
                },
            ));
        }
        Ok((
            OpenWatch {
                index,
                _requests: requests,
                responses,
            },
            created,
        ))
    }
}

/// The error for a watch the member cancelled.
fn cancellation(response: &WatchResponse, next_revision: i64) -> ClientError {
    if response.compact_revision != 0 {
        ClientError::Compacted {
            revision: next_revision,
            compact_revision: response.compact_revision,
        }
    } else if response.cancel_reason.is_empty() {
        ClientError::WatchCanceled {
            reason: "no reason given".to_string(),
        }
    } else {
        ClientError::WatchCanceled {
            reason: response.cancel_reason.clone(),
        }
    }
}

/// Delivers the watch's responses, reopening the stream where it broke.
async fn watch_task(
    client: Client,
    options: WatchOptions,
    mut next_revision: i64,
    mut open: OpenWatch,
    sender: mpsc::Sender<Result<WatchResponse, ClientError>>,
    endpoint_sender: watch::Sender<String>,
) {
    loop {
        let broken = match open.responses.message().await {
            Ok(Some(mut response)) => {
                if response.canceled {
                    let _ = sender
                        .send(Err(cancellation(&response, next_revision)))
                        .await;
                    return;
                }
                if response.created {
                    continue;
                }
                let header_revision = response.header.as_ref().map_or(0, |header| header.revision);
                if response.events.is_empty() {
                    // A progress notification: everything up to its revision was sent.
                    next_revision = next_revision.max(header_revision + 1);
                    if options.progress_notify && sender.send(Ok(response)).await.is_err() {
                        return;
                    }
                    continue;
                }
                response.events.retain(|event| {
                    event
                        .kv
                        .as_ref()
                        .is_some_and(|kv| kv.mod_revision >= next_revision)
                });
                let Some(last) = response.events.last().and_then(|event| event.kv.as_ref()) else {
                    continue;
                };
                next_revision = last.mod_revision + 1;
                if sender.send(Ok(response)).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(None) => None,
            Err(status) => Some(status),
        };
        let endpoint = client.inner.endpoints[open.index].url.clone();
        match &broken {
            Some(status) => {
                let (failure, _) = classify(&endpoint, status);
                client.record_outcome(open.index, Route::Any, Err(failure));
            }
            None => client.record_outcome(open.index, Route::Any, Err(Failure::NoAnswer)),
        }
        tracing::debug!(%endpoint, next_revision, "watch stream broke; resuming");
        let mut tried = vec![false; client.inner.endpoints.len()];
        tried[open.index] = true;
        let mut retry = 0u32;
        open = loop {
            retry += 1;
            let delay = if client.withdraw_retry() {
                client.backoff_delay(retry)
            } else {
                // The budget is spent: keep resuming, at the slowest pace.
                client.config().backoff_max
            };
            tokio::time::sleep(delay).await;
            if sender.is_closed() {
                return;
            }
            match client.open_watch(&options, next_revision, &mut tried).await {
                Ok((open, _created)) => {
                    let _ = endpoint_sender.send(client.inner.endpoints[open.index].url.clone());
                    break open;
                }
                Err((Failure::Answered, error)) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                Err(_) => continue,
            }
        };
    }
}
