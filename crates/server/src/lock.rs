//! etcd's Lock service (v3lock): distributed mutual exclusion over the key
//! space, with the same keys, transactions and errors as etcd's
//! `concurrency.Mutex`, so keel's locks and those taken by etcd client
//! libraries (or `etcdctl lock`) exclude each other.
//!
//! # How a lock works
//!
//! `Lock(name, lease)` joins a queue: it creates the key `name/<lease id in
//! hexadecimal>` attached to the lease, unless that key exists already (the
//! same lease asking again). The queue is ordered by the keys' create
//! revisions, and the holder is the key with the smallest one. The request
//! waits until every key under `name/` created before its own is gone (deleted
//! by `Unlock`, or by the expiry or revocation of its lease), then answers with
//! its key. `Unlock(key)` deletes the key, which lets the next waiter in.
//!
//! A waiting request ends with an error instead when its own key disappears
//! (its lease expired or was revoked: "mutex: session is expired"), and when
//! the client gives up (the request future is dropped), in which case its key
//! is deleted so that it does not hold the lock later for nobody.
//!
//! Waiting costs no polling: a waiter sleeps on the member's published
//! revision and looks at the queue again (a local read) each time this member
//! applies a new revision. Before answering, it confirms with a linearizable
//! read that its key still heads the queue.
//!
//! # Fencing tokens
//!
//! A lock held through a lease is not a guarantee by itself: the holder can be
//! paused (a long garbage collection, SIGSTOP, a slow disk) past its lease's
//! TTL, lose the lock to the next waiter, wake up and still believe it holds
//! the lock. The lock key's **create revision** is the fencing token that makes
//! this safe. It strictly increases across successive holders of one lock,
//! because every holder's key is created after the previous holder's key and
//! revisions only grow. A protected resource uses it in one of two ways:
//!
//! 1. **Guard every write with the lock key.** When the resource lives in keel
//!    itself, write with a Txn that compares the lock key's create revision
//!    with the token (`create_revision(lock key) == token`) and puts only if
//!    the comparison holds. A deposed holder's key is gone (or belongs to a
//!    later lock), so its write fails, however late it arrives.
//! 2. **Pass the token to the resource.** Send the token with every request;
//!    the resource remembers the highest token it has accepted and rejects
//!    requests with a lower one. Once a newer holder has written, the old
//!    holder's writes are refused.
//!
//! `keel lock NAME -- COMMAND` runs a command with the token in
//! `KEEL_LOCK_REVISION` and the key in `KEEL_LOCK_KEY` for that purpose.

use std::sync::Arc;

use keel_core::{RequestError, Response, WriteRequest, WriteResponse};
use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_types::etcdserverpb::request_op::Request as Operation;
use keel_types::etcdserverpb::response_op::Response as OperationResponse;
use keel_types::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use keel_types::mvccpb::KeyValue;
use keel_types::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tokio::sync::{oneshot, Semaphore};
use tonic::{Request, Status};

use crate::grpc::{status_of, Services};
use crate::member::Input;

/// Lock requests that may wait for their turn at once on one member. A waiter
/// holds no member resource while it sleeps, but each wakes up (and reads) on
/// every new revision, so their number is bounded.
pub const LOCK_WAITERS_MAX: usize = 1_024;

/// How long a waiter backs off when the member's input queue is full before
/// it looks at the queue again.
const BUSY_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// The TTL of the lease granted for a request that names no lease (lease 0),
/// as etcd's `concurrency.NewSession` does (`defaultSessionTTL`).
pub const SESSION_TTL_SECONDS_DEFAULT: i64 = 60;

/// etcd's `concurrency.ErrSessionExpired`: the waiter's key disappeared.
const MUTEX_SESSION_EXPIRED: &str = "mutex: session is expired";

/// The Lock service over one member.
#[derive(Clone)]
pub struct LockService {
    services: Services,
    /// Permits for requests that must wait for a predecessor to go.
    waiters: Arc<Semaphore>,
}

impl LockService {
    /// A Lock service over `services`.
    pub fn new(services: Services) -> Self {
        LockService {
            services,
            waiters: Arc::new(Semaphore::new(LOCK_WAITERS_MAX)),
        }
    }

    async fn lock(&self, request: LockRequest) -> Result<LockResponse, Status> {
        let prefix = queue_prefix(&request.name);
        let lease = session_lease(&self.services, request.lease).await?;
        let key = queue_key(&prefix, lease);
        let joined = join_queue(&self.services, &prefix, &key, &[], lease).await?;
        if joined.heads_queue() {
            return Ok(LockResponse {
                header: joined.header,
                key,
            });
        }
        // From here on, giving up (an error, or the client dropping the
        // request) must leave the queue, or the key would hold the lock later
        // for nobody: etcd's Mutex.Lock unlocks when waiting fails.
        let mut leave = LeaveQueueOnDrop::new(&self.services, &key, joined.create_revision);
        let _permit = self
            .waiters
            .clone()
            .try_acquire_owned()
            .map_err(|_| status_of(&RequestError::TooManyRequests))?;
        let header = wait_for_turn(
            &self.services,
            &prefix,
            &key,
            joined.create_revision,
            MUTEX_SESSION_EXPIRED,
        )
        .await?;
        leave.disarm();
        Ok(LockResponse {
            header: Some(header),
            key,
        })
    }

    async fn unlock(&self, request: UnlockRequest) -> Result<UnlockResponse, Status> {
        // etcd deletes the key unconditionally: Unlock is a plain delete.
        match self
            .services
            .write_raw(WriteRequest::DeleteRange(DeleteRangeRequest {
                key: request.key,
                ..Default::default()
            }))
            .await?
        {
            WriteResponse::DeleteRange(response) => Ok(UnlockResponse {
                header: response.header,
            }),
            _ => Err(Status::internal("a delete was answered with another write")),
        }
    }
}

#[tonic::async_trait]
impl crate::api::v3lockpb::lock_server::Lock for LockService {
    async fn lock(
        &self,
        request: Request<LockRequest>,
    ) -> Result<tonic::Response<LockResponse>, Status> {
        LockService::lock(self, request.into_inner())
            .await
            .map(tonic::Response::new)
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<tonic::Response<UnlockResponse>, Status> {
        LockService::unlock(self, request.into_inner())
            .await
            .map(tonic::Response::new)
    }
}

// The queue machinery below is shared with the Election service, whose
// candidates queue exactly as lock waiters do (etcd's `waitDeletes`).

/// The prefix under which the waiters of lock or election `name` queue.
pub(crate) fn queue_prefix(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// The queue key of `lease`: the prefix and the lease id in hexadecimal, as
/// Go's `%x` prints an int64 (a minus sign for negative ids, which Rust's `{:x}`
/// would print in two's complement instead).
pub(crate) fn queue_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    let digits = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    key.extend_from_slice(digits.as_bytes());
    key
}

/// The lease a request's key is attached to: its own, or for lease 0 a new
/// lease of [`SESSION_TTL_SECONDS_DEFAULT`], as etcd's server does (it opens a
/// session for the request, and a session without a lease grants one).
pub(crate) async fn session_lease(services: &Services, lease: i64) -> Result<i64, Status> {
    if lease != 0 {
        return Ok(lease);
    }
    match services
        .write_raw(WriteRequest::LeaseGrant(LeaseGrantRequest {
            ttl: SESSION_TTL_SECONDS_DEFAULT,
            id: 0,
        }))
        .await?
    {
        WriteResponse::LeaseGrant(response) if response.error.is_empty() => Ok(response.id),
        WriteResponse::LeaseGrant(response) => Err(Status::unknown(response.error)),
        _ => Err(Status::internal(
            "a lease grant was answered with another write",
        )),
    }
}

/// The result of joining a queue.
pub(crate) struct Joined {
    /// The header of the joining transaction.
    pub header: Option<ResponseHeader>,
    /// The create revision of our key: our place in the queue.
    pub create_revision: i64,
    /// Our key's value as it was before this request (None if we created it).
    pub existing_value: Option<Vec<u8>>,
    /// The create revision of the key heading the queue.
    pub head_create_revision: Option<i64>,
}

impl Joined {
    /// True when our key heads the queue, so there is nothing to wait for.
    pub fn heads_queue(&self) -> bool {
        self.head_create_revision
            .is_none_or(|head| head == self.create_revision)
    }
}

/// A compare that holds when `key` was created at `create_revision` (0: when
/// it does not exist).
pub(crate) fn created_at(key: &[u8], create_revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::CreateRevision(create_revision)),
    }
}

/// A read of the first-created key under `prefix` (etcd's `WithFirstCreate`):
/// the head of the queue.
pub(crate) fn first_created(prefix: &[u8]) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: SortOrder::Ascend as i32,
        sort_target: SortTarget::Create as i32,
        ..Default::default()
    }
}

fn range_operation(request: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Operation::RequestRange(request)),
    }
}

fn range_of(response: &TxnResponse, index: usize) -> Option<&RangeResponse> {
    match response.responses.get(index)?.response.as_ref()? {
        OperationResponse::ResponseRange(range) => Some(range),
        _ => None,
    }
}

/// Joins the queue under `prefix` with `key` (value `value`, attached to
/// `lease`) in one transaction, as etcd's `Mutex.tryAcquire` and
/// `Election.Campaign` do: create the key if it does not exist, else read it;
/// and read the head of the queue either way. A lease that does not exist
/// fails with etcd's "requested lease not found".
pub(crate) async fn join_queue(
    services: &Services,
    prefix: &[u8],
    key: &[u8],
    value: &[u8],
    lease: i64,
) -> Result<Joined, Status> {
    let head = range_operation(first_created(prefix));
    let transaction = TxnRequest {
        compare: vec![created_at(key, 0)],
        success: vec![
            RequestOp {
                request: Some(Operation::RequestPut(PutRequest {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    lease,
                    ..Default::default()
                })),
            },
            head.clone(),
        ],
        failure: vec![
            range_operation(RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            }),
            head,
        ],
    };
    let response = txn(services, transaction).await?;
    let head_create_revision = range_of(&response, 1)
        .and_then(|range| range.kvs.first())
        .map(|kv| kv.create_revision);
    if response.succeeded {
        let revision = response.header.as_ref().map_or(0, |header| header.revision);
        return Ok(Joined {
            header: response.header,
            create_revision: revision,
            existing_value: None,
            head_create_revision,
        });
    }
    let existing = range_of(&response, 0)
        .and_then(|range| range.kvs.first())
        .ok_or_else(|| Status::internal("the queue key exists but was not read"))?;
    Ok(Joined {
        create_revision: existing.create_revision,
        existing_value: Some(existing.value.clone()),
        head_create_revision,
        header: response.header,
    })
}

/// Waits until `key` (created at `create_revision`) heads the queue under
/// `prefix`: every key created before it is gone. Returns the header of the
/// linearizable read that confirmed it. Fails with `lost_message` when `key`
/// itself disappears first (its lease expired or was revoked).
///
/// This is etcd's `waitDeletes`, with two differences: it watches the
/// member's revision instead of one predecessor's key (so it needs no watch
/// stream), and it notices at once that its own key is gone.
pub(crate) async fn wait_for_turn(
    services: &Services,
    prefix: &[u8],
    key: &[u8],
    create_revision: i64,
    lost_message: &str,
) -> Result<ResponseHeader, Status> {
    let mut revision = services.revision();
    let mut linearizable = false;
    loop {
        // Mark the current revision seen before reading, so a change that
        // lands during the read wakes us again instead of being missed.
        revision.borrow_and_update();
        let request = last_created(prefix, create_revision);
        // Keys created before ours only ever disappear, so this member's own
        // state (possibly behind, never ahead of the cluster) is enough to
        // know when to look again; the answer itself is confirmed with a
        // linearizable read, which sees at least as much as the local one.
        let result = if linearizable {
            read(services, request).await
        } else {
            read_local(services, request).await
        };
        let response = match result {
            Ok(response) => response,
            // The member's input queue is full: a busy moment, not a reason
            // to give up a place in the queue. Look again shortly.
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                tokio::time::sleep(BUSY_RETRY_INTERVAL).await;
                continue;
            }
            Err(status) => return Err(status),
        };
        match response.kvs.as_slice() {
            // Our key, and nothing created before it: our turn.
            [own] if own.key == key && own.create_revision == create_revision => {
                if linearizable {
                    return Ok(response.header.unwrap_or_default());
                }
                linearizable = true;
                continue;
            }
            // Our key, behind another: wait for that one to go.
            [own, _] if own.key == key && own.create_revision == create_revision => {}
            // No key in our place: ours was deleted (its lease expired or was
            // revoked, or someone unlocked it).
            _ => return Err(Status::unknown(lost_message)),
        }
        linearizable = false;
        if revision.changed().await.is_err() {
            return Err(Status::unavailable("etcdserver: server stopped"));
        }
    }
}

/// A read of the two last-created keys under `prefix` among those created at
/// or before `create_revision`: a waiter's own key, and the one just before it
/// in the queue if there is one (etcd's `WithLastCreate` and `WithMaxCreateRev`).
fn last_created(prefix: &[u8], create_revision: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 2,
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision: create_revision,
        keys_only: true,
        ..Default::default()
    }
}

/// Deletes `key` if it is still the one created at `create_revision` (so a
/// later holder's key of the same name is never touched). Returns the header.
pub(crate) async fn delete_if_created_at(
    services: &Services,
    key: &[u8],
    create_revision: i64,
) -> Result<Option<ResponseHeader>, Status> {
    let response = txn(
        services,
        TxnRequest {
            compare: vec![created_at(key, create_revision)],
            success: vec![RequestOp {
                request: Some(Operation::RequestDeleteRange(DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                })),
            }],
            failure: Vec::new(),
        },
    )
    .await?;
    Ok(response.header)
}

/// Leaves a queue when dropped while armed: when waiting for a turn fails or
/// the client gives up (tonic drops the request future), the key is deleted
/// in a task of its own, as the request can no longer await anything.
pub(crate) struct LeaveQueueOnDrop {
    armed: Option<(Services, Vec<u8>, i64)>,
}

impl LeaveQueueOnDrop {
    /// Armed for `key`, created at `create_revision`.
    pub fn new(services: &Services, key: &[u8], create_revision: i64) -> Self {
        LeaveQueueOnDrop {
            armed: Some((services.clone(), key.to_vec(), create_revision)),
        }
    }

    /// Keeps the key: the request succeeded.
    pub fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for LeaveQueueOnDrop {
    fn drop(&mut self) {
        let Some((services, key, create_revision)) = self.armed.take() else {
            return;
        };
        // Outside a runtime (the server is shutting down) there is nobody to
        // do it; the key's lease removes it later.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(status) = delete_if_created_at(&services, &key, create_revision).await {
                    tracing::warn!(
                        key = %String::from_utf8_lossy(&key),
                        error = %status.message(),
                        "could not leave a lock or election queue; the key's lease will remove it"
                    );
                }
            });
        }
    }
}

/// A transaction through the log.
pub(crate) async fn txn(services: &Services, request: TxnRequest) -> Result<TxnResponse, Status> {
    match services.write_raw(WriteRequest::Txn(request)).await? {
        WriteResponse::Txn(response) => Ok(response),
        _ => Err(Status::internal("a txn was answered with another write")),
    }
}

/// A linearizable read (after a ReadIndex round), as the KV service's Range.
pub(crate) async fn read(
    services: &Services,
    request: RangeRequest,
) -> Result<RangeResponse, Status> {
    let (reply, answer) = oneshot::channel();
    services.send_input(Input::Read { request, reply })?;
    match answer.await {
        Ok(Ok(Response::Range(response))) => Ok(response),
        Ok(Ok(_)) => Err(Status::internal("a read was answered with a write")),
        Ok(Err(error)) => Err(status_of(&error)),
        Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
    }
}

/// A read of this member's state as it is now (serializable; possibly behind).
pub(crate) async fn read_local(
    services: &Services,
    request: RangeRequest,
) -> Result<RangeResponse, Status> {
    let (reply, answer) = oneshot::channel();
    services.send_input(Input::LocalRead { request, reply })?;
    match answer.await {
        Ok(result) => result.map_err(|error| status_of(&RequestError::KeySpace(error))),
        Err(_) => Err(Status::unavailable("etcdserver: server stopped")),
    }
}

/// The key heading the queue under `prefix`, read linearizably.
pub(crate) async fn queue_head(
    services: &Services,
    prefix: &[u8],
) -> Result<(Option<ResponseHeader>, Option<KeyValue>), Status> {
    let response = read(services, first_created(prefix)).await?;
    Ok((response.header, response.kvs.into_iter().next()))
}

/// The end of the range of every key starting with `prefix`, as etcd computes it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_print_lease_ids_as_go_does() {
        assert_eq!(
            queue_key(b"name/", 0x694d7c1b2e3f4a10),
            b"name/694d7c1b2e3f4a10"
        );
        assert_eq!(queue_key(b"name/", 255), b"name/ff");
        assert_eq!(queue_key(b"name/", -255), b"name/-ff");
    }

    #[test]
    fn prefixes_end_past_every_key_under_them() {
        assert_eq!(queue_prefix(b"lock"), b"lock/");
        assert_eq!(prefix_end(b"lock/"), b"lock0");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn a_joined_key_heads_an_empty_queue_or_its_own() {
        let joined = |head| Joined {
            header: None,
            create_revision: 7,
            existing_value: None,
            head_create_revision: head,
        };
        assert!(joined(None).heads_queue());
        assert!(joined(Some(7)).heads_queue());
        assert!(!joined(Some(3)).heads_queue());
    }
}
