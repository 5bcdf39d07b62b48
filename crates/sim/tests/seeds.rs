//! The main test of keel's fault tolerance: a few hundred seeds, each a whole cluster
//! under crashes, power losses with torn writes, fsync errors, partitions, lossy and
//! duplicating links, clock drift and stalls and pauses, with clients using leases that
//! are kept alive, revoked and left to expire, checked for every invariant.
//!
//! Every fault kind is available to every seed; each seed switches each kind on with
//! probability 3/4 (swarm testing), so some seeds hammer a few kinds while others mix them
//! all. The counters printed at the end show what the seeds exercised.
//!
//! `KEEL_SIM_SEEDS` and `KEEL_SIM_START` change the range, for longer local runs.

use keel_sim::{install_quiet_panic_hook, run_campaign, CampaignOptions, SimOptions};

/// The seeds every test run replays.
const SEEDS_DEFAULT: u64 = 200;

fn environment_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[test]
fn seeds_with_every_fault_find_no_violation() {
    install_quiet_panic_hook();
    let options = CampaignOptions {
        start: environment_number("KEEL_SIM_START", 0),
        seeds: environment_number("KEEL_SIM_SEEDS", SEEDS_DEFAULT),
        threads: 2,
        options: SimOptions::default(),
        stop_at_first_failure: false,
    };
    let summary = run_campaign(&options, |_| {});
    eprintln!("{}", summary.text());
    for report in &summary.failures {
        eprintln!("{}", report.failure_text());
    }
    assert_eq!(
        summary.failure_count, 0,
        "the simulator found violations (replay commands above)"
    );
    assert_eq!(summary.seeds_run, options.seeds);
    // The seeds did what they are for: faults happened and the system went through them.
    let totals = &summary.totals;
    assert!(totals.operations_answered > 0 && totals.operations_unknown > 0);
    assert!(totals.lease_operations_answered > 0);
    assert!(totals.member_restarts > 0 && totals.persist_failures > 0);
    assert!(totals.snapshots_installed > 0 && totals.snapshots_made > 0);
    assert!(totals.messages_dropped > 0 && totals.leader_terms > options.seeds);
}
