//! etcd's Election service (v3election): leader election over the key space,
//! with the same keys, transactions and errors as etcd's
//! `concurrency.Election`, so keel's elections and those run by etcd client
//! libraries (or `etcdctl elect`) are one and the same.
//!
//! Candidates queue exactly as lock waiters do (see [`crate::lock`]): each
//! creates `name/<lease id in hexadecimal>` holding its proposed value and
//! attached to its lease, and the leader is the key with the smallest create
//! revision. `Campaign` answers once its key heads the queue, with a
//! `LeaderKey` (name, key, create revision, lease) that `Proclaim` (change the
//! value while still leader) and `Resign` (delete the key) use to prove
//! leadership: both are transactions that compare the key's create revision,
//! so a deposed leader's Proclaim fails with "election: not leader" and its
//! Resign deletes nothing. The create revision is a fencing token, as a lock's.
//!
//! `Leader` reads the head of the queue; `Observe` streams it, once at the
//! start and again each time the leader or its value changes (intermediate
//! values may be skipped when they change faster than the client reads, as in
//! etcd: the latest value is always sent).

use std::sync::Arc;

use keel_core::RequestError;
use keel_types::etcdserverpb::request_op::Request as Operation;
use keel_types::etcdserverpb::{DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};
use keel_types::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use tokio::sync::{mpsc, Semaphore};
use tonic::codegen::BoxStream;
use tonic::{Request, Status};

use crate::grpc::{status_of, Services};
use crate::lock::{
    created_at, first_created, join_queue, queue_head, queue_key, queue_prefix, read, read_local,
    session_lease, txn, wait_for_turn, LeaveQueueOnDrop,
};

/// Campaigns that may wait for their turn at once on one member (each wakes
/// up and reads on every new revision).
pub const CAMPAIGN_WAITERS_MAX: usize = 1_024;
/// Observe streams open at once on one member (each reads on every new revision).
pub const OBSERVERS_MAX: usize = 1_024;
/// Leader responses queued for one Observe stream before it stops reading:
/// a slow client then gets the latest leader when it catches up, not a backlog.
const OBSERVE_QUEUE_MAX: usize = 4;

/// etcd's `concurrency.ErrElectionNotLeader`.
const NOT_LEADER: &str = "election: not leader";
/// etcd's `concurrency.ErrElectionNoLeader`.
const NO_LEADER: &str = "election: no leader";
/// etcd's `v3election.ErrMissingLeaderKey`.
const MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";
/// A campaign's key disappeared while it waited (its lease expired or was revoked).
const CAMPAIGN_SESSION_EXPIRED: &str = "election: session is expired";

/// The Election service over one member.
#[derive(Clone)]
pub struct ElectionService {
    services: Services,
    /// Permits for campaigns that must wait for earlier candidates to go.
    campaign_waiters: Arc<Semaphore>,
    /// Permits for open Observe streams.
    observers: Arc<Semaphore>,
}

impl ElectionService {
    /// An Election service over `services`.
    pub fn new(services: Services) -> Self {
        ElectionService {
            services,
            campaign_waiters: Arc::new(Semaphore::new(CAMPAIGN_WAITERS_MAX)),
            observers: Arc::new(Semaphore::new(OBSERVERS_MAX)),
        }
    }

    async fn campaign(&self, request: CampaignRequest) -> Result<CampaignResponse, Status> {
        let prefix = queue_prefix(&request.name);
        let lease = session_lease(&self.services, request.lease).await?;
        let key = queue_key(&prefix, lease);
        let joined = join_queue(&self.services, &prefix, &key, &request.value, lease).await?;
        let leader = LeaderKey {
            name: request.name.clone(),
            key: key.clone(),
            rev: joined.create_revision,
            lease,
        };
        // From here on, failing or being dropped by the client resigns, as
        // etcd's Campaign does when its context is cancelled.
        let mut resign = LeaveQueueOnDrop::new(&self.services, &key, joined.create_revision);
        if joined
            .existing_value
            .as_ref()
            .is_some_and(|value| *value != request.value)
        {
            // The same lease campaigned before with another value: take the
            // new one, as etcd does.
            self.proclaim_value(&leader, &request.value).await?;
        }
        if !joined.heads_queue() {
            let _permit = self
                .campaign_waiters
                .clone()
                .try_acquire_owned()
                .map_err(|_| status_of(&RequestError::TooManyRequests))?;
            wait_for_turn(
                &self.services,
                &prefix,
                &key,
                joined.create_revision,
                CAMPAIGN_SESSION_EXPIRED,
            )
            .await?;
        }
        resign.disarm();
        // etcd answers with the header of the campaign's own transaction.
        Ok(CampaignResponse {
            header: joined.header,
            leader: Some(leader),
        })
    }

    /// Puts `value` on the leader key if it is still the leader's (same create revision).
    async fn proclaim_value(
        &self,
        leader: &LeaderKey,
        value: &[u8],
    ) -> Result<ProclaimResponse, Status> {
        let response = txn(
            &self.services,
            TxnRequest {
                compare: vec![created_at(&leader.key, leader.rev)],
                success: vec![RequestOp {
                    request: Some(Operation::RequestPut(PutRequest {
                        key: leader.key.clone(),
                        value: value.to_vec(),
                        lease: leader.lease,
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            },
        )
        .await?;
        if !response.succeeded {
            return Err(Status::unknown(NOT_LEADER));
        }
        Ok(ProclaimResponse {
            header: response.header,
        })
    }

    async fn resign(&self, request: ResignRequest) -> Result<ResignResponse, Status> {
        let leader = request
            .leader
            .ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
        // Deletes the key only if it is still this leadership's; a deposed
        // leader's resignation is a no-op, not an error, as in etcd.
        let response = txn(
            &self.services,
            TxnRequest {
                compare: vec![created_at(&leader.key, leader.rev)],
                success: vec![RequestOp {
                    request: Some(Operation::RequestDeleteRange(DeleteRangeRequest {
                        key: leader.key.clone(),
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            },
        )
        .await?;
        Ok(ResignResponse {
            header: response.header,
        })
    }

    async fn leader(&self, request: LeaderRequest) -> Result<LeaderResponse, Status> {
        match queue_head(&self.services, &queue_prefix(&request.name)).await? {
            (header, Some(kv)) => Ok(LeaderResponse {
                header,
                kv: Some(kv),
            }),
            (_, None) => Err(Status::unknown(NO_LEADER)),
        }
    }

    fn observe(&self, request: LeaderRequest) -> Result<BoxStream<LeaderResponse>, Status> {
        let permit = self
            .observers
            .clone()
            .try_acquire_owned()
            .map_err(|_| status_of(&RequestError::TooManyRequests))?;
        let (sender, receiver) = mpsc::channel(OBSERVE_QUEUE_MAX);
        let services = self.services.clone();
        let prefix = queue_prefix(&request.name);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(status) = observe(&services, &prefix, &sender).await {
                let _ = sender.send(Err(status)).await;
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

/// Sends the leader of the election under `prefix` to `sender` whenever it
/// changes (another key, or a new value), until the client goes away.
async fn observe(
    services: &Services,
    prefix: &[u8],
    sender: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    let mut revision = services.revision();
    // The leader last sent: its key and the revision of its value.
    let mut last_sent: Option<(Vec<u8>, i64)> = None;
    let mut first = true;
    loop {
        revision.borrow_and_update();
        // The first answer is linearizable, as etcd's (a Get); after that this
        // member's own state is read whenever it applies a revision, which
        // never goes back in time.
        let response = if first {
            read(services, first_created(prefix)).await?
        } else {
            read_local(services, first_created(prefix)).await?
        };
        first = false;
        if let Some(kv) = response.kvs.into_iter().next() {
            let current = (kv.key.clone(), kv.mod_revision);
            if last_sent.as_ref() != Some(&current) {
                let leader = LeaderResponse {
                    header: response.header,
                    kv: Some(kv),
                };
                if sender.send(Ok(leader)).await.is_err() {
                    return Ok(());
                }
                last_sent = Some(current);
            }
        }
        tokio::select! {
            changed = revision.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("etcdserver: server stopped"));
                }
            }
            () = sender.closed() => return Ok(()),
        }
    }
}

#[tonic::async_trait]
impl crate::api::v3electionpb::election_server::Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<tonic::Response<CampaignResponse>, Status> {
        ElectionService::campaign(self, request.into_inner())
            .await
            .map(tonic::Response::new)
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<tonic::Response<ProclaimResponse>, Status> {
        let request = request.into_inner();
        let leader = request
            .leader
            .ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
        self.proclaim_value(&leader, &request.value)
            .await
            .map(tonic::Response::new)
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<tonic::Response<LeaderResponse>, Status> {
        ElectionService::leader(self, request.into_inner())
            .await
            .map(tonic::Response::new)
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<tonic::Response<BoxStream<LeaderResponse>>, Status> {
        ElectionService::observe(self, request.into_inner()).map(tonic::Response::new)
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<tonic::Response<ResignResponse>, Status> {
        ElectionService::resign(self, request.into_inner())
            .await
            .map(tonic::Response::new)
    }
}
