//! Regression: seeds 199, 564 and 597 with `--snapshot-sent-unreported` (the server's
//! transport today): "members did not catch up with the leader within 30 s": one
//! follower stays at its old log for good.
//!
//! The leader sent that follower a snapshot; it arrived, but the follower stopped (an
//! fsync error) before installing it. raft-rs keeps a follower in its Snapshot state,
//! sending it nothing (`Progress::is_paused`), until the application reports the
//! snapshot's fate with `report_snapshot`. The server's transport reports only failures to
//! send (`SnapshotFailed`), never success, so after a delivered-but-lost snapshot the
//! follower is never probed again until the next election. etcd's transport reports
//! `SnapshotFinish` once the snapshot is written to the connection.
//!
//! Fix: a new core event `Event::SnapshotSent(peer)` → `report_snapshot(peer, Finish)`;
//! the server's transport sends `Input::SnapshotSent(to)` after writing and flushing a
//! `MsgSnapshot` frame; the simulator's `TransportReport::SnapshotSent` steps
//! `Event::SnapshotSent` instead of its stand-in `Event::SnapshotFailed`, and the
//! `snapshot_sent_unreported` option goes (this test then runs the seeds with the
//! default options, which is what the server then does).

#[test]
fn followers_that_lost_a_delivered_snapshot_catch_up() {
    for seed in [199, 564, 597] {
        let report = keel_sim::run_seed(seed, keel_sim::SimOptions::default());
        assert!(report.passed(), "{}", report.failure_text());
    }
}
