//! `keel alloc status [ID]` and `keel alloc logs ID`: allocations through an
//! agent's HTTP API (`--agent-addr`, or KEEL_AGENT_ADDR), as `keel service`
//! does. An ID may be abbreviated to any unique prefix (as Nomad's).

use std::io::Write;

use keel_agent::api_client::{ApiClient, ApiError};
use serde_json::Value;

use crate::operations::print_table;

/// Most events of a task shown by `keel alloc status ID`.
const EVENTS_SHOWN_MAX: usize = 10;

/// `keel alloc`.
#[derive(Debug, clap::Args)]
pub struct AllocArguments {
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
    #[command(subcommand)]
    command: AllocCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AllocCommand {
    /// List allocations (id, job, group, index, node, desired, status,
    /// restarts, limits), or show one with its tasks and their events.
    Status {
        /// An allocation id (or a unique prefix of one).
        id: Option<String>,
        /// Only the allocations of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only the allocations on this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Print a task's stdout (or stderr), following it with -f.
    Logs {
        /// An allocation id (or a unique prefix of one).
        id: String,
        /// The task (needed when the group has several).
        #[arg(long)]
        task: Option<String>,
        /// Show stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing what the task writes.
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Unix milliseconds as the age they are now (`1h2m3s ago`), or `-`.
fn time(value: &Value) -> String {
    let Some(milliseconds) = value.as_u64() else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    age(now.saturating_sub(milliseconds) / 1000)
}

fn age(seconds: u64) -> String {
    let (hours, minutes, seconds) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s ago"),
        (0, _) => format!("{minutes}m{seconds}s ago"),
        _ => format!("{hours}h{minutes}m{seconds}s ago"),
    }
}

/// The full id of the allocation `id` names (itself or a unique prefix).
async fn resolve(client: &ApiClient, id: &str) -> anyhow::Result<String> {
    match client.get(&format!("/v1/allocation/{id}")).await {
        Ok(_) => return Ok(id.to_string()),
        Err(ApiError::Refused { status: 404, .. }) => {}
        Err(error) => return Err(error.into()),
    }
    let listing = client.get("/v1/allocations").await?;
    let matches: Vec<String> = listing
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry["id"].as_str())
        .filter(|candidate| candidate.starts_with(id))
        .map(str::to_string)
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!("no allocation with id {id:?} (or starting with it)"),
        several => anyhow::bail!(
            "{id:?} is the start of several allocation ids: {}",
            several.join(", ")
        ),
    }
}

/// Runs `keel alloc …`.
pub async fn run(arguments: AllocArguments) -> anyhow::Result<()> {
    let json_output = match arguments.output.as_str() {
        "json" => true,
        "table" => false,
        other => anyhow::bail!("-o: {other:?} is not table or json"),
    };
    let client = ApiClient::new(&arguments.agent_addr);
    match arguments.command {
        AllocCommand::Status {
            id: None,
            job,
            node,
        } => {
            let mut query = Vec::new();
            if let Some(job) = &job {
                query.push(format!("job={job}"));
            }
            if let Some(node) = &node {
                query.push(format!("node={node}"));
            }
            let path = if query.is_empty() {
                "/v1/allocations".to_string()
            } else {
                format!("/v1/allocations?{}", query.join("&"))
            };
            let listing = client.get(&path).await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&listing)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = listing
                .as_array()
                .into_iter()
                .flatten()
                .map(|entry| {
                    let desired = match &entry["desired_reason"] {
                        Value::Null => text(&entry["desired_status"]),
                        reason => format!("{} ({})", text(&entry["desired_status"]), text(reason)),
                    };
                    vec![
                        text(&entry["id"]),
                        text(&entry["job"]),
                        text(&entry["group"]),
                        text(&entry["index"]),
                        text(&entry["node"]),
                        desired,
                        text(&entry["client_status"]),
                        text(&entry["restarts"]),
                        text(&entry["resource_limits"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "JOB", "GROUP", "INDEX", "NODE", "DESIRED", "STATUS", "RESTARTS",
                    "LIMITS",
                ],
                &rows,
            );
        }
        AllocCommand::Status {
            id: Some(id),
            job: _,
            node: _,
        } => {
            let id = resolve(&client, &id).await?;
            let entry = client.get(&format!("/v1/allocation/{id}")).await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&entry)?);
                return Ok(());
            }
            print_allocation(&entry);
        }
        AllocCommand::Logs {
            id,
            task,
            stderr,
            follow,
        } => {
            let id = resolve(&client, &id).await?;
            let mut path = format!(
                "/v1/allocation/{id}/logs?type={}",
                if stderr { "stderr" } else { "stdout" }
            );
            if let Some(task) = &task {
                path.push_str(&format!("&task={task}"));
            }
            if follow {
                path.push_str("&follow=true");
            }
            let mut stdout = std::io::stdout().lock();
            client
                .get_streamed(&path, |bytes| {
                    stdout.write_all(bytes)?;
                    stdout.flush()
                })
                .await?;
        }
    }
    Ok(())
}

fn print_allocation(entry: &Value) {
    let allocation = &entry["allocation"];
    let status = &entry["status"];
    let client = &allocation["client"];
    let desired = match &entry["desired_reason"] {
        Value::Null => text(&entry["desired_status"]),
        reason => format!("{} ({})", text(&entry["desired_status"]), text(reason)),
    };
    let fields = [
        ("ID", text(&entry["id"])),
        (
            "Job",
            format!(
                "{} (version {})",
                text(&entry["job"]),
                text(&entry["job_version"])
            ),
        ),
        (
            "Group",
            format!("{}[{}]", text(&entry["group"]), text(&entry["index"])),
        ),
        ("Node", text(&entry["node"])),
        ("Desired", desired),
        ("Status", text(&client["status"])),
        ("Started", time(&client["started_at"])),
        ("Ready since", time(&client["ready_since"])),
        ("Finished", time(&client["finished_at"])),
        ("Placed because", text(&allocation["placement_reason"])),
        ("Ports", text(&allocation["ports"])),
        ("Limits", text(&status["resource_limits"])),
        ("Limits applied", text(&status["resource_limits_detail"])),
    ];
    for (name, value) in fields {
        println!("{:<16}{value}", format!("{name}:"));
    }
    let Some(tasks) = status["tasks"].as_object() else {
        println!("\n(no status reported yet)");
        return;
    };
    println!();
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|(name, task)| {
            vec![
                name.clone(),
                text(&task["state"]),
                text(&task["pid"]),
                text(&task["restarts"]),
                text(&task["last_exit_code"]),
                text(&task["last_signal"]),
                time(&task["started_at"]),
            ]
        })
        .collect();
    print_table(
        &[
            "TASK",
            "STATE",
            "PID",
            "RESTARTS",
            "EXIT CODE",
            "SIGNAL",
            "STARTED",
        ],
        &rows,
    );
    for (name, task) in tasks {
        let events = task["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            continue;
        }
        println!("\nRecent events of {name}:");
        let skip = events.len().saturating_sub(EVENTS_SHOWN_MAX);
        for event in &events[skip..] {
            println!("  {}  {}", time(&event["time"]), text(&event["message"]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_durations() {
        assert_eq!(age(5), "5s ago");
        assert_eq!(age(125), "2m5s ago");
        assert_eq!(age(3 * 3600 + 61), "3h1m1s ago");
        assert_eq!(time(&Value::Null), "-");
    }
}
