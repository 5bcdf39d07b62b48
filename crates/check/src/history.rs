//! The history model: operations with call and return times, their inputs and outputs.
//!
//! A history is what clients saw: for every request, which client sent it, when (call time),
//! when the answer came back (return time) and what it was. Times are abstract `u64`
//! nanoseconds of one monotonic clock (simulated, or a real monotonic clock shared by the
//! recording processes). A request whose answer never came (a timeout, a lost connection) has
//! no return time and an [`Output::Unknown`] output: it may or may not have taken effect, at any
//! moment after its call.
//!
//! [`Operation`] is generic so that other models (watches, locks) can reuse the checker; its
//! default type parameters are the key-value [`Input`] and [`Output`] this crate models.
//! Histories serialize to JSON so that multi-process tests can dump them and re-check them
//! later (see the `keel-check` binary).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::bytes::Bytes;

/// The default for the largest history the checkers accept; larger ones are refused with
/// [`HistoryError::TooManyOperations`] rather than exhausting memory.
pub const OPERATIONS_MAX_DEFAULT: usize = 100_000;

/// The largest JSON text [`History::read_json`] reads, so that a corrupt or runaway dump cannot
/// exhaust memory before the operation count is known.
pub const HISTORY_JSON_BYTES_MAX: u64 = 1 << 30;

/// One client request and what the client saw of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation<I = Input, O = Output> {
    /// Which client issued the request; used only in explanations.
    pub client_id: u64,
    /// When the request was sent.
    pub call_time: u64,
    /// When the answer arrived; `None` when the outcome is unknown (the request may still take
    /// effect at any later time, or never).
    pub return_time: Option<u64>,
    /// What was asked.
    pub input: I,
    /// What was answered; [`Output::Unknown`] for the key-value model when `return_time` is
    /// `None`.
    pub output: O,
}

/// A key-value request: over a single key, or over a lease (etcd's leases: a key put with a
/// lease is deleted when the lease is revoked or expires, with every other key attached to it,
/// at one revision).
///
/// Lease ids are chosen by the client (etcd lets a grant name its id), so that a grant whose
/// answer never came still names the lease that later requests use. A lease id is never 0,
/// which etcd reserves for "no lease".
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Input {
    /// Sets `key` to `value`.
    Put {
        /// The key written.
        key: Bytes,
        /// The value written.
        value: Bytes,
    },
    /// Reads `key`.
    Get {
        /// The key read.
        key: Bytes,
        /// A serializable read is served from a member's local state and may be stale; it is
        /// left out of the linearizability search and checked by
        /// [`check_serializable_reads`](crate::check_serializable_reads) instead.
        #[serde(default)]
        serializable: bool,
    },
    /// Deletes `key`.
    Delete {
        /// The key deleted.
        key: Bytes,
    },
    /// A transaction that puts `new_value` if the current value of `key` equals `expected`.
    CompareAndSwap {
        /// The key compared and written.
        key: Bytes,
        /// The value the key must hold; `None` means the key must be absent.
        expected: Option<Bytes>,
        /// The value written when the comparison holds.
        new_value: Bytes,
    },
    /// Sets `key` to `value` and attaches it to lease `lease_id`; answered with
    /// [`Output::Put`], or [`Output::LeaseNotFound`] when the lease does not exist (then
    /// nothing changes).
    PutWithLease {
        /// The key written.
        key: Bytes,
        /// The value written.
        value: Bytes,
        /// The lease the key is attached to.
        lease_id: i64,
    },
    /// Grants lease `lease_id` for `ttl_seconds`.
    LeaseGrant {
        /// The lease, chosen by the client.
        lease_id: i64,
        /// The time to live granted, in seconds.
        ttl_seconds: i64,
    },
    /// One keep-alive of a keep-alive stream: the lease lives at least its TTL from this
    /// request's call (see [`with_lease_expiries`](crate::with_lease_expiries)).
    LeaseKeepAlive {
        /// The lease.
        lease_id: i64,
    },
    /// Revokes the lease: it and every key attached to it go, at one revision.
    LeaseRevoke {
        /// The lease.
        lease_id: i64,
    },
    /// The lease expires, with the same effect as a revocation. No client sends this: the
    /// checker inserts one per lease, with an unknown outcome and a call time at the earliest
    /// instant the lease may expire (see [`with_lease_expiries`](crate::with_lease_expiries)).
    LeaseExpire {
        /// The lease.
        lease_id: i64,
    },
}

impl Input {
    /// The key the request reads or writes; `None` for requests about a lease alone.
    pub fn key(&self) -> Option<&Bytes> {
        match self {
            Input::Put { key, .. }
            | Input::Get { key, .. }
            | Input::Delete { key }
            | Input::CompareAndSwap { key, .. }
            | Input::PutWithLease { key, .. } => Some(key),
            Input::LeaseGrant { .. }
            | Input::LeaseKeepAlive { .. }
            | Input::LeaseRevoke { .. }
            | Input::LeaseExpire { .. } => None,
        }
    }

    /// The lease the request names, if any.
    pub fn lease_id(&self) -> Option<i64> {
        match self {
            Input::PutWithLease { lease_id, .. }
            | Input::LeaseGrant { lease_id, .. }
            | Input::LeaseKeepAlive { lease_id }
            | Input::LeaseRevoke { lease_id }
            | Input::LeaseExpire { lease_id } => Some(*lease_id),
            Input::Put { .. }
            | Input::Get { .. }
            | Input::Delete { .. }
            | Input::CompareAndSwap { .. } => None,
        }
    }

    /// Whether this is a serializable (possibly stale) read.
    pub fn is_serializable_read(&self) -> bool {
        matches!(
            self,
            Input::Get {
                serializable: true,
                ..
            }
        )
    }

    /// The name of the request kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Put { .. } => "put",
            Input::Get { .. } => "get",
            Input::Delete { .. } => "delete",
            Input::CompareAndSwap { .. } => "compare_and_swap",
            Input::PutWithLease { .. } => "put_with_lease",
            Input::LeaseGrant { .. } => "lease_grant",
            Input::LeaseKeepAlive { .. } => "lease_keep_alive",
            Input::LeaseRevoke { .. } => "lease_revoke",
            Input::LeaseExpire { .. } => "lease_expire",
        }
    }
}

/// The answer to a key-value request. Revisions follow etcd: a cluster-wide counter that grows
/// by one with every write that changes the store; `revision` is the store revision after the
/// request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Output {
    /// The answer to [`Input::Put`] and to a successful [`Input::PutWithLease`].
    Put {
        /// The revision the put created.
        revision: u64,
    },
    /// The answer to [`Input::Get`].
    Get {
        /// The value read; `None` when the key is absent.
        value: Option<Bytes>,
        /// The revision of the last write of the key; 0 when the key is absent.
        mod_revision: u64,
        /// The store revision the read saw.
        revision: u64,
    },
    /// The answer to [`Input::Delete`].
    Delete {
        /// How many keys were deleted: 0 or 1.
        deleted: u64,
        /// The store revision after the delete (unchanged when nothing was deleted).
        revision: u64,
    },
    /// The answer to [`Input::CompareAndSwap`].
    CompareAndSwap {
        /// Whether the comparison held and the new value was put.
        succeeded: bool,
        /// The store revision after the transaction.
        revision: u64,
    },
    /// The answer to [`Input::LeaseGrant`].
    LeaseGrant {
        /// The store revision when the lease was granted (a grant writes no key).
        revision: u64,
    },
    /// The answer to [`Input::LeaseKeepAlive`].
    LeaseKeepAlive {
        /// The lease's TTL in seconds; 0 means the lease was not found (revoked, expired or
        /// never granted), as etcd answers.
        ttl_seconds: i64,
    },
    /// The answer to a successful [`Input::LeaseRevoke`].
    LeaseRevoke {
        /// The store revision after the revocation: one above the revision before when it
        /// deleted keys, unchanged when the lease had none.
        revision: u64,
    },
    /// etcd's "requested lease not found": the lease of an [`Input::PutWithLease`] or
    /// [`Input::LeaseRevoke`] did not exist, and nothing changed.
    LeaseNotFound,
    /// No answer arrived: the request may or may not have taken effect.
    Unknown,
}

impl Output {
    /// The name of the answer kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Output::Put { .. } => "put",
            Output::Get { .. } => "get",
            Output::Delete { .. } => "delete",
            Output::CompareAndSwap { .. } => "compare_and_swap",
            Output::LeaseGrant { .. } => "lease_grant",
            Output::LeaseKeepAlive { .. } => "lease_keep_alive",
            Output::LeaseRevoke { .. } => "lease_revoke",
            Output::LeaseNotFound => "lease_not_found",
            Output::Unknown => "unknown",
        }
    }

    /// The store revision in the answer, if there was an answer.
    pub fn revision(&self) -> Option<u64> {
        match self {
            Output::Put { revision }
            | Output::Get { revision, .. }
            | Output::Delete { revision, .. }
            | Output::CompareAndSwap { revision, .. }
            | Output::LeaseGrant { revision }
            | Output::LeaseRevoke { revision } => Some(*revision),
            Output::LeaseKeepAlive { .. } | Output::LeaseNotFound | Output::Unknown => None,
        }
    }
}

impl Operation {
    /// The revision this operation created, if it is a write known to have changed the store:
    /// a put, a delete that deleted a key, or a compare-and-swap that succeeded. A revocation
    /// is not one: its answer does not say whether it deleted any key.
    pub fn write_revision(&self) -> Option<u64> {
        match self.output {
            Output::Put { revision } => Some(revision),
            Output::Delete { deleted, revision } if deleted > 0 => Some(revision),
            Output::CompareAndSwap {
                succeeded: true,
                revision,
            } => Some(revision),
            _ => None,
        }
    }
}

/// Why a history cannot be checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The history is longer than the configured limit.
    #[error("history has {count} operations, more than operations_max {operations_max}")]
    TooManyOperations {
        /// Operations in the history.
        count: usize,
        /// The limit.
        operations_max: usize,
    },
    /// An operation returned before it was called.
    #[error("operation #{index} returns at {return_time}, before its call at {call_time}")]
    ReturnBeforeCall {
        /// Position of the operation in the history.
        index: usize,
        /// Its call time.
        call_time: u64,
        /// Its return time.
        return_time: u64,
    },
    /// The output's kind does not answer the input's kind (a recording bug).
    #[error("operation #{index}: a {output} output does not answer a {input} input")]
    OutputDoesNotAnswerInput {
        /// Position of the operation in the history.
        index: usize,
        /// The input kind.
        input: &'static str,
        /// The output kind.
        output: &'static str,
    },
    /// An operation has a return time but an unknown output.
    #[error("operation #{index} has a return time but an unknown output")]
    UnknownOutputWithReturnTime {
        /// Position of the operation in the history.
        index: usize,
    },
    /// An operation has an output but no return time.
    #[error("operation #{index} has an output but no return time")]
    KnownOutputWithoutReturnTime {
        /// Position of the operation in the history.
        index: usize,
    },
    /// A request names lease 0, which etcd reserves for "no lease".
    #[error("operation #{index} names lease 0, which means no lease")]
    LeaseIdZero {
        /// Position of the operation in the history.
        index: usize,
    },
    /// A JSON dump is larger than [`HISTORY_JSON_BYTES_MAX`].
    #[error("history JSON is larger than {json_bytes_max} bytes")]
    JsonTooLarge {
        /// The limit.
        json_bytes_max: u64,
    },
    /// A JSON dump is malformed.
    #[error("history JSON is malformed: {0}")]
    Json(#[from] serde_json::Error),
    /// Reading or writing a dump failed.
    #[error("history I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks what every checker needs of any history: at most `operations_max` operations, and
/// no operation returning before its call.
pub fn validate_times<I, O>(
    history: &[Operation<I, O>],
    operations_max: usize,
) -> Result<(), HistoryError> {
    if history.len() > operations_max {
        return Err(HistoryError::TooManyOperations {
            count: history.len(),
            operations_max,
        });
    }
    for (index, operation) in history.iter().enumerate() {
        if let Some(return_time) = operation.return_time {
            if return_time < operation.call_time {
                return Err(HistoryError::ReturnBeforeCall {
                    index,
                    call_time: operation.call_time,
                    return_time,
                });
            }
        }
    }
    Ok(())
}

/// Checks a key-value history's shape: [`validate_times`], every output answers its input's
/// kind, the output is [`Output::Unknown`] exactly when the return time is unknown, and
/// lease expiries (which only the checker inserts) have an unknown outcome.
///
/// Shape errors are recording bugs, not consistency violations, so they are reported as
/// errors instead of being left for the model to reject as "not linearizable".
pub fn validate(history: &[Operation], operations_max: usize) -> Result<(), HistoryError> {
    validate_times(history, operations_max)?;
    for (index, operation) in history.iter().enumerate() {
        let answers = matches!(
            (&operation.input, &operation.output),
            (_, Output::Unknown)
                | (Input::Put { .. }, Output::Put { .. })
                | (Input::Get { .. }, Output::Get { .. })
                | (Input::Delete { .. }, Output::Delete { .. })
                | (Input::CompareAndSwap { .. }, Output::CompareAndSwap { .. })
                | (
                    Input::PutWithLease { .. },
                    Output::Put { .. } | Output::LeaseNotFound
                )
                | (Input::LeaseGrant { .. }, Output::LeaseGrant { .. })
                | (Input::LeaseKeepAlive { .. }, Output::LeaseKeepAlive { .. })
                | (
                    Input::LeaseRevoke { .. },
                    Output::LeaseRevoke { .. } | Output::LeaseNotFound
                )
        );
        if !answers {
            return Err(HistoryError::OutputDoesNotAnswerInput {
                index,
                input: operation.input.kind(),
                output: operation.output.kind(),
            });
        }
        if operation.input.lease_id() == Some(0) {
            return Err(HistoryError::LeaseIdZero { index });
        }
        match (operation.return_time, &operation.output) {
            (Some(_), Output::Unknown) => {
                return Err(HistoryError::UnknownOutputWithReturnTime { index })
            }
            (None, output) if *output != Output::Unknown => {
                return Err(HistoryError::KnownOutputWithoutReturnTime { index })
            }
            _ => {}
        }
    }
    Ok(())
}

/// A key-value history as it is written to and read from JSON:
/// `{"operations": [{"client_id": 1, "call_time": 10, "return_time": 20,
/// "input": {"type": "put", "key": "k", "value": "v"},
/// "output": {"type": "put", "revision": 2}}, …]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The operations, in any order.
    pub operations: Vec<Operation>,
}

impl History {
    /// Renders the history as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a history always serializes")
    }

    /// Parses a history from JSON, refusing more than `operations_max` operations.
    pub fn from_json(text: &str, operations_max: usize) -> Result<History, HistoryError> {
        if text.len() as u64 > HISTORY_JSON_BYTES_MAX {
            return Err(HistoryError::JsonTooLarge {
                json_bytes_max: HISTORY_JSON_BYTES_MAX,
            });
        }
        let history: History = serde_json::from_str(text)?;
        validate(&history.operations, operations_max)?;
        Ok(history)
    }

    /// Writes the history as pretty-printed JSON.
    pub fn write_json<W: Write>(&self, writer: W) -> Result<(), HistoryError> {
        serde_json::to_writer_pretty(writer, self)?;
        Ok(())
    }

    /// Reads a history from JSON, refusing more than [`HISTORY_JSON_BYTES_MAX`] bytes or
    /// `operations_max` operations.
    pub fn read_json<R: Read>(reader: R, operations_max: usize) -> Result<History, HistoryError> {
        let mut text = String::new();
        reader
            .take(HISTORY_JSON_BYTES_MAX + 1)
            .read_to_string(&mut text)?;
        History::from_json(&text, operations_max)
    }
}

/// Records a history as requests are sent and answered, for tests that drive real clients.
///
/// Each call is recorded when the request is sent; its answer fills it in later. A request
/// that never gets an answer stays recorded with an unknown outcome, which is exactly what the
/// checker needs for timeouts and lost connections. Wrap the recorder in a mutex to share it
/// between client tasks.
#[derive(Debug)]
pub struct HistoryRecorder {
    operations: Vec<Operation>,
    operations_max: usize,
}

/// The handle of a recorded call, consumed by [`HistoryRecorder::record_return`] so that an
/// operation cannot be answered twice.
#[derive(Debug)]
#[must_use = "a call without its return is recorded as an unknown outcome"]
pub struct PendingCall {
    index: usize,
}

impl HistoryRecorder {
    /// An empty recorder that refuses to record more than `operations_max` operations.
    pub fn new(operations_max: usize) -> HistoryRecorder {
        HistoryRecorder {
            operations: Vec::new(),
            operations_max,
        }
    }

    /// Records that `client_id` sent `input` at `call_time`.
    pub fn record_call(
        &mut self,
        client_id: u64,
        call_time: u64,
        input: Input,
    ) -> Result<PendingCall, HistoryError> {
        if self.operations.len() >= self.operations_max {
            return Err(HistoryError::TooManyOperations {
                count: self.operations.len() + 1,
                operations_max: self.operations_max,
            });
        }
        self.operations.push(Operation {
            client_id,
            call_time,
            return_time: None,
            input,
            output: Output::Unknown,
        });
        Ok(PendingCall {
            index: self.operations.len() - 1,
        })
    }

    /// Records the answer to a call. An [`Output::Unknown`] answer (an ambiguous error) leaves
    /// the outcome unknown, as if the answer never came.
    pub fn record_return(&mut self, call: PendingCall, return_time: u64, output: Output) {
        if output == Output::Unknown {
            return;
        }
        let operation = &mut self.operations[call.index];
        assert!(
            operation.return_time.is_none(),
            "a pending call is answered once"
        );
        operation.return_time = Some(return_time);
        operation.output = output;
    }

    /// The operations recorded so far.
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    /// The recorded history; calls never answered keep an unknown outcome.
    pub fn finish(self) -> History {
        History {
            operations: self.operations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(call_time: u64, return_time: Option<u64>, output: Output) -> Operation {
        Operation {
            client_id: 1,
            call_time,
            return_time,
            input: Input::Put {
                key: "k".into(),
                value: "v".into(),
            },
            output,
        }
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let history = History {
            operations: vec![
                put(1, Some(2), Output::Put { revision: 2 }),
                put(3, None, Output::Unknown),
                Operation {
                    client_id: 2,
                    call_time: 4,
                    return_time: Some(5),
                    input: Input::CompareAndSwap {
                        key: Bytes(vec![0xff]),
                        expected: None,
                        new_value: "w".into(),
                    },
                    output: Output::CompareAndSwap {
                        succeeded: true,
                        revision: 3,
                    },
                },
            ],
        };
        let json = history.to_json();
        assert!(json.contains("\"type\": \"compare_and_swap\""), "{json}");
        let parsed = History::from_json(&json, 10).unwrap();
        assert_eq!(parsed, history);

        let mut buffer = Vec::new();
        history.write_json(&mut buffer).unwrap();
        assert_eq!(History::read_json(&buffer[..], 10).unwrap(), history);
    }

    #[test]
    fn serializable_flag_defaults_to_false() {
        let input: Input = serde_json::from_str(r#"{"type": "get", "key": "k"}"#).unwrap();
        assert_eq!(
            input,
            Input::Get {
                key: "k".into(),
                serializable: false
            }
        );
    }

    #[test]
    fn too_many_operations_are_refused() {
        let history = History {
            operations: vec![put(1, Some(2), Output::Put { revision: 2 }); 3],
        };
        let error = History::from_json(&history.to_json(), 2).unwrap_err();
        assert!(matches!(
            error,
            HistoryError::TooManyOperations {
                count: 3,
                operations_max: 2
            }
        ));
    }

    #[test]
    fn malformed_json_is_an_error() {
        assert!(matches!(
            History::from_json("{\"operations\": [1]}", 10),
            Err(HistoryError::Json(_))
        ));
    }

    #[test]
    fn shape_errors_are_reported() {
        let cases = [
            (
                put(5, Some(4), Output::Put { revision: 2 }),
                "returns at 4, before its call at 5",
            ),
            (
                put(1, Some(2), Output::Unknown),
                "has a return time but an unknown output",
            ),
            (
                put(1, None, Output::Put { revision: 2 }),
                "has an output but no return time",
            ),
            (
                put(
                    1,
                    Some(2),
                    Output::Delete {
                        deleted: 1,
                        revision: 2,
                    },
                ),
                "a delete output does not answer a put input",
            ),
        ];
        for (operation, message) in cases {
            let error = validate(&[operation], 10).unwrap_err();
            assert!(error.to_string().contains(message), "{error}");
        }
    }

    #[test]
    fn recorder_leaves_unanswered_calls_unknown() {
        let mut recorder = HistoryRecorder::new(2);
        let first = recorder
            .record_call(1, 10, Input::Delete { key: "k".into() })
            .unwrap();
        let second = recorder
            .record_call(2, 11, Input::Delete { key: "k".into() })
            .unwrap();
        assert!(matches!(
            recorder.record_call(3, 12, Input::Delete { key: "k".into() }),
            Err(HistoryError::TooManyOperations { .. })
        ));
        recorder.record_return(
            first,
            20,
            Output::Delete {
                deleted: 0,
                revision: 1,
            },
        );
        recorder.record_return(second, 21, Output::Unknown);
        let history = recorder.finish();
        assert_eq!(history.operations[0].return_time, Some(20));
        assert_eq!(history.operations[1].return_time, None);
        assert_eq!(history.operations[1].output, Output::Unknown);
        validate(&history.operations, 10).unwrap();
    }
}
