//! Campaigns: many seeds run on several threads, with throughput figures.
//!
//! Each thread takes the next seed from a shared counter and runs it whole; seeds never
//! share state, so running them in parallel changes nothing about any one of them. Only
//! failing reports are kept, so a campaign of any length uses bounded memory (at most
//! [`FAILURES_KEPT_MAX`] reports).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SimOptions;
use crate::report::{RunReport, RunStats};
use crate::world::run_seed;

/// The most failing reports a campaign keeps; later failures are only counted.
pub const FAILURES_KEPT_MAX: usize = 100;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignOptions {
    /// The first seed.
    pub start: u64,
    /// How many consecutive seeds.
    pub seeds: u64,
    /// Threads running seeds at once.
    pub threads: usize,
    /// Options for every seed.
    pub options: SimOptions,
    /// Stop handing out seeds once one fails (the must-catch tests use this).
    pub stop_at_first_failure: bool,
}

/// What a campaign found.
#[derive(Debug, Clone, Default)]
pub struct CampaignSummary {
    /// Seeds run to the end.
    pub seeds_run: u64,
    /// Seeds that found a violation.
    pub failure_count: u64,
    /// The first failing reports, by seed.
    pub failures: Vec<RunReport>,
    /// Seeds whose linearizability search stopped without a verdict.
    pub undecided_seeds: Vec<u64>,
    /// Client operations checked, over all seeds.
    pub operations: u64,
    /// Simulated time covered, over all seeds.
    pub simulated_ns: u64,
    /// Every counter summed over all seeds, to show what the campaign exercised.
    pub totals: RunStats,
    /// Wall-clock time of the campaign.
    pub wall_time: Duration,
}

impl CampaignSummary {
    /// Seeds per minute of wall-clock time.
    pub fn seeds_per_minute(&self) -> f64 {
        self.seeds_run as f64 * 60.0 / self.wall_time.as_secs_f64().max(1e-9)
    }

    /// Simulated client operations per second of wall-clock time.
    pub fn operations_per_second(&self) -> f64 {
        self.operations as f64 / self.wall_time.as_secs_f64().max(1e-9)
    }

    /// How much faster than real time the simulation ran, over all threads.
    pub fn speedup(&self) -> f64 {
        self.simulated_ns as f64 / 1e9 / self.wall_time.as_secs_f64().max(1e-9)
    }

    /// A human-readable account, with a replay command per failing seed.
    pub fn text(&self) -> String {
        let mut text = format!(
            "{} seeds in {:.1} s: {:.1} seeds/min, {:.0} simulated ops/s, {:.0}× real time; \
             {} violations",
            self.seeds_run,
            self.wall_time.as_secs_f64(),
            self.seeds_per_minute(),
            self.operations_per_second(),
            self.speedup(),
            self.failure_count
        );
        let totals = &self.totals;
        text.push_str(&format!(
            "\n  exercised: {} ops ({} unknown outcome, {} answered lease requests), {} stops, \
             {} restarts, {} persist failures, {} snapshots sent and installed, {} made, {} \
             snapshot writes hit by faults, {} messages dropped of {}, {} leader terms, {} faults",
            totals.operations,
            totals.operations_unknown,
            totals.lease_operations_answered,
            totals.member_stops,
            totals.member_restarts,
            totals.persist_failures,
            totals.snapshots_installed,
            totals.snapshots_made,
            totals.snapshot_write_faults,
            totals.messages_dropped,
            totals.messages_sent,
            totals.leader_terms,
            totals.faults
        ));
        if !self.undecided_seeds.is_empty() {
            text.push_str(&format!(
                "; linearizability undecided for seeds {:?}",
                self.undecided_seeds
            ));
        }
        for report in &self.failures {
            text.push_str(&format!(
                "\n  seed {}: {}\n    replay: {}",
                report.seed(),
                report
                    .violation
                    .as_ref()
                    .map(|violation| violation.to_string())
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default(),
                report.replay_command()
            ));
        }
        text
    }
}

/// Runs a campaign, calling `on_report` (from the worker threads) after every seed.
pub fn run_campaign(
    options: &CampaignOptions,
    on_report: impl Fn(&RunReport) + Sync,
) -> CampaignSummary {
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let summary = Mutex::new(CampaignSummary::default());
    std::thread::scope(|scope| {
        for _ in 0..options.threads.max(1) {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let position = next.fetch_add(1, Ordering::Relaxed);
                if position >= options.seeds {
                    return;
                }
                let report = run_seed(options.start + position, options.options);
                on_report(&report);
                let mut summary = summary
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                summary.seeds_run += 1;
                summary.operations += report.stats.operations;
                summary.simulated_ns += report.stats.simulated_ns;
                summary.totals.add(&report.stats);
                if report.undecided.is_some() {
                    summary.undecided_seeds.push(report.seed());
                }
                if !report.passed() {
                    summary.failure_count += 1;
                    if options.stop_at_first_failure {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if summary.failures.len() < FAILURES_KEPT_MAX {
                        summary.failures.push(report);
                    }
                }
            });
        }
    });
    let mut summary = summary
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    summary.failures.sort_by_key(RunReport::seed);
    summary.undecided_seeds.sort_unstable();
    summary.wall_time = started.elapsed();
    summary
}
