//! `keel chaos`: inject faults into running members (`inject`, `heal`, `list`) through
//! their fault-injection admin service (`keelchaospb.Chaos` on the client port, served
//! when a member runs with `--experimental-enable-fault-injection`, to loopback callers
//! only), and run scenario files (`run`, in `chaos/`).
//!
//! Targets are member names (found in the membership list of whichever `--endpoints`
//! member answers), node names (their agents, started with `--enable-chaos`: kill and
//! pause only) or allocations (`<id>` or `<id>/<task>`: their tasks' process groups,
//! through the agent of their node). The command talks to each target directly; the
//! fault is carried out by the target itself and heals by itself after `--for`, even if
//! this command is gone: a killed member or agent restarts itself after `--for` (a
//! helper it starts before the SIGKILL runs it again with the same arguments), a killed
//! task is restarted by its supervisor. Faults on members are recorded in the events log here
//! (members have no recorder); agents record their own. Callers outside the targets'
//! loopback interface present a token (`--token-file`).

use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use keel_agent::api_client::{ApiClient, ApiError};
use keel_agent::events;
use keel_server::api::etcdserverpb::cluster_client::ClusterClient;
use keel_server::api::keelchaospb::chaos_client::ChaosClient;
use keel_types::etcdserverpb::{Member, MemberListRequest};
use keel_types::keelchaospb::{
    disk_fault, fault, process_fault, ClockRate, DelayMessages, DiskFault, DropMessages, Fault,
    HealRequest, InjectRequest, ListRequest, Partition, ProcessFault,
};
use tonic::transport::Channel;

mod nodes;
mod report;
mod run;
mod scenario;

/// Where nodes are registered (their agents' HTTP addresses).
const NODES_PREFIX: &str = "/keel/nodes/";
/// Where allocations are placed, by node: `/keel/allocs/<node>/<id>`.
const ALLOCATIONS_PREFIX: &str = "/keel/allocs/";
/// The events log's source for faults injected into members.
const EVENT_SOURCE: &str = "keel-chaos";

/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Arguments {
    #[command(subcommand)]
    command: Command,
    /// Comma-separated client endpoints used to find the members by name.
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// A file holding the token that members
    /// (--experimental-fault-injection-token-file) and agents (--chaos-token-file)
    /// ask of callers outside their loopback interface.
    #[arg(
        long,
        global = true,
        env = "KEEL_CHAOS_TOKEN_FILE",
        value_name = "FILE"
    )]
    token_file: Option<std::path::PathBuf>,
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
    /// Start a fault on the target members, nodes or tasks for a while.
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
    /// starts its own members, and agents and their job when it has [agents]
    /// (--endpoints is not used).
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
    // SIGKILL the targets; members and agents restart after --for (same arguments, data
    // and log), tasks by their supervisor's restart block.
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
    /// kill is SIGKILL and restart: a member or agent runs again after --for with the
    /// same arguments, data and log; a task is restarted by its supervisor.
    #[arg(value_enum)]
    kind: Kind,
    /// Comma-separated targets: member names, node names (their agents, started with
    /// --enable-chaos), or allocations (`<id>` or `<id>/<task>`: their tasks).
    #[arg(long, value_delimiter = ',', required = true)]
    target: Vec<String>,
    /// How long the fault lasts (e.g. 10s); the target heals it by itself afterwards: a
    /// killed member or agent is restarted by a helper it started before the kill.
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

/// Shortest token accepted: a short one could be guessed.
const TOKEN_CHARACTERS_MIN: usize = 16;

/// Reads a fault-injection token from its file (surrounding whitespace ignored).
pub(crate) fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?
        .trim()
        .to_owned();
    if token.chars().count() < TOKEN_CHARACTERS_MIN
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        anyhow::bail!(
            "the token in {} must be at least {TOKEN_CHARACTERS_MIN} characters, \
             without spaces",
            path.display()
        );
    }
    Ok(token)
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
    let token = arguments
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let admin = Admin::connect(&arguments.endpoints, token).await?;
    match arguments.command {
        Command::Run(_) => unreachable!("handled above"),
        Command::Inject(inject) => {
            let results = admin.inject(&inject).await?;
            print_injected(arguments.output, &results);
        }
        Command::Heal { target, fault_id } => {
            let mut rows = Vec::new();
            for target in admin.resolve(&target, true).await? {
                let healed = admin.heal(&target, fault_id.unwrap_or(0)).await?;
                rows.push((target.name().to_owned(), healed));
            }
            match arguments.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!(rows
                        .iter()
                        .map(|(name, healed)| serde_json::json!({"target": name, "healed": healed}))
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
            let mut rows = Vec::new();
            for target in admin.resolve(&target, true).await? {
                rows.extend(admin.list(&target).await?);
            }
            match arguments.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string(&rows).expect("plain data serialises")
                ),
                Output::Table => {
                    println!(
                        "{:<12} {:>8} {:>10}  fault",
                        "target", "fault id", "remaining"
                    );
                    for row in rows {
                        println!(
                            "{:<12} {:>8} {:>9.1}s  {}",
                            row.target,
                            row.fault_id,
                            row.remaining_milliseconds as f64 / 1_000.0,
                            row.fault
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// One injected fault, as reported back.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Injected {
    /// The member, node or allocation (task) named in --target.
    pub target: String,
    /// The member's id (hex) or the node that carried the fault out.
    pub carried_out_by: String,
    pub fault_id: u64,
}

/// One active fault, as `list` reports it.
#[derive(Debug, Clone, serde::Serialize)]
struct ActiveRow {
    target: String,
    fault_id: u64,
    remaining_milliseconds: u64,
    fault: String,
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
                    result.target, result.carried_out_by, result.fault_id
                );
            }
        }
    }
}

/// What a `--target` name resolved to.
enum Target {
    /// A member: its own fault-injection service carries the fault out.
    Member(Member),
    /// A node's agent (`keel agent --enable-chaos`).
    Agent { node: String, agent: String },
    /// Tasks of an allocation, through the agent of its node.
    Tasks {
        name: String,
        node: String,
        agent: String,
    },
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Member(member) => &member.name,
            Target::Agent { node, .. } => node,
            Target::Tasks { name, .. } => name,
        }
    }
}

/// The members, the store and the token: what every subcommand but `run` uses.
struct Admin {
    members: Vec<Member>,
    store: keel_client::Client,
    token: Option<String>,
}

impl Admin {
    async fn connect(endpoints: &str, token: Option<String>) -> anyhow::Result<Admin> {
        Ok(Admin {
            members: list_members(endpoints).await?,
            store: crate::kv::client(endpoints).await?,
            token,
        })
    }

    /// Resolves names: members first, then nodes (their agents), then
    /// allocations (`<id>` or `<id>/<task>`). No names: every member when
    /// `all_by_default`, and every node whose agent has fault injection on.
    async fn resolve(&self, names: &[String], all_by_default: bool) -> anyhow::Result<Vec<Target>> {
        if names.is_empty() && all_by_default {
            let mut targets: Vec<Target> =
                self.members.iter().cloned().map(Target::Member).collect();
            for (node, agent) in self.nodes().await? {
                targets.push(Target::Agent { node, agent });
            }
            return Ok(targets);
        }
        let nodes = self.nodes().await?;
        let mut targets = Vec::new();
        for name in names {
            if let Some(member) = self.members.iter().find(|member| &member.name == name) {
                targets.push(Target::Member(member.clone()));
            } else if let Some((node, agent)) = nodes.iter().find(|(node, _)| node == name) {
                targets.push(Target::Agent {
                    node: node.clone(),
                    agent: agent.clone(),
                });
            } else if let Some(node) = self.allocation_node(name).await? {
                let agent = nodes
                    .iter()
                    .find(|(candidate, _)| *candidate == node)
                    .map(|(_, agent)| agent.clone())
                    .ok_or_else(|| {
                        anyhow::anyhow!("allocation {name} runs on node {node}, which is down")
                    })?;
                targets.push(Target::Tasks {
                    name: name.clone(),
                    node,
                    agent,
                });
            } else {
                anyhow::bail!(
                    "no member, node or allocation is named {name:?}; the members are {}; \
                     the nodes are {}",
                    self.members
                        .iter()
                        .map(|member| member.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if nodes.is_empty() {
                        "(none registered)".to_owned()
                    } else {
                        nodes
                            .iter()
                            .map(|(node, _)| node.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                );
            }
        }
        Ok(targets)
    }

    /// Every registered node with its agent's HTTP address.
    async fn nodes(&self) -> anyhow::Result<Vec<(String, String)>> {
        let listing = self
            .store
            .get_prefix(NODES_PREFIX)
            .await
            .map_err(crate::kv::client_error)?;
        Ok(listing
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).ok())
            .filter_map(|node| {
                Some((
                    node.get("name")?.as_str()?.to_owned(),
                    node.get("http_address")?.as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    /// The node of the allocation named `<id>` or `<id>/<task>`, if it exists.
    async fn allocation_node(&self, name: &str) -> anyhow::Result<Option<String>> {
        let allocation = name.split('/').next().unwrap_or(name);
        let listing = self
            .store
            .range(keel_types::etcdserverpb::RangeRequest {
                key: ALLOCATIONS_PREFIX.into(),
                range_end: crate::kv::prefix_end(ALLOCATIONS_PREFIX.as_bytes()),
                keys_only: true,
                ..Default::default()
            })
            .await
            .map_err(crate::kv::client_error)?;
        Ok(listing.kvs.iter().find_map(|kv| {
            let key = String::from_utf8_lossy(&kv.key);
            let (node, id) = key.strip_prefix(ALLOCATIONS_PREFIX)?.split_once('/')?;
            (id == allocation).then(|| node.to_owned())
        }))
    }

    fn agent(&self, address: &str) -> ApiClient {
        ApiClient::new(address).with_bearer_token(self.token.clone())
    }

    async fn inject(&self, arguments: &InjectArguments) -> anyhow::Result<Vec<Injected>> {
        let targets = self.resolve(&arguments.target, false).await?;
        let member_targets: Vec<&Member> = targets
            .iter()
            .filter_map(|target| match target {
                Target::Member(member) => Some(member),
                _ => None,
            })
            .collect();
        let process_fault = matches!(arguments.kind, Kind::Kill | Kind::Pause);
        if !process_fault && member_targets.len() != targets.len() {
            anyhow::bail!(
                "only kill and pause apply to agents and tasks; {} is a member fault",
                arguments
                    .kind
                    .to_possible_value()
                    .map(|value| value.get_name().to_owned())
                    .unwrap_or_default()
            );
        }
        let fault = if member_targets.is_empty() {
            None
        } else {
            Some(build_fault(&self.members, &member_targets, arguments)?)
        };
        let mut results = Vec::new();
        for target in &targets {
            let result = match target {
                Target::Member(member) => {
                    let fault = fault.clone().expect("built for member targets");
                    let injected =
                        inject_one(member, fault, arguments.for_duration, self.token.as_deref())
                            .await?;
                    self.record_member_fault(&injected, arguments).await;
                    injected
                }
                Target::Agent { agent, node } | Target::Tasks { agent, node, .. } => {
                    let target_on_agent = match target {
                        Target::Tasks { name, .. } => name.clone(),
                        _ => "agent".to_owned(),
                    };
                    let answer = self
                        .agent(agent)
                        .post(
                            "/v1/chaos/inject",
                            &serde_json::json!({
                                "kind": if arguments.kind == Kind::Kill { "kill" } else { "pause" },
                                "target": target_on_agent,
                                "duration_milliseconds": arguments.for_duration.as_millis() as u64,
                            }),
                        )
                        .await
                        .with_context(|| {
                            format!("injecting into {} (node {node})", target.name())
                        })?;
                    Injected {
                        target: target.name().to_owned(),
                        carried_out_by: node.clone(),
                        fault_id: answer["fault_id"].as_u64().unwrap_or_default(),
                    }
                }
            };
            results.push(result);
        }
        Ok(results)
    }

    /// Members have no events recorder of their own: the injector records
    /// the fault, with when it will heal by itself.
    async fn record_member_fault(&self, injected: &Injected, arguments: &InjectArguments) {
        let expires = events::now_unix_ms() + arguments.for_duration.as_millis() as u64;
        let event = events::Event::now(
            EVENT_SOURCE,
            events::EventType::FaultInjected,
            &injected.target,
            format!(
                "{} on member {} for {:.1} s",
                arguments
                    .kind
                    .to_possible_value()
                    .map(|value| value.get_name().to_owned())
                    .unwrap_or_default(),
                injected.target,
                arguments.for_duration.as_secs_f64()
            ),
            [
                ("fault_id".to_owned(), injected.fault_id.to_string()),
                ("member_id".to_owned(), injected.carried_out_by.clone()),
                ("expires_unix_ms".to_owned(), expires.to_string()),
            ],
        );
        if let Err(error) = events::write(&self.store, &event).await {
            eprintln!("warning: the fault is injected but not in the events log: {error}");
        }
    }

    async fn heal(&self, target: &Target, fault_id: u64) -> anyhow::Result<u64> {
        match target {
            Target::Member(member) => {
                let mut client = chaos_client(member).await?;
                let healed = request(
                    client.heal(authorized(HealRequest { fault_id }, self.token.as_deref())),
                )
                .await
                .with_context(|| format!("healing {}", member.name))?
                .healed;
                if healed > 0 {
                    let event = events::Event::now(
                        EVENT_SOURCE,
                        events::EventType::FaultHealed,
                        &member.name,
                        format!("{healed} fault(s) on member {} healed", member.name),
                        [("fault_id".to_owned(), fault_id.to_string())],
                    );
                    if let Err(error) = events::write(&self.store, &event).await {
                        eprintln!("warning: healed, but not in the events log: {error}");
                    }
                }
                Ok(u64::from(healed))
            }
            Target::Agent { agent, node } | Target::Tasks { agent, node, .. } => {
                match self
                    .agent(agent)
                    .post(
                        "/v1/chaos/heal",
                        &serde_json::json!({ "fault_id": fault_id }),
                    )
                    .await
                {
                    Ok(answer) => Ok(answer["healed"].as_u64().unwrap_or_default()),
                    Err(error) if agent_has_chaos_off(&error) => Ok(0),
                    Err(error) => Err(error).with_context(|| format!("healing node {node}")),
                }
            }
        }
    }

    async fn list(&self, target: &Target) -> anyhow::Result<Vec<ActiveRow>> {
        match target {
            Target::Member(member) => {
                let mut client = chaos_client(member).await?;
                let list = request(client.list(authorized(ListRequest {}, self.token.as_deref())))
                    .await
                    .with_context(|| format!("listing the faults of {}", member.name))?;
                Ok(list
                    .faults
                    .iter()
                    .map(|active| ActiveRow {
                        target: member.name.clone(),
                        fault_id: active.fault_id,
                        remaining_milliseconds: active.remaining_milliseconds,
                        fault: active.description.clone(),
                    })
                    .collect())
            }
            Target::Agent { agent, node } | Target::Tasks { agent, node, .. } => {
                let answer = match self.agent(agent).get("/v1/chaos").await {
                    Ok(answer) => answer,
                    Err(error) if agent_has_chaos_off(&error) => return Ok(Vec::new()),
                    Err(error) => {
                        return Err(error).with_context(|| format!("listing the faults of {node}"))
                    }
                };
                Ok(answer
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|active| ActiveRow {
                        target: node.clone(),
                        fault_id: active["fault_id"].as_u64().unwrap_or_default(),
                        remaining_milliseconds: active["remaining_milliseconds"]
                            .as_u64()
                            .unwrap_or_default(),
                        fault: active["description"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    })
                    .collect())
            }
        }
    }
}

/// Agents without --enable-chaos are left out of "every target".
fn agent_has_chaos_off(error: &ApiError) -> bool {
    matches!(error, ApiError::Refused { status: 403, message } if message.contains("--enable-chaos"))
}

/// A request carrying the fault-injection token, when there is one.
fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        match format!("Bearer {token}").parse() {
            Ok(value) => {
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => unreachable!("tokens are checked to be printable when read"),
        }
    }
    request
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

/// Builds the member fault for the targets (the peers default to every other member).
fn build_fault(
    members: &[Member],
    targets: &[&Member],
    arguments: &InjectArguments,
) -> anyhow::Result<Fault> {
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
    Ok(Fault { kind: Some(fault) })
}

/// Injects one fault into one member.
pub(crate) async fn inject_one(
    target: &Member,
    fault: Fault,
    for_duration: Duration,
    token: Option<&str>,
) -> anyhow::Result<Injected> {
    let mut client = chaos_client(target).await?;
    let response = request(client.inject(authorized(
        InjectRequest {
            fault: Some(fault),
            duration_milliseconds: for_duration.as_millis() as u64,
        },
        token,
    )))
    .await
    .with_context(|| format!("injecting into {}", target.name))?;
    Ok(Injected {
        target: target.name.clone(),
        carried_out_by: format!("{:x}", response.member_id),
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
