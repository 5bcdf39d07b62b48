//! Own snapshots are written off the member loop (issue 16), so a crash, an fsync error
//! or a power loss can now hit one while the member goes on, or just after it became
//! durable but before the member heard of it. The nemesis aims those faults at snapshot
//! writes; this test runs seeds until several of them have hit, and every run must keep
//! every invariant (no acknowledged write lost, linearizable history, equal state).

/// Seeds run at most, so the test stays within tens of seconds.
const SEEDS_MAX: u64 = 40;
/// Faults on snapshot writes the test wants to have seen.
const FAULTS_WANTED: u64 = 6;

#[test]
fn snapshot_write_faults_lose_no_acknowledged_write() {
    let mut faults = 0;
    let mut seeds = 0;
    for seed in 0..SEEDS_MAX {
        let report = keel_sim::run_seed(seed, keel_sim::SimOptions::default());
        assert!(report.passed(), "{}", report.failure_text());
        faults += report.stats.snapshot_write_faults;
        seeds += 1;
        if faults >= FAULTS_WANTED {
            break;
        }
    }
    assert!(
        faults >= FAULTS_WANTED,
        "only {faults} snapshot writes were hit by faults in {seeds} seeds"
    );
}
