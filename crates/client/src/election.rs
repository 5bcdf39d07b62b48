//! Leader election and locks through etcd's v3election and v3lock services.
//!
//! A campaign (or a lock) is keyed by its lease: the candidate's key is
//! `name/<lease in hex>`, created in a transaction only if absent. Repeating
//! a campaign with the same lease therefore finds the same key and waits
//! again; it cannot make a second candidate. That is why the client retries
//! campaigns and locks like reads, across member failures, even though they
//! write. The leadership's fencing token is its key's create revision
//! ([`LeaderKey::rev`](keel_types::v3electionpb::LeaderKey)): guard every
//! write the leader makes with
//! `txn::compare_create_revision(&leader.key, CompareResult::Equal, leader.rev)`.

use keel_types::v3electionpb::{
    CampaignRequest, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};
use keel_types::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::api::v3electionpb::election_client::ElectionClient;
use crate::api::v3lockpb::lock_client::LockClient;
use crate::client::{Policy, Retry};
use crate::error::{classify, ClientError, Failure};
use crate::selection::Route;
use crate::Client;

/// Leader changes buffered between the observing task and its consumer.
const OBSERVE_QUEUE_MAX: usize = 16;

/// Waits for something to happen, safe to repeat (keyed by the lease).
const BLOCKING: Policy = Policy {
    route: Route::Leader,
    retry: Retry::Always,
    blocking: true,
};

impl Client {
    fn election_client(&self, channel: Channel) -> ElectionClient<Channel> {
        ElectionClient::new(channel)
            .max_decoding_message_size(self.inner.config.response_bytes_max)
            .max_encoding_message_size(self.inner.config.request_bytes_max)
    }

    fn lock_client(&self, channel: Channel) -> LockClient<Channel> {
        LockClient::new(channel)
            .max_decoding_message_size(self.inner.config.response_bytes_max)
            .max_encoding_message_size(self.inner.config.request_bytes_max)
    }

    /// Campaigns for leadership of election `name` with `lease`, publishing
    /// `value` once elected; waits until elected (or the handle's blocking
    /// timeout, see [`Client::with_blocking_timeout`]).
    pub async fn campaign(
        &self,
        name: impl Into<Vec<u8>>,
        lease: i64,
        value: impl Into<Vec<u8>>,
    ) -> Result<LeaderKey, ClientError> {
        let request = CampaignRequest {
            name: name.into(),
            lease,
            value: value.into(),
        };
        self.check_size(&request)?;
        let response = self
            .call(BLOCKING, |channel| {
                let request = request.clone();
                let mut client = self.election_client(channel);
                async move { client.campaign(request).await }
            })
            .await?;
        response.leader.ok_or_else(|| ClientError::Protocol {
            endpoint: String::new(),
            message: "a campaign was answered without a leader key".to_string(),
        })
    }

    /// Publishes a new value as the leader holding `leader`.
    pub async fn proclaim(
        &self,
        leader: LeaderKey,
        value: impl Into<Vec<u8>>,
    ) -> Result<ProclaimResponse, ClientError> {
        let request = ProclaimRequest {
            leader: Some(leader),
            value: value.into(),
        };
        self.check_size(&request)?;
        self.call(Policy::WRITE, |channel| {
            let request = request.clone();
            let mut client = self.election_client(channel);
            async move { client.proclaim(request).await }
        })
        .await
    }

    /// The current leader of election `name` (its key-value), if any; a
    /// member answers "election: no leader" (NotFound) when there is none.
    pub async fn election_leader(
        &self,
        name: impl Into<Vec<u8>>,
    ) -> Result<LeaderResponse, ClientError> {
        let request = LeaderRequest { name: name.into() };
        self.call(Policy::READ, |channel| {
            let request = request.clone();
            let mut client = self.election_client(channel);
            async move { client.leader(request).await }
        })
        .await
    }

    /// Gives up the leadership `leader`.
    pub async fn resign(&self, leader: LeaderKey) -> Result<ResignResponse, ClientError> {
        let request = ResignRequest {
            leader: Some(leader),
        };
        self.call(Policy::WRITE, |channel| {
            let request = request.clone();
            let mut client = self.election_client(channel);
            async move { client.resign(request).await }
        })
        .await
    }

    /// Observes election `name`: every change of leader (or of the leader's
    /// proclaimed value), reconnecting across member failures.
    pub async fn observe(&self, name: impl Into<Vec<u8>>) -> Result<Observer, ClientError> {
        let name = name.into();
        let (sender, receiver) = mpsc::channel(OBSERVE_QUEUE_MAX);
        let task = tokio::spawn(observe_task(self.clone(), name, sender));
        Ok(Observer { receiver, task })
    }

    /// Acquires lock `name` with `lease`; waits until held (or the handle's
    /// blocking timeout). The returned key's create revision is the fencing token.
    pub async fn lock(
        &self,
        name: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<LockResponse, ClientError> {
        let request = LockRequest {
            name: name.into(),
            lease,
        };
        self.check_size(&request)?;
        self.call(BLOCKING, |channel| {
            let request = request.clone();
            let mut client = self.lock_client(channel);
            async move { client.lock(request).await }
        })
        .await
    }

    /// Releases the lock held with `key` (deleting a key is safe to repeat).
    pub async fn unlock(&self, key: impl Into<Vec<u8>>) -> Result<UnlockResponse, ClientError> {
        let request = UnlockRequest { key: key.into() };
        self.call(Policy::LEADER_READ, |channel| {
            let request = request.clone();
            let mut client = self.lock_client(channel);
            async move { client.unlock(request).await }
        })
        .await
    }
}

/// The leaders of one election as they change. Dropping it stops observing.
#[derive(Debug)]
pub struct Observer {
    receiver: mpsc::Receiver<Result<LeaderResponse, ClientError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// The next leader (or proclamation); `None` once observing ended.
    pub async fn next(&mut self) -> Option<Result<LeaderResponse, ClientError>> {
        self.receiver.recv().await
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Streams Observe answers, reopening the stream on another member when it
/// breaks; the first answer of a new stream repeats the current leader, which
/// is dropped if it is the one already delivered.
async fn observe_task(
    client: Client,
    name: Vec<u8>,
    sender: mpsc::Sender<Result<LeaderResponse, ClientError>>,
) {
    // (key, mod revision) of the last leader delivered.
    let mut last: Option<(Vec<u8>, i64)> = None;
    let mut tried = vec![false; client.inner.endpoints.len()];
    let mut retry = 0u32;
    loop {
        if retry > 0 {
            let delay = if client.withdraw_retry() {
                client.backoff_delay(retry)
            } else {
                client.config().backoff_max
            };
            tokio::time::sleep(delay).await;
        }
        if sender.is_closed() {
            return;
        }
        retry += 1;
        let Some(index) = client.acquire_endpoint(Route::Any, &tried) else {
            tried.fill(false);
            continue;
        };
        tried[index] = true;
        let endpoint = &client.inner.endpoints[index];
        let mut election = client.election_client(endpoint.channel.clone());
        let opened = tokio::time::timeout(
            client.config().attempt_timeout,
            election.observe(LeaderRequest { name: name.clone() }),
        )
        .await;
        let mut responses = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let (failure, error) = classify(&endpoint.url, &status);
                client.record_outcome(index, Route::Any, Err(failure));
                if failure == Failure::Answered {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                continue;
            }
            Err(_) => {
                client.record_outcome(index, Route::Any, Err(Failure::NoAnswer));
                continue;
            }
        };
        loop {
            match responses.message().await {
                Ok(Some(response)) => {
                    client.record_outcome(index, Route::Any, Ok(response.header.as_ref()));
                    retry = 0;
                    tried.fill(false);
                    let identity = response
                        .kv
                        .as_ref()
                        .map(|kv| (kv.key.clone(), kv.mod_revision));
                    if identity.is_some() && identity == last {
                        continue;
                    }
                    last = identity;
                    if sender.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    client.record_outcome(index, Route::Any, Err(Failure::NoAnswer));
                    break;
                }
                Err(status) => {
                    let (failure, error) = classify(&endpoint.url, &status);
                    client.record_outcome(index, Route::Any, Err(failure));
                    if failure == Failure::Answered {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                    break;
                }
            }
        }
        retry = retry.max(1);
    }
}
