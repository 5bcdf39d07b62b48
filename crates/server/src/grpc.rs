//! etcd's v3 gRPC services, served over tonic: requests become member-loop
//! inputs, results become etcd responses, errors become etcd's gRPC statuses
//! (same code, same message) so that etcd clients react to them the same way.

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use keel_core::mvcc::KeySpaceError;
use keel_core::{NodeStatus, RequestError, Response, WriteRequest, WriteResponse};
use keel_types::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, AlarmType, CompactionRequest,
    CompactionResponse, DefragmentRequest, DefragmentResponse, DeleteRangeRequest,
    DeleteRangeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse, Member,
    MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, MoveLeaderRequest, MoveLeaderResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, SnapshotRequest, SnapshotResponse,
    StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use keel_types::keelpb::MemberRecord;
use tokio::sync::oneshot;
use tonic::{Request, Status};

use crate::api::etcdserverpb::{cluster_server, kv_server, maintenance_server};
use crate::member::Input;

/// The etcd API version keel is wire compatible with, reported by Status so
/// clients that gate features on the server version enable them.
pub const ETCD_COMPATIBLE_VERSION: &str = "3.5.0";

/// Bytes per message of a Maintenance.Snapshot stream.
const SNAPSHOT_CHUNK_BYTES: usize = 64 * 1024;

/// A boxed stream of responses, as the generated service traits want.
type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// The state shared by every service: the way into the member loop.
#[derive(Clone)]
pub struct Services {
    inner: Arc<ServicesInner>,
}

struct ServicesInner {
    input: SyncSender<Input>,
    revision: tokio::sync::watch::Receiver<i64>,
    /// Connections to other members' client endpoints, by URL, for
    /// forwarding calls only the leader can answer.
    leader_channels:
        std::sync::Mutex<std::collections::BTreeMap<String, tonic::transport::Channel>>,
    /// Set by the member loop while a CORRUPT alarm names this member.
    corrupt: Arc<std::sync::atomic::AtomicBool>,
    /// Serializable single-key reads answered without the member thread.
    read_view: Arc<crate::read_view::ReadView>,
}

/// Metadata key marking a request forwarded by another member; such a request
/// is never forwarded again.
pub const FORWARDED_METADATA_KEY: &str = "keel-forwarded";
/// How long a forwarded call may take.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Services {
    /// Services that talk to the member loop through `input` and learn of new
    /// revisions from `revision`.
    pub fn new(
        input: SyncSender<Input>,
        revision: tokio::sync::watch::Receiver<i64>,
        corrupt: Arc<std::sync::atomic::AtomicBool>,
        read_view: Arc<crate::read_view::ReadView>,
    ) -> Self {
        Services {
            inner: Arc::new(ServicesInner {
                input,
                revision,
                leader_channels: Default::default(),
                corrupt,
                read_view,
            }),
        }
    }

    /// A channel to the leader's client endpoint, for forwarding.
    pub async fn leader_channel(
        &self,
        leader_id: u64,
    ) -> Result<tonic::transport::Channel, Status> {
        // Right after a start the leader may not have published its client
        // URLs yet (they arrive through the log): wait for them, bounded.
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        let url = loop {
            let (_, members) = self.status().await?;
            let url = members
                .iter()
                .find(|member| member.id == leader_id)
                .and_then(|member| member.client_urls.first().cloned());
            match url {
                Some(url) => break url,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                None => {
                    return Err(Status::unavailable(
                        "etcdserver: leader's client URL is not known yet",
                    ))
                }
            }
        };
        let mut channels = self.inner.leader_channels.lock().expect("not poisoned");
        if let Some(channel) = channels.get(&url) {
            return Ok(channel.clone());
        }
        let channel = tonic::transport::Channel::from_shared(url.clone())
            .map_err(|_| Status::internal(format!("leader client URL {url:?} is not a URL")))?
            .connect_timeout(FORWARD_TIMEOUT)
            .timeout(FORWARD_TIMEOUT)
            .connect_lazy();
        channels.insert(url, channel.clone());
        Ok(channel)
    }

    /// Asks the member loop for a membership change.
    async fn change_membership(
        &self,
        change: keel_core::MembershipChange,
    ) -> Result<Result<(MemberRecord, Vec<MemberRecord>), RequestError>, Status> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::ChangeMembership { change, reply })?;
        match answer.await {
            Ok(Ok(Response::Membership { member, members })) => Ok(Ok((member, members))),
            Ok(Ok(_)) => Err(Status::internal(
                "a membership change was answered with something else",
            )),
            Ok(Err(error)) => Ok(Err(error)),
            Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
        }
    }

    /// The member's HashKV at `revision` (0: the newest).
    pub async fn hash_kv_at(&self, revision: i64) -> Result<HashKvResponse, Status> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::HashKv { revision, reply })?;
        match answer.await {
            Ok(result) => result.map_err(|error| status_of(&RequestError::KeySpace(error))),
            Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
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

    /// A member whose data a CORRUPT alarm names serves no client: whatever
    /// it would answer may be wrong (etcd's "corrupt cluster").
    fn refuse_if_corrupt(&self) -> Result<(), Status> {
        if self
            .inner
            .corrupt
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(Status::data_loss("etcdserver: corrupt cluster"));
        }
        Ok(())
    }

    async fn write(&self, request: WriteRequest) -> Result<WriteResponse, Status> {
        self.refuse_if_corrupt()?;
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
        self.refuse_if_corrupt()?;
        if request.serializable {
            if let Some(result) = self.inner.read_view.range(&request) {
                return result.map_err(|error| status_of(&RequestError::KeySpace(error)));
            }
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
        RequestError::MemberNotFound => Status::not_found(error.to_string()),
        RequestError::PeerUrlExists
        | RequestError::MemberNotLearner
        | RequestError::LearnerNotReady => Status::failed_precondition(error.to_string()),
        RequestError::MembershipChangeInProgress => Status::unavailable(error.to_string()),
        RequestError::NoSpace => Status::resource_exhausted(error.to_string()),
        RequestError::BadLeaderTransferee => Status::failed_precondition(error.to_string()),
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

/// The Cluster service's header: etcd's ClusterServer leaves the revision
/// out (membership is not part of the key space), and so its answers, over
/// gRPC and the JSON gateway alike, carry none.
fn cluster_header_of(status: &NodeStatus) -> ResponseHeader {
    ResponseHeader {
        revision: 0,
        ..header_of(status)
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
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<tonic::Response<MemberAddResponse>, Status> {
        let request = request.into_inner();
        if request.peer_ur_ls.is_empty() {
            return Err(Status::invalid_argument(
                "etcdserver: member peer URLs are not provided",
            ));
        }
        let (member, members) = self
            .change_membership(keel_core::MembershipChange::Add {
                peer_urls: request.peer_ur_ls,
                is_learner: request.is_learner,
            })
            .await?
            .map_err(|error| status_of(&error))?;
        let (status, _) = self.status().await?;
        Ok(tonic::Response::new(MemberAddResponse {
            header: Some(cluster_header_of(&status)),
            member: Some(member_of(&member)),
            members: members.iter().map(member_of).collect(),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<tonic::Response<MemberRemoveResponse>, Status> {
        let (_, members) = self
            .change_membership(keel_core::MembershipChange::Remove {
                member_id: request.into_inner().id,
            })
            .await?
            .map_err(|error| status_of(&error))?;
        let (status, _) = self.status().await?;
        Ok(tonic::Response::new(MemberRemoveResponse {
            header: Some(cluster_header_of(&status)),
            members: members.iter().map(member_of).collect(),
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<tonic::Response<MemberUpdateResponse>, Status> {
        let request = request.into_inner();
        let change = keel_core::MembershipChange::Update {
            member_id: request.id,
            peer_urls: request.peer_ur_ls,
        };
        let (reply, answer) = oneshot::channel();
        self.submit(Input::ChangeMembership { change, reply })?;
        match answer.await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(status_of(&error)),
            Err(_) => return Err(Status::unavailable("etcdserver: server stopped")),
        }
        let (status, members) = self.status().await?;
        Ok(tonic::Response::new(MemberUpdateResponse {
            header: Some(cluster_header_of(&status)),
            members: members.iter().map(member_of).collect(),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<tonic::Response<MemberPromoteResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED_METADATA_KEY);
        let member_id = request.into_inner().id;
        match self
            .change_membership(keel_core::MembershipChange::Promote { member_id })
            .await?
        {
            Ok((_, members)) => {
                let (status, _) = self.status().await?;
                Ok(tonic::Response::new(MemberPromoteResponse {
                    header: Some(cluster_header_of(&status)),
                    members: members.iter().map(member_of).collect(),
                }))
            }
            // Only the leader knows how far behind a learner is.
            Err(RequestError::NotLeader { leader_id }) if !forwarded && leader_id != 0 => {
                let mut client = crate::api::etcdserverpb::cluster_client::ClusterClient::new(
                    self.leader_channel(leader_id).await?,
                );
                let mut request = Request::new(MemberPromoteRequest { id: member_id });
                request
                    .metadata_mut()
                    .insert(FORWARDED_METADATA_KEY, "1".parse().expect("ascii"));
                client.member_promote(request).await
            }
            Err(error) => Err(status_of(&error)),
        }
    }

    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<tonic::Response<MemberListResponse>, Status> {
        let (status, members) = self.status().await?;
        Ok(tonic::Response::new(MemberListResponse {
            header: Some(cluster_header_of(&status)),
            members: members.iter().map(member_of).collect(),
        }))
    }
}

#[tonic::async_trait]
impl maintenance_server::Maintenance for Services {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<tonic::Response<AlarmResponse>, Status> {
        let request = request.into_inner();
        if request.action() == AlarmAction::Get {
            // Alarms are replicated state: any member lists them, as etcd does.
            let (status, _) = Services::status(self).await?;
            let alarms = status
                .alarms
                .iter()
                .filter(|alarm| request.member_id == 0 || alarm.member_id == request.member_id)
                .filter(|alarm| {
                    request.alarm == AlarmType::None as i32 || alarm.alarm == request.alarm
                })
                .copied()
                .collect();
            return Ok(tonic::Response::new(AlarmResponse {
                header: Some(header_of(&status)),
                alarms,
            }));
        }
        match self.write(WriteRequest::Alarm(request)).await? {
            WriteResponse::Alarm(response) => Ok(tonic::Response::new(response)),
            _ => Err(Status::internal("an alarm was answered with another write")),
        }
    }

    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<tonic::Response<BoxStream<SnapshotResponse>>, Status> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Backup { reply })?;
        let (header, bytes) = answer
            .await
            .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
        // The image is taken at once, in the member loop, so it is one
        // consistent point in time; it is then streamed in bounded chunks.
        let total = bytes.len();
        let chunk_count = total.div_ceil(SNAPSHOT_CHUNK_BYTES).max(1);
        let chunks = (0..chunk_count).map(move |index| {
            let start = index * SNAPSHOT_CHUNK_BYTES;
            let end = (start + SNAPSHOT_CHUNK_BYTES).min(total);
            Ok(SnapshotResponse {
                header: Some(header),
                remaining_bytes: (total - end) as u64,
                blob: bytes[start..end].to_vec(),
                version: ETCD_COMPATIBLE_VERSION.to_string(),
            })
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<tonic::Response<DefragmentResponse>, Status> {
        // keel's key space lives in memory and compaction frees what it drops
        // at once: there is no file to rewrite, so defragmenting has nothing
        // to do and never blocks reads or writes.
        let (status, _) = Services::status(self).await?;
        Ok(tonic::Response::new(DefragmentResponse {
            header: Some(header_of(&status)),
        }))
    }

    async fn hash(
        &self,
        _request: Request<HashRequest>,
    ) -> Result<tonic::Response<HashResponse>, Status> {
        let response = self.hash_kv_at(0).await?;
        Ok(tonic::Response::new(HashResponse {
            header: response.header,
            hash: response.hash,
        }))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<tonic::Response<MoveLeaderResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED_METADATA_KEY);
        let target = request.into_inner().target_id;
        let (reply, answer) = oneshot::channel();
        self.submit(Input::MoveLeader { target, reply })?;
        match answer.await {
            Ok(Ok(_)) => {
                let (status, _) = Services::status(self).await?;
                Ok(tonic::Response::new(MoveLeaderResponse {
                    header: Some(header_of(&status)),
                }))
            }
            // Only the leader can hand leadership over.
            Ok(Err(RequestError::NotLeader { leader_id })) if !forwarded && leader_id != 0 => {
                let mut client =
                    crate::api::etcdserverpb::maintenance_client::MaintenanceClient::new(
                        self.leader_channel(leader_id).await?,
                    );
                let mut request = Request::new(MoveLeaderRequest { target_id: target });
                request
                    .metadata_mut()
                    .insert(FORWARDED_METADATA_KEY, "1".parse().expect("ascii"));
                client.move_leader(request).await
            }
            Ok(Err(error)) => Err(status_of(&error)),
            Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
        }
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<tonic::Response<HashKvResponse>, Status> {
        self.hash_kv_at(request.into_inner().revision)
            .await
            .map(tonic::Response::new)
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
            // etcd lists raised alarms here, as "memberID:<id> alarm:<TYPE> ".
            errors: status
                .alarms
                .iter()
                .map(|alarm| {
                    format!(
                        "memberID:{} alarm:{} ",
                        alarm.member_id,
                        AlarmType::try_from(alarm.alarm)
                            .map_or("UNKNOWN", |alarm_type| alarm_type.as_str_name())
                    )
                })
                .collect(),
            db_size_in_use: status.key_space_bytes as i64,
            is_learner: status.is_learner,
            ..Default::default()
        }))
    }
}
