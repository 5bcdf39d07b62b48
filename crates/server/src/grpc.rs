//! etcd's v3 gRPC services, served over tonic: requests become member-loop
//! inputs, results become etcd responses, errors become etcd's gRPC statuses
//! (same code, same message) so that etcd clients react to them the same way.

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use keel_core::mvcc::KeySpaceError;
use keel_core::{NodeStatus, RequestError, Response, WriteRequest, WriteResponse};
use keel_types::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, HashKvRequest,
    HashKvResponse, Member, MemberListRequest, MemberListResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, StatusRequest, StatusResponse, TxnRequest,
    TxnResponse,
};
use keel_types::keelpb::MemberRecord;
use tokio::sync::oneshot;
use tonic::{Request, Status};

use crate::api::etcdserverpb::{cluster_server, kv_server, maintenance_server};
use crate::member::Input;

/// The etcd API version keel is wire compatible with, reported by Status so
/// clients that gate features on the server version enable them.
pub const ETCD_COMPATIBLE_VERSION: &str = "3.5.0";

/// The state shared by every service: the way into the member loop.
#[derive(Clone)]
pub struct Services {
    inner: Arc<ServicesInner>,
}

struct ServicesInner {
    input: SyncSender<Input>,
    revision: tokio::sync::watch::Receiver<i64>,
}

impl Services {
    /// Services that talk to the member loop through `input` and learn of new
    /// revisions from `revision`.
    pub fn new(input: SyncSender<Input>, revision: tokio::sync::watch::Receiver<i64>) -> Self {
        Services {
            inner: Arc::new(ServicesInner { input, revision }),
        }
    }

    /// A receiver that changes whenever the member applies a new revision.
    pub fn revision(&self) -> tokio::sync::watch::Receiver<i64> {
        self.inner.revision.clone()
    }

    /// Sends an input to the member loop, or fails with etcd's "too many
    /// requests" when its queue is full.
    pub fn send_input(&self, input: Input) -> Result<(), Status> {
        self.submit(input)
    }

    fn submit(&self, input: Input) -> Result<(), Status> {
        match self.inner.input.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(status_of(&RequestError::TooManyRequests)),
            Err(TrySendError::Disconnected(_)) => {
                Err(Status::unavailable("etcdserver: server stopped"))
            }
        }
    }

    async fn write(&self, request: WriteRequest) -> Result<WriteResponse, Status> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Write { request, reply })?;
        match answer.await {
            Ok(Ok(Response::Write(response))) => Ok(response),
            Ok(Ok(_)) => Err(Status::internal("a write was answered with a read")),
            Ok(Err(error)) => Err(status_of(&error)),
            Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
        }
    }

    /// Proposes a write that has no gRPC method of its own (member attributes).
    pub async fn write_raw(&self, request: WriteRequest) -> Result<WriteResponse, Status> {
        self.write(request).await
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, Status> {
        if request.serializable {
            let (reply, answer) = oneshot::channel();
            self.submit(Input::LocalRead { request, reply })?;
            return match answer.await {
                Ok(result) => result.map_err(|error| status_of(&RequestError::KeySpace(error))),
                Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
            };
        }
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Read { request, reply })?;
        match answer.await {
            Ok(Ok(Response::Range(response))) => Ok(response),
            Ok(Ok(_)) => Err(Status::internal("a read was answered with a write")),
            Ok(Err(error)) => Err(status_of(&error)),
            Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
        }
    }

    /// The member's status and the membership.
    pub async fn status(&self) -> Result<(NodeStatus, Vec<MemberRecord>), Status> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Status { reply })?;
        answer
            .await
            .map_err(|_| Status::unavailable("etcdserver: server stopped"))
    }
}

/// etcd's gRPC status for each error (etcd's `rpctypes` table).
pub fn status_of(error: &RequestError) -> Status {
    match error {
        RequestError::KeySpace(key_space_error) => match key_space_error {
            KeySpaceError::Compacted => {
                Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
            }
            KeySpaceError::FutureRevision => {
                Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
            }
            KeySpaceError::LeaseNotFound => Status::not_found(key_space_error.to_string()),
            other => Status::invalid_argument(other.to_string()),
        },
        RequestError::LeaseExists => Status::failed_precondition(error.to_string()),
        RequestError::LeaseTtlTooLarge => Status::out_of_range(error.to_string()),
        RequestError::NotLeader { .. } => Status::failed_precondition(error.to_string()),
        RequestError::NoLeader => Status::unavailable(error.to_string()),
        RequestError::Timeout => Status::unavailable(error.to_string()),
        RequestError::LeaderChanged => Status::unavailable(error.to_string()),
        RequestError::TooManyRequests => Status::resource_exhausted(error.to_string()),
        RequestError::RequestTooLarge => Status::invalid_argument(error.to_string()),
        RequestError::Dropped => Status::cancelled(error.to_string()),
        other => Status::unknown(other.to_string()),
    }
}

#[tonic::async_trait]
impl kv_server::Kv for Services {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<tonic::Response<RangeResponse>, Status> {
        Services::range(self, request.into_inner())
            .await
            .map(tonic::Response::new)
    }

    async fn put(
        &self,
        request: Request<PutRequest>,
    ) -> Result<tonic::Response<PutResponse>, Status> {
        match self.write(WriteRequest::Put(request.into_inner())).await? {
            WriteResponse::Put(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal("a put was answered with another write")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<tonic::Response<DeleteRangeResponse>, Status> {
        match self
            .write(WriteRequest::DeleteRange(request.into_inner()))
            .await?
        {
            WriteResponse::DeleteRange(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal("a delete was answered with another write")),
        }
    }

    async fn txn(
        &self,
        request: Request<TxnRequest>,
    ) -> Result<tonic::Response<TxnResponse>, Status> {
        let txn = request.into_inner();
        // A transaction with only reads still goes through the log: it is then
        // linearizable like any other, which is what etcd does for non-serializable txns.
        match self.write(WriteRequest::Txn(txn)).await? {
            WriteResponse::Txn(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal("a txn was answered with another write")),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<tonic::Response<CompactionResponse>, Status> {
        match self
            .write(WriteRequest::Compaction(request.into_inner()))
            .await?
        {
            WriteResponse::Compaction(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal(
                "a compaction was answered with another write",
            )),
        }
    }
}

fn header_of(status: &NodeStatus) -> ResponseHeader {
    ResponseHeader {
        cluster_id: status.cluster_id,
        member_id: status.member_id,
        revision: status.revision,
        raft_term: status.term,
    }
}

fn member_of(record: &MemberRecord) -> Member {
    Member {
        id: record.id,
        name: record.name.clone(),
        peer_ur_ls: record.peer_urls.clone(),
        client_ur_ls: record.client_urls.clone(),
        is_learner: record.is_learner,
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Services {
    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<tonic::Response<MemberListResponse>, Status> {
        let (status, members) = self.status().await?;
        Ok(tonic::Response::new(MemberListResponse {
            header: Some(header_of(&status)),
            members: members.iter().map(member_of).collect(),
        }))
    }
}

#[tonic::async_trait]
impl maintenance_server::Maintenance for Services {
    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<tonic::Response<HashKvResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::HashKv {
            revision: request.into_inner().revision,
            reply,
        })?;
        match answer.await {
            Ok(result) => result
                .map(tonic::Response::new)
                .map_err(|error| status_of(&RequestError::KeySpace(error))),
            Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
        }
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, Status> {
        let (status, _) = Services::status(self).await?;
        Ok(tonic::Response::new(StatusResponse {
            header: Some(header_of(&status)),
            version: ETCD_COMPATIBLE_VERSION.to_string(),
            db_size: status.key_space_bytes as i64,
            leader: status.leader_id,
            raft_index: status.commit_index,
            raft_term: status.term,
            raft_applied_index: status.applied_index,
            errors: Vec::new(),
            db_size_in_use: status.key_space_bytes as i64,
            is_learner: status.is_learner,
            ..Default::default()
        }))
    }
}
