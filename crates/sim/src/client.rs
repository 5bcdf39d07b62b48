//! Simulated clients: what they ask, how a request becomes a core event, and how an
//! answer becomes a history entry.
//!
//! Each client has at most one request outstanding, as a real client waiting for an
//! answer does, and picks a member at random for each request (members that are down
//! included: that is a refused connection). Keys are few so that requests conflict, and
//! every written value is unique (`client.sequence`), which is what lets the checker tell
//! which write a read saw. A compare-and-swap usually expects the value the client last
//! saw for its key, so that many succeed.
//!
//! # Leases
//!
//! A workload client holds at most one lease at a time, which it grants with an id of its
//! own (so that a grant whose answer never came still names the lease), with a short TTL
//! so that expiry happens within a run. It puts some of its own lease keys (`l<client>.<n>`,
//! apart from the plain keys so that each client's leases form a small component for the
//! checker) with the lease, reads lease keys (its own and other clients'), and ends the
//! lease in one of three ways the seed weighs: it revokes it, it keeps it alive for a while
//! and then stops, or it abandons it at once. A kept-alive lease gets a keep-alive every
//! third of its TTL, as etcd's clients send them (or, in some runs, at longer gaps that race
//! the lease's expiry), ahead of anything else the client would do: that is the keep-alive
//! stream, one request at a time. A lease that a request finds
//! gone (a put refused with "lease not found", a keep-alive answered with TTL 0) is
//! dropped and a new one granted later.

use std::collections::BTreeMap;

use keel_check::{Bytes, Input, Output};
use keel_core::mvcc::KeySpaceError;
use keel_core::{RequestError, Response, WriteRequest, WriteResponse};
use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::{
    request_op, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RangeResponse, RequestOp, TxnRequest,
};

use crate::config::{RunConfig, SECOND_NS};
use crate::random::SimRandom;

/// The key the liveness probe writes; outside the workload's keys.
pub const LIVENESS_KEY: &str = "liveness";

/// The most keep-alives a kept-alive lease gets before its client stops sending them.
pub const KEEP_ALIVES_PER_LEASE_MAX: u64 = 12;

/// The most puts and reads a client does with one lease before it ends it.
pub const STEPS_PER_LEASE_MAX: u64 = 8;

/// The `n`th lease key of workload client `client_id`.
pub fn lease_key(client_id: u64, n: usize) -> Bytes {
    Bytes::from(format!("l{client_id}.{n}"))
}

/// How a client means to end a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnding {
    /// Revoke it after its steps.
    Revoke,
    /// Keep it alive until its steps are done and this many keep-alives were sent, then
    /// let it expire.
    KeepAliveThenExpire {
        /// Keep-alives still to send.
        keep_alives_left: u64,
    },
    /// Let it expire after its steps.
    Expire,
}

/// The lease a workload client holds.
#[derive(Debug, Clone)]
pub struct HeldLease {
    /// The lease's id (chosen by the client).
    pub id: i64,
    /// Its TTL.
    pub ttl_seconds: i64,
    /// Puts and reads still to do with it.
    pub steps_left: u64,
    /// How it ends.
    pub ending: LeaseEnding,
    /// When the next keep-alive is due (for a kept-alive lease).
    pub next_keep_alive_ns: u64,
}

/// What a client is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    /// Sends the random workload during the fault and liveness phases.
    Workload,
    /// Writes the liveness key until one write is acknowledged after healing.
    LivenessProbe,
    /// Reads every key once at the end.
    FinalReader,
}

/// A request sent and not yet answered.
#[derive(Debug, Clone)]
pub struct Outstanding {
    /// The client's number for it; events about older requests are ignored.
    pub request_number: u64,
    /// The member it went to.
    pub member: u64,
    /// What was asked.
    pub input: Input,
    /// When it was sent.
    pub call_time_ns: u64,
    /// The token the member answers with, once the request reached it.
    pub token: Option<u64>,
    /// Whether a follower already forwarded it to the leader (a keep-alive is forwarded
    /// once at most, as the server does).
    pub forwarded: bool,
}

/// One simulated client.
#[derive(Debug)]
pub struct Client {
    /// The client's id in the history (from 1).
    pub id: u64,
    /// What it does.
    pub role: ClientRole,
    /// The request in flight.
    pub outstanding: Option<Outstanding>,
    /// The number of the last request sent.
    pub request_number: u64,
    /// Counter that makes written values unique.
    next_value: u64,
    /// The value last seen per key (`None`: absent), for compare-and-swap.
    last_seen: BTreeMap<Bytes, Option<Bytes>>,
    /// The lease held now, if any.
    pub lease: Option<HeldLease>,
    /// Leases granted so far, which makes lease ids unique.
    leases_granted: u64,
}

/// How a request is handed to a member.
#[derive(Debug, Clone)]
pub enum Request {
    /// A write, answered after it is applied.
    Write(WriteRequest),
    /// A linearizable read, answered after a ReadIndex round.
    LinearizableRead(RangeRequest),
    /// A serializable read, answered at once from the member's state.
    SerializableRead(RangeRequest),
    /// A lease keep-alive, answered by the leader (a follower's server forwards it once).
    KeepAlive(i64),
}

/// What a failed request means for the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// The request certainly had no effect: leave it out.
    NoEffect,
    /// It may have taken effect: record an unknown outcome (for writes).
    Unknown,
}

impl Client {
    /// A client with nothing sent yet.
    pub fn new(id: u64, role: ClientRole) -> Client {
        Client {
            id,
            role,
            outstanding: None,
            request_number: 0,
            next_value: 0,
            last_seen: BTreeMap::new(),
            lease: None,
            leases_granted: 0,
        }
    }

    fn unique_value(&mut self) -> Bytes {
        self.next_value += 1;
        Bytes::from(format!("{}.{}", self.id, self.next_value))
    }

    /// The workload's next request, at simulated time `now_ns`: a due keep-alive first,
    /// then a lease step or a plain request as the seed's mix says.
    pub fn next_workload_input(
        &mut self,
        config: &RunConfig,
        random: &mut SimRandom,
        now_ns: u64,
    ) -> Input {
        if let Some(keep_alive) = self.due_keep_alive(config, random, now_ns) {
            return keep_alive;
        }
        if random.below(1_000) < config.lease_per_mille {
            return self.next_lease_input(config, random, now_ns);
        }
        let key = Bytes::from(format!("k{}", random.below(config.key_count as u64)));
        let mut roll = random.below(1_000);
        let mut take = |per_mille: u64| {
            if roll < per_mille {
                true
            } else {
                roll -= per_mille;
                false
            }
        };
        if take(config.serializable_read_per_mille) {
            Input::Get {
                key,
                serializable: true,
            }
        } else if take(config.linearizable_read_per_mille) {
            Input::Get {
                key,
                serializable: false,
            }
        } else if take(config.delete_per_mille) {
            Input::Delete { key }
        } else if take(config.compare_and_swap_per_mille) {
            let expected = match self.last_seen.get(&key) {
                Some(seen) if random.below(4) != 0 => seen.clone(),
                _ if random.below(2) == 0 => None,
                _ => Some(Bytes::from(format!(
                    "{}.{}",
                    random.between(1, config.client_count as u64),
                    random.between(1, self.next_value.max(1))
                ))),
            };
            Input::CompareAndSwap {
                key,
                expected,
                new_value: self.unique_value(),
            }
        } else {
            Input::Put {
                key,
                value: self.unique_value(),
            }
        }
    }

    /// A keep-alive of the held lease, if one is due.
    fn due_keep_alive(
        &mut self,
        config: &RunConfig,
        random: &mut SimRandom,
        now_ns: u64,
    ) -> Option<Input> {
        let lease = self.lease.as_mut()?;
        let LeaseEnding::KeepAliveThenExpire { keep_alives_left } = &mut lease.ending else {
            return None;
        };
        if *keep_alives_left == 0 || now_ns < lease.next_keep_alive_ns {
            return None;
        }
        *keep_alives_left -= 1;
        lease.next_keep_alive_ns = now_ns + keep_alive_gap_ns(config, random, lease.ttl_seconds);
        let id = lease.id;
        self.drop_finished_lease();
        Some(Input::LeaseKeepAlive { lease_id: id })
    }

    /// Forgets the held lease once nothing more is to be done with it (a lease to revoke
    /// is forgotten when the revocation is sent).
    fn drop_finished_lease(&mut self) {
        let finished = self.lease.as_ref().is_some_and(|lease| {
            lease.steps_left == 0
                && match lease.ending {
                    LeaseEnding::KeepAliveThenExpire { keep_alives_left } => keep_alives_left == 0,
                    LeaseEnding::Expire => true,
                    LeaseEnding::Revoke => false,
                }
        });
        if finished {
            self.lease = None;
        }
    }

    /// The next request of the lease workload: a grant when no lease is held, else a put of
    /// a lease key with it, a read of a lease key, or the revocation that ends it.
    fn next_lease_input(
        &mut self,
        config: &RunConfig,
        random: &mut SimRandom,
        now_ns: u64,
    ) -> Input {
        let Some(lease) = self.lease.as_mut() else {
            self.leases_granted += 1;
            // Unique in the run: the client id above the client's own count.
            let id = ((self.id as i64) << 32) | self.leases_granted as i64;
            let ttl_seconds =
                random.between(config.lease_ttl_seconds_min, config.lease_ttl_seconds_max) as i64;
            let ending = if random.below(1_000) < config.lease_revoke_per_mille {
                LeaseEnding::Revoke
            } else if random.below(1_000) < config.lease_keep_alive_per_mille {
                LeaseEnding::KeepAliveThenExpire {
                    keep_alives_left: random.between(1, KEEP_ALIVES_PER_LEASE_MAX),
                }
            } else {
                LeaseEnding::Expire
            };
            self.lease = Some(HeldLease {
                id,
                ttl_seconds,
                steps_left: random.between(1, STEPS_PER_LEASE_MAX),
                ending,
                next_keep_alive_ns: now_ns + keep_alive_gap_ns(config, random, ttl_seconds),
            });
            return Input::LeaseGrant {
                lease_id: id,
                ttl_seconds,
            };
        };
        let lease_id = lease.id;
        if lease.steps_left == 0 {
            if lease.ending == LeaseEnding::Revoke {
                self.lease = None;
                return Input::LeaseRevoke { lease_id };
            }
            // Steps done, keep-alives still going: watch the keys meanwhile.
            return read_lease_key(config, random);
        }
        lease.steps_left -= 1;
        let input = if random.below(3) != 0 {
            Input::PutWithLease {
                key: lease_key(self.id, random.index(config.lease_keys_per_client)),
                value: self.unique_value(),
                lease_id,
            }
        } else {
            read_lease_key(config, random)
        };
        self.drop_finished_lease();
        input
    }

    /// The liveness probe's next write.
    pub fn next_probe_input(&mut self) -> Input {
        Input::Put {
            key: Bytes::from(LIVENESS_KEY),
            value: self.unique_value(),
        }
    }

    /// Remembers what an answered request showed about its key or lease.
    pub fn learn(&mut self, input: &Input, output: &Output) {
        let lease_gone = matches!(
            (input, output),
            (Input::PutWithLease { .. }, Output::LeaseNotFound)
                | (
                    Input::LeaseKeepAlive { .. },
                    Output::LeaseKeepAlive { ttl_seconds: 0 }
                )
        );
        if lease_gone && self.lease.as_ref().map(|lease| lease.id) == input.lease_id() {
            self.lease = None;
        }
        let seen = match (input, output) {
            (Input::Put { value, .. }, Output::Put { .. })
            | (Input::PutWithLease { value, .. }, Output::Put { .. }) => Some(value.clone()),
            (Input::Get { .. }, Output::Get { value, .. }) => value.clone(),
            (Input::Delete { .. }, Output::Delete { .. }) => None,
            (
                Input::CompareAndSwap { new_value, .. },
                Output::CompareAndSwap {
                    succeeded: true, ..
                },
            ) => Some(new_value.clone()),
            _ => return,
        };
        if let Some(key) = input.key() {
            self.last_seen.insert(key.clone(), seen);
        }
    }
}

/// The time to the next keep-alive of a lease of `ttl_seconds`.
fn keep_alive_gap_ns(config: &RunConfig, random: &mut SimRandom, ttl_seconds: i64) -> u64 {
    let gap_max_ns =
        ttl_seconds as u64 * SECOND_NS * config.lease_keep_alive_interval_per_mille / 1_000;
    random.between(gap_max_ns / 2, gap_max_ns)
}

/// A read of any workload client's lease key, so that others see keys vanish too.
fn read_lease_key(config: &RunConfig, random: &mut SimRandom) -> Input {
    let owner = random.between(1, config.client_count as u64);
    Input::Get {
        key: lease_key(owner, random.index(config.lease_keys_per_client)),
        serializable: random.below(4) == 0,
    }
}

/// The core request for a history input.
pub fn request_for(input: &Input) -> Request {
    match input {
        Input::Put { key, value } => Request::Write(WriteRequest::Put(PutRequest {
            key: key.0.clone(),
            value: value.0.clone(),
            ..Default::default()
        })),
        Input::Get { key, serializable } => {
            let range = RangeRequest {
                key: key.0.clone(),
                serializable: *serializable,
                ..Default::default()
            };
            if *serializable {
                Request::SerializableRead(range)
            } else {
                Request::LinearizableRead(range)
            }
        }
        Input::Delete { key } => Request::Write(WriteRequest::DeleteRange(DeleteRangeRequest {
            key: key.0.clone(),
            ..Default::default()
        })),
        Input::CompareAndSwap {
            key,
            expected,
            new_value,
        } => {
            // etcd's idiom: a value compare for a present key, `version == 0` for an
            // absent one (a value compare on a missing key always fails).
            let compare = match expected {
                Some(value) => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: key.0.clone(),
                    target_union: Some(TargetUnion::Value(value.0.clone())),
                    ..Default::default()
                },
                None => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: key.0.clone(),
                    target_union: Some(TargetUnion::Version(0)),
                    ..Default::default()
                },
            };
            let put = RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.0.clone(),
                    value: new_value.0.clone(),
                    ..Default::default()
                })),
            };
            Request::Write(WriteRequest::Txn(TxnRequest {
                compare: vec![compare],
                success: vec![put],
                failure: Vec::new(),
            }))
        }
        Input::PutWithLease {
            key,
            value,
            lease_id,
        } => Request::Write(WriteRequest::Put(PutRequest {
            key: key.0.clone(),
            value: value.0.clone(),
            lease: *lease_id,
            ..Default::default()
        })),
        Input::LeaseGrant {
            lease_id,
            ttl_seconds,
        } => Request::Write(WriteRequest::LeaseGrant(LeaseGrantRequest {
            ttl: *ttl_seconds,
            id: *lease_id,
        })),
        Input::LeaseKeepAlive { lease_id } => Request::KeepAlive(*lease_id),
        Input::LeaseRevoke { lease_id } => {
            Request::Write(WriteRequest::LeaseRevoke(LeaseRevokeRequest {
                id: *lease_id,
            }))
        }
        Input::LeaseExpire { .. } => {
            unreachable!("no client asks for an expiry: the checker inserts them")
        }
    }
}

fn revision_of(header: Option<&keel_types::etcdserverpb::ResponseHeader>) -> Result<u64, String> {
    let header = header.ok_or("the response has no header")?;
    u64::try_from(header.revision).map_err(|_| format!("negative revision {}", header.revision))
}

/// The history output for a range answer.
pub fn read_output(input: &Input, range: &RangeResponse) -> Result<Output, String> {
    let revision = revision_of(range.header.as_ref())?;
    let key = input.key().ok_or("a read names a key")?;
    match range.kvs.as_slice() {
        [] => Ok(Output::Get {
            value: None,
            mod_revision: 0,
            revision,
        }),
        [kv] if kv.key == key.0 => Ok(Output::Get {
            value: Some(Bytes(kv.value.clone())),
            mod_revision: u64::try_from(kv.mod_revision)
                .map_err(|_| format!("negative mod_revision {}", kv.mod_revision))?,
            revision,
        }),
        kvs => Err(format!(
            "a read of key {key} returned {} keys, the first {:?}",
            kvs.len(),
            String::from_utf8_lossy(&kvs[0].key)
        )),
    }
}

/// The history output for a successful answer to `input`, or why it does not fit.
pub fn output_for(input: &Input, response: &Response) -> Result<Output, String> {
    match (input, response) {
        (Input::Get { .. }, Response::Range(range)) => read_output(input, range),
        (Input::Put { .. }, Response::Write(WriteResponse::Put(put))) => Ok(Output::Put {
            revision: revision_of(put.header.as_ref())?,
        }),
        (Input::Delete { .. }, Response::Write(WriteResponse::DeleteRange(delete))) => {
            Ok(Output::Delete {
                deleted: u64::try_from(delete.deleted)
                    .map_err(|_| format!("negative deleted count {}", delete.deleted))?,
                revision: revision_of(delete.header.as_ref())?,
            })
        }
        (Input::CompareAndSwap { .. }, Response::Write(WriteResponse::Txn(txn))) => {
            Ok(Output::CompareAndSwap {
                succeeded: txn.succeeded,
                revision: revision_of(txn.header.as_ref())?,
            })
        }
        (Input::PutWithLease { .. }, Response::Write(WriteResponse::Put(put))) => Ok(Output::Put {
            revision: revision_of(put.header.as_ref())?,
        }),
        (
            Input::LeaseGrant {
                lease_id,
                ttl_seconds,
            },
            Response::Write(WriteResponse::LeaseGrant(grant)),
        ) => {
            // The client asks for at least the shortest TTL, so the grant keeps it; the
            // checker's expiry bound relies on the TTL the client asked for.
            if grant.id != *lease_id || grant.ttl != *ttl_seconds {
                return Err(format!(
                    "a grant of lease {lease_id:#x} for {ttl_seconds} s was answered with                      lease {:#x} for {} s",
                    grant.id, grant.ttl
                ));
            }
            Ok(Output::LeaseGrant {
                revision: revision_of(grant.header.as_ref())?,
            })
        }
        (Input::LeaseKeepAlive { lease_id }, Response::LeaseKeepAlive(keep_alive)) => {
            if keep_alive.id != *lease_id {
                return Err(format!(
                    "a keep-alive of lease {lease_id:#x} was answered for lease {:#x}",
                    keep_alive.id
                ));
            }
            Ok(Output::LeaseKeepAlive {
                ttl_seconds: keep_alive.ttl,
            })
        }
        (Input::LeaseRevoke { .. }, Response::Write(WriteResponse::LeaseRevoke(revoke))) => {
            Ok(Output::LeaseRevoke {
                revision: revision_of(revoke.header.as_ref())?,
            })
        }
        (input, response) => Err(format!("a {} was answered with {response:?}", input.kind())),
    }
}

/// The answer a failure gives, when it is one: "requested lease not found" is decided when
/// the request applies, the same on every member, so it says the lease did not exist at
/// that point of the log.
pub fn failure_answer(input: &Input, error: &RequestError) -> Option<Output> {
    match (input, error) {
        (
            Input::PutWithLease { .. } | Input::LeaseRevoke { .. },
            RequestError::KeySpace(KeySpaceError::LeaseNotFound),
        ) => Some(Output::LeaseNotFound),
        _ => None,
    }
}

/// Whether a failed request may still take effect.
pub fn failure_outcome(error: &RequestError) -> FailureOutcome {
    match error {
        // Refused before anything was proposed (a keep-alive sent to a follower whose
        // forward found no leader changed nothing either).
        RequestError::NoLeader
        | RequestError::NotLeader { .. }
        | RequestError::TooManyRequests
        | RequestError::RequestTooLarge
        | RequestError::KeySpace(_) => FailureOutcome::NoEffect,
        // Proposed (or possibly forwarded to the leader) and then lost sight of.
        RequestError::Timeout | RequestError::LeaderChanged | RequestError::Dropped => {
            FailureOutcome::Unknown
        }
        // A new kind of error: assume the worst, which keeps the check sound.
        _ => FailureOutcome::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_types::etcdserverpb::{PutResponse, ResponseHeader};

    #[test]
    fn a_put_answer_becomes_a_put_output() {
        let input = Input::Put {
            key: "k".into(),
            value: "v".into(),
        };
        let response = Response::Write(WriteResponse::Put(PutResponse {
            header: Some(ResponseHeader {
                revision: 7,
                ..Default::default()
            }),
            prev_kv: None,
        }));
        assert_eq!(
            output_for(&input, &response),
            Ok(Output::Put { revision: 7 })
        );
        let wrong = Input::Delete { key: "k".into() };
        assert!(output_for(&wrong, &response).is_err());
    }

    #[test]
    fn ambiguous_errors_leave_the_outcome_unknown() {
        assert_eq!(
            failure_outcome(&RequestError::NoLeader),
            FailureOutcome::NoEffect
        );
        assert_eq!(
            failure_outcome(&RequestError::Timeout),
            FailureOutcome::Unknown
        );
        assert_eq!(
            failure_outcome(&RequestError::Dropped),
            FailureOutcome::Unknown
        );
    }
}
