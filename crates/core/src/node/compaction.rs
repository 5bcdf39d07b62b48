//! Automatic compaction of old revisions, decided by the leader and carried
//! out through the log like any compaction.

use keel_types::keelpb::log_request;

use super::{AutoCompactionPolicy, Node};

/// Revisions remembered for periodic compaction: one every tenth of the
/// retention, so compaction lags the retention by at most a tenth.
pub(super) const AUTO_COMPACTION_SAMPLES_MAX: usize = 11;

impl Node {
    /// Compacts history older than the retention, on the leader only, through
    /// the log like any compaction (so every member compacts at one index).
    pub(super) fn auto_compact(&mut self) {
        let key_space = self.state_machine.key_space();
        let current = key_space.current_revision();
        let compacted = key_space.compact_revision();
        let target = match self.config.auto_compaction {
            AutoCompactionPolicy::Off => return,
            AutoCompactionPolicy::KeepRevisions(keep) => {
                // Checked once per election timeout: compaction is cheap but
                // need not run on every tick.
                if !self
                    .tick_count
                    .is_multiple_of(self.config.election_ticks.max(1) as u64)
                {
                    return;
                }
                current - keep as i64
            }
            AutoCompactionPolicy::KeepTicks(keep) => {
                let interval = (keep / 10).max(1);
                if !self.tick_count.is_multiple_of(interval) {
                    return;
                }
                self.revision_samples.push_back((self.tick_count, current));
                while self.revision_samples.len() > AUTO_COMPACTION_SAMPLES_MAX {
                    self.revision_samples.pop_front();
                }
                let horizon = self.tick_count.saturating_sub(keep);
                match self
                    .revision_samples
                    .iter()
                    .rev()
                    .find(|(tick, _)| *tick <= horizon)
                {
                    Some(&(_, revision)) if self.tick_count >= keep => revision,
                    _ => return,
                }
            }
        };
        if target > compacted && target > 1 {
            self.propose_internal(log_request::Request::Compaction(
                keel_types::etcdserverpb::CompactionRequest {
                    revision: target,
                    physical: false,
                },
            ));
        }
    }
}
