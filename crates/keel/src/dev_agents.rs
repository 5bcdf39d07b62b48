//! The three agents of `keel dev`, one beside each member, on Consul's
//! default ports (HTTP 8500, DNS 8600, gossip 8301) and the next ones. Kept
//! apart from dev.rs: this file starts, reports and stops the agents.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use keel_agent::api_client::ApiClient;
use tokio::process::{Child, Command};

/// How long an agent gets to answer on its HTTP port.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long agents get to stop before they are killed.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// One agent of `keel dev`.
pub struct DevAgent {
    pub name: String,
    pub http_addr: String,
    pub dns_addr: String,
    /// The agent's `--data-dir`, where its supervisor records its tasks.
    data_dir: std::path::PathBuf,
    child: Child,
}

/// The ports the agents take, each with what it is for, so `keel dev` can
/// refuse to start, naming the port, when one is in use.
pub fn ports() -> Vec<(String, u16, &'static str)> {
    (0..3u16)
        .flat_map(|index| {
            let name = format!("agent{}", index + 1);
            [
                (name.clone(), 8500 + index, "HTTP"),
                (name.clone(), 8600 + index, "DNS"),
                (name, 8301 + 10 * index, "gossip"),
            ]
        })
        .collect()
}

/// Dynamic port ranges of the three agents (clear of keel dev's members,
/// 22379, and of the agents' own ports).
const DYNAMIC_PORTS: [&str; 3] = ["20000-20999", "21000-21999", "23000-23999"];

/// The demo job of `keel dev --demo`.
const DEMO_JOB: &str = include_str!("../../../examples/jobs/web.toml");

/// Registers the demo job through the first agent and says how to watch it.
pub async fn run_demo(agents: &[DevAgent]) -> anyhow::Result<()> {
    let Some(first) = agents.first() else {
        anyhow::bail!("no agent to run the demo job on");
    };
    let job = keel_scheduler::Job::from_toml_validated(DEMO_JOB).context("the demo job")?;
    let body: serde_json::Value = serde_json::from_str(&job.to_json())?;
    ApiClient::new(&first.http_addr)
        .call(keel_agent::api_client::Method::PUT, "/v1/jobs", Some(&body))
        .await
        .context("registering the demo job")?;
    println!();
    println!(
        "demo: job {} runs 3 instances of python3 -m http.server (examples/jobs/web.toml)",
        job.name
    );
    println!(
        "  keel job status {} --agent-addr {}",
        job.name, first.http_addr
    );
    println!("  kill one agent (its instances move after its TTL and the job's 10 s grace)");
    Ok(())
}

/// Starts three agents for the members at `endpoints`, data and logs under
/// `data_dir`, and waits until each answers.
pub async fn start(
    executable: &Path,
    data_dir: &Path,
    endpoints: &str,
) -> anyhow::Result<Vec<DevAgent>> {
    let gossip: Vec<String> = (0..3)
        .map(|index| format!("127.0.0.1:{}", 8301 + 10 * index))
        .collect();
    let mut agents = Vec::new();
    for index in 0..3 {
        let name = format!("agent{}", index + 1);
        let http_addr = format!("127.0.0.1:{}", 8500 + index);
        let dns_addr = format!("127.0.0.1:{}", 8600 + index);
        let log_path = data_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let join: Vec<&str> = gossip
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, address)| address.as_str())
            .collect();
        let child = Command::new(executable)
            .arg("agent")
            .args(["--name", &name])
            .args(["--endpoints", endpoints])
            .arg("--data-dir")
            .arg(data_dir.join(&name))
            .args(["--http-addr", &http_addr])
            .args(["--dns-addr", &dns_addr])
            .args(["--gossip-addr", &gossip[index]])
            .args(["--join", &join.join(",")])
            // Agents share 127.0.0.1: disjoint dynamic port ranges, so two
            // allocations on two nodes never get the same port.
            .args(["--dynamic-ports", DYNAMIC_PORTS[index]])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        agents.push(DevAgent {
            data_dir: data_dir.join(&name),
            name,
            http_addr,
            dns_addr,
            child,
        });
    }
    for agent in &mut agents {
        let client = ApiClient::new(&agent.http_addr);
        let deadline = tokio::time::Instant::now() + AGENT_READY_TIMEOUT;
        while client.get("/v1/agent/self").await.is_err() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                anyhow::bail!("{} exited ({status}); see its log", agent.name);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} did not answer on {} within {AGENT_READY_TIMEOUT:?}",
                agent.name,
                agent.http_addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(agents)
}

/// Prints each agent's HTTP and DNS addresses and how to use them.
pub fn print(agents: &[DevAgent]) {
    println!("agents (Consul's /v1 HTTP API and DNS):");
    for agent in agents {
        println!(
            "  {:<7} http://{}   dns {}",
            agent.name, agent.http_addr, agent.dns_addr
        );
    }
    if let Some(first) = agents.first() {
        let (host, port) = first
            .dns_addr
            .split_once(':')
            .unwrap_or((&first.dns_addr, "53"));
        println!("  dashboard: http://{}/ui", first.http_addr);
        println!("  keel node list --agent-addr {}", first.http_addr);
        println!("  keel events --follow --agent-addr {}", first.http_addr);
        println!("  dig @{host} -p {port} <service>.service.keel SRV");
    }
}

/// Stops the agents (SIGTERM, then SIGKILL after a bound).
pub async fn stop(agents: &mut [DevAgent]) {
    for agent in agents.iter() {
        if let Some(pid) = agent.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for agent in agents.iter_mut() {
        if tokio::time::timeout(AGENT_STOP_TIMEOUT, agent.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop in time; killing it", agent.name);
            let _ = agent.child.kill().await;
        }
        // An agent leaves its tasks running when it stops (so that restarting
        // an agent does not restart its workloads); "Ctrl-C stops them all"
        // includes the workloads of a dev cluster.
        let allocations = agent
            .data_dir
            .join(keel_agent::supervisor::ALLOCS_DIRECTORY);
        let stopped = keel_agent::supervisor::process::kill_leftovers(&allocations);
        if !stopped.is_empty() {
            println!("{}: stopped {} allocation(s)", agent.name, stopped.len());
        }
    }
}
