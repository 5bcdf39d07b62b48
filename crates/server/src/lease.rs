//! etcd's Lease service. Grants and revocations go through the log; keep-alives
//! and time-to-live queries are answered by the leader, which alone keeps
//! expiry times: a member that is not the leader forwards them to the leader's
//! client endpoint (once: a forwarded request is never forwarded again).

use std::pin::Pin;

use keel_core::{RequestError, Response, WriteRequest, WriteResponse};
use keel_types::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Status, Streaming};

use crate::api::etcdserverpb::lease_client::LeaseClient;
use crate::api::etcdserverpb::lease_server;
use crate::grpc::{status_of, Services, FORWARDED_METADATA_KEY};
use crate::member::Input;

/// Keep-alive responses queued for one client stream before we stop reading it.
const KEEP_ALIVE_QUEUE_MAX: usize = 64;

/// The Lease service over one member.
#[derive(Clone)]
pub struct LeaseService {
    services: Services,
}

/// Which leader-only question to ask.
#[derive(Debug, Clone, Copy)]
enum LeaderQuery {
    KeepAlive(i64),
    TimeToLive { id: i64, keys: bool },
}

impl LeaseService {
    /// A Lease service over `services`.
    pub fn new(services: Services) -> Self {
        LeaseService { services }
    }

    async fn write(&self, request: WriteRequest) -> Result<WriteResponse, Status> {
        self.services.write_raw(request).await
    }

    async fn ask_local(&self, query: LeaderQuery) -> Result<Response, RequestError> {
        let (reply, answer) = oneshot::channel();
        let input = match query {
            LeaderQuery::KeepAlive(id) => Input::LeaseKeepAlive { id, reply },
            LeaderQuery::TimeToLive { id, keys } => Input::LeaseTimeToLive { id, keys, reply },
        };
        if self.services.send_input(input).is_err() {
            return Err(RequestError::TooManyRequests);
        }
        answer.await.unwrap_or(Err(RequestError::NoLeader))
    }

    /// Asks the leader: locally if this member leads, else over gRPC.
    async fn ask_leader(&self, query: LeaderQuery, forwarded: bool) -> Result<Response, Status> {
        match self.ask_local(query).await {
            Ok(response) => Ok(response),
            Err(RequestError::NotLeader { leader_id }) if !forwarded && leader_id != 0 => {
                self.forward(query, leader_id).await
            }
            Err(RequestError::NotLeader { .. }) => {
                Err(Status::unavailable("etcdserver: no leader"))
            }
            Err(error) => Err(status_of(&error)),
        }
    }

    async fn forward(&self, query: LeaderQuery, leader_id: u64) -> Result<Response, Status> {
        let mut client = LeaseClient::new(self.services.leader_channel(leader_id).await?);
        match query {
            LeaderQuery::KeepAlive(id) => {
                let mut request = Request::new(tokio_stream::once(LeaseKeepAliveRequest { id }));
                request
                    .metadata_mut()
                    .insert(FORWARDED_METADATA_KEY, "1".parse().expect("ascii"));
                let mut responses = client.lease_keep_alive(request).await?.into_inner();
                match responses.message().await? {
                    Some(response) => Ok(Response::LeaseKeepAlive(response)),
                    None => Err(Status::unavailable(
                        "etcdserver: leader closed the keep-alive",
                    )),
                }
            }
            LeaderQuery::TimeToLive { id, keys } => {
                let mut request = Request::new(LeaseTimeToLiveRequest { id, keys });
                request
                    .metadata_mut()
                    .insert(FORWARDED_METADATA_KEY, "1".parse().expect("ascii"));
                let response = client.lease_time_to_live(request).await?.into_inner();
                Ok(Response::LeaseTimeToLive(response))
            }
        }
    }
}

impl LeaseService {
    /// Answers a stream of keep-alives, one at a time and in order, as etcd
    /// does; the answers end after the last request's, or at the first error.
    /// The gRPC method and the JSON gateway both serve keep-alives with this.
    pub fn keep_alive_stream<S>(&self, mut incoming: S, forwarded: bool) -> KeepAliveStream
    where
        S: Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + Unpin + 'static,
    {
        let (sender, receiver) = mpsc::channel(KEEP_ALIVE_QUEUE_MAX);
        let service = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(keep_alive)) = incoming.next().await {
                let result = match service
                    .ask_leader(LeaderQuery::KeepAlive(keep_alive.id), forwarded)
                    .await
                {
                    Ok(Response::LeaseKeepAlive(response)) => Ok(response),
                    Ok(_) => Err(Status::internal(
                        "a keep-alive was answered with something else",
                    )),
                    Err(status) => Err(status),
                };
                let failed = result.is_err();
                if sender.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
    }
}

fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_METADATA_KEY)
}

/// The answers to a stream of keep-alives.
pub type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<tonic::Response<LeaseGrantResponse>, Status> {
        match self
            .write(WriteRequest::LeaseGrant(request.into_inner()))
            .await?
        {
            WriteResponse::LeaseGrant(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal(
                "a lease grant was answered with another write",
            )),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<tonic::Response<LeaseRevokeResponse>, Status> {
        match self
            .write(WriteRequest::LeaseRevoke(request.into_inner()))
            .await?
        {
            WriteResponse::LeaseRevoke(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal(
                "a lease revoke was answered with another write",
            )),
        }
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<tonic::Response<KeepAliveStream>, Status> {
        let forwarded = is_forwarded(&request);
        Ok(tonic::Response::new(
            self.keep_alive_stream(request.into_inner(), forwarded),
        ))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<tonic::Response<LeaseTimeToLiveResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let query = request.into_inner();
        match self
            .ask_leader(
                LeaderQuery::TimeToLive {
                    id: query.id,
                    keys: query.keys,
                },
                forwarded,
            )
            .await?
        {
            Response::LeaseTimeToLive(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal(
                "a time-to-live query was answered with something else",
            )),
        }
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<tonic::Response<LeaseLeasesResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        self.services.send_input(Input::LeaseList { reply })?;
        let (header, ids) = answer
            .await
            .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
        Ok(tonic::Response::new(LeaseLeasesResponse {
            header: Some(header),
            leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
        }))
    }
}
