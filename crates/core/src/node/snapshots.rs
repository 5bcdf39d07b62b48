//! Snapshots of the state machine: the bootstrap snapshot, this member's own
//! snapshots, and installing one received from the leader.

use keel_types::keelpb::MemberRecord;
use raft::eraftpb::{Snapshot, SnapshotMetadata};

use crate::state_machine::StateMachine;

use super::{Node, OwnSnapshot};

/// The index (and term) of the snapshot a founding member starts from.
pub const BOOTSTRAP_INDEX: u64 = 1;

/// Builds the snapshot at index 1 that a founding member starts from: no data,
/// only the initial voters and their records.
pub fn bootstrap_snapshot(members: Vec<MemberRecord>, cluster_id: u64) -> Snapshot {
    let voters = members
        .iter()
        .filter(|member| !member.is_learner)
        .map(|member| member.id)
        .collect::<Vec<_>>();
    let learners = members
        .iter()
        .filter(|member| member.is_learner)
        .map(|member| member.id)
        .collect::<Vec<_>>();
    let mut state_machine = StateMachine::new(members, cluster_id);
    state_machine.set_applied_index(BOOTSTRAP_INDEX);
    let mut snapshot = Snapshot::default();
    let metadata = snapshot.mut_metadata();
    // At index 1, term 1, not 0: a member added later starts with an empty log
    // (last index 0), so the leader cannot find index 1 in its log and must
    // send it a snapshot, which carries the membership. Entries start at 2.
    metadata.index = BOOTSTRAP_INDEX;
    metadata.term = BOOTSTRAP_INDEX;
    metadata.mut_conf_state().voters = voters;
    metadata.mut_conf_state().learners = learners;
    snapshot.data = state_machine.encode().into();
    snapshot
}

impl Node {
    pub(super) fn install_snapshot(&mut self, snapshot: &Snapshot) {
        let state_machine = match StateMachine::decode(&snapshot.data) {
            Ok(state_machine) => state_machine,
            // The leader's snapshot bytes passed its own checksums; if they do
            // not decode here the member cannot continue safely.
            Err(error) => panic!("snapshot from leader does not decode: {error}"),
        };
        self.state_machine = state_machine;
        self.state_machine
            .set_applied_index(snapshot.get_metadata().index);
        self.raw_node.mut_store().apply_snapshot(snapshot);
        self.last_snapshot_index = snapshot.get_metadata().index;
    }

    /// Makes a snapshot of the state machine every `snapshot_entries_interval`
    /// applied entries, and compacts the in-memory log behind it.
    pub(super) fn maybe_snapshot(&mut self) -> Option<OwnSnapshot> {
        let applied = self.state_machine.applied_index();
        let wanted =
            self.raw_node.store().take_snapshot_wanted() && applied > self.last_snapshot_index;
        if !wanted && applied < self.last_snapshot_index + self.config.snapshot_entries_interval {
            return None;
        }
        let term = raft::Storage::term(self.raw_node.store(), applied)
            .expect("the applied entry is still in the log");
        let mut metadata = SnapshotMetadata {
            index: applied,
            term,
            ..Default::default()
        };
        metadata.set_conf_state(self.raw_node.raft.prs().conf().to_conf_state());
        // The previous image is replaced below; letting go of it first means a member
        // never holds two images of a large state machine at once (a transfer still
        // in flight keeps its own reference until it ends).
        self.raw_node.mut_store().release_snapshot_image();
        let data = bytes::Bytes::from(self.state_machine.encode());
        let compact_index = applied
            .saturating_sub(self.config.snapshot_catch_up_entries)
            .max(self.raw_node.store().first_index());
        self.raw_node.mut_store().install_own_snapshot(
            metadata.clone(),
            data.clone(),
            compact_index,
        );
        self.last_snapshot_index = applied;
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(metadata);
        snapshot.data = data;
        Some(OwnSnapshot {
            snapshot,
            compact_index,
        })
    }
}
