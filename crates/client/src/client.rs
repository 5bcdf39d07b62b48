//! `Client`: the endpoints, their channels and breakers, what is known of the
//! leader, and the retry loop every unary call goes through.
//!
//! One `Client` is shared by all the tasks of a process (it is cheap to
//! clone: an `Arc`). Its mutable state (breakers, leader, retry budget, the
//! jitter's random number generator) sits behind one short-held mutex; no
//! lock is held across an await.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keel_types::etcdserverpb::{ResponseHeader, StatusRequest, StatusResponse};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tonic::transport::Channel;

use crate::api::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::breaker::{BreakerState, CircuitBreaker};
use crate::budget::RetryBudget;
use crate::config::ClientConfig;
use crate::error::{classify, ClientError, Failure};
use crate::selection::{self, Candidate, Route};

/// Whether a request may be sent again after it reached a member that did
/// not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Reads, status, keep-alives, and requests whose repetition has the same
    /// effect as one (an election campaign keyed by its lease).
    Always,
    /// Writes: retried only when they provably never reached a member.
    IfNotSent,
}

/// How one kind of request is routed and retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) route: Route,
    pub(crate) retry: Retry,
    /// A call that waits for something to happen (a campaign, a lock): no
    /// per-attempt timeout, and the handle's blocking deadline.
    pub(crate) blocking: bool,
}

impl Policy {
    pub(crate) const READ: Policy = Policy {
        route: Route::Any,
        retry: Retry::Always,
        blocking: false,
    };
    pub(crate) const WRITE: Policy = Policy {
        route: Route::Leader,
        retry: Retry::IfNotSent,
        blocking: false,
    };
    /// Answered by the leader but safe to repeat (lease TimeToLive, keep-alive).
    pub(crate) const LEADER_READ: Policy = Policy {
        route: Route::Leader,
        retry: Retry::Always,
        blocking: false,
    };
}

/// Responses that carry etcd's `ResponseHeader`, from which the client
/// learns of term changes (and so of a possibly new leader).
pub(crate) trait HasHeader {
    fn response_header(&self) -> Option<&ResponseHeader>;
}

macro_rules! has_header {
    ($($type:path),* $(,)?) => {
        $(impl HasHeader for $type {
            fn response_header(&self) -> Option<&ResponseHeader> {
                self.header.as_ref()
            }
        })*
    };
}

has_header!(
    keel_types::etcdserverpb::RangeResponse,
    keel_types::etcdserverpb::PutResponse,
    keel_types::etcdserverpb::DeleteRangeResponse,
    keel_types::etcdserverpb::TxnResponse,
    keel_types::etcdserverpb::CompactionResponse,
    keel_types::etcdserverpb::LeaseGrantResponse,
    keel_types::etcdserverpb::LeaseRevokeResponse,
    keel_types::etcdserverpb::LeaseTimeToLiveResponse,
    keel_types::etcdserverpb::LeaseLeasesResponse,
    keel_types::etcdserverpb::LeaseKeepAliveResponse,
    keel_types::etcdserverpb::StatusResponse,
    keel_types::etcdserverpb::MemberListResponse,
    keel_types::etcdserverpb::MemberAddResponse,
    keel_types::etcdserverpb::MemberRemoveResponse,
    keel_types::etcdserverpb::MemberUpdateResponse,
    keel_types::etcdserverpb::MemberPromoteResponse,
    keel_types::etcdserverpb::AlarmResponse,
    keel_types::etcdserverpb::DefragmentResponse,
    keel_types::etcdserverpb::HashKvResponse,
    keel_types::etcdserverpb::MoveLeaderResponse,
    keel_types::v3electionpb::CampaignResponse,
    keel_types::v3electionpb::ProclaimResponse,
    keel_types::v3electionpb::LeaderResponse,
    keel_types::v3electionpb::ResignResponse,
    keel_types::v3lockpb::LockResponse,
    keel_types::v3lockpb::UnlockResponse,
);

/// One endpoint's connection.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// The URL, `http://host:port`.
    pub(crate) url: String,
    /// A lazily connected channel: it connects on first use and reconnects
    /// after the connection breaks.
    pub(crate) channel: Channel,
}

/// What the client has learned, behind one mutex.
#[derive(Debug)]
struct State {
    breakers: Vec<CircuitBreaker>,
    /// Each endpoint's member id, once a Status told it.
    member_ids: Vec<Option<u64>>,
    /// The endpoint of the leader, when known and among the endpoints.
    leader: Option<usize>,
    /// The term in which `leader` was learned: a response from a later term
    /// means the leader may have changed.
    leader_term: u64,
    /// When the leader was last looked for.
    leader_discovered_at: Option<Instant>,
    /// Where reads go first: the last endpoint that answered one.
    preferred: usize,
    budget: RetryBudget,
    rng: StdRng,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    pub(crate) endpoints: Vec<Endpoint>,
    state: Mutex<State>,
}

/// A client of a keel (or etcd) cluster. Cheap to clone; clones share
/// connections, breakers, leader knowledge and the retry budget.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    /// This handle's deadline for a whole non-blocking request.
    request_timeout: Duration,
    /// This handle's deadline for blocking calls (campaign, lock); `None`
    /// waits until they succeed or fail.
    blocking_timeout: Option<Duration>,
}

/// One endpoint's answer to Status (see [`Client::endpoint_statuses`]).
#[derive(Debug, Clone)]
pub struct EndpointStatus {
    /// The endpoint's URL.
    pub endpoint: String,
    /// Its status, or why it did not answer.
    pub status: Result<StatusResponse, ClientError>,
    /// Its circuit breaker's state when asked.
    pub breaker: BreakerState,
}

/// Turns `host:port` into `http://host:port`; refuses what tonic cannot dial.
pub fn endpoint_url(endpoint: &str) -> Result<String, ClientError> {
    let trimmed = endpoint.trim();
    let invalid = |reason: &str| ClientError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    if trimmed.is_empty() {
        return Err(invalid("is empty"));
    }
    let url = if let Some(rest) = trimmed.strip_prefix("http://") {
        format!("http://{rest}")
    } else if trimmed.starts_with("https://") {
        return Err(invalid(
            "https is not supported: keel's client speaks plain HTTP/2",
        ));
    } else if trimmed.contains("://") {
        return Err(invalid("the scheme must be http"));
    } else {
        format!("http://{trimmed}")
    };
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|error| invalid(&format!("not a URL: {error}")))?;
    if uri.port_u16().is_none() {
        return Err(invalid("needs a port, as in 127.0.0.1:2379"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

impl Client {
    /// A client of the members at `endpoints` (`host:port` or
    /// `http://host:port`). Nothing is dialled yet: each endpoint connects on
    /// first use, so a client can be made while the cluster is down. Call it
    /// inside a tokio runtime: each channel's connection task is spawned on it.
    pub async fn connect<I, S>(endpoints: I, config: ClientConfig) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        config.validate()?;
        let mut urls = Vec::new();
        for endpoint in endpoints {
            let url = endpoint_url(endpoint.as_ref())?;
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        if urls.is_empty() {
            return Err(ClientError::InvalidConfig {
                field: "endpoints",
                reason: "is empty: give at least one member's client URL".to_string(),
            });
        }
        if urls.len() > config.endpoints_max {
            return Err(ClientError::InvalidConfig {
                field: "endpoints",
                reason: format!(
                    "has {} endpoints, more than endpoints_max ({})",
                    urls.len(),
                    config.endpoints_max
                ),
            });
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|error| ClientError::InvalidEndpoint {
                    endpoint: url.clone(),
                    reason: error.to_string(),
                })?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(config.keep_alive_ping_interval)
                .keep_alive_timeout(config.keep_alive_ping_timeout)
                .connect_lazy();
            endpoints.push(Endpoint { url, channel });
        }
        let now = Instant::now();
        let rng = match config.random_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let state = State {
            breakers: vec![CircuitBreaker::new(config.breaker_settings()); endpoints.len()],
            member_ids: vec![None; endpoints.len()],
            leader: None,
            leader_term: 0,
            leader_discovered_at: None,
            preferred: 0,
            budget: RetryBudget::new(config.retry_budget_settings(), now),
            rng,
        };
        Ok(Client {
            request_timeout: config.request_timeout,
            blocking_timeout: None,
            inner: Arc::new(Inner {
                config,
                endpoints,
                state: Mutex::new(state),
            }),
        })
    }

    /// A handle on the same connections whose requests have this deadline
    /// (retries and backoff included) instead of `request_timeout`.
    pub fn with_request_timeout(&self, timeout: Duration) -> Client {
        Client {
            request_timeout: timeout,
            ..self.clone()
        }
    }

    /// A handle whose blocking calls (campaign, lock) give up after `timeout`.
    pub fn with_blocking_timeout(&self, timeout: Option<Duration>) -> Client {
        Client {
            blocking_timeout: timeout,
            ..self.clone()
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The endpoints' URLs, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner
            .endpoints
            .iter()
            .map(|endpoint| endpoint.url.clone())
            .collect()
    }

    /// The URL of the endpoint believed to be the leader, if known.
    pub fn leader_endpoint(&self) -> Option<String> {
        let leader = self.state().leader?;
        Some(self.inner.endpoints[leader].url.clone())
    }

    /// Each endpoint's breaker state now.
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        let now = Instant::now();
        let state = self.state();
        self.inner
            .endpoints
            .iter()
            .zip(&state.breakers)
            .map(|(endpoint, breaker)| (endpoint.url.clone(), breaker.state(now)))
            .collect()
    }

    /// The channel of endpoint `index` (as in [`Client::endpoints`]), for a
    /// call the client does not wrap or one meant for that member alone.
    pub fn channel(&self, index: usize) -> Option<Channel> {
        self.inner
            .endpoints
            .get(index)
            .map(|endpoint| endpoint.channel.clone())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in a few lines of
        // bookkeeping; the state stays usable, so carry on with it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Refuses a request larger than `request_bytes_max` before sending it.
    pub(crate) fn check_size(&self, request: &impl prost::Message) -> Result<(), ClientError> {
        let bytes = request.encoded_len();
        let limit = self.inner.config.request_bytes_max;
        if bytes > limit {
            return Err(ClientError::RequestTooLarge { bytes, limit });
        }
        Ok(())
    }

    /// Picks an endpoint for the next attempt and takes its breaker's
    /// permission. `None`: every breaker is open.
    pub(crate) fn acquire_endpoint(&self, route: Route, tried: &[bool]) -> Option<usize> {
        let now = Instant::now();
        let mut state = self.state();
        let candidates: Vec<Candidate> = (0..self.inner.endpoints.len())
            .map(|index| Candidate {
                available: state.breakers[index].would_allow(now),
                leader: state.leader == Some(index),
                tried: tried.get(index).copied().unwrap_or(false),
            })
            .collect();
        let index = selection::choose(&candidates, route, state.preferred)?;
        state.breakers[index].try_acquire(now).then_some(index)
    }

    /// Records how an attempt at `index` went.
    pub(crate) fn record_outcome(
        &self,
        index: usize,
        route: Route,
        outcome: Result<Option<&ResponseHeader>, Failure>,
    ) {
        let now = Instant::now();
        let mut state = self.state();
        match outcome {
            Ok(header) => {
                state.breakers[index].record_success(now);
                if route == Route::Any {
                    state.preferred = index;
                }
                if let Some(header) = header {
                    if header.member_id != 0 {
                        state.member_ids[index] = Some(header.member_id);
                    }
                    // A later term than the one the leader was learned in:
                    // there was an election since, look again before the next write.
                    if state.leader.is_some() && header.raft_term > state.leader_term {
                        state.leader = None;
                        state.leader_discovered_at = None;
                    }
                }
            }
            Err(failure) if failure.counts_against_endpoint() => {
                state.breakers[index].record_failure(now);
                if state.leader == Some(index) || route == Route::Leader {
                    state.leader = None;
                }
                if state.preferred == index {
                    state.preferred = (index + 1) % self.inner.endpoints.len();
                }
            }
            Err(_) => state.breakers[index].record_success(now),
        }
    }

    /// A backoff delay for retry number `retry`, drawn with the client's RNG.
    pub(crate) fn backoff_delay(&self, retry: u32) -> Duration {
        let backoff = self.inner.config.backoff();
        let mut state = self.state();
        backoff.delay(retry, &mut state.rng)
    }

    /// Takes a retry token; `false` if the budget is spent.
    pub(crate) fn withdraw_retry(&self) -> bool {
        self.state().budget.try_withdraw(Instant::now())
    }

    /// Runs one unary request under `policy`: endpoint selection, per-attempt
    /// timeout, classification, breaker bookkeeping, retry with backoff under
    /// the budget, and the request's deadline.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        policy: Policy,
        mut attempt: F,
    ) -> Result<T, ClientError>
    where
        T: HasHeader,
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let timeout = if policy.blocking {
            self.blocking_timeout
        } else {
            Some(self.request_timeout)
        };
        let deadline = timeout.map(|timeout| started + timeout);
        self.state().budget.record_request(started);
        let mut tried = vec![false; self.inner.endpoints.len()];
        let mut attempts = 0u32;
        let mut outcome_unknown = false;
        // The last failure of an endpoint: when every breaker is open, it
        // says why better than "no endpoint available" does.
        let mut last_endpoint_error: Option<ClientError> = None;
        loop {
            if policy.route == Route::Leader {
                self.discover_leader_if_unknown().await;
            }
            attempts += 1;
            let now = Instant::now();
            let remaining = deadline.map(|deadline| deadline.saturating_duration_since(now));
            let (failure, error) = match self.acquire_endpoint(policy.route, &tried) {
                None => (
                    Failure::NotSent,
                    last_endpoint_error
                        .clone()
                        .unwrap_or(ClientError::NoEndpointAvailable),
                ),
                Some(index) => {
                    tried[index] = true;
                    let endpoint = &self.inner.endpoints[index];
                    let attempt_timeout = if policy.blocking {
                        remaining
                    } else {
                        Some(
                            remaining
                                .unwrap_or(self.inner.config.attempt_timeout)
                                .min(self.inner.config.attempt_timeout),
                        )
                    };
                    let future = attempt(endpoint.channel.clone());
                    let result = match attempt_timeout {
                        Some(attempt_timeout) => {
                            match tokio::time::timeout(attempt_timeout, future).await {
                                Ok(result) => result,
                                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                                    "no answer within {attempt_timeout:?}"
                                ))),
                            }
                        }
                        None => future.await,
                    };
                    match result {
                        Ok(response) => {
                            let response = response.into_inner();
                            self.record_outcome(
                                index,
                                policy.route,
                                Ok(response.response_header()),
                            );
                            return Ok(response);
                        }
                        Err(status) => {
                            let (failure, error) = classify(&endpoint.url, &status);
                            self.record_outcome(index, policy.route, Err(failure));
                            last_endpoint_error = Some(error.clone());
                            (failure, error)
                        }
                    }
                }
            };
            if failure == Failure::NoAnswer {
                outcome_unknown = true;
            }
            let retryable = match failure {
                Failure::Answered => false,
                Failure::NotSent => true,
                Failure::NoAnswer | Failure::Busy => policy.retry == Retry::Always,
            };
            if !retryable {
                return Err(error);
            }
            if attempts >= self.inner.config.retry_attempts_max {
                return Err(ClientError::AttemptsExhausted {
                    attempts,
                    last: Box::new(error),
                    outcome_unknown,
                });
            }
            let delay = self.backoff_delay(attempts);
            if let (Some(deadline), Some(timeout)) = (deadline, timeout) {
                if Instant::now() + delay >= deadline {
                    return Err(ClientError::DeadlineExceeded {
                        timeout,
                        attempts,
                        last: Box::new(error),
                        outcome_unknown,
                    });
                }
            }
            if !self.withdraw_retry() {
                return Err(ClientError::RetryBudgetExhausted {
                    last: Box::new(error),
                });
            }
            tracing::debug!(%error, attempt = attempts, ?delay, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Looks for the leader if it is not known, at most once per
    /// `leader_discovery_interval_min`.
    pub(crate) async fn discover_leader_if_unknown(&self) {
        {
            let now = Instant::now();
            let mut state = self.state();
            if state.leader.is_some() {
                return;
            }
            if let Some(at) = state.leader_discovered_at {
                if now.saturating_duration_since(at)
                    < self.inner.config.leader_discovery_interval_min
                {
                    return;
                }
            }
            state.leader_discovered_at = Some(now);
        }
        let timeout = self.inner.config.leader_discovery_timeout;
        let now = Instant::now();
        let skip: Vec<bool> = {
            let state = self.state();
            state
                .breakers
                .iter()
                .map(|breaker| !breaker.would_allow(now))
                .collect()
        };
        self.statuses(timeout, &skip, true).await;
    }

    /// Asks every endpoint not in `skip` for its Status, at once, each within
    /// `timeout`; learns member ids and the leader from the answers. With
    /// `stop_at_leader`, returns as soon as the leader is known, so a member
    /// that is slow to answer (paused, overloaded) delays no write.
    async fn statuses(
        &self,
        timeout: Duration,
        skip: &[bool],
        stop_at_leader: bool,
    ) -> Vec<Option<Result<StatusResponse, ClientError>>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (index, endpoint) in self.inner.endpoints.iter().enumerate() {
            if skip.get(index).copied().unwrap_or(false) {
                continue;
            }
            let channel = endpoint.channel.clone();
            let url = endpoint.url.clone();
            let response_bytes_max = self.inner.config.response_bytes_max;
            tasks.spawn(async move {
                let mut client =
                    MaintenanceClient::new(channel).max_decoding_message_size(response_bytes_max);
                let result =
                    match tokio::time::timeout(timeout, client.status(StatusRequest {})).await {
                        Ok(Ok(response)) => Ok(response.into_inner()),
                        Ok(Err(status)) => Err(classify(&url, &status)),
                        Err(_) => Err((
                            Failure::NoAnswer,
                            ClientError::NoAnswer {
                                endpoint: url,
                                code: tonic::Code::DeadlineExceeded,
                                message: format!("no answer within {timeout:?}"),
                            },
                        )),
                    };
                (index, result)
            });
        }
        let mut results = vec![None; self.inner.endpoints.len()];
        while let Some(joined) = tasks.join_next().await {
            let Ok((index, result)) = joined else {
                continue;
            };
            match &result {
                Ok(status) => self.record_outcome(index, Route::Any, Ok(status.header.as_ref())),
                Err((failure, _)) => self.record_outcome(index, Route::Any, Err(*failure)),
            }
            results[index] = Some(result.map_err(|(_, error)| error));
            if stop_at_leader {
                self.learn_leader(&results);
                if self.state().leader.is_some() {
                    // The remaining tasks are aborted when the set drops.
                    break;
                }
            }
        }
        self.learn_leader(&results);
        results
    }

    /// Sets the leader from a round of Status answers: the leader reported in
    /// the highest term, if it is one of the endpoints.
    fn learn_leader(&self, results: &[Option<Result<StatusResponse, ClientError>>]) {
        let mut state = self.state();
        let mut newest: Option<(u64, u64)> = None;
        for status in results.iter().flatten().flatten() {
            if status.leader != 0 && newest.is_none_or(|(term, _)| status.raft_term > term) {
                newest = Some((status.raft_term, status.leader));
            }
        }
        let Some((term, leader_id)) = newest else {
            return;
        };
        if let Some(index) = state
            .member_ids
            .iter()
            .position(|member_id| *member_id == Some(leader_id))
        {
            state.leader = Some(index);
            state.leader_term = term;
        }
    }

    /// Status of one member, any member (retried like a read).
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        let response_bytes_max = self.inner.config.response_bytes_max;
        self.call(Policy::READ, move |channel| async move {
            MaintenanceClient::new(channel)
                .max_decoding_message_size(response_bytes_max)
                .status(StatusRequest {})
                .await
        })
        .await
    }

    /// Status of every endpoint, asked at once (each within `attempt_timeout`,
    /// no retries): which members answer, who they think leads, how far each
    /// has applied. Also refreshes the client's idea of the leader.
    pub async fn endpoint_statuses(&self) -> Vec<EndpointStatus> {
        let skip = vec![false; self.inner.endpoints.len()];
        let results = self
            .statuses(self.inner.config.attempt_timeout, &skip, false)
            .await;
        let now = Instant::now();
        let state = self.state();
        results
            .into_iter()
            .enumerate()
            .map(|(index, result)| EndpointStatus {
                endpoint: self.inner.endpoints[index].url.clone(),
                status: result.unwrap_or_else(|| {
                    Err(ClientError::Protocol {
                        endpoint: self.inner.endpoints[index].url.clone(),
                        message: "the status task ended without an answer".to_string(),
                    })
                }),
                breaker: state.breakers[index].state(now),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised_to_http_urls() {
        assert_eq!(
            endpoint_url("127.0.0.1:2379").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            endpoint_url(" http://localhost:2379/ ").unwrap(),
            "http://localhost:2379"
        );
        for bad in [
            "",
            "https://a:1",
            "unix:///tmp/s",
            "127.0.0.1",
            "http://[::1",
        ] {
            let error = endpoint_url(bad).unwrap_err();
            assert!(
                matches!(error, ClientError::InvalidEndpoint { .. }),
                "{bad:?}: {error}"
            );
        }
    }
}
