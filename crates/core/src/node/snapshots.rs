//! Snapshots of the state machine: the bootstrap snapshot, this member's own
//! snapshots, and installing one received from the leader.

use keel_types::keelpb::MemberRecord;
use raft::eraftpb::{Snapshot, SnapshotMetadata};

use crate::state_machine::StateMachine;

use super::{LogCompaction, Node, SnapshotCapture};

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

    /// Captures the state machine every `snapshot_entries_interval` applied
    /// entries (or when raft-rs wants a fresher snapshot for a follower), at most
    /// one capture at a time. Taking the capture is O(1); the shell encodes,
    /// writes and fsyncs it off the member loop and reports
    /// [`Event::SnapshotDurable`](super::Event::SnapshotDurable). Nothing is
    /// compacted and raft-rs is told nothing until then.
    pub(super) fn maybe_snapshot(&mut self) -> Option<SnapshotCapture> {
        if self.snapshot_in_flight {
            return None;
        }
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
        // The previous image will be replaced by this one; letting go of it now
        // means a member never holds two images of a large state machine at once
        // (a transfer still in flight keeps its own reference until it ends).
        // Until the new image is durable, raft-rs is told "temporarily
        // unavailable" and asks again.
        self.raw_node.mut_store().release_snapshot_image();
        self.last_snapshot_index = applied;
        self.snapshot_in_flight = true;
        Some(SnapshotCapture {
            metadata,
            state: self.state_machine.capture(),
        })
    }

    /// A capture became a durable snapshot: raft-rs may now send it, and the log
    /// behind it is compacted in memory here and on disk by the shell
    /// (`log_compaction` of the next output). A snapshot received from the
    /// leader while this one was being written may have overtaken it; then it
    /// is simply not used.
    pub(super) fn record_durable_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot_in_flight = false;
        let metadata = snapshot.get_metadata().clone();
        let store = self.raw_node.store();
        if metadata.index <= store.snapshot_metadata().index {
            tracing::debug!(
                index = metadata.index,
                newer = store.snapshot_metadata().index,
                "own snapshot overtaken by a newer one"
            );
            return;
        }
        assert!(
            metadata.index <= store.last_index(),
            "a snapshot at {} beyond the log's last index {}: captures are taken at the applied index",
            metadata.index,
            store.last_index()
        );
        let compact_index = metadata
            .index
            .saturating_sub(self.config.snapshot_catch_up_entries)
            .max(store.first_index());
        self.raw_node.mut_store().install_own_snapshot(
            metadata.clone(),
            snapshot.data,
            compact_index,
        );
        self.log_compaction = Some(LogCompaction {
            snapshot_index: metadata.index,
            snapshot_term: metadata.term,
            compact_index,
        });
    }
}
