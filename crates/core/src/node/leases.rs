//! Leases on the leader: the expiry clock, keep-alives (renewed only after a
//! ReadIndex round), time-to-live queries, revocation of expired leases and
//! checkpoints of remaining TTLs.

use keel_types::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    LeaseTimeToLiveResponse,
};
use keel_types::keelpb::{log_request, LogRequest};
use prost::Message as _;
use raft::StateRole;

use super::{
    DeliberateBug, Node, PendingRead, ReadPurpose, Reply, RequestError, Response, WaitingProposal,
    WriteRequest,
};

/// A keep-alive waiting for its lease's revocation to apply.
#[derive(Debug)]
pub(super) struct PendingKeepAlive {
    pub(super) token: u64,
    pub(super) id: i64,
    pub(super) received_tick: u64,
}

impl Node {
    /// Ticks in one second of lease time, as the leader's lease clock counts them.
    pub(super) fn lease_ticks_per_second(&self) -> u64 {
        let ticks_per_second = self.config.ticks_per_second();
        if self.config.deliberate_bug == DeliberateBug::LeaseExpiresAtHalfTtl {
            (ticks_per_second / 2).max(1)
        } else {
            ticks_per_second
        }
    }

    /// Starts the lease clock when this member becomes leader and stops it
    /// when it stops being one.
    pub(super) fn follow_leadership(&mut self) {
        self.follow_move_leader();
        let is_leader = self.raw_node.raft.state == StateRole::Leader;
        if is_leader && !self.lessor.is_active() {
            let ticks_per_second = self.lease_ticks_per_second();
            self.lessor.promote(
                self.tick_count,
                self.state_machine.leases(),
                ticks_per_second,
                self.config.election_ticks as u64,
            );
            self.last_lease_checkpoint_tick = self.tick_count;
        } else if !is_leader && self.lessor.is_active() {
            self.lessor.demote();
            // Whether the revocations they wait for will commit is unknown now.
            for waiting in std::mem::take(&mut self.keep_alives_waiting_for_revocation) {
                self.refuse(waiting.token, RequestError::LeaderChanged);
            }
        }
    }

    /// Answers the keep-alives waiting for revocations that have applied: their
    /// leases are gone, which etcd answers with TTL 0.
    pub(super) fn answer_keep_alives_of_revoked_leases(&mut self) {
        if self.keep_alives_waiting_for_revocation.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.keep_alives_waiting_for_revocation);
        for keep_alive in waiting {
            if self.state_machine.leases().contains(keep_alive.id) {
                self.keep_alives_waiting_for_revocation.push(keep_alive);
                continue;
            }
            let response = LeaseKeepAliveResponse {
                header: Some(self.header(0)),
                id: keep_alive.id,
                ttl: 0,
            };
            self.replies.push(Reply {
                token: keep_alive.token,
                result: Ok(Response::LeaseKeepAlive(response)),
            });
        }
    }

    pub(super) fn revoke_expired_leases(&mut self) {
        let expired = self.lessor.take_expired(
            self.tick_count,
            self.config.lease_revoke_retry_ticks,
            self.config.lease_revokes_per_tick_max,
        );
        for id in expired {
            self.propose_internal(log_request::Request::LeaseRevoke(LeaseRevokeRequest { id }));
        }
    }

    /// Records remaining TTLs in the log every checkpoint interval, so a new
    /// leader continues from them instead of restarting every lease at its full TTL.
    pub(super) fn checkpoint_leases(&mut self) {
        if self.tick_count - self.last_lease_checkpoint_tick
            < self.config.lease_checkpoint_interval_ticks
        {
            return;
        }
        self.last_lease_checkpoint_tick = self.tick_count;
        let remaining = self.lessor.remaining_seconds(
            self.tick_count,
            self.lease_ticks_per_second(),
            usize::MAX,
        );
        let leases = self.state_machine.leases();
        let changed: Vec<LeaseCheckpoint> = remaining
            .into_iter()
            .filter(|(id, seconds)| {
                leases
                    .get(*id)
                    .is_some_and(|lease| lease.remaining_ttl_seconds != *seconds)
            })
            .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
            .collect();
        for chunk in changed.chunks(self.config.lease_checkpoints_per_entry_max.max(1)) {
            self.propose_internal(log_request::Request::LeaseCheckpoint(
                LeaseCheckpointRequest {
                    checkpoints: chunk.to_vec(),
                },
            ));
        }
    }

    /// A keep-alive reaching the leader waits for a ReadIndex round (see
    /// [`ReadPurpose::KeepAlive`]), then [`Node::renew_lease`] answers it.
    pub(super) fn lease_keep_alive(&mut self, token: u64, id: i64) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        self.reads_waiting.push(PendingRead {
            token,
            purpose: ReadPurpose::KeepAlive(id),
            received_tick: self.tick_count,
        });
    }

    /// Renews a lease for a keep-alive whose read index has applied.
    pub(super) fn renew_lease(&mut self, token: u64, id: i64) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        let Some(lease) = self.state_machine.leases().get(id) else {
            // etcd answers a keep-alive for an unknown lease with TTL 0.
            let response = LeaseKeepAliveResponse {
                header: Some(self.header(0)),
                id,
                ttl: 0,
            };
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaseKeepAlive(response)),
            });
            return;
        };
        if self.lessor.is_revoking(id) {
            // The lease expired on this clock and its revocation is in the log:
            // renewing it now would acknowledge a lease that is about to vanish.
            // As etcd's lessor does, wait for the revocation and answer "not found".
            if self.pending_request_count() >= self.config.pending_requests_max {
                return self.refuse(token, RequestError::TooManyRequests);
            }
            self.keep_alives_waiting_for_revocation
                .push(PendingKeepAlive {
                    token,
                    id,
                    received_tick: self.tick_count,
                });
            return;
        }
        let ttl_seconds = lease.ttl_seconds;
        let checkpointed = lease.remaining_ttl_seconds != 0;
        self.lessor.refresh(
            id,
            self.tick_count,
            ttl_seconds,
            self.lease_ticks_per_second(),
        );
        if !checkpointed {
            let response = LeaseKeepAliveResponse {
                header: Some(self.header(0)),
                id,
                ttl: ttl_seconds,
            };
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaseKeepAlive(response)),
            });
            return;
        }
        // A checkpoint says less than the full TTL remains: a new leader would
        // start from it. Clear it through the log before acknowledging, so an
        // acknowledged keep-alive always buys the full TTL.
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        let request_id = self.next_request_id();
        let log_request = LogRequest {
            request_id,
            origin_member_id: self.config.member_id,
            request: Some(log_request::Request::LeaseCheckpoint(
                LeaseCheckpointRequest {
                    checkpoints: vec![LeaseCheckpoint {
                        id,
                        remaining_ttl: 0,
                    }],
                },
            )),
        };
        // Queued, not proposed: this runs while reads are served, which can be
        // between taking a Ready and advancing it, when raft-rs must not be
        // given new entries (it panicked at advance under `compare.sh`'s lease
        // workload).
        self.proposals_waiting.push(WaitingProposal {
            token,
            request_id,
            data: log_request.encode_to_vec(),
            keep_alive: Some((id, ttl_seconds)),
        });
    }

    pub(super) fn lease_time_to_live(&mut self, token: u64, id: i64, keys: bool) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        let header = Some(self.header(0));
        let response = match self.state_machine.leases().get(id) {
            // etcd reports an unknown (expired or revoked) lease with TTL -1.
            None => LeaseTimeToLiveResponse {
                header,
                id,
                ttl: -1,
                ..Default::default()
            },
            Some(lease) => {
                let remaining_ticks = self
                    .lessor
                    .remaining_ticks(id, self.tick_count)
                    .unwrap_or(0);
                LeaseTimeToLiveResponse {
                    header,
                    id,
                    ttl: (remaining_ticks / self.lease_ticks_per_second()) as i64,
                    granted_ttl: lease.ttl_seconds,
                    keys: if keys {
                        lease.keys.iter().cloned().collect()
                    } else {
                        Vec::new()
                    },
                }
            }
        };
        self.replies.push(Reply {
            token,
            result: Ok(Response::LeaseTimeToLive(response)),
        });
    }

    /// A lease id no other member or boot of this member generates: the low
    /// bits of the member id, the boot epoch and a counter, kept positive.
    pub(super) fn next_lease_id(&mut self) -> i64 {
        self.next_lease_sequence = self.next_lease_sequence.wrapping_add(1) & 0x7fff_ffff;
        let member = self.config.member_id & 0xffff;
        let epoch = u64::from(self.config.boot_epoch) & 0xffff;
        let id = (member << 47) | (epoch << 31) | u64::from(self.next_lease_sequence);
        (id as i64).max(1)
    }

    /// Keeps the leader's lease clock in step with applied lease changes.
    pub(super) fn follow_lease_changes(&mut self, request: &WriteRequest) {
        let ticks_per_second = self.lease_ticks_per_second();
        match request {
            log_request::Request::LeaseGrant(grant) => {
                self.lessor
                    .refresh(grant.id, self.tick_count, grant.ttl, ticks_per_second);
            }
            log_request::Request::LeaseRevoke(revoke) => self.lessor.forget(revoke.id),
            log_request::Request::LeaseCheckpoint(checkpoint) => {
                for entry in &checkpoint.checkpoints {
                    // A cleared checkpoint is a keep-alive: the full TTL from now.
                    if entry.remaining_ttl == 0 {
                        if let Some(lease) = self.state_machine.leases().get(entry.id) {
                            let ttl = lease.ttl_seconds;
                            self.lessor
                                .refresh(entry.id, self.tick_count, ttl, ticks_per_second);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}
