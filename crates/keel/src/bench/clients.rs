//! The client tasks: each sends one operation at a time (put, range, txn
//! compare-and-swap, lease grant and keep-alives, or a watch workload's put),
//! paced by `--rate` or closed-loop, until its share of `--total` is done or
//! `--duration` is over, and records every outcome in the shared
//! [`Recorder`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_server::api::etcdserverpb::lease_client::LeaseClient;
use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::request_op::Request;
use keel_types::etcdserverpb::{
    Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use super::pacer::Pacer;
use super::progress::Goal;
use super::report::{OperationError, Recorder, Timings};
use super::{zookeeper, Connection, Plan, Workload, TIMESTAMP_BYTES};

/// Keep-alive requests queued on a lease client's stream: one, because a
/// client waits for each answer before it sends the next.
const KEEP_ALIVE_QUEUE_MAX: usize = 1;

/// What one successful operation reports.
struct Completed {
    /// From the intended send time to the answer that counts (for lease,
    /// the grant's; keep-alives are recorded on their own).
    pub latency: Duration,
    /// The txn's compare failed.
    pub conflict: bool,
}

/// A lease client's keep-alive stream, opened at its first keep-alive and
/// kept for the rest of the run (opened again after it broke).
struct KeepAliveStream {
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

/// One client's connection and workload.
enum Client {
    Put(KvClient<Channel>),
    Range {
        kv: KvClient<Channel>,
        serializable: bool,
    },
    Txn(KvClient<Channel>),
    Lease {
        lease: LeaseClient<Channel>,
        // Boxed: a stream is large, and the other clients need none.
        keep_alive: Option<Box<KeepAliveStream>>,
        ttl_seconds: i64,
        keep_alives: u32,
    },
    /// Puts whose value starts with the intended send time, in nanoseconds
    /// since `epoch`, for the watchers to measure delivery latency with.
    WatchWriter {
        kv: KvClient<Channel>,
        epoch: Instant,
    },
    /// ZooKeeper's setData.
    ZooKeeperSetData(zookeeper_client::Client),
    /// ZooKeeper's getData, after a sync when linearizable.
    ZooKeeperGetData {
        session: zookeeper_client::Client,
        linearizable: bool,
    },
}

impl Client {
    /// A client of `plan`'s workload (the watch workload's writer for watch).
    fn new(plan: &Plan, connection: Connection, epoch: Instant) -> Client {
        let channel = match connection {
            Connection::Etcd(channel) => channel,
            Connection::ZooKeeper(session) => {
                return match plan.workload {
                    Workload::Range { serializable } => Client::ZooKeeperGetData {
                        session,
                        linearizable: !serializable,
                    },
                    // The plan allows only put and range with ZooKeeper.
                    _ => Client::ZooKeeperSetData(session),
                };
            }
        };
        match plan.workload {
            Workload::Put => Client::Put(KvClient::new(channel)),
            Workload::Range { serializable } => Client::Range {
                kv: KvClient::new(channel),
                serializable,
            },
            Workload::Txn => Client::Txn(KvClient::new(channel)),
            Workload::Lease { ttl, keep_alives } => Client::Lease {
                lease: LeaseClient::new(channel),
                keep_alive: None,
                ttl_seconds: ttl.as_secs() as i64,
                keep_alives,
            },
            Workload::Watch { .. } => Client::WatchWriter {
                kv: KvClient::new(channel),
                epoch,
            },
        }
    }

    /// Runs one operation on `key`, intended to be sent at `intended`.
    async fn operate(
        &mut self,
        key: Vec<u8>,
        value: &[u8],
        intended: Instant,
        recorder: &Recorder,
    ) -> Result<Completed, OperationError> {
        match self {
            Client::Put(kv) => {
                put(kv, key, value.to_vec()).await?;
                Ok(completed(intended, false))
            }
            Client::Range { kv, serializable } => {
                kv.range(RangeRequest {
                    key,
                    serializable: *serializable,
                    ..Default::default()
                })
                .await
                .map_err(|status| OperationError::status("range", &status))?;
                Ok(completed(intended, false))
            }
            Client::Txn(kv) => compare_and_swap(kv, key, value.to_vec(), intended).await,
            Client::Lease {
                lease,
                keep_alive,
                ttl_seconds,
                keep_alives,
            } => {
                let granted = lease
                    .lease_grant(LeaseGrantRequest {
                        ttl: *ttl_seconds,
                        id: 0,
                    })
                    .await
                    .map_err(|status| OperationError::status("grant", &status))?
                    .into_inner();
                if !granted.error.is_empty() {
                    return Err(OperationError::new("grant", "Unknown", &granted.error));
                }
                let grant = completed(intended, false);
                for _ in 0..*keep_alives {
                    let sent = Instant::now();
                    keep_alive_once(lease, keep_alive, granted.id).await?;
                    recorder.keep_alive_latency.record(sent.elapsed());
                }
                Ok(grant)
            }
            Client::WatchWriter { kv, epoch } => {
                let mut value = value.to_vec();
                let nanoseconds = intended.saturating_duration_since(*epoch).as_nanos() as u64;
                value[..TIMESTAMP_BYTES].copy_from_slice(&nanoseconds.to_be_bytes());
                put(kv, key, value).await?;
                Ok(completed(intended, false))
            }
            Client::ZooKeeperSetData(session) => {
                zookeeper::set_data(session, &key, value).await?;
                Ok(completed(intended, false))
            }
            Client::ZooKeeperGetData {
                session,
                linearizable,
            } => {
                zookeeper::get_data(session, &key, *linearizable).await?;
                Ok(completed(intended, false))
            }
        }
    }
}

fn completed(intended: Instant, conflict: bool) -> Completed {
    Completed {
        latency: intended.elapsed(),
        conflict,
    }
}

async fn put(
    kv: &mut KvClient<Channel>,
    key: Vec<u8>,
    value: Vec<u8>,
) -> Result<(), OperationError> {
    kv.put(PutRequest {
        key,
        value,
        ..Default::default()
    })
    .await
    .map_err(|status| OperationError::status("put", &status))?;
    Ok(())
}

/// Reads the key's mod revision (0 when it does not exist), then swaps in
/// the new value only if the key is still at that revision; otherwise the
/// txn reads the key instead, as a real compare-and-swap loop would before
/// trying again.
async fn compare_and_swap(
    kv: &mut KvClient<Channel>,
    key: Vec<u8>,
    value: Vec<u8>,
    intended: Instant,
) -> Result<Completed, OperationError> {
    let read = kv
        .range(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })
        .await
        .map_err(|status| OperationError::status("range", &status))?
        .into_inner();
    let mod_revision = read.kvs.first().map_or(0, |found| found.mod_revision);
    let response = kv
        .txn(TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.clone(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::ModRevision(mod_revision)),
            }],
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value,
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key,
                    ..Default::default()
                })),
            }],
        })
        .await
        .map_err(|status| OperationError::status("txn", &status))?
        .into_inner();
    Ok(completed(intended, !response.succeeded))
}

/// One keep-alive round trip for lease `id` on the client's stream, opening
/// the stream first if there is none. A broken stream is dropped, so the next
/// keep-alive opens a new one.
async fn keep_alive_once(
    lease: &mut LeaseClient<Channel>,
    stream: &mut Option<Box<KeepAliveStream>>,
    id: i64,
) -> Result<(), OperationError> {
    let request = LeaseKeepAliveRequest { id };
    let mut opened = match stream.take() {
        Some(opened) => {
            if opened.requests.send(request).await.is_err() {
                return Err(OperationError::new(
                    "keep-alive",
                    "Unavailable",
                    "the keep-alive stream closed",
                ));
            }
            opened
        }
        None => {
            let (requests, receiver) = mpsc::channel(KEEP_ALIVE_QUEUE_MAX);
            // Queued before the call, so the server has a request to answer
            // (some servers send their response headers only with the first
            // response, and the call completes only on the headers).
            requests
                .send(request)
                .await
                .expect("the receiver is held here");
            let responses = lease
                .lease_keep_alive(ReceiverStream::new(receiver))
                .await
                .map_err(|status| OperationError::status("keep-alive", &status))?
                .into_inner();
            Box::new(KeepAliveStream {
                requests,
                responses,
            })
        }
    };
    match opened.responses.message().await {
        Ok(Some(response)) if response.ttl > 0 => {
            *stream = Some(opened);
            Ok(())
        }
        Ok(Some(_)) => {
            *stream = Some(opened);
            Err(OperationError::new(
                "keep-alive",
                "NotFound",
                "the lease expired or was revoked (TTL 0)",
            ))
        }
        Ok(None) => Err(OperationError::new(
            "keep-alive",
            "Unavailable",
            "the keep-alive stream ended",
        )),
        Err(status) => Err(OperationError::status("keep-alive", &status)),
    }
}

/// A small deterministic generator for key choice: benchmarks need spread,
/// not cryptographic quality, and a seed makes runs comparable (SplitMix64).
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut mixed = *state;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// When one client stops and how it paces itself.
struct Schedule {
    /// Its share of --total, if there is one.
    operations: Option<u64>,
    /// The end of --duration, if there is one.
    deadline: Option<Instant>,
    /// With --rate: its send times.
    pacer: Option<Pacer>,
    /// Seeds the client's key choice.
    seed: u64,
    /// Every operation uses key 0 (watch on one key).
    single_key: bool,
    /// With --sequential-keys: the client's next key index and its step.
    sequential: Option<(u64, u64)>,
}

/// Sends operations until the schedule ends; records every outcome.
async fn drive(
    mut client: Client,
    mut schedule: Schedule,
    plan: Arc<Plan>,
    recorder: Arc<Recorder>,
) {
    let value = vec![b'v'; plan.value_size];
    let mut random = schedule.seed;
    let mut sent = 0u64;
    loop {
        if schedule
            .operations
            .is_some_and(|operations| sent >= operations)
        {
            return;
        }
        let intended = match &mut schedule.pacer {
            Some(pacer) => match pacer.wait(schedule.deadline).await {
                Some(intended) => intended,
                None => return,
            },
            None => {
                let now = Instant::now();
                if schedule.deadline.is_some_and(|deadline| now >= deadline) {
                    return;
                }
                now
            }
        };
        sent += 1;
        let key_index = if schedule.single_key {
            0
        } else if let Some((next, step)) = &mut schedule.sequential {
            let index = *next % plan.key_space_size;
            *next += *step;
            index
        } else {
            next_random(&mut random) % plan.key_space_size
        };
        let outcome = tokio::time::timeout(
            plan.request_timeout,
            client.operate(plan.key(key_index), &value, intended, &recorder),
        )
        .await;
        match outcome {
            Ok(Ok(completed)) => {
                recorder.operation_latency.record(completed.latency);
                if completed.conflict {
                    recorder.conflicts.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Err(error)) => recorder.record_error(error),
            Err(_) => {
                // The operation was abandoned part way: a lease client's
                // keep-alive stream may hold an answer that is not ours now.
                if let Client::Lease { keep_alive, .. } = &mut client {
                    *keep_alive = None;
                }
                recorder.record_error(OperationError::new(
                    plan.workload.request_name(),
                    "DeadlineExceeded",
                    &format!(
                        "no answer within --request-timeout {:?}",
                        plan.request_timeout
                    ),
                ));
            }
        }
        recorder.completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `plan.clients` clients over the connections round-robin until each
/// has done its share; returns how long that took. `epoch` is the watch
/// workload's clock origin.
pub async fn run(
    plan: &Arc<Plan>,
    connections: &[Connection],
    recorder: &Arc<Recorder>,
    epoch: Instant,
) -> Timings {
    let start = Instant::now();
    let deadline = match plan.goal {
        Goal::Duration(duration) => Some(start + duration),
        Goal::Operations(_) => None,
    };
    let clients = plan.clients as u64;
    let single_key = matches!(plan.workload, Workload::Watch { prefix: false, .. });
    let mut tasks = Vec::with_capacity(plan.clients);
    for client_index in 0..plan.clients {
        let operations = match plan.goal {
            Goal::Operations(total) => {
                Some(total / clients + u64::from((client_index as u64) < total % clients))
            }
            Goal::Duration(_) => None,
        };
        let pacer = plan.rate_per_second.map(|rate| {
            Pacer::new(
                start,
                rate as f64 / clients as f64,
                client_index,
                plan.clients,
            )
        });
        let schedule = Schedule {
            operations,
            deadline,
            pacer,
            seed: client_index as u64,
            single_key,
            sequential: plan
                .sequential_keys
                .then_some((client_index as u64, clients)),
        };
        let connection = connections[client_index % connections.len()].clone();
        let client = Client::new(plan, connection, epoch);
        tasks.push(tokio::spawn(drive(
            client,
            schedule,
            plan.clone(),
            recorder.clone(),
        )));
    }
    for task in tasks {
        // A client task only ends by returning (it catches every error); a
        // panic in one is a bug worth seeing.
        if let Err(error) = task.await {
            if error.is_panic() {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }
    Timings {
        operations: start.elapsed(),
        events: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_keys_spread_over_the_key_space() {
        let mut state = 0;
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[(next_random(&mut state) % 10) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&count| (800..1_200).contains(&count)),
            "{seen:?}"
        );
    }
}
