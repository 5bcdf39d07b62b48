//! `keel service …` and `keel node list`: the registry, through an agent's
//! HTTP API (`--agent-addr`, or KEEL_AGENT_ADDR; by default the local
//! agent's default address).

use std::path::PathBuf;

use anyhow::Context;
use keel_agent::api_client::ApiClient;
use serde_json::Value;

use crate::operations::print_table;

/// Where the agent's HTTP API is.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentAddress {
    /// The agent's HTTP address (host:port).
    #[arg(
        long,
        env = "KEEL_AGENT_ADDR",
        default_value = "127.0.0.1:8500",
        global = true
    )]
    agent_addr: String,
    /// Output format: table or json.
    #[arg(short = 'o', long, default_value = "table", global = true)]
    output: String,
}

impl AgentAddress {
    pub(crate) fn client(&self) -> ApiClient {
        ApiClient::new(&self.agent_addr)
    }

    pub(crate) fn json(&self) -> anyhow::Result<bool> {
        match self.output.as_str() {
            "json" => Ok(true),
            "table" => Ok(false),
            other => anyhow::bail!("-o: {other:?} is not table or json"),
        }
    }
}

/// `keel service`.
#[derive(Debug, clap::Args)]
pub struct ServiceArguments {
    #[command(flatten)]
    agent: AgentAddress,
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ServiceCommand {
    /// Register the service defined in FILE (TOML, or Consul's JSON if it ends in .json).
    Register { file: PathBuf },
    /// Deregister the instance with this id from the agent.
    Deregister { id: String },
    /// List services with their instance counts and tags.
    List,
    /// Show the instances of a service with their health.
    Health { name: String },
}

/// `keel node`.
#[derive(Debug, clap::Args)]
pub struct NodeArguments {
    #[command(flatten)]
    agent: AgentAddress,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Debug, clap::Subcommand)]
enum NodeCommand {
    /// List nodes: status (alive, suspect, down), phi, resources, labels, instances.
    List,
    /// Move every allocation off a node (migrate.max_parallel at a time) and
    /// mark it ineligible; --disable cancels the drain.
    Drain {
        name: String,
        #[arg(long)]
        disable: bool,
    },
    /// Allow (--enable) or forbid (--disable) new allocations on a node.
    Eligibility {
        name: String,
        #[arg(long, conflicts_with = "disable", required_unless_present = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
}

pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The status discovery uses for one health entry: the worst of the node's
/// check and the gating (readiness, startup) checks.
fn entry_status(entry: &Value) -> &'static str {
    let mut worst = 0;
    for check in entry["Checks"].as_array().into_iter().flatten() {
        if check["Kind"].as_str() == Some("liveness") {
            continue;
        }
        let rank = match check["Status"].as_str() {
            Some("passing") => 0,
            Some("warning") => 1,
            _ => 2,
        };
        worst = worst.max(rank);
    }
    ["passing", "warning", "critical"][worst]
}

/// Runs `keel service …`.
pub async fn run_service(arguments: ServiceArguments) -> anyhow::Result<()> {
    let json_output = arguments.agent.json()?;
    let client = arguments.agent.client();
    match arguments.command {
        ServiceCommand::Register { file } => {
            let content = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Validated here too, so a bad file is refused before anything is sent.
            let definition = if file
                .extension()
                .is_some_and(|extension| extension == "json")
            {
                keel_agent::definition::parse_json(content.as_bytes())
            } else {
                keel_agent::definition::parse_toml(&content)
            }
            .with_context(|| format!("{}", file.display()))?;
            client
                .put(
                    "/v1/agent/service/register",
                    Some(&definition.to_register_json()),
                )
                .await?;
            println!("registered {} (service {})", definition.id, definition.name);
        }
        ServiceCommand::Deregister { id } => {
            client
                .put(&format!("/v1/agent/service/deregister/{id}"), None)
                .await?;
            println!("deregistered {id}");
        }
        ServiceCommand::List => {
            let services = client.get("/v1/catalog/services").await?;
            let mut rows = Vec::new();
            let mut all = serde_json::Map::new();
            for (name, tags) in services.as_object().into_iter().flatten() {
                let entries = client.get(&format!("/v1/health/service/{name}")).await?;
                let entries = entries.as_array().cloned().unwrap_or_default();
                let passing = entries
                    .iter()
                    .filter(|entry| entry_status(entry) == "passing")
                    .count();
                let tags: Vec<String> = tags.as_array().into_iter().flatten().map(text).collect();
                rows.push(vec![
                    name.clone(),
                    entries.len().to_string(),
                    passing.to_string(),
                    tags.join(","),
                ]);
                all.insert(name.clone(), Value::Array(entries));
            }
            if json_output {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_table(&["SERVICE", "INSTANCES", "PASSING", "TAGS"], &rows);
            }
        }
        ServiceCommand::Health { name } => {
            let entries = client.get(&format!("/v1/health/service/{name}")).await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = entries
                .as_array()
                .into_iter()
                .flatten()
                .map(|entry| {
                    let service = &entry["Service"];
                    let address = match service["Address"].as_str() {
                        Some(address) if !address.is_empty() => address.to_string(),
                        _ => text(&entry["Node"]["Address"]),
                    };
                    let checks: Vec<String> = entry["Checks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|check| {
                            format!("{}={}", text(&check["CheckID"]), text(&check["Status"]))
                        })
                        .collect();
                    vec![
                        text(&entry["Node"]["Node"]),
                        text(&service["ID"]),
                        format!("{address}:{}", text(&service["Port"])),
                        entry_status(entry).to_string(),
                        checks.join(" "),
                    ]
                })
                .collect();
            print_table(&["NODE", "ID", "ADDRESS", "STATUS", "CHECKS"], &rows);
        }
    }
    Ok(())
}

fn bytes(value: &Value) -> String {
    let Some(bytes) = value.as_f64() else {
        return "-".into();
    };
    let gibibytes = bytes / (1u64 << 30) as f64;
    if gibibytes >= 1.0 {
        format!("{gibibytes:.1}G")
    } else {
        format!("{:.0}M", bytes / (1u64 << 20) as f64)
    }
}

/// Runs `keel node …`.
pub async fn run_node(arguments: NodeArguments) -> anyhow::Result<()> {
    let json_output = arguments.agent.json()?;
    let client = arguments.agent.client();
    match arguments.command {
        NodeCommand::Drain { name, disable } => {
            let body = serde_json::json!({ "enable": !disable });
            let answer = client
                .call(
                    keel_agent::api_client::Method::PUT,
                    &format!("/v1/node/{name}/drain"),
                    Some(&body),
                )
                .await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else if disable {
                println!("node {name}: drain cancelled (still ineligible; `keel node eligibility {name} --enable` to place on it again)");
            } else {
                println!("node {name}: draining (ineligible; its allocations move off)");
            }
        }
        NodeCommand::Eligibility {
            name,
            enable,
            disable: _,
        } => {
            let body = serde_json::json!({ "eligible": enable });
            let answer = client
                .call(
                    keel_agent::api_client::Method::PUT,
                    &format!("/v1/node/{name}/eligibility"),
                    Some(&body),
                )
                .await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!(
                    "node {name}: {}",
                    if enable { "eligible" } else { "ineligible" }
                );
            }
        }
        NodeCommand::List => {
            let nodes = client.get("/v1/keel/nodes").await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = nodes
                .as_array()
                .into_iter()
                .flatten()
                .map(|node| {
                    let usage = &node["Usage"];
                    let phi = node["Phi"]
                        .as_f64()
                        .map_or("-".to_string(), |phi| format!("{phi:.2}"));
                    let cpu = match usage["cpu_percent"].as_f64() {
                        Some(percent) => format!("{} ({percent:.0}%)", text(&node["CpuCores"])),
                        None => text(&node["CpuCores"]),
                    };
                    let memory = format!(
                        "{}/{}",
                        bytes(&usage["memory_used_bytes"]),
                        bytes(&node["MemoryTotalBytes"])
                    );
                    let disk = format!(
                        "{} free/{}",
                        bytes(&usage["disk_free_bytes"]),
                        bytes(&node["DiskTotalBytes"])
                    );
                    let labels: Vec<String> = node["Labels"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(key, value)| format!("{key}={}", text(value)))
                        .collect();
                    vec![
                        text(&node["Node"]),
                        text(&node["Address"]),
                        text(&node["Status"]),
                        phi,
                        cpu,
                        memory,
                        disk,
                        if labels.is_empty() {
                            "-".into()
                        } else {
                            labels.join(",")
                        },
                        text(&node["Instances"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "ADDRESS",
                    "STATUS",
                    "PHI",
                    "CPU",
                    "MEMORY",
                    "DISK",
                    "LABELS",
                    "INSTANCES",
                ],
                &rows,
            );
        }
    }
    Ok(())
}
