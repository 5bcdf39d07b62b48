//! `keel chaos`: inject faults into running members (`inject`, `heal`, `list`) through
//! their fault-injection admin service (`keelchaospb.Chaos` on the client port, served
//! when a member runs with `--experimental-enable-fault-injection`, to loopback callers
//! only), and run scenario files (`run`, in `chaos/`).
//!
//! Targets are member names; the command finds their ids and client URLs in the
//! membership list of whichever `--endpoints` member answers, then talks to each target
//! directly. A fault is carried out by the target member itself and heals by itself
//! after `--for`, even if this command is gone.

use std::time::Duration;

use anyhow::Context;
use keel_server::api::etcdserverpb::cluster_client::ClusterClient;
use keel_server::api::keelchaospb::chaos_client::ChaosClient;
use keel_types::etcdserverpb::{Member, MemberListRequest};
use keel_types::keelchaospb::{
    disk_fault, fault, process_fault, ClockRate, DelayMessages, DiskFault, DropMessages, Fault,
    HealRequest, InjectRequest, ListRequest, Partition, ProcessFault,
};
use tonic::transport::Channel;

mod report;
mod run;
mod scenario;

/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Arguments {
    #[command(subcommand)]
    command: Command,
    /// Comma-separated client endpoints used to find the members by name.
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    // Plain comments: clap would print doc comments under `--help` as a long list.
    // Human-readable table.
    Table,
    // One JSON document on standard output.
    Json,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Start a fault on the target members for a while.
    Inject(InjectArguments),
    /// End faults early (all faults on every member by default).
    Heal {
        /// Members to heal (default: every member).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
        /// Heal only this fault id (as printed by inject or list).
        #[arg(long)]
        fault_id: Option<u64>,
    },
    /// Run a scenario file: a cluster, a workload, a fault schedule and a hypothesis;
    /// starts its own members (--endpoints is not used).
    Run(run::RunArguments),
    /// The faults active on each member.
    List {
        /// Members to ask (default: every member).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
    },
}

/// The kinds of fault, as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    // Cut the targets off from the other members (or --peers), --direction both by default.
    Partition,
    // Lose --fraction of the messages the targets send.
    Drop,
    // Hold back messages the targets send by --delay plus up to --jitter.
    Delay,
    // Run the targets' tick clock at --rate times real time.
    Clock,
    // Make the targets' fsyncs fail: they stop, as the storage invariant requires.
    FsyncError,
    // Slow the targets' fsyncs by --fsync-delay.
    SlowFsync,
    // Make the targets' disk writes fail.
    WriteError,
    // SIGKILL the targets.
    Kill,
    // SIGSTOP the targets, and SIGCONT them after --for.
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PartitionDirection {
    // Both ways.
    Both,
    // Only what the targets send.
    Outgoing,
    // Only what the targets receive.
    Incoming,
}

#[derive(Debug, clap::Args)]
struct InjectArguments {
    /// partition, drop, delay, clock, fsync-error, slow-fsync, write-error, kill or pause.
    #[arg(value_enum)]
    kind: Kind,
    /// Comma-separated member names to inject into.
    #[arg(long, value_delimiter = ',', required = true)]
    target: Vec<String>,
    /// How long the fault lasts (e.g. 10s); the member heals it by itself afterwards.
    #[arg(long = "for", value_parser = duration)]
    for_duration: Duration,
    /// Peers the fault applies to (partition: the other side; drop/delay: whom to
    /// send to). Default: every member that is not a target.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Which way a partition cuts.
    #[arg(long, value_enum, default_value = "both")]
    direction: PartitionDirection,
    /// Fraction of messages to drop, in (0, 1].
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// Delay of each message.
    #[arg(long, value_parser = duration, default_value = "100ms")]
    delay: Duration,
    /// Up to this much more delay, uniformly at random.
    #[arg(long, value_parser = duration, default_value = "0ms")]
    jitter: Duration,
    /// Tick clock rate: 2 runs twice as fast, 0.25 four times as slow.
    #[arg(long, default_value_t = 0.5)]
    rate: f64,
    /// Extra time per fsync for slow-fsync.
    #[arg(long, value_parser = duration, default_value = "200ms")]
    fsync_delay: Duration,
}

/// Parses `10s`, `500ms`, `2m`, `1.5s` (units as everywhere in keel).
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0ms" || text.trim() == "0s" {
        return Ok(Duration::ZERO);
    }
    keel_availability::duration::parse_hours(text)
        .map(|hours| Duration::from_secs_f64(hours * 3_600.0))
        .map_err(|error| error.to_string())
}

pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    if let Command::Run(run_arguments) = arguments.command {
        return run::run(run_arguments, arguments.output == Output::Json).await;
    }
    let members = list_members(&arguments.endpoints).await?;
    match arguments.command {
        Command::Run(_) => unreachable!("handled above"),
        Command::Inject(inject) => {
            let results = inject_faults(&members, &inject).await?;
            print_injected(arguments.output, &results);
        }
        Command::Heal { target, fault_id } => {
            let targets = resolve(&members, &target, true)?;
            let mut rows = Vec::new();
            for member in targets {
                let mut client = chaos_client(member).await?;
                let healed = request(client.heal(HealRequest {
                    fault_id: fault_id.unwrap_or(0),
                }))
                .await
                .with_context(|| format!("healing {}", member.name))?;
                rows.push((member.name.clone(), healed.healed));
            }
            match arguments.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!(rows
                        .iter()
                        .map(|(name, healed)| serde_json::json!({"member": name, "healed": healed}))
                        .collect::<Vec<_>>())
                ),
                Output::Table => {
                    for (name, healed) in rows {
                        println!("{name}: {healed} fault(s) healed");
                    }
                }
            }
        }
        Command::List { target } => {
            let targets = resolve(&members, &target, true)?;
            let mut documents = Vec::new();
            if arguments.output == Output::Table {
                println!(
                    "{:<12} {:>8} {:>10}  fault",
                    "member", "fault id", "remaining"
                );
            }
            for member in targets {
                let mut client = chaos_client(member).await?;
                let list = request(client.list(ListRequest {}))
                    .await
                    .with_context(|| format!("listing the faults of {}", member.name))?;
                for active in &list.faults {
                    if arguments.output == Output::Table {
                        println!(
                            "{:<12} {:>8} {:>9.1}s  {}",
                            member.name,
                            active.fault_id,
                            active.remaining_milliseconds as f64 / 1_000.0,
                            active.description
                        );
                    }
                    documents.push(serde_json::json!({
                        "member": member.name,
                        "member_id": format!("{:x}", list.member_id),
                        "fault_id": active.fault_id,
                        "remaining_milliseconds": active.remaining_milliseconds,
                        "fault": active.description,
                    }));
                }
            }
            if arguments.output == Output::Json {
                println!("{}", serde_json::Value::Array(documents));
            }
        }
    }
    Ok(())
}

/// One injected fault, as reported back.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Injected {
    pub member: String,
    pub member_id: String,
    pub fault_id: u64,
}

fn print_injected(output: Output, results: &[Injected]) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string(results).expect("plain data serialises")
        ),
        Output::Table => {
            for result in results {
                println!(
                    "{} ({}): fault {} injected",
                    result.member, result.member_id, result.fault_id
                );
            }
        }
    }
}

/// The cluster's members, from the first endpoint that answers.
pub(crate) async fn list_members(endpoints: &str) -> anyhow::Result<Vec<Member>> {
    let channel = crate::kv::connect(endpoints).await?;
    let response = request(ClusterClient::new(channel).member_list(MemberListRequest::default()))
        .await
        .context("listing the members")?;
    Ok(response.members)
}

/// The members named, or every member when `names` is empty and `all_by_default`.
fn resolve<'a>(
    members: &'a [Member],
    names: &[String],
    all_by_default: bool,
) -> anyhow::Result<Vec<&'a Member>> {
    if names.is_empty() && all_by_default {
        return Ok(members.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            members
                .iter()
                .find(|member| &member.name == name)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no member is named {name:?}; the members are {}",
                        members
                            .iter()
                            .map(|member| member.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        })
        .collect()
}

/// Builds the fault and injects it into every target.
async fn inject_faults(
    members: &[Member],
    arguments: &InjectArguments,
) -> anyhow::Result<Vec<Injected>> {
    let targets = resolve(members, &arguments.target, false)?;
    let peer_ids: Vec<u64> = if arguments.peers.is_empty() {
        members
            .iter()
            .filter(|member| !targets.iter().any(|target| target.id == member.id))
            .map(|member| member.id)
            .collect()
    } else {
        resolve(members, &arguments.peers, false)?
            .iter()
            .map(|member| member.id)
            .collect()
    };
    let fault = match arguments.kind {
        Kind::Partition => {
            if peer_ids.is_empty() {
                anyhow::bail!(
                    "a partition needs members on the other side: the targets are every member"
                );
            }
            fault::Kind::Partition(Partition {
                peer_ids,
                outgoing: arguments.direction != PartitionDirection::Incoming,
                incoming: arguments.direction != PartitionDirection::Outgoing,
            })
        }
        Kind::Drop => fault::Kind::DropMessages(DropMessages {
            peer_ids,
            fraction: arguments.fraction,
        }),
        Kind::Delay => fault::Kind::DelayMessages(DelayMessages {
            peer_ids,
            delay_milliseconds: arguments.delay.as_millis() as u64,
            jitter_milliseconds: arguments.jitter.as_millis() as u64,
        }),
        Kind::Clock => fault::Kind::ClockRate(ClockRate {
            rate: arguments.rate,
        }),
        Kind::FsyncError | Kind::SlowFsync | Kind::WriteError => {
            let kind = match arguments.kind {
                Kind::FsyncError => disk_fault::Kind::FsyncError,
                Kind::SlowFsync => disk_fault::Kind::SlowFsync,
                _ => disk_fault::Kind::WriteError,
            };
            fault::Kind::Disk(DiskFault {
                kind: kind as i32,
                delay_milliseconds: arguments.fsync_delay.as_millis() as u64,
            })
        }
        Kind::Kill | Kind::Pause => fault::Kind::Process(ProcessFault {
            kind: if arguments.kind == Kind::Kill {
                process_fault::Kind::Kill
            } else {
                process_fault::Kind::Pause
            } as i32,
        }),
    };
    let fault = Fault { kind: Some(fault) };
    let mut results = Vec::new();
    for target in targets {
        results.push(inject_one(target, fault.clone(), arguments.for_duration).await?);
    }
    Ok(results)
}

/// Injects one fault into one member.
pub(crate) async fn inject_one(
    target: &Member,
    fault: Fault,
    for_duration: Duration,
) -> anyhow::Result<Injected> {
    let mut client = chaos_client(target).await?;
    let response = request(client.inject(InjectRequest {
        fault: Some(fault),
        duration_milliseconds: for_duration.as_millis() as u64,
    }))
    .await
    .with_context(|| format!("injecting into {}", target.name))?;
    Ok(Injected {
        member: target.name.clone(),
        member_id: format!("{:x}", response.member_id),
        fault_id: response.fault_id,
    })
}

/// A Chaos client connected to the member's first client URL.
pub(crate) async fn chaos_client(member: &Member) -> anyhow::Result<ChaosClient<Channel>> {
    let url = member
        .client_ur_ls
        .first()
        .ok_or_else(|| anyhow::anyhow!("member {} has published no client URL yet", member.name))?;
    let channel = Channel::from_shared(url.clone())
        .with_context(|| format!("{url:?} is not a URL"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connecting to {} at {url}", member.name))?;
    Ok(ChaosClient::new(channel))
}

async fn request<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow::anyhow!("{}", status.message())),
        Err(_) => anyhow::bail!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
    }
}
