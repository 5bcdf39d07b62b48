//! Simulated clients: what they ask, how a request becomes a core event, and how an
//! answer becomes a history entry.
//!
//! Each client has at most one request outstanding, as a real client waiting for an
//! answer does, and picks a member at random for each request (members that are down
//! included: that is a refused connection). Keys are few so that requests conflict, and
//! every written value is unique (`client.sequence`), which is what lets the checker tell
//! which write a read saw. A compare-and-swap usually expects the value the client last
//! saw for its key, so that many succeed.

use std::collections::BTreeMap;

use keel_check::{Bytes, Input, Output};
use keel_core::{RequestError, Response, WriteRequest, WriteResponse};
use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::{
    request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    TxnRequest,
};

use crate::config::RunConfig;
use crate::random::SimRandom;

/// The key the liveness probe writes; outside the workload's keys.
pub const LIVENESS_KEY: &str = "liveness";

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
        }
    }

    fn unique_value(&mut self) -> Bytes {
        self.next_value += 1;
        Bytes::from(format!("{}.{}", self.id, self.next_value))
    }

    /// The workload's next request.
    pub fn next_workload_input(&mut self, config: &RunConfig, random: &mut SimRandom) -> Input {
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

    /// The liveness probe's next write.
    pub fn next_probe_input(&mut self) -> Input {
        Input::Put {
            key: Bytes::from(LIVENESS_KEY),
            value: self.unique_value(),
        }
    }

    /// Remembers what an answered request showed about its key.
    pub fn learn(&mut self, input: &Input, output: &Output) {
        let seen = match (input, output) {
            (Input::Put { value, .. }, Output::Put { .. }) => Some(value.clone()),
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
        self.last_seen.insert(input.key().clone(), seen);
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
    }
}

fn revision_of(header: Option<&keel_types::etcdserverpb::ResponseHeader>) -> Result<u64, String> {
    let header = header.ok_or("the response has no header")?;
    u64::try_from(header.revision).map_err(|_| format!("negative revision {}", header.revision))
}

/// The history output for a range answer.
pub fn read_output(input: &Input, range: &RangeResponse) -> Result<Output, String> {
    let revision = revision_of(range.header.as_ref())?;
    let key = input.key();
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
        (input, response) => Err(format!("a {} was answered with {response:?}", input.kind())),
    }
}

/// Whether a failed request may still take effect.
pub fn failure_outcome(error: &RequestError) -> FailureOutcome {
    match error {
        // Refused before anything was proposed.
        RequestError::NoLeader
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
