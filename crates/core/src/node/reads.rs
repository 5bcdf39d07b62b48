//! Linearizable reads (one ReadIndex round per batch, §6.4 of Ongaro's thesis)
//! and serializable reads from the local state machine.

use std::collections::VecDeque;

use keel_types::etcdserverpb::{RangeRequest, RangeResponse};

use crate::mvcc::{self, KeySpaceError};

use super::{DeliberateBug, Node, Reply, RequestError, Response};

/// A ReadIndex context starts with the member id (8 bytes) and its boot epoch
/// (4 bytes); the batch number (8 bytes) follows.
const READ_CONTEXT_PREFIX_BYTES: usize = 12;

/// A batch of linearizable reads waiting for one ReadIndex answer.
#[derive(Debug)]
pub(super) struct ReadBatch {
    pub(super) reads: Vec<PendingRead>,
    pub(super) issued_tick: u64,
}

#[derive(Debug)]
pub(super) struct PendingRead {
    pub(super) token: u64,
    pub(super) purpose: ReadPurpose,
    pub(super) received_tick: u64,
}

/// What a request waits for a read index to do.
#[derive(Debug)]
pub(super) enum ReadPurpose {
    /// A linearizable range read.
    Range(RangeRequest),
    /// A lease keep-alive. The leader renews a lease only after a ReadIndex
    /// round (etcd's `ensureLeadership` and `waitAppliedIndex`): the round
    /// proves it is still the leader, so no newer leader's clock has taken
    /// over, and once the read index is applied its lease table holds every
    /// revocation and checkpoint committed before, including a previous
    /// leader's. Without it, a new leader that had not yet applied its
    /// predecessor's revocation acknowledged a keep-alive for a lease that was
    /// about to vanish, and a deposed leader could acknowledge one that a newer
    /// leader would expire first (found by the simulator; see
    /// `crates/sim/tests/regression_lease_keep_alive_on_stale_state.rs`).
    KeepAlive(i64),
}

impl Node {
    pub(super) fn queue_read(&mut self, token: u64, request: RangeRequest) {
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        if let Err(error) = mvcc::validate_range(&request) {
            return self.refuse(token, RequestError::KeySpace(error));
        }
        if self.config.deliberate_bug == DeliberateBug::ReadsWithoutReadIndex {
            let result = self
                .range_local(&request)
                .map(Response::Range)
                .map_err(RequestError::KeySpace);
            self.replies.push(Reply { token, result });
            return;
        }
        if self.raw_node.raft.leader_id == raft::INVALID_ID {
            return self.refuse(token, RequestError::NoLeader);
        }
        self.reads_waiting.push(PendingRead {
            token,
            purpose: ReadPurpose::Range(request),
            received_tick: self.tick_count,
        });
    }

    /// Sends all waiting reads as one ReadIndex request: one heartbeat round
    /// confirms leadership for the whole batch.
    pub(super) fn issue_read_index(&mut self) {
        if self.reads_waiting.is_empty() || self.raw_node.raft.leader_id == raft::INVALID_ID {
            return;
        }
        let context = self.next_read_context;
        self.next_read_context += 1;
        let reads = std::mem::take(&mut self.reads_waiting);
        self.reads_in_flight.insert(
            context,
            ReadBatch {
                reads,
                issued_tick: self.tick_count,
            },
        );
        self.raw_node.read_index(self.read_context_bytes(context));
    }

    /// The ReadIndex context on the wire: this member's id, its boot epoch and
    /// the batch's number. The leader keeps one pending request per context and
    /// silently drops a second one with the same bytes (raft-rs `ReadOnly::
    /// add_request`), so contexts must be unique across the cluster and across
    /// restarts. With a bare counter, every member's batches collided with the
    /// leader's own: the dropped batch waited `read_index_retry_ticks` (0.5 s)
    /// for its retry, and a restarted member could even be answered with the
    /// read index of its previous incarnation's request, which may predate a
    /// write acknowledged before the new read began (a stale read).
    fn read_context_bytes(&self, context: u64) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(READ_CONTEXT_PREFIX_BYTES + 8);
        bytes.extend_from_slice(&self.read_context_prefix());
        bytes.extend_from_slice(&context.to_be_bytes());
        bytes
    }

    /// What every ReadIndex context of this incarnation starts with.
    fn read_context_prefix(&self) -> [u8; READ_CONTEXT_PREFIX_BYTES] {
        let mut prefix = [0; READ_CONTEXT_PREFIX_BYTES];
        prefix[..8].copy_from_slice(&self.raw_node.raft.id.to_be_bytes());
        prefix[8..].copy_from_slice(&self.config.boot_epoch.to_be_bytes());
        prefix
    }

    pub(super) fn record_read_states(&mut self, read_states: Vec<raft::ReadState>) {
        for read_state in read_states {
            let Some(context) = self.own_read_context(&read_state.request_ctx) else {
                continue;
            };
            if let Some(batch) = self.reads_in_flight.remove(&context) {
                self.reads_ready.push_back((read_state.index, batch.reads));
            }
        }
    }

    /// The batch number in a ReadIndex context this incarnation issued, or
    /// `None` for anyone else's.
    fn own_read_context(&self, bytes: &[u8]) -> Option<u64> {
        let counter = bytes.strip_prefix(&self.read_context_prefix())?;
        Some(u64::from_be_bytes(counter.try_into().ok()?))
    }

    /// Serves every read whose read index has been applied (§6.4: the state
    /// machine has then caught up with everything committed before the read).
    pub(super) fn serve_ready_reads(&mut self) {
        let applied = self.state_machine.applied_index();
        let mut still_waiting = VecDeque::new();
        while let Some((read_index, reads)) = self.reads_ready.pop_front() {
            if read_index > applied {
                still_waiting.push_back((read_index, reads));
                continue;
            }
            for read in reads {
                let request = match read.purpose {
                    ReadPurpose::Range(request) => request,
                    ReadPurpose::KeepAlive(id) => {
                        self.renew_lease(read.token, id);
                        continue;
                    }
                };
                let result = self
                    .range_local(&request)
                    .map(Response::Range)
                    .map_err(RequestError::KeySpace);
                self.replies.push(Reply {
                    token: read.token,
                    result,
                });
            }
        }
        self.reads_ready = still_waiting;
    }

    /// Answers a read from this member's state machine as it is now: a
    /// serializable read, possibly stale, never reordered.
    pub fn range_local(&self, request: &RangeRequest) -> Result<RangeResponse, KeySpaceError> {
        let mut response = self.state_machine.range(request)?;
        response.header = Some(self.header(response.header.as_ref().map_or(0, |h| h.revision)));
        Ok(response)
    }
}
