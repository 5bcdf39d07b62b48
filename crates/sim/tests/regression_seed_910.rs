//! Regression: seed 910 found "appending entry 125 leaves a gap after the last index 49".
//!
//! A member received a snapshot; its file was saved, then the fsync of its marker in the
//! log failed and the member lost power, so after the restart the log still ended before
//! the snapshot and the first append after it panicked (a crash loop). Fixed in
//! `DurableState::open`, which now finishes the interrupted save (commit bf15b4d, with the
//! unit test `issue_3_seed_910_snapshot_whose_marker_was_lost_takes_later_entries`).
//! Seeds 2783, 4826, 7563 and 30 more of the first 50,000 failed the same way.

use keel_sim::{run_seed, SimOptions};

#[test]
fn seeds_that_lost_a_snapshot_marker_replay_without_violation() {
    for seed in [910, 2783, 4826, 7563] {
        let report = run_seed(seed, SimOptions::default());
        assert!(report.passed(), "{}", report.failure_text());
    }
}
