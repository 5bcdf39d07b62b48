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
//! A workload client uses one lease at a time, which it grants with an id of its own (so
//! that a grant whose answer never came still names the lease), with a short TTL so that
//! expiry happens within a run. It puts some of its own lease keys
//! (`l<client>.<generation>.<n>`, apart from the plain keys, and changing every
//! [`LEASE_KEY_GENERATION_NS`] so that the leases sharing keys form small components for
//! the checker) with the lease, reads lease keys (its own and other clients'), and then
//! either revokes the lease or moves on to a new one and lets the old one expire, perhaps
//! after keeping it alive for a while (up to [`KEPT_ALIVE_LEASES_MAX`] leases at once, each
//! for up to [`KEEP_ALIVES_PER_LEASE_MAX`] keep-alives). A kept-alive lease gets a
//! keep-alive every third of its TTL, as etcd's clients send them (or, in some runs, at
//! longer gaps that race the lease's expiry), ahead of anything else the client would do:
//! those are the keep-alive streams, one request at a time. A lease that a request finds
//! gone (a put refused with "lease not found", a keep-alive answered with TTL 0) is
//! forgotten.

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

/// The most leases one client keeps alive at once; a lease granted while that many are
/// kept alive is left to expire instead.
pub const KEPT_ALIVE_LEASES_MAX: usize = 2;

/// How long the leases a client grants share one set of lease keys.
///
/// Keys shared by leases tie them into one component for the checker (a key moves from
/// lease to lease, and each lease's expiry may take it). Every lease adds an expiry with an
/// unknown outcome, and when the search backtracks it may try every subset of the expiries
/// in a component, so a client's keys change every few seconds: leases granted in one
/// window share keys (a key still moves between them), and components stay at a few
/// leases.
pub const LEASE_KEY_GENERATION_NS: u64 = 3 * SECOND_NS;

/// The `n`th lease key of workload client `client_id` for leases granted in key
/// generation `generation`.
pub fn lease_key(client_id: u64, generation: u64, n: usize) -> Bytes {
    Bytes::from(format!("l{client_id}.{generation}.{n}"))
}

/// The lease a workload client puts its lease keys with now.
#[derive(Debug, Clone)]
pub struct HeldLease {
    /// The lease's id (chosen by the client).
    pub id: i64,
    /// The key generation of its grant: which lease keys it puts.
    pub key_generation: u64,
    /// Puts and reads still to do with it.
    pub steps_left: u64,
    /// Whether its steps end with a revocation (else it is left to expire, perhaps after
    /// a run of keep-alives).
    pub revoke: bool,
}

/// A lease a client keeps alive, whether or not it still puts keys with it.
#[derive(Debug, Clone)]
pub struct KeptAliveLease {
    /// The lease's id.
    pub id: i64,
    /// Its TTL.
    pub ttl_seconds: i64,
    /// Keep-alives still to send before the client lets it expire.
    pub keep_alives_left: u64,
    /// When the next keep-alive is due.
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
    /// The lease the client puts its lease keys with now, if any.
    pub lease: Option<HeldLease>,
    /// The leases it keeps alive: the keep-alive streams, served ahead of other work.
    pub kept_alive: Vec<KeptAliveLease>,
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
            kept_alive: Vec::new(),
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

    /// A keep-alive of a kept-alive lease, if one is due; a lease whose last keep-alive
    /// this is will be left to expire.
    fn due_keep_alive(
        &mut self,
        config: &RunConfig,
        random: &mut SimRandom,
        now_ns: u64,
    ) -> Option<Input> {
        let position = self
            .kept_alive
            .iter()
            .position(|lease| lease.next_keep_alive_ns <= now_ns)?;
        let lease = &mut self.kept_alive[position];
        let input = Input::LeaseKeepAlive { lease_id: lease.id };
        lease.keep_alives_left -= 1;
        lease.next_keep_alive_ns = now_ns + keep_alive_gap_ns(config, random, lease.ttl_seconds);
        if lease.keep_alives_left == 0 {
            self.kept_alive.remove(position);
        }
        Some(input)
    }

    /// The next request of the lease workload: a grant when no lease is in use, else a put
    /// of a lease key with it, a read of a lease key, or the revocation that ends it.
    fn next_lease_input(
        &mut self,
        config: &RunConfig,
        random: &mut SimRandom,
        now_ns: u64,
    ) -> Input {
        let Some(lease) = self.lease.as_mut() else {
            return self.grant(config, random, now_ns);
        };
        let lease_id = lease.id;
        let key_generation = lease.key_generation;
        if lease.steps_left == 0 {
            // Only a revocation is left (other leases are dropped after their last step).
            self.lease = None;
            return Input::LeaseRevoke { lease_id };
        }
        lease.steps_left -= 1;
        if lease.steps_left == 0 && !lease.revoke {
            self.lease = None;
        }
        if random.below(3) != 0 {
            Input::PutWithLease {
                key: lease_key(
                    self.id,
                    key_generation,
                    random.index(config.lease_keys_per_client),
                ),
                value: self.unique_value(),
                lease_id,
            }
        } else {
            read_lease_key(config, random, now_ns)
        }
    }

    /// Grants a new lease to use, choosing how it ends.
    fn grant(&mut self, config: &RunConfig, random: &mut SimRandom, now_ns: u64) -> Input {
        self.leases_granted += 1;
        // Unique in the run: the client id above the client's own count.
        let id = ((self.id as i64) << 32) | self.leases_granted as i64;
        let ttl_seconds =
            random.between(config.lease_ttl_seconds_min, config.lease_ttl_seconds_max) as i64;
        let revoke = random.below(1_000) < config.lease_revoke_per_mille;
        let keep_alive = !revoke
            && random.below(1_000) < config.lease_keep_alive_per_mille
            && self.kept_alive.len() < KEPT_ALIVE_LEASES_MAX;
        if keep_alive {
            self.kept_alive.push(KeptAliveLease {
                id,
                ttl_seconds,
                keep_alives_left: random.between(1, KEEP_ALIVES_PER_LEASE_MAX),
                next_keep_alive_ns: now_ns + keep_alive_gap_ns(config, random, ttl_seconds),
            });
        }
        self.lease = Some(HeldLease {
            id,
            key_generation: now_ns / LEASE_KEY_GENERATION_NS,
            steps_left: random.between(1, STEPS_PER_LEASE_MAX),
            revoke,
        });
        Input::LeaseGrant {
            lease_id: id,
            ttl_seconds,
        }
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
        if lease_gone {
            if self.lease.as_ref().map(|lease| lease.id) == input.lease_id() {
                self.lease = None;
            }
            self.kept_alive
                .retain(|lease| Some(lease.id) != input.lease_id());
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

/// A read of a recent lease key of any workload client, so that others see keys vanish
/// too.
fn read_lease_key(config: &RunConfig, random: &mut SimRandom, now_ns: u64) -> Input {
    let owner = random.between(1, config.client_count as u64);
    let generation = (now_ns / LEASE_KEY_GENERATION_NS).saturating_sub(random.below(2));
    Input::Get {
        key: lease_key(
            owner,
            generation,
            random.index(config.lease_keys_per_client),
        ),
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
