//! Leases: grant, revoke, time-to-live, list, one keep-alive, and
//! [`LeaseKeeper`], which keeps a lease alive from a background task across
//! member failures and says when the lease is lost.
//!
//! The keeper sends a keep-alive every third of the TTL (etcd's client does
//! the same, so two may be lost before the lease expires), to the leader when
//! known (followers would forward it). When a stream breaks it opens another,
//! on another member if need be, with backoff. It declares the lease lost
//! when a member answers TTL 0 (expired or revoked) and also, by its own
//! clock, when no keep-alive was acknowledged for a whole TTL counted from
//! when the last acknowledged one was *sent*: the lease may be gone then, and
//! whatever it guards (a registration, a leadership) must be treated as gone.

use std::time::Duration;

use keel_types::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::api::etcdserverpb::lease_client::LeaseClient;
use crate::client::Policy;
use crate::error::{classify, ClientError, Failure};
use crate::selection::Route;
use crate::Client;

/// Keep-alives sent per TTL.
const KEEP_ALIVES_PER_TTL: u32 = 3;

/// Keep-alive requests queued on one stream (one is outstanding at a time).
const KEEP_ALIVE_QUEUE_MAX: usize = 1;

impl Client {
    fn lease_client(&self, channel: Channel) -> LeaseClient<Channel> {
        LeaseClient::new(channel)
            .max_decoding_message_size(self.inner.config.response_bytes_max)
            .max_encoding_message_size(self.inner.config.request_bytes_max)
    }

    /// Grants a lease of `ttl_seconds` (`id` 0 lets the cluster choose one).
    pub async fn lease_grant(
        &self,
        ttl_seconds: i64,
        id: i64,
    ) -> Result<LeaseGrantResponse, ClientError> {
        let request = LeaseGrantRequest {
            ttl: ttl_seconds,
            id,
        };
        let response = self
            .call(Policy::WRITE, |channel| {
                let mut client = self.lease_client(channel);
                async move { client.lease_grant(request).await }
            })
            .await?;
        if !response.error.is_empty() {
            return Err(ClientError::Status {
                endpoint: String::new(),
                code: tonic::Code::FailedPrecondition,
                message: response.error,
            });
        }
        Ok(response)
    }

    /// Revokes lease `id`, deleting every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, ClientError> {
        let request = LeaseRevokeRequest { id };
        self.call(Policy::WRITE, |channel| {
            let mut client = self.lease_client(channel);
            async move { client.lease_revoke(request).await }
        })
        .await
    }

    /// The remaining TTL of lease `id` (-1 if it does not exist), and its keys if asked.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, ClientError> {
        let request = LeaseTimeToLiveRequest { id, keys };
        self.call(Policy::LEADER_READ, |channel| {
            let mut client = self.lease_client(channel);
            async move { client.lease_time_to_live(request).await }
        })
        .await
    }

    /// Every lease the cluster holds.
    pub async fn lease_leases(&self) -> Result<LeaseLeasesResponse, ClientError> {
        self.call(Policy::LEADER_READ, |channel| {
            let mut client = self.lease_client(channel);
            async move { client.lease_leases(LeaseLeasesRequest {}).await }
        })
        .await
    }

    /// One keep-alive of lease `id`: the answer's TTL is the renewed TTL, or
    /// 0 or less if the lease no longer exists.
    pub async fn lease_keep_alive_once(
        &self,
        id: i64,
    ) -> Result<LeaseKeepAliveResponse, ClientError> {
        self.call(Policy::LEADER_READ, |channel| {
            let mut client = self.lease_client(channel);
            async move {
                let (requests, receiver) = mpsc::channel(KEEP_ALIVE_QUEUE_MAX);
                let _ = requests.send(LeaseKeepAliveRequest { id }).await;
                let mut responses = client
                    .lease_keep_alive(ReceiverStream::new(receiver))
                    .await?
                    .into_inner();
                let response = responses.message().await?;
                // The request stream stays open until the answer came: closing
                // it first could end the call before the member answers.
                drop(requests);
                response
                    .map(tonic::Response::new)
                    .ok_or_else(|| tonic::Status::unavailable("the keep-alive stream ended"))
            }
        })
        .await
    }

    /// Starts keeping lease `id` alive in a background task. Fails at once if
    /// the lease does not exist.
    pub async fn keep_alive(&self, id: i64) -> Result<LeaseKeeper, ClientError> {
        let sent_at = Instant::now();
        let response = self.lease_keep_alive_once(id).await?;
        if response.ttl <= 0 {
            return Err(ClientError::LeaseLost {
                id,
                reason: "it does not exist (expired or revoked)".to_string(),
            });
        }
        let expires_at = sent_at + Duration::from_secs(response.ttl as u64);
        let (sender, state) = watch::channel(LeaseState::Alive {
            ttl_seconds: response.ttl,
            expires_at,
        });
        let task = tokio::spawn(keep_alive_task(
            self.clone(),
            id,
            response.ttl,
            expires_at,
            sender,
        ));
        Ok(LeaseKeeper { id, state, task })
    }

    /// Grants a lease of `ttl_seconds` and keeps it alive.
    pub async fn grant_kept_lease(&self, ttl_seconds: i64) -> Result<LeaseKeeper, ClientError> {
        let granted = self.lease_grant(ttl_seconds, 0).await?;
        self.keep_alive(granted.id).await
    }
}

/// Where a kept lease stands.
#[derive(Debug, Clone)]
pub enum LeaseState {
    /// Renewed; alive at least until `expires_at` by the client's clock.
    Alive {
        /// The TTL the last keep-alive renewed, in seconds.
        ttl_seconds: i64,
        /// A TTL after the last acknowledged keep-alive was sent.
        expires_at: Instant,
    },
    /// Gone, or possibly gone: treat what it guards as lost.
    Lost(ClientError),
}

/// A lease kept alive by a background task (stopped when this is dropped).
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    state: watch::Receiver<LeaseState>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The lease's state now.
    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// Whether the lease is still held.
    pub fn is_alive(&self) -> bool {
        matches!(*self.state.borrow(), LeaseState::Alive { .. })
    }

    /// Completes when the lease is lost, with why.
    pub async fn lost(&self) -> ClientError {
        let mut state = self.state.clone();
        let lost = state
            .wait_for(|state| matches!(state, LeaseState::Lost(_)))
            .await;
        match lost.as_deref() {
            Ok(LeaseState::Lost(error)) => error.clone(),
            _ => ClientError::LeaseLost {
                id: self.id,
                reason: "the keep-alive task stopped".to_string(),
            },
        }
    }

    /// Stops keeping the lease alive (it then expires after its TTL; revoke it
    /// with [`Client::lease_revoke`] to delete its keys at once).
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps lease `id` alive until it is lost; then says why on `state`.
async fn keep_alive_task(
    client: Client,
    id: i64,
    ttl_seconds: i64,
    mut expires_at: Instant,
    state: watch::Sender<LeaseState>,
) {
    let config = client.config().clone();
    let interval = (Duration::from_secs(ttl_seconds.max(1) as u64) / KEEP_ALIVES_PER_TTL)
        .max(config.lease_keep_alive_interval_min);
    let lost = |reason: String| ClientError::LeaseLost { id, reason };
    let mut retry = 0u32;
    let mut tried = vec![false; client.inner.endpoints.len()];
    let error = 'session: loop {
        if Instant::now() >= expires_at {
            break lost(format!(
                "no keep-alive was acknowledged within its TTL ({ttl_seconds}s)"
            ));
        }
        if retry > 0 {
            let delay = if client.withdraw_retry() {
                client.backoff_delay(retry)
            } else {
                // The budget is spent: the cluster is failing. Keep trying,
                // at the slowest pace, as long as the lease may be alive.
                config.backoff_max
            };
            tokio::time::sleep_until((Instant::now() + delay).min(expires_at)).await;
            if Instant::now() >= expires_at {
                continue;
            }
        }
        retry += 1;
        client.discover_leader_if_unknown().await;
        let Some(index) = client.acquire_endpoint(Route::Leader, &tried) else {
            tried.fill(false);
            continue;
        };
        tried[index] = true;
        let endpoint = &client.inner.endpoints[index];
        let mut lease_client = client.lease_client(endpoint.channel.clone());
        let (requests, receiver) = mpsc::channel(KEEP_ALIVE_QUEUE_MAX);
        let open = tokio::time::timeout_at(
            (Instant::now() + config.attempt_timeout).min(expires_at),
            lease_client.lease_keep_alive(ReceiverStream::new(receiver)),
        )
        .await;
        let mut responses = match open {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let (failure, error) = classify(&endpoint.url, &status);
                client.record_outcome(index, Route::Leader, Err(failure));
                if failure == Failure::Answered {
                    break 'session lost(error.to_string());
                }
                continue;
            }
            Err(_) => {
                client.record_outcome(index, Route::Leader, Err(Failure::NoAnswer));
                continue;
            }
        };
        loop {
            let sent_at = Instant::now();
            if sent_at >= expires_at {
                continue 'session;
            }
            if requests.send(LeaseKeepAliveRequest { id }).await.is_err() {
                continue 'session;
            }
            let answer = tokio::time::timeout_at(
                (sent_at + config.attempt_timeout).min(expires_at),
                responses.message(),
            )
            .await;
            match answer {
                Ok(Ok(Some(response))) if response.ttl <= 0 => {
                    client.record_outcome(index, Route::Leader, Ok(response.header.as_ref()));
                    break 'session lost("it expired or was revoked".to_string());
                }
                Ok(Ok(Some(response))) => {
                    client.record_outcome(index, Route::Leader, Ok(response.header.as_ref()));
                    expires_at = sent_at + Duration::from_secs(response.ttl as u64);
                    retry = 0;
                    tried.fill(false);
                    let _ = state.send(LeaseState::Alive {
                        ttl_seconds: response.ttl,
                        expires_at,
                    });
                }
                Ok(Ok(None)) => {
                    client.record_outcome(index, Route::Leader, Err(Failure::NoAnswer));
                    continue 'session;
                }
                Ok(Err(status)) => {
                    let (failure, error) = classify(&endpoint.url, &status);
                    client.record_outcome(index, Route::Leader, Err(failure));
                    if failure == Failure::Answered {
                        break 'session lost(error.to_string());
                    }
                    continue 'session;
                }
                Err(_) => {
                    client.record_outcome(index, Route::Leader, Err(Failure::NoAnswer));
                    continue 'session;
                }
            }
            tokio::time::sleep(interval).await;
        }
    };
    tracing::warn!(lease = format!("{id:x}"), %error, "lease lost");
    let _ = state.send(LeaseState::Lost(error));
}
