//! Client writes: checking and batching proposals, applying committed entries,
//! answering the member that proposed them, and failing writes that timed out or
//! whose term ended.

use std::collections::BTreeMap;

use keel_types::etcdserverpb::{LeaseKeepAliveResponse, ResponseHeader};
use keel_types::keelpb::{log_request, LogRequest};
use prost::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message, MessageType};

use crate::lease::LEASE_TTL_SECONDS_MAX;
use crate::mvcc;
use crate::state_machine::WriteResponse;

use super::{Node, Reply, RequestError, Response, WriteRequest};

/// Answers every pending request that `should_fail` picks with `error`, in
/// request-id order, and forgets it.
pub(super) fn fail_pending(
    pending: &mut BTreeMap<u64, PendingWrite>,
    replies: &mut Vec<Reply>,
    should_fail: impl Fn(&PendingWrite) -> bool,
    error: RequestError,
) {
    pending.retain(|_, write| {
        if should_fail(write) {
            replies.push(Reply {
                token: write.token,
                result: Err(error.clone()),
            });
            false
        } else {
            true
        }
    });
}

/// A client write numbered and encoded, to be proposed at the next Ready.
#[derive(Debug)]
pub(super) struct WaitingProposal {
    pub(super) token: u64,
    pub(super) request_id: u64,
    pub(super) data: Vec<u8>,
    /// For a keep-alive's checkpoint reset: the lease and the TTL to answer with.
    pub(super) keep_alive: Option<(i64, i64)>,
}

#[derive(Debug)]
pub(super) struct PendingWrite {
    pub(super) token: u64,
    pub(super) proposed_tick: u64,
    /// The term in which this member proposed it.
    pub(super) proposed_term: u64,
    /// For a keep-alive that had to clear a checkpoint first: the lease and
    /// TTL to answer with once the checkpoint applies.
    pub(super) keep_alive: Option<(i64, i64)>,
}

impl Node {
    pub(super) fn propose_write(&mut self, token: u64, mut request: WriteRequest) {
        if let log_request::Request::LeaseGrant(grant) = &mut request {
            if grant.ttl > LEASE_TTL_SECONDS_MAX {
                return self.refuse(token, RequestError::LeaseTtlTooLarge);
            }
            // Decided here, before the log, so that members with different
            // election settings still apply the same grant identically.
            grant.ttl = grant.ttl.max(self.config.lease_ttl_seconds_min());
            if grant.id == 0 {
                grant.id = self.next_lease_id();
            }
        }
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        // Stateless checks before the request enters the log, as etcd's gRPC
        // layer does: a bad request costs no consensus round.
        let validation = match &request {
            log_request::Request::Put(put) => mvcc::validate_put(put),
            log_request::Request::DeleteRange(delete) => mvcc::validate_delete_range(delete),
            log_request::Request::Txn(txn) => {
                mvcc::validate_txn(txn, self.config.txn_operations_max)
            }
            log_request::Request::Compaction(_)
            | log_request::Request::MemberAttributes(_)
            | log_request::Request::LeaseGrant(_)
            | log_request::Request::LeaseRevoke(_)
            | log_request::Request::LeaseCheckpoint(_)
            | log_request::Request::MemberPeerUrls(_)
            | log_request::Request::Alarm(_) => Ok(()),
        };
        if let Err(error) = validation {
            return self.refuse(token, RequestError::KeySpace(error));
        }
        if crate::state_machine::adds_data(&request) {
            if self.state_machine.has_no_space_alarm() {
                return self.refuse(token, RequestError::NoSpace);
            }
            // As etcd's quota check: a write that would take the key space
            // past the quota raises NOSPACE (through the log, so every member
            // learns it) and is refused.
            let request_bytes = request.encoded_len() as u64;
            if self.state_machine.approximate_bytes() + request_bytes > self.config.quota_bytes {
                self.propose_internal(log_request::Request::Alarm(
                    keel_types::etcdserverpb::AlarmRequest {
                        action: keel_types::etcdserverpb::alarm_request::AlarmAction::Activate
                            as i32,
                        member_id: self.config.member_id,
                        alarm: keel_types::etcdserverpb::AlarmType::Nospace as i32,
                    },
                ));
                return self.refuse(token, RequestError::NoSpace);
            }
        }
        if self.raw_node.raft.leader_id == raft::INVALID_ID {
            return self.refuse(token, RequestError::NoLeader);
        }
        let request_id = self.next_request_id();
        let log_request = LogRequest {
            request_id,
            origin_member_id: self.config.member_id,
            request: Some(request),
        };
        let data = log_request.encode_to_vec();
        if data.len() > self.config.request_bytes_max {
            return self.refuse(token, RequestError::RequestTooLarge);
        }
        self.proposals_waiting.push(WaitingProposal {
            token,
            request_id,
            data,
            keep_alive: None,
        });
    }

    /// Proposes every write that arrived since the last Ready as one MsgPropose:
    /// raft-rs appends them together and broadcasts one MsgAppend per follower,
    /// where proposing them one by one costs one MsgAppend (and one response)
    /// per write per follower. A follower's raft-rs forwards the batch to the
    /// leader; whichever member applies a write, only this one answers it, by
    /// matching the request id.
    pub(super) fn propose_waiting_writes(&mut self) {
        if self.proposals_waiting.is_empty() {
            return;
        }
        let mut proposals = std::mem::take(&mut self.proposals_waiting);
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.config.member_id;
        message.set_entries(
            proposals
                .iter_mut()
                .map(|proposal| Entry {
                    data: std::mem::take(&mut proposal.data).into(),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
                .into(),
        );
        match self.raw_node.step(message) {
            Ok(()) => {
                for proposal in proposals {
                    let pending = self.pending(proposal.token, proposal.keep_alive);
                    self.pending_writes.insert(proposal.request_id, pending);
                }
            }
            Err(raft::Error::ProposalDropped) => {
                for proposal in proposals {
                    self.refuse(proposal.token, RequestError::Dropped);
                }
            }
            Err(error) => panic!("raft-rs failed a proposal in an unexpected way: {error}"),
        }
    }

    /// Proposes a write nobody waits for (lease revocations and checkpoints).
    /// If it is lost, the leader proposes it again later.
    pub(super) fn propose_internal(&mut self, request: WriteRequest) {
        let log_request = LogRequest {
            request_id: 0,
            origin_member_id: self.config.member_id,
            request: Some(request),
        };
        if let Err(error) = self
            .raw_node
            .propose(Vec::new(), log_request.encode_to_vec())
        {
            tracing::debug!(%error, "internal proposal dropped");
        }
    }

    /// The record of a request this member proposed and now waits for.
    pub(super) fn pending(&self, token: u64, keep_alive: Option<(i64, i64)>) -> PendingWrite {
        PendingWrite {
            token,
            proposed_tick: self.tick_count,
            proposed_term: self.raw_node.raft.term,
            keep_alive,
        }
    }

    pub(super) fn next_request_id(&mut self) -> u64 {
        self.next_request_sequence = self.next_request_sequence.wrapping_add(1);
        (u64::from(self.config.boot_epoch) << 32) | u64::from(self.next_request_sequence)
    }

    pub(super) fn refuse(&mut self, token: u64, error: RequestError) {
        self.replies.push(Reply {
            token,
            result: Err(error),
        });
    }

    pub(super) fn pending_request_count(&self) -> usize {
        self.pending_writes.len()
            + self.proposals_waiting.len()
            + self.keep_alives_waiting_for_revocation.len()
            + self.reads_waiting.len()
            + self
                .reads_in_flight
                .values()
                .map(|batch| batch.reads.len())
                .sum::<usize>()
            + self
                .reads_ready
                .iter()
                .map(|(_, reads)| reads.len())
                .sum::<usize>()
    }

    /// When the term changes, a write proposed in an older term may have been
    /// lost with the old leader, or may still commit under the new one: its
    /// outcome is unknown. Answering "leader changed" at once, as etcd does,
    /// lets the client retry in about an election timeout instead of waiting
    /// for the request timeout.
    pub(super) fn fail_writes_of_older_terms(&mut self) {
        let term = self.raw_node.raft.term;
        let is_stale = |pending: &PendingWrite| pending.proposed_term < term;
        fail_pending(
            &mut self.pending_membership,
            &mut self.replies,
            is_stale,
            RequestError::LeaderChanged,
        );
        fail_pending(
            &mut self.pending_writes,
            &mut self.replies,
            is_stale,
            RequestError::LeaderChanged,
        );
    }

    pub(super) fn expire_requests(&mut self) {
        let now = self.tick_count;
        let timeout = self.config.request_timeout_ticks;
        let is_expired = |pending: &PendingWrite| now - pending.proposed_tick >= timeout;
        fail_pending(
            &mut self.pending_writes,
            &mut self.replies,
            is_expired,
            RequestError::Timeout,
        );
        fail_pending(
            &mut self.pending_membership,
            &mut self.replies,
            is_expired,
            RequestError::Timeout,
        );
        let (expired, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.keep_alives_waiting_for_revocation)
                .into_iter()
                .partition(|keep_alive| now - keep_alive.received_tick >= timeout);
        self.keep_alives_waiting_for_revocation = waiting;
        for keep_alive in expired {
            self.replies.push(Reply {
                token: keep_alive.token,
                result: Err(RequestError::Timeout),
            });
        }
        // ReadIndex requests that got no answer are issued again; reads waiting
        // too long in total fail.
        let retry = self.config.read_index_retry_ticks;
        let stale_contexts: Vec<u64> = self
            .reads_in_flight
            .iter()
            .filter(|(_, batch)| now - batch.issued_tick >= retry)
            .map(|(&context, _)| context)
            .collect();
        for context in stale_contexts {
            let batch = self.reads_in_flight.remove(&context).expect("listed above");
            self.reads_waiting.extend(batch.reads);
        }
        let mut kept = Vec::with_capacity(self.reads_waiting.len());
        for read in self.reads_waiting.drain(..) {
            if now - read.received_tick >= timeout {
                self.replies.push(Reply {
                    token: read.token,
                    result: Err(RequestError::Timeout),
                });
            } else {
                kept.push(read);
            }
        }
        self.reads_waiting = kept;
    }

    pub(super) fn apply_committed(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.index <= self.state_machine.applied_index() {
                // Already reflected in the snapshot we started from.
                continue;
            }
            assert_eq!(
                entry.index,
                self.state_machine.applied_index() + 1,
                "committed entries must be applied in order without gaps (§5.3)"
            );
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry),
                EntryType::EntryConfChange => {
                    let change = <ConfChange as protobuf::Message>::parse_from_bytes(&entry.data)
                        .expect("committed configuration change decodes");
                    let conf_state = self
                        .raw_node
                        .apply_conf_change(&change)
                        .expect("a committed configuration change applies");
                    self.record_conf_change(entry.index, conf_state, &change.context);
                }
                EntryType::EntryConfChangeV2 => {
                    let change = <ConfChangeV2 as protobuf::Message>::parse_from_bytes(&entry.data)
                        .expect("committed configuration change decodes");
                    let conf_state = self
                        .raw_node
                        .apply_conf_change(&change)
                        .expect("a committed configuration change applies");
                    self.record_conf_change(entry.index, conf_state, &change.context);
                }
            }
        }
        self.answer_keep_alives_of_revoked_leases();
    }

    pub(super) fn apply_normal(&mut self, entry: &Entry) {
        if entry.data.is_empty() {
            // A new leader's empty entry (§8): it commits the leader's term, nothing to apply.
            self.state_machine.set_applied_index(entry.index);
            return;
        }
        let log_request = LogRequest::decode(entry.data.as_ref())
            .expect("committed log request decodes: it was encoded by a keel member");
        let Some(request) = log_request.request else {
            self.state_machine.set_applied_index(entry.index);
            return;
        };
        if !self
            .state_machine
            .first_application(log_request.origin_member_id, log_request.request_id)
        {
            // The same proposal appended twice: the first copy was applied (and
            // answered); applying it again could undo a later write.
            self.state_machine.set_applied_index(entry.index);
            return;
        }
        let request = self.inject_corruption(request);
        let result = self.state_machine.apply_write(entry.index, &request);
        if result.is_ok() && self.lessor.is_active() {
            self.follow_lease_changes(&request);
        }
        if log_request.origin_member_id == self.config.member_id && log_request.request_id != 0 {
            if let Some(write) = self.pending_writes.remove(&log_request.request_id) {
                let result = match write.keep_alive {
                    Some((id, ttl)) => result.map(|_| {
                        Response::LeaseKeepAlive(LeaseKeepAliveResponse {
                            header: Some(self.header(0)),
                            id,
                            ttl,
                        })
                    }),
                    None => {
                        result.map(|response| Response::Write(self.with_header_write(response)))
                    }
                }
                .map_err(RequestError::from);
                self.replies.push(Reply {
                    token: write.token,
                    result,
                });
            }
        }
    }

    /// Applies the configured fault: a wrong value for one key on this member only.
    pub(super) fn inject_corruption(&self, request: WriteRequest) -> WriteRequest {
        match (&self.config.corrupt_values_of_key, request) {
            (Some(key), log_request::Request::Put(mut put)) if &put.key == key => {
                put.value = b"corrupted by fault injection".to_vec();
                log_request::Request::Put(put)
            }
            (_, request) => request,
        }
    }

    pub(super) fn with_header_write(&self, response: WriteResponse) -> WriteResponse {
        fn fill(header: &mut Option<ResponseHeader>, node: &Node) {
            let revision = header.as_ref().map_or(0, |h| h.revision);
            *header = Some(node.header(revision));
        }
        let mut response = response;
        match &mut response {
            WriteResponse::Put(put) => fill(&mut put.header, self),
            WriteResponse::DeleteRange(delete) => fill(&mut delete.header, self),
            WriteResponse::Txn(txn) => fill(&mut txn.header, self),
            WriteResponse::Compaction(compaction) => fill(&mut compaction.header, self),
            WriteResponse::MemberAttributes => {}
            WriteResponse::LeaseGrant(grant) => fill(&mut grant.header, self),
            WriteResponse::LeaseRevoke(revoke) => fill(&mut revoke.header, self),
            WriteResponse::LeaseCheckpoint(checkpoint) => fill(&mut checkpoint.header, self),
            WriteResponse::Alarm(alarm) => fill(&mut alarm.header, self),
        }
        response
    }
}
