//! `keel job run|plan|status|stop|history`: jobs through an agent's HTTP
//! API (`--agent-addr`, or KEEL_AGENT_ADDR), as `keel service` does. The
//! job file is TOML (Nomad's vocabulary); it is validated here first, so a
//! bad file is refused, naming the field, before anything is sent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_agent::api_client::{ApiClient, Method};
use keel_scheduler::Job;
use serde_json::Value;

use crate::operations::print_table;
use crate::registry_command::{text, AgentAddress};

/// How long `keel job run` waits for the controller to place the version.
const PLACEMENT_WAIT: Duration = Duration::from_secs(15);
/// How often it looks.
const PLACEMENT_POLL: Duration = Duration::from_millis(250);

/// `keel job`.
#[derive(Debug, clap::Args)]
pub struct JobArguments {
    #[command(flatten)]
    agent: AgentAddress,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Debug, clap::Subcommand)]
enum JobCommand {
    /// Register the job in FILE (TOML) as its next version and show what the
    /// controller placed.
    Run {
        file: PathBuf,
        /// Return once registered, without waiting for the placements.
        #[arg(long)]
        detach: bool,
    },
    /// Show what running the job in FILE would place and stop; nothing is written.
    Plan { file: PathBuf },
    /// List jobs, or show one job's allocations (status, node, restarts,
    /// reschedule delays).
    Status { name: Option<String> },
    /// Stop a job: every allocation stops (the job and its history stay).
    Stop { name: String },
    /// Show a job's versions and the events about it.
    History { name: String },
}

fn read_job(file: &Path) -> anyhow::Result<Job> {
    let content =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Job::from_toml_validated(&content).with_context(|| format!("{}", file.display()))
}

fn json_of(job: &Job) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&job.to_json())?)
}

fn short(id: &Value) -> String {
    text(id).chars().take(8).collect()
}

/// Milliseconds from now until `at` (Unix milliseconds), as text.
fn relative(at: &Value) -> String {
    let Some(at) = at.as_u64() else {
        return "-".into();
    };
    let now = keel_agent::events::now_unix_ms();
    if at >= now {
        format!("in {:.1}s", (at - now) as f64 / 1000.0)
    } else {
        format!("{:.1}s ago", (now - at) as f64 / 1000.0)
    }
}

/// Prints a plan the way `keel job plan` and `keel job run` show it.
fn print_plan(evaluation: &Value) {
    let plan = &evaluation["plan"];
    for placement in plan["placements"].as_array().into_iter().flatten() {
        println!(
            "+ place {}.{}[{}] on {} ({}, version {})",
            text(&placement["job"]),
            text(&placement["group"]),
            text(&placement["index"]),
            text(&placement["node"]),
            text(&placement["placement_reason"]),
            text(&placement["job_version"]),
        );
    }
    for update in plan["in_place_updates"].as_array().into_iter().flatten() {
        println!(
            "~ update {} on {} in place to version {}",
            short(&update["allocation"]),
            text(&update["node"]),
            text(&update["job_version"]),
        );
    }
    for stop in plan["stops"].as_array().into_iter().flatten() {
        println!(
            "- stop {} ({}) on {}: {}",
            short(&stop["allocation"]),
            text(&stop["group"]),
            text(&stop["node"]),
            text(&stop["reason"]),
        );
    }
    for failed in plan["failed_placements"].as_array().into_iter().flatten() {
        println!(
            "! cannot place {}[{}]: {}",
            text(&failed["group"]),
            text(&failed["index"]),
            failed["failure"],
        );
    }
    let summary = &evaluation["summary"];
    println!(
        "{} to place, {} to stop, {} to update in place, {} unplaceable",
        text(&summary["placements"]),
        text(&summary["stops"]),
        text(&summary["in_place_updates"]),
        text(&summary["failed_placements"]),
    );
}

/// Runs `keel job …`.
pub async fn run(arguments: JobArguments) -> anyhow::Result<()> {
    let json_output = arguments.agent.json()?;
    let client = arguments.agent.client();
    match arguments.command {
        JobCommand::Plan { file } => {
            let job = read_job(&file)?;
            let answer = client
                .call(Method::POST, "/v1/jobs/plan", Some(&json_of(&job)?))
                .await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!("job {} (dry run: nothing is written)", job.name);
                print_plan(&answer);
            }
        }
        JobCommand::Run { file, detach } => {
            let job = read_job(&file)?;
            let answer = client
                .call(Method::PUT, "/v1/jobs", Some(&json_of(&job)?))
                .await?;
            let version = answer["version"].as_u64().unwrap_or_default();
            if json_output && detach {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            if !json_output {
                if answer["changed"].as_bool() == Some(true) {
                    println!("job {} registered as version {version}", job.name);
                } else {
                    println!("job {} unchanged (version {version})", job.name);
                }
                println!("evaluation:");
                print_plan(&answer["evaluation"]);
            }
            if detach {
                return Ok(());
            }
            let placed = wait_for_placements(&client, &job, version).await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&placed)?);
            } else {
                print_allocations(&placed, Some(version));
            }
        }
        JobCommand::Status { name: None } => {
            let jobs = client.get("/v1/jobs").await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = jobs
                .as_array()
                .into_iter()
                .flatten()
                .map(|job| {
                    let deployment = &job["deployment"];
                    vec![
                        text(&job["name"]),
                        text(&job["type"]),
                        text(&job["version"]),
                        if job["stopped"].as_bool() == Some(true) {
                            "stopped".into()
                        } else {
                            "running".into()
                        },
                        format!("{}/{}", text(&job["running"]), text(&job["desired"])),
                        if deployment.is_null() {
                            "-".into()
                        } else {
                            format!(
                                "v{} {}",
                                text(&deployment["job_version"]),
                                text(&deployment["status"])
                            )
                        },
                    ]
                })
                .collect();
            print_table(
                &["NAME", "TYPE", "VERSION", "STATUS", "RUNNING", "DEPLOYMENT"],
                &rows,
            );
        }
        JobCommand::Status { name: Some(name) } => {
            let status = client.get(&format!("/v1/job/{name}")).await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            let state = &status["job"];
            let versions = state["versions"].as_array().cloned().unwrap_or_default();
            let current = versions.last().cloned().unwrap_or(Value::Null);
            println!(
                "job {name}: version {}{}, {}",
                text(&current["version"]),
                if current["stable"].as_bool() == Some(true) {
                    " (stable)"
                } else {
                    ""
                },
                if state["stopped"].as_bool() == Some(true) {
                    "stopped"
                } else {
                    "running"
                }
            );
            let deployment = &state["deployment"];
            if !deployment.is_null() {
                println!(
                    "deployment: version {} {} (started {})",
                    text(&deployment["job_version"]),
                    text(&deployment["status"]),
                    relative(&deployment["started_at"])
                );
            }
            print_allocations(&status, None);
            for later in status["reschedule_later"].as_array().into_iter().flatten() {
                println!(
                    "reschedule of {} {} (delay {})",
                    short(&later["allocation"]),
                    relative(&later["at"]),
                    text(&later["delay"])
                );
            }
            for failed in status["failed_placements"].as_array().into_iter().flatten() {
                println!(
                    "cannot place {}[{}]: {}",
                    text(&failed["group"]),
                    text(&failed["index"]),
                    failed["failure"]
                );
            }
        }
        JobCommand::Stop { name } => {
            let answer = client
                .call(Method::DELETE, &format!("/v1/job/{name}"), None)
                .await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else if answer["changed"].as_bool() == Some(true) {
                println!("job {name} stopped");
            } else {
                println!("job {name} was already stopped");
            }
        }
        JobCommand::History { name } => {
            let history = client.get(&format!("/v1/job/{name}/history")).await?;
            if json_output {
                println!("{}", serde_json::to_string_pretty(&history)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = history["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|version| {
                    let counts: Vec<String> = version["job"]["group"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(group, spec)| format!("{group}={}", text(&spec["count"])))
                        .collect();
                    vec![
                        text(&version["version"]),
                        text(&version["stable"]),
                        counts.join(","),
                    ]
                })
                .collect();
            print_table(&["VERSION", "STABLE", "COUNTS"], &rows);
            println!();
            let rows: Vec<Vec<String>> = history["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|event| {
                    vec![
                        relative(&event["time_unix_ms"]),
                        text(&event["type"]),
                        text(&event["message"]),
                    ]
                })
                .collect();
            print_table(&["WHEN", "TYPE", "MESSAGE"], &rows);
        }
    }
    Ok(())
}

/// Waits (bounded) until every instance of `version` is placed; returns the
/// job's status either way.
async fn wait_for_placements(client: &ApiClient, job: &Job, version: u64) -> anyhow::Result<Value> {
    let wanted: u64 = job
        .groups
        .values()
        .map(|group| u64::from(group.count))
        .sum();
    let deadline = Instant::now() + PLACEMENT_WAIT;
    loop {
        let status = client.get(&format!("/v1/job/{}", job.name)).await?;
        let placed = status["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|allocation| {
                allocation["job_version"].as_u64() == Some(version)
                    && allocation["desired_status"]["status"] == "run"
            })
            .count() as u64;
        if placed >= wanted || Instant::now() >= deadline {
            if placed < wanted {
                eprintln!(
                    "{placed} of {wanted} instances of version {version} placed after {PLACEMENT_WAIT:?}; see `keel job status {}`",
                    job.name
                );
            }
            return Ok(status);
        }
        tokio::time::sleep(PLACEMENT_POLL).await;
    }
}

/// The allocations table of `keel job status NAME` (only `version`'s when given).
fn print_allocations(status: &Value, version: Option<u64>) {
    let rows: Vec<Vec<String>> = status["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|allocation| {
            version.is_none_or(|version| allocation["job_version"].as_u64() == Some(version))
        })
        .map(|allocation| {
            let reported = &allocation["status"];
            let restarts: u64 = reported["tasks"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, task)| task["restarts"].as_u64())
                .sum();
            let delays: Vec<String> = allocation["reschedule_events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|event| text(&event["delay"]))
                .collect();
            let desired = &allocation["desired_status"];
            let desired = match desired["reason"].as_str() {
                Some(reason) => format!("{} ({reason})", text(&desired["status"])),
                None => text(&desired["status"]),
            };
            vec![
                short(&allocation["id"]),
                format!(
                    "{}[{}]",
                    text(&allocation["group"]),
                    text(&allocation["index"])
                ),
                text(&allocation["job_version"]),
                text(&allocation["node"]),
                desired,
                text(&allocation["client"]["status"]),
                if allocation["client"]["ready_since"].is_null() {
                    "no".into()
                } else {
                    "yes".into()
                },
                restarts.to_string(),
                if delays.is_empty() {
                    "-".into()
                } else {
                    delays.join(",")
                },
                relative(&allocation["created_at"]),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "INSTANCE",
            "VERSION",
            "NODE",
            "DESIRED",
            "STATUS",
            "READY",
            "RESTARTS",
            "RESCHEDULES",
            "CREATED",
        ],
        &rows,
    );
}
