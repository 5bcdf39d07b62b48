//! What the member loop tells the outside world after each batch: its figures
//! as metrics (gauges set once per batch, never counted per entry), and one
//! log line, with member and term, per event worth reading: a leader elected,
//! changed or lost; a member added, promoted or removed; an alarm raised or
//! cleared. Snapshots sent and received are logged by the transport.

use std::sync::Arc;
use std::time::Duration;

use keel_core::Node;
use keel_types::etcdserverpb::{AlarmMember, AlarmType};
use keel_types::keelpb::MemberRecord;

use crate::metrics::{member_label, MemberMetrics, SLOW_APPLY_THRESHOLD};

/// The member loop's observer; owned by the loop thread.
pub struct MemberObserver {
    metrics: Arc<MemberMetrics>,
    member: String,
    /// The leader last seen, 0 for none (etcd's `getLead`).
    leader: u64,
    alarms: Vec<AlarmMember>,
}

fn alarm_name(alarm: &AlarmMember) -> &'static str {
    AlarmType::try_from(alarm.alarm).map_or("UNKNOWN", |kind| kind.as_str_name())
}

impl MemberObserver {
    /// Starts from the node as recovered (its membership and alarms are not
    /// news); publishes what does not change.
    pub fn new(metrics: Arc<MemberMetrics>, node: &Node) -> MemberObserver {
        metrics
            .quota_backend_bytes
            .set(node.config().quota_bytes.min(i64::MAX as u64) as i64);
        let alarms = node.state_machine().alarms().to_vec();
        metrics.set_alarms(&alarms);
        MemberObserver {
            member: member_label(node.member_id()),
            metrics,
            leader: 0,
            alarms,
        }
    }

    /// One Ready carried out: `apply` is the time spent inside the node
    /// (where committed entries are applied), `total` the whole Ready.
    pub fn ready_carried_out(&self, apply: Duration, total: Duration) {
        if apply > SLOW_APPLY_THRESHOLD {
            self.metrics.slow_apply.inc();
            tracing::warn!(
                member = %self.member,
                took_milliseconds = apply.as_millis() as u64,
                "apply request took too long"
            );
        }
        self.metrics.ready_duration.observe(total.as_secs_f64());
    }

    /// A batch of `inputs` was taken from the queue.
    pub fn batch_taken(&self, inputs: usize) {
        self.metrics.batch_inputs.observe(inputs as f64);
    }

    /// After a batch: publishes the node's figures and logs leadership and
    /// alarm changes. `pending_proposals` is this member's proposals waiting
    /// for an answer.
    pub fn batch_done(&mut self, node: &Node, pending_proposals: usize) {
        let status = node.status();
        let metrics = &self.metrics;
        metrics.has_leader.set(i64::from(status.leader_id != 0));
        metrics.is_leader.set(i64::from(status.is_leader));
        metrics.is_learner.set(i64::from(status.is_learner));
        metrics.raft_term.set(status.term as i64);
        metrics.proposals_committed.set(status.commit_index as i64);
        metrics.proposals_applied.set(status.applied_index as i64);
        metrics.proposals_pending.set(pending_proposals as i64);
        metrics.db_total_size.set(status.key_space_bytes as i64);
        metrics
            .keys_total
            .set(node.state_machine().key_space().key_count() as i64);
        metrics.current_revision.set(status.revision);
        metrics.compact_revision.set(status.compact_revision);

        if status.leader_id != self.leader {
            // etcd counts a change whenever a leader appears that differs from
            // the one last seen, "none" included: a survivor of a killed
            // leader counts one, however long the election took.
            if status.leader_id != 0 {
                metrics.leader_changes_seen.inc();
                let is_self = status.leader_id == node.member_id();
                if self.leader == 0 {
                    tracing::info!(
                        member = %self.member,
                        term = status.term,
                        leader = %member_label(status.leader_id),
                        is_self,
                        "leader elected"
                    );
                } else {
                    tracing::info!(
                        member = %self.member,
                        term = status.term,
                        leader = %member_label(status.leader_id),
                        previous_leader = %member_label(self.leader),
                        is_self,
                        "leader changed"
                    );
                }
            } else {
                tracing::warn!(
                    member = %self.member,
                    term = status.term,
                    previous_leader = %member_label(self.leader),
                    "lost the leader"
                );
            }
            self.leader = status.leader_id;
        }

        if status.alarms != self.alarms {
            for alarm in status.alarms.iter().filter(|a| !self.alarms.contains(a)) {
                tracing::warn!(
                    member = %self.member,
                    term = status.term,
                    alarm = alarm_name(alarm),
                    alarm_member = %member_label(alarm.member_id),
                    "alarm raised"
                );
            }
            for alarm in self.alarms.iter().filter(|a| !status.alarms.contains(a)) {
                tracing::info!(
                    member = %self.member,
                    term = status.term,
                    alarm = alarm_name(alarm),
                    alarm_member = %member_label(alarm.member_id),
                    "alarm cleared"
                );
            }
            metrics.set_alarms(&status.alarms);
            self.alarms = status.alarms;
        }
    }

    /// The membership changed from `before` to `after` (the loop compares).
    pub fn membership_changed(&self, term: u64, before: &[MemberRecord], after: &[MemberRecord]) {
        for member in after {
            match before.iter().find(|known| known.id == member.id) {
                None => tracing::info!(
                    member = %self.member,
                    term,
                    added = %member_label(member.id),
                    peer_urls = ?member.peer_urls,
                    is_learner = member.is_learner,
                    "member added"
                ),
                Some(known) if known.is_learner && !member.is_learner => tracing::info!(
                    member = %self.member,
                    term,
                    promoted = %member_label(member.id),
                    "member promoted"
                ),
                Some(_) => {}
            }
        }
        for member in before {
            if !after.iter().any(|now| now.id == member.id) {
                tracing::info!(
                    member = %self.member,
                    term,
                    removed = %member_label(member.id),
                    name = %member.name,
                    "member removed"
                );
            }
        }
    }
}
