//! `keel-sim`: runs the deterministic simulator from the command line.
//!
//! - `keel-sim replay --seed N` runs one seed and prints its report (the command a
//!   failing run prints is exactly this);
//! - `keel-sim campaign --seeds N [--start S] [--threads T]` runs many seeds in parallel
//!   and prints seeds per minute, simulated operations per second and every failing seed
//!   with its replay command.
//!
//! `--bug` switches on a deliberate bug, to see the simulator catch it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use keel_check::History;
use keel_sim::{
    run_campaign, run_world, CampaignOptions, DeliberateBug, ShellBug, SimOptions, World,
};

/// keel's deterministic simulator.
#[derive(Debug, Parser)]
#[command(name = "keel-sim", version, about)]
struct Arguments {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one seed and print its report (failing runs print this command).
    #[command(alias = "run")]
    Replay {
        /// The seed.
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        switches: Switches,
        /// Write the client history as JSON here (readable by `keel-check`), with each
        /// lease's expiry inserted as the simulator checked it.
        #[arg(long)]
        history: Option<PathBuf>,
        /// Print every event (ticks and heartbeats aside) to stderr as it happens.
        #[arg(long)]
        print_events: bool,
    },
    /// Run many seeds across threads and report throughput and failures.
    Campaign {
        /// How many seeds.
        #[arg(long)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Threads running seeds at once.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Stop at the first failing seed.
        #[arg(long)]
        stop_at_first_failure: bool,
        /// Print a line per seed.
        #[arg(long)]
        verbose: bool,
        #[command(flatten)]
        switches: Switches,
    },
}

#[derive(Debug, clap::Args)]
struct Switches {
    /// Switch on a deliberate bug (repeatable).
    #[arg(long = "bug", value_enum)]
    bugs: Vec<Bug>,
    /// Inject no fault at all.
    #[arg(long)]
    faults_off: bool,
    /// After an fsync error only the process exits; the page cache keeps the bytes whose
    /// write-back failed.
    #[arg(long)]
    fsync_error_keeps_page_cache: bool,
    /// Let the network duplicate forwarded proposals (MsgPropose) too.
    #[arg(long)]
    duplicate_proposals: bool,
    /// Report nothing when a snapshot reaches its follower (today's server transport).
    #[arg(long)]
    snapshot_sent_unreported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bug {
    /// The core answers linearizable reads from local state, without ReadIndex.
    ReadsWithoutReadIndex,
    /// The shell acknowledges (sends votes and append responses) before fsync.
    AcknowledgeBeforeFsync,
    /// The core's lease clock runs twice as fast: leases expire at half their TTL.
    LeaseExpiresAtHalfTtl,
}

impl Switches {
    fn options(&self) -> SimOptions {
        let mut options = SimOptions {
            faults_off: self.faults_off,
            fsync_error_keeps_page_cache: self.fsync_error_keeps_page_cache,
            duplicate_proposals: self.duplicate_proposals,
            snapshot_sent_unreported: self.snapshot_sent_unreported,
            ..SimOptions::default()
        };
        for bug in &self.bugs {
            match bug {
                Bug::ReadsWithoutReadIndex => {
                    options.core_bug = DeliberateBug::ReadsWithoutReadIndex
                }
                Bug::AcknowledgeBeforeFsync => options.shell_bug = ShellBug::AcknowledgeBeforeFsync,
                Bug::LeaseExpiresAtHalfTtl => {
                    options.core_bug = DeliberateBug::LeaseExpiresAtHalfTtl
                }
            }
        }
        options
    }
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    match arguments.command {
        Command::Replay {
            seed,
            switches,
            history,
            print_events,
        } => {
            let mut world = World::new(seed, switches.options());
            world.echo_events = print_events;
            let (report, operations) = run_world(world);
            println!("{}", report.summary());
            if let Some(path) = history {
                // With the leases' expiries, as the simulator checked it: keel-check then
                // needs no clock bound of its own.
                let history = History {
                    operations: keel_sim::invariants::history::with_expiries(&operations),
                };
                match std::fs::File::create(&path) {
                    Ok(file) => {
                        if let Err(error) = history.write_json(std::io::BufWriter::new(file)) {
                            eprintln!("cannot write {}: {error}", path.display());
                        }
                    }
                    Err(error) => eprintln!("cannot create {}: {error}", path.display()),
                }
            }
            if let Some(reason) = &report.undecided {
                println!("linearizability undecided: {reason}");
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                println!("{}", report.failure_text());
                ExitCode::FAILURE
            }
        }
        Command::Campaign {
            seeds,
            start,
            threads,
            stop_at_first_failure,
            verbose,
            switches,
        } => {
            keel_sim::install_quiet_panic_hook();
            let options = CampaignOptions {
                start,
                seeds,
                threads,
                options: switches.options(),
                stop_at_first_failure,
            };
            let summary = run_campaign(&options, |report| {
                if verbose || !report.passed() {
                    println!("{}", report.summary());
                }
                if !report.passed() {
                    println!("{}", report.failure_text());
                }
            });
            println!("{}", summary.text());
            if summary.failure_count == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
