//! Membership: configuration changes (add, remove, promote, update), leader
//! transfer, a removed or corrupt member handing leadership over.

use keel_types::keelpb::{log_request, MemberRecord};
use prost::Message as _;
use raft::eraftpb::ConfChangeV2;
use raft::StateRole;

use super::{MembershipChange, Node, Reply, RequestError, Response};

/// A learner is promoted only once its log is within this fraction of the
/// leader's (etcd's `readyPercent`), so promotion cannot stall the quorum.
pub(super) const LEARNER_READY_FRACTION: f64 = 0.9;

impl Node {
    pub(super) fn move_leader(&mut self, token: u64, target: u64) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        if !self.raw_node.raft.prs().conf().voters().contains(target) {
            return self.refuse(token, RequestError::BadLeaderTransferee);
        }
        if target == self.config.member_id {
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaderMoved),
            });
            return;
        }
        if let Some((previous, _, _)) = self.pending_move_leader.take() {
            self.refuse(previous, RequestError::LeaderChanged);
        }
        self.raw_node.transfer_leader(target);
        self.pending_move_leader = Some((token, target, self.tick_count));
    }

    /// Answers a pending MoveLeader once the target leads, or after raft-rs
    /// gave up the transfer (it aborts after an election timeout).
    pub(super) fn follow_move_leader(&mut self) {
        let Some((token, target, asked)) = self.pending_move_leader else {
            return;
        };
        if self.raw_node.raft.leader_id == target {
            self.pending_move_leader = None;
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaderMoved),
            });
        } else if self.tick_count - asked > 2 * self.config.election_ticks as u64 {
            self.pending_move_leader = None;
            self.refuse(token, RequestError::Timeout);
        }
    }

    pub(super) fn change_membership(&mut self, token: u64, change: MembershipChange) {
        use raft::eraftpb::{ConfChangeSingle, ConfChangeType};
        if self.raw_node.raft.leader_id == raft::INVALID_ID {
            return self.refuse(token, RequestError::NoLeader);
        }
        let members = self.state_machine.members().to_vec();
        let find = |id: u64| members.iter().find(|member| member.id == id).cloned();
        let (change_type, member) = match change {
            MembershipChange::Add {
                peer_urls,
                is_learner,
            } => {
                if members
                    .iter()
                    .any(|member| member.peer_urls.iter().any(|url| peer_urls.contains(url)))
                {
                    return self.refuse(token, RequestError::PeerUrlExists);
                }
                let id = self.next_member_id(&peer_urls, &members);
                let member = MemberRecord {
                    id,
                    name: String::new(),
                    peer_urls,
                    client_urls: Vec::new(),
                    is_learner,
                };
                let change_type = if is_learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                };
                (change_type, member)
            }
            MembershipChange::Remove { member_id } => {
                let Some(member) = find(member_id) else {
                    return self.refuse(token, RequestError::MemberNotFound);
                };
                (ConfChangeType::RemoveNode, member)
            }
            MembershipChange::Promote { member_id } => {
                let Some(mut member) = find(member_id) else {
                    return self.refuse(token, RequestError::MemberNotFound);
                };
                if !member.is_learner {
                    return self.refuse(token, RequestError::MemberNotLearner);
                }
                if !self.lessor.is_active() {
                    let leader_id = self.raw_node.raft.leader_id;
                    return self.refuse(token, RequestError::NotLeader { leader_id });
                }
                let raft = &self.raw_node.raft;
                let leader_match = raft
                    .prs()
                    .get(self.config.member_id)
                    .map_or(0, |progress| progress.matched);
                let learner_match = raft
                    .prs()
                    .get(member_id)
                    .map_or(0, |progress| progress.matched);
                if (learner_match as f64) < (leader_match as f64) * LEARNER_READY_FRACTION {
                    return self.refuse(token, RequestError::LearnerNotReady);
                }
                member.is_learner = false;
                (ConfChangeType::AddNode, member)
            }
            MembershipChange::Update {
                member_id,
                peer_urls,
            } => {
                let Some(mut member) = find(member_id) else {
                    return self.refuse(token, RequestError::MemberNotFound);
                };
                if members.iter().any(|other| {
                    other.id != member_id
                        && other.peer_urls.iter().any(|url| peer_urls.contains(url))
                }) {
                    return self.refuse(token, RequestError::PeerUrlExists);
                }
                member.peer_urls = peer_urls;
                // Peer URLs are metadata, not configuration: a normal entry.
                return self.propose_write(token, log_request::Request::MemberPeerUrls(member));
            }
        };
        let request_id = self.next_request_id();
        let context = keel_types::keelpb::ConfChangeContext {
            request_id,
            origin_member_id: self.config.member_id,
            member: Some(member.clone()),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = member.id;
        let mut conf_change = ConfChangeV2::default();
        conf_change.set_changes(vec![single].into());
        conf_change.context = context.encode_to_vec().into();
        match self.raw_node.propose_conf_change(Vec::new(), conf_change) {
            Ok(()) => {
                self.pending_membership
                    .insert(request_id, self.pending(token, None));
            }
            // raft-rs allows one configuration change in flight at a time.
            Err(_) => self.refuse(token, RequestError::MembershipChangeInProgress),
        }
    }

    /// A member id for a new member: a hash of its peer URLs, the cluster and
    /// this member's request counter, so adding the same URLs again after a
    /// removal gives a new id (a removed id must never come back).
    pub(super) fn next_member_id(&mut self, peer_urls: &[String], members: &[MemberRecord]) -> u64 {
        loop {
            let salt = self.next_request_id();
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ self.state_machine.cluster_id();
            for byte in peer_urls
                .iter()
                .flat_map(|url| url.bytes())
                .chain(salt.to_le_bytes())
                .chain(self.config.member_id.to_le_bytes())
            {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
            if hash != 0 && !members.iter().any(|member| member.id == hash) {
                return hash;
            }
        }
    }

    /// True once this member has applied its own removal and, if it was the
    /// leader, has handed leadership over (or waited an election timeout):
    /// the shell then stops it.
    pub fn is_removed_and_done(&self) -> bool {
        match self.removed_at_tick {
            None => false,
            Some(removed_at) => {
                self.raw_node.raft.state != StateRole::Leader
                    || self.tick_count - removed_at >= self.config.election_ticks as u64
            }
        }
    }

    /// Records the configuration in force after a configuration change and the
    /// member record carried in its context, and answers the proposing client.
    pub(super) fn record_conf_change(
        &mut self,
        index: u64,
        conf_state: raft::eraftpb::ConfState,
        context: &[u8],
    ) {
        self.raw_node.mut_store().set_conf_state(conf_state.clone());
        let context = keel_types::keelpb::ConfChangeContext::decode(context).unwrap_or_default();
        let is_member =
            |id: u64| conf_state.voters.contains(&id) || conf_state.learners.contains(&id);
        if let Some(mut member) = context.member.clone() {
            if is_member(member.id) {
                // Keep what the member announced about itself (name, client URLs).
                if let Some(known) = self
                    .state_machine
                    .members()
                    .iter()
                    .find(|known| known.id == member.id)
                {
                    member.name = known.name.clone();
                    member.client_urls = known.client_urls.clone();
                }
                member.is_learner = conf_state.learners.contains(&member.id);
                self.state_machine.upsert_member(member);
            }
        }
        let removed: Vec<u64> = self
            .state_machine
            .members()
            .iter()
            .map(|member| member.id)
            .filter(|&id| !is_member(id))
            .collect();
        for id in removed {
            self.state_machine.remove_member(id);
        }
        self.state_machine.set_applied_index(index);
        if !is_member(self.config.member_id) && self.removed_at_tick.is_none() {
            self.removed_at_tick = Some(self.tick_count);
            self.hand_over_leadership();
        }
        if context.origin_member_id == self.config.member_id {
            if let Some(pending) = self.pending_membership.remove(&context.request_id) {
                let member = context.member.unwrap_or_default();
                let member = self
                    .state_machine
                    .members()
                    .iter()
                    .find(|known| known.id == member.id)
                    .cloned()
                    .unwrap_or(member);
                self.replies.push(Reply {
                    token: pending.token,
                    result: Ok(Response::Membership {
                        member,
                        members: self.state_machine.members().to_vec(),
                    }),
                });
            }
        }
    }

    /// A removed (or corrupt) leader transfers leadership to the most
    /// up-to-date voter whose data is not known to be corrupt, so the cluster
    /// does not wait an election timeout for a new leader.
    pub(super) fn hand_over_leadership(&mut self) {
        if self.raw_node.raft.state != StateRole::Leader {
            return;
        }
        let own_id = self.config.member_id;
        let transferee = self
            .raw_node
            .raft
            .prs()
            .iter()
            .filter(|(&id, _)| id != own_id && !self.is_named_corrupt(id))
            .filter(|(&id, _)| self.raw_node.raft.prs().conf().voters().contains(id))
            .max_by_key(|(_, progress)| progress.matched)
            .map(|(&id, _)| id);
        if let Some(transferee) = transferee {
            self.raw_node.transfer_leader(transferee);
        }
    }

    /// True when some member raised the CORRUPT alarm naming this member: it
    /// then refuses to serve clients, its data is not to be trusted.
    pub fn is_corrupt(&self) -> bool {
        self.is_named_corrupt(self.config.member_id)
    }

    /// True when a CORRUPT alarm names `member_id`.
    pub(super) fn is_named_corrupt(&self, member_id: u64) -> bool {
        self.state_machine.alarms().iter().any(|alarm| {
            alarm.member_id == member_id
                && alarm.alarm == keel_types::etcdserverpb::AlarmType::Corrupt as i32
        })
    }
}
