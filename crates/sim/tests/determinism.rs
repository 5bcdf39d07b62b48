//! A seed must replay exactly: that is what makes a failing seed worth printing.
//!
//! Two runs of one seed must produce the same trace digest (every event, in order, with
//! its time), the same counters and the same history; different seeds must differ. Runs
//! on two threads at once must not disturb each other (no shared state).

use keel_sim::{run_seed, run_seed_with_history, SimOptions};

const SEEDS: [u64; 3] = [0, 17, 123_456_789];

#[test]
fn the_same_seed_gives_the_same_run() {
    for seed in SEEDS {
        let (first, first_history) = run_seed_with_history(seed, SimOptions::default());
        let (second, second_history) = run_seed_with_history(seed, SimOptions::default());
        assert_eq!(first.trace_digest, second.trace_digest, "seed {seed}");
        assert_eq!(first.stats, second.stats, "seed {seed}");
        assert_eq!(first_history, second_history, "seed {seed}");
        assert_eq!(first.recent_events, second.recent_events, "seed {seed}");
    }
}

#[test]
fn runs_on_parallel_threads_do_not_disturb_each_other() {
    let alone = run_seed(SEEDS[1], SimOptions::default());
    let handles: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| run_seed(SEEDS[1], SimOptions::default())))
        .collect();
    for handle in handles {
        let report = handle.join().expect("the run does not panic");
        assert_eq!(report.trace_digest, alone.trace_digest);
    }
}

#[test]
fn different_seeds_give_different_runs() {
    let digests: Vec<u64> = SEEDS
        .iter()
        .map(|&seed| run_seed(seed, SimOptions::default()).trace_digest)
        .collect();
    assert_ne!(digests[0], digests[1]);
    assert_ne!(digests[1], digests[2]);
}
