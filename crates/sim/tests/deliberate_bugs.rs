//! The simulator must catch real bugs. Each test switches on one deliberately wrong
//! behaviour and requires a violation within a bounded number of seeds.
//!
//! - Answering linearizable reads from local state, without ReadIndex (a bug in the
//!   core): a deposed leader or a lagging follower serves stale data, which the history's
//!   linearizability or revision checks must catch.
//! - Acknowledging before fsync (a bug in the shell): votes and append responses go out
//!   before what they promise is durable, so a power loss makes members forget entries and
//!   votes the cluster counted on; the step invariants (state machine safety, election
//!   safety, log matching), raft-rs's own assertions or the history must catch it.
//! - Expiring leases at half their TTL (a bug in the core's lease clock): keys attached to
//!   a lease vanish before the lease may legally expire, which the history's lease expiry
//!   bound must catch.

use keel_sim::{
    install_quiet_panic_hook, run_campaign, CampaignOptions, DeliberateBug, RunReport, ShellBug,
    SimOptions, Violation,
};

/// The most seeds a deliberate bug may survive.
const SEEDS_MAX: u64 = 200;

/// The first failing report of a campaign that stops at its first failure.
fn first_failure(options: SimOptions) -> RunReport {
    install_quiet_panic_hook();
    let campaign = CampaignOptions {
        start: 0,
        seeds: SEEDS_MAX,
        threads: 2,
        options,
        stop_at_first_failure: true,
    };
    let summary = run_campaign(&campaign, |_| {});
    assert!(
        summary.failure_count > 0,
        "{options:?} survived {SEEDS_MAX} seeds: {}",
        summary.text()
    );
    let report = summary.failures[0].clone();
    eprintln!(
        "caught after {} seeds:\n{}",
        summary.seeds_run,
        report.failure_text()
    );
    report
}

#[test]
fn reads_without_read_index_are_caught() {
    let report = first_failure(SimOptions {
        core_bug: DeliberateBug::ReadsWithoutReadIndex,
        ..SimOptions::default()
    });
    assert!(
        matches!(
            report.violation,
            Some(Violation::NotLinearizable(_) | Violation::Revisions(_))
        ),
        "{:?}",
        report.violation
    );
}

#[test]
fn leases_expiring_at_half_their_ttl_are_caught() {
    let report = first_failure(SimOptions {
        core_bug: DeliberateBug::LeaseExpiresAtHalfTtl,
        ..SimOptions::default()
    });
    let Some(Violation::NotLinearizable(explanation)) = &report.violation else {
        panic!("{:?}", report.violation);
    };
    // The explanation names the expiry that could not come yet.
    assert!(explanation.contains("expires"), "{explanation}");
}

#[test]
fn acknowledging_before_fsync_is_caught() {
    let report = first_failure(SimOptions {
        shell_bug: ShellBug::AcknowledgeBeforeFsync,
        ..SimOptions::default()
    });
    let violation = report.violation.expect("a failing report has a violation");
    let is_durability_symptom = match &violation {
        Violation::TwoLeadersInOneTerm { .. }
        | Violation::LogMatching { .. }
        | Violation::CommittedEntryDiffers { .. }
        | Violation::SnapshotDisagrees { .. }
        | Violation::NotLinearizable(_)
        | Violation::Revisions(_)
        | Violation::LostAcknowledgedWrite(_) => true,
        // raft-rs's own check that a follower kept what it acknowledged.
        Violation::Panic(message) => message.contains("to_commit"),
        _ => false,
    };
    assert!(is_durability_symptom, "{violation}");
}
