//! The `keel` command: `keel server` runs one member (with etcd's flag names),
//! `keel dev` runs a local three-member cluster, and `keel kv …` is a small
//! etcd-protocol client for the basics; `keel bench` measures a cluster.

mod agent_command;
mod alloc_command;
mod availability;
mod bench;
mod chaos;
mod dev;
mod dev_agents;
mod elect;
mod job_command;
mod kv;
mod lease_command;
mod lock;
mod logging;
mod operations;
mod registry_command;
mod server_command;
mod watch;

use clap::{Parser, Subcommand};

/// keel: a fault-tolerant coordination service that speaks etcd's v3 API.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one cluster member (flags as etcd's).
    Server(Box<server_command::ServerArguments>),
    /// Run a local three-member cluster on 127.0.0.1 until Ctrl-C.
    Dev(dev::DevArguments),
    /// Read and write keys.
    Kv(kv::KvArguments),
    /// Grant, revoke, keep alive and inspect leases.
    Lease(lease_command::Arguments),
    /// Run a command while holding a distributed lock (its fencing token in
    /// KEEL_LOCK_REVISION), or just acquire it.
    Lock(lock::Arguments),
    /// Campaign for leadership of an election, or observe it.
    Elect(elect::Arguments),
    /// status, member, snapshot, defrag, alarm and move-leader (operations.rs).
    #[command(flatten)]
    Operations(operations::Command),
    /// Watch a key or prefix for changes, from now or from a past revision.
    Watch(watch::WatchArguments),
    /// Measure throughput and latency of an etcd-protocol cluster (keel or etcd).
    Bench(bench::BenchArguments),
    /// Run the node agent: registration, health checks, Consul's /v1 HTTP API, DNS.
    Agent(Box<agent_command::AgentArguments>),
    /// Register, deregister, list services and show their health (via an agent).
    Service(registry_command::ServiceArguments),
    /// List nodes with their status and resources, drain them, change their
    /// eligibility (via an agent).
    Node(registry_command::NodeArguments),
    /// Run, plan, inspect and stop jobs (via an agent).
    Job(job_command::JobArguments),
    /// Model reliability and availability: components, quorums, repair, block diagrams.
    Availability(availability::Arguments),
    /// Inject faults into running members (needs --experimental-enable-fault-injection).
    Chaos(chaos::Arguments),
    /// Show allocations and their tasks, print their logs (via an agent).
    Alloc(alloc_command::AllocArguments),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(arguments) => server_command::run(*arguments).await,
            Command::Dev(arguments) => dev::run(arguments).await,
            Command::Kv(arguments) => kv::run(arguments).await,
            Command::Bench(arguments) => bench::run(arguments).await,
            Command::Watch(arguments) => watch::run(arguments).await,
            Command::Lease(arguments) => lease_command::run(arguments).await,
            Command::Lock(arguments) => lock::run(arguments).await,
            Command::Elect(arguments) => elect::run(arguments).await,
            Command::Operations(command) => operations::run(command).await,
            Command::Agent(arguments) => agent_command::run(*arguments).await,
            Command::Service(arguments) => registry_command::run_service(arguments).await,
            Command::Node(arguments) => registry_command::run_node(arguments).await,
            Command::Job(arguments) => job_command::run(arguments).await,
            Command::Availability(arguments) => availability::run(arguments).await,
            Command::Chaos(arguments) => chaos::run(arguments).await,
            Command::Alloc(arguments) => alloc_command::run(arguments).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
