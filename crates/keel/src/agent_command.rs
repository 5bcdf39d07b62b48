//! `keel agent`: the node daemon (registration, health checks, the Consul-
//! shaped HTTP API and DNS). The work is in the `keel-agent` crate; this
//! file turns flags into its configuration and runs it until SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use keel_agent::agent::{Agent, AgentConfig};
use keel_agent::definition::parse_duration;

/// The agent's flags.
#[derive(Debug, clap::Args)]
pub struct AgentArguments {
    /// This node's name (letters, digits, `-`, `_`); default: the host name.
    #[arg(long)]
    name: Option<String>,
    /// Members' client URLs, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    endpoints: String,
    /// Where the agent keeps the services registered through its API.
    #[arg(long, default_value = "keel-agent-data")]
    data_dir: PathBuf,
    /// The HTTP API (Consul's /v1) address.
    #[arg(long, default_value = "127.0.0.1:8500")]
    http_addr: SocketAddr,
    /// The DNS server's address (UDP and TCP).
    #[arg(long, default_value = "127.0.0.1:8600")]
    dns_addr: SocketAddr,
    /// The gossip address (UDP).
    #[arg(long, default_value = "127.0.0.1:8301")]
    gossip_addr: SocketAddr,
    /// Other agents' gossip addresses, comma-separated.
    #[arg(long, default_value = "")]
    join: String,
    /// Node labels: key=value,...
    #[arg(long, default_value = "")]
    labels: String,
    /// TTL of the node lease: the node is down this long after its agent
    /// stops (10s, 500ms, 1m).
    #[arg(long, default_value = "10s")]
    node_ttl: String,
    /// A directory of service definitions (*.toml) loaded at start.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// The DNS domain answered: <service>.service.<domain>, <node>.node.<domain>.
    #[arg(long, default_value = "keel")]
    dns_domain: String,
    /// Serve fault injection (`keel chaos inject kill|pause`) on this agent and
    /// the tasks it supervises, to loopback callers. Off by default.
    #[arg(long)]
    enable_chaos: bool,
    /// A file holding the token (at least 16 characters) that callers outside the
    /// loopback interface must present to inject faults; without it only loopback.
    #[arg(long, value_name = "FILE", requires = "enable_chaos")]
    chaos_token_file: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| {
            name.trim()
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "agent".to_string())
}

impl AgentArguments {
    fn to_config(&self) -> anyhow::Result<AgentConfig> {
        let mut labels = BTreeMap::new();
        for pair in split_list(&self.labels) {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--labels: {pair:?} is not key=value"))?;
            anyhow::ensure!(!key.is_empty(), "--labels: {pair:?} has an empty key");
            labels.insert(key.to_string(), value.to_string());
        }
        let node_ttl = parse_duration(&self.node_ttl)
            .map_err(|reason| anyhow::anyhow!("--node-ttl: {reason}"))?;
        let endpoints = split_list(&self.endpoints);
        anyhow::ensure!(
            !endpoints.is_empty(),
            "--endpoints: give at least one member URL"
        );
        let domain = self.dns_domain.trim_matches('.').to_string();
        anyhow::ensure!(!domain.is_empty(), "--dns-domain: must not be empty");
        Ok(AgentConfig {
            name: self.name.clone().unwrap_or_else(host_name),
            endpoints,
            data_dir: self.data_dir.clone(),
            http_addr: self.http_addr,
            dns_addr: self.dns_addr,
            gossip_addr: self.gossip_addr,
            join: split_list(&self.join),
            labels,
            node_ttl,
            config_dir: self.config_dir.clone(),
            dns_domain: domain,
            chaos: keel_agent::chaos::ChaosConfig {
                enabled: self.enable_chaos,
                token: self
                    .chaos_token_file
                    .as_deref()
                    .map(crate::chaos::read_token_file)
                    .transpose()?,
            },
        })
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(arguments: AgentArguments) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(format!(
                "{},h2=warn,tower=warn,hyper=warn,chitchat=warn,hickory_server=warn",
                arguments.log_level
            ))
        })
        .context("--log-level")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = arguments.to_config()?;
    let agent = Agent::start(config).await?;
    println!(
        "keel agent: HTTP on {}, DNS on {}",
        agent.http_addr, agent.dns_addr
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, stopping"),
        _ = terminate.recv() => tracing::info!("terminated, stopping"),
    }
    drop(agent);
    Ok(())
}
