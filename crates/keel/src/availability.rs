//! `keel availability`: the reliability and availability model of `keel-availability`
//! on the command line. This file only reads arguments and prints; the model is the
//! library's.

use anyhow::Context;
use keel_availability::duration::{format_hours, parse_hours};
use keel_availability::{analyse_quorums, Block, Lifetime, QuorumQuestion};

#[derive(Debug, clap::Args)]
pub struct Arguments {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// One component: R(t), MTTF, availability, nines and downtime per year.
    Component {
        #[command(flatten)]
        lifetime: LifetimeArguments,
        /// Mean time to repair (e.g. 1h).
        #[arg(long, value_parser = hours)]
        mttr: f64,
        /// The t of R(t) (default: 30d).
        #[arg(long, value_parser = hours, default_value = "30d")]
        mission_time: f64,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Clusters of each size with a majority quorum: availability (closed form and Markov
    /// chain with repair crews), nines, downtime, mean time to losing quorum, R(t), and a
    /// Monte Carlo cross-check with its 95% confidence interval.
    Quorum {
        /// Cluster sizes to compare, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "3,5,7")]
        members: Vec<usize>,
        #[command(flatten)]
        lifetime: LifetimeArguments,
        /// Mean time to repair one member (e.g. 1h).
        #[arg(long, value_parser = hours)]
        mttr: f64,
        /// Members repaired at the same time (default: every member has its own crew).
        #[arg(long)]
        repair_crews: Option<usize>,
        /// The t of R(t).
        #[arg(long, value_parser = hours, default_value = "30d")]
        mission_time: f64,
        /// Monte Carlo replications (0 turns the cross-check off; at least 30 otherwise).
        #[arg(long, default_value_t = 200)]
        monte_carlo_replications: u32,
        /// Simulated time per replication.
        #[arg(long, value_parser = hours, default_value = "10y")]
        monte_carlo_horizon: f64,
        /// Seed of the Monte Carlo run; equal seeds give equal numbers.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also draw R(t) and the nines of each size into this SVG file.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// A reliability block diagram, for example
    /// "series(0.9995, 2of3(30d/1h, 30d/1h, 30d/1h))": numbers are availabilities,
    /// MTTF/MTTR pairs become MTTF/(MTTF+MTTR), series/parallel/KofN compose.
    System {
        /// The expression.
        expression: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// A member's lifetime: exponential from --mttf or --failure-rate, or Weibull.
#[derive(Debug, clap::Args)]
struct LifetimeArguments {
    /// Mean time to failure of one member (exponential lifetime), e.g. 30d.
    #[arg(long, value_parser = hours, conflicts_with_all = ["failure_rate", "weibull_shape"])]
    mttf: Option<f64>,
    /// Failures per hour of one member (exponential lifetime, λ).
    #[arg(long, conflicts_with = "weibull_shape")]
    failure_rate: Option<f64>,
    /// Weibull shape β (with --weibull-scale): below 1 infant mortality, above 1 wear-out.
    #[arg(long, requires = "weibull_scale")]
    weibull_shape: Option<f64>,
    /// Weibull scale η, the characteristic life (e.g. 60d).
    #[arg(long, value_parser = hours, requires = "weibull_shape")]
    weibull_scale: Option<f64>,
}

impl LifetimeArguments {
    fn lifetime(&self) -> anyhow::Result<Lifetime> {
        let lifetime = match (
            self.mttf,
            self.failure_rate,
            self.weibull_shape,
            self.weibull_scale,
        ) {
            (Some(mttf), None, None, None) => Lifetime::exponential_mttf(mttf)?,
            (None, Some(rate), None, None) => Lifetime::exponential_rate(rate)?,
            (None, None, Some(shape), Some(scale)) => Lifetime::weibull(shape, scale)?,
            _ => anyhow::bail!(
                "give one lifetime: --mttf, --failure-rate, or --weibull-shape with --weibull-scale"
            ),
        };
        Ok(lifetime)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    // Plain comments: clap would print doc comments as a long list under `--help`.
    // Human-readable table.
    Table,
    // One JSON document on standard output.
    Json,
}

fn hours(text: &str) -> Result<f64, String> {
    parse_hours(text).map_err(|error| error.to_string())
}

pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    match arguments.command {
        Command::Component {
            lifetime,
            mttr,
            mission_time,
            output,
        } => component(lifetime.lifetime()?, mttr, mission_time, output),
        Command::Quorum {
            members,
            lifetime,
            mttr,
            repair_crews,
            mission_time,
            monte_carlo_replications,
            monte_carlo_horizon,
            seed,
            plot,
            output,
        } => {
            let question = QuorumQuestion {
                members,
                lifetime: lifetime.lifetime()?,
                mean_time_to_repair_hours: mttr,
                repair_crews,
                mission_hours: mission_time,
                monte_carlo: (monte_carlo_replications > 0).then_some((
                    monte_carlo_replications,
                    monte_carlo_horizon.max(mission_time),
                    seed,
                )),
            };
            quorum(&question, plot.as_deref(), output)
        }
        Command::System { expression, output } => {
            let block = Block::parse(&expression)?;
            let probability = block.evaluate()?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "expression": expression,
                        "availability": probability.up,
                        "unavailability": probability.down,
                        "nines": -probability.down.log10(),
                        "downtime_hours_per_year": probability.down * keel_availability::HOURS_PER_YEAR,
                    })
                ),
                Output::Table => {
                    println!("availability            {:.9}", probability.up);
                    println!("unavailability          {:.3e}", probability.down);
                    println!("nines                   {:.2}", -probability.down.log10());
                    println!(
                        "downtime per year       {}",
                        format_hours(probability.down * keel_availability::HOURS_PER_YEAR)
                    );
                }
            }
            Ok(())
        }
    }
}

fn component(
    lifetime: Lifetime,
    mean_time_to_repair_hours: f64,
    mission_hours: f64,
    output: Output,
) -> anyhow::Result<()> {
    let mean_time_to_failure_hours = lifetime.mean_time_to_failure_hours();
    let availability = keel_availability::steady_state_availability(
        mean_time_to_failure_hours,
        mean_time_to_repair_hours,
    )?;
    let unavailability =
        mean_time_to_repair_hours / (mean_time_to_failure_hours + mean_time_to_repair_hours);
    let reliability = lifetime.reliability(mission_hours);
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "lifetime": lifetime,
                "mean_time_to_failure_hours": mean_time_to_failure_hours,
                "mean_time_to_repair_hours": mean_time_to_repair_hours,
                "availability": availability,
                "nines": -unavailability.log10(),
                "downtime_hours_per_year": unavailability * keel_availability::HOURS_PER_YEAR,
                "mission_hours": mission_hours,
                "reliability": reliability,
            })
        ),
        Output::Table => {
            println!(
                "mttf                    {}",
                format_hours(mean_time_to_failure_hours)
            );
            println!(
                "mttr                    {}",
                format_hours(mean_time_to_repair_hours)
            );
            println!("availability            {availability:.9}");
            println!("nines                   {:.2}", -unavailability.log10());
            println!(
                "downtime per year       {}",
                format_hours(unavailability * keel_availability::HOURS_PER_YEAR)
            );
            println!(
                "R({})            {reliability:.6}",
                format_hours(mission_hours)
            );
        }
    }
    Ok(())
}

fn quorum(
    question: &QuorumQuestion,
    plot: Option<&std::path::Path>,
    output: Output,
) -> anyhow::Result<()> {
    let analyses = analyse_quorums(question)?;
    if let Some(path) = plot {
        let title = format!(
            "keel availability: member MTTF {}, MTTR {}",
            format_hours(question.lifetime.mean_time_to_failure_hours()),
            format_hours(question.mean_time_to_repair_hours)
        );
        std::fs::write(path, keel_availability::plot::quorum_svg(&analyses, &title))
            .with_context(|| format!("cannot write the plot to {}", path.display()))?;
    }
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "question": question,
                "clusters": analyses,
            }))?
        );
        return Ok(());
    }
    let mission = format_hours(question.mission_hours);
    println!(
        "{:>7} {:>6} {:>9} {:>5} {:>14} {:>6} {:>12} {:>14} {:>13} {:>13}  monte carlo unavailability [95% CI]",
        "members",
        "quorum",
        "tolerates",
        "crews",
        "availability",
        "nines",
        "down/year",
        "mttf(quorum)",
        format!("R({mission})"),
        "R no repair",
    );
    for analysis in &analyses {
        let monte_carlo = match &analysis.monte_carlo {
            None => "-".to_owned(),
            Some(result) if result.quorum_losses == 0 => {
                "no quorum loss seen (rarer than the run shows)".to_owned()
            }
            Some(result) => format!(
                "{:.3e} [{:.3e}, {:.3e}] ({} quorum losses)",
                result.unavailability.value,
                result.unavailability.low,
                result.unavailability.high,
                result.quorum_losses
            ),
        };
        println!(
            "{:>7} {:>6} {:>9} {:>5} {:>14.10} {:>6.2} {:>12} {:>14} {:>13} {:>13.6}  {}",
            analysis.members,
            analysis.quorum,
            analysis.failures_tolerated,
            analysis.repair_crews,
            analysis.availability.up,
            analysis.nines,
            format_hours(analysis.downtime_hours_per_year),
            analysis
                .mean_time_to_quorum_loss_hours
                .map_or("-".to_owned(), format_hours),
            analysis
                .reliability_with_repair
                .map_or("-".to_owned(), |reliability| format!("{reliability:.6}")),
            analysis.reliability_without_repair,
            monte_carlo
        );
    }
    println!(
        "(model unavailability: {})",
        analyses
            .iter()
            .map(|analysis| format!(
                "{} members {:.3e}",
                analysis.members, analysis.availability.down
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
