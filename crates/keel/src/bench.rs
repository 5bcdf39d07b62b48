//! `keel bench`: a load generator over etcd's v3 gRPC API, so the same run can
//! drive keel and etcd. This first version has the put and range workloads;
//! it reports throughput and latency percentiles as a table or JSON.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_types::etcdserverpb::{PutRequest, RangeRequest};
use serde::Serialize;

/// Options of `keel bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArguments {
    /// Comma-separated client endpoints; clients are spread over them.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 1_000)]
    total: usize,
    /// Distinct keys written or read.
    #[arg(long, default_value_t = 10_000)]
    key_space_size: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Output format: "table" or "json".
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: String,
    /// The workload.
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Clone, Copy, clap::Subcommand)]
enum Workload {
    /// Durable writes of random keys.
    Put,
    /// Reads of random keys (linearizable unless --serializable).
    Range {
        /// Answer from the contacted member without a quorum round.
        #[arg(long)]
        serializable: bool,
    },
}

/// Clients above this many are refused: each is a task and a connection.
const CLIENTS_MAX: usize = 10_000;

#[derive(Serialize)]
struct Report {
    workload: String,
    clients: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    requests_per_second: f64,
    latency_milliseconds_p50: f64,
    latency_milliseconds_p90: f64,
    latency_milliseconds_p99: f64,
    latency_milliseconds_p999: f64,
    latency_milliseconds_max: f64,
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let position = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[position].as_secs_f64() * 1000.0
}

/// A small deterministic generator for key choice: benchmarks need spread,
/// not cryptographic quality, and a seed makes runs comparable.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut mixed = *state;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// Runs the benchmark and prints its report.
pub async fn run(arguments: BenchArguments) -> anyhow::Result<()> {
    if arguments.clients == 0 || arguments.clients > CLIENTS_MAX {
        anyhow::bail!("--clients must be between 1 and {CLIENTS_MAX}");
    }
    if arguments.key_space_size == 0 {
        anyhow::bail!("--key-space-size must be positive");
    }
    let json = match arguments.output.as_str() {
        "json" => true,
        "table" => false,
        other => anyhow::bail!("-o must be \"table\" or \"json\", not {other:?}"),
    };
    let endpoints: Vec<String> = arguments
        .endpoints
        .split(',')
        .map(str::trim)
        .filter(|endpoint| !endpoint.is_empty())
        .map(str::to_string)
        .collect();
    let mut channels = Vec::new();
    for endpoint in &endpoints {
        channels.push(
            crate::kv::connect(endpoint)
                .await
                .with_context(|| format!("connecting to {endpoint}"))?,
        );
    }
    let value = vec![b'v'; arguments.value_size];
    let per_client = arguments.total / arguments.clients;
    let remainder = arguments.total % arguments.clients;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..arguments.clients {
        let mut client = KvClient::new(channels[client_index % channels.len()].clone());
        let requests = per_client + usize::from(client_index < remainder);
        let value = value.clone();
        let workload = arguments.workload;
        let key_space_size = arguments.key_space_size as u64;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(requests);
            let mut errors = 0usize;
            let mut random = client_index as u64;
            for _ in 0..requests {
                let key = format!("bench/{:08}", next_random(&mut random) % key_space_size);
                let issued = Instant::now();
                let result = match workload {
                    Workload::Put => client
                        .put(PutRequest {
                            key: key.into_bytes(),
                            value: value.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    Workload::Range { serializable } => client
                        .range(RangeRequest {
                            key: key.into_bytes(),
                            serializable,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                };
                match result {
                    Ok(()) => latencies.push(issued.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(arguments.total);
    let mut errors = 0;
    for task in tasks {
        let (client_latencies, client_errors) = task.await.context("a client task failed")?;
        latencies.extend(client_latencies);
        errors += client_errors;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    let workload = match arguments.workload {
        Workload::Put => "put".to_string(),
        Workload::Range { serializable: true } => "range (serializable)".to_string(),
        Workload::Range {
            serializable: false,
        } => "range (linearizable)".to_string(),
    };
    let report = Report {
        workload,
        clients: arguments.clients,
        requests: latencies.len(),
        errors,
        seconds,
        requests_per_second: latencies.len() as f64 / seconds,
        latency_milliseconds_p50: percentile(&latencies, 0.50),
        latency_milliseconds_p90: percentile(&latencies, 0.90),
        latency_milliseconds_p99: percentile(&latencies, 0.99),
        latency_milliseconds_p999: percentile(&latencies, 0.999),
        latency_milliseconds_max: percentile(&latencies, 1.0),
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:<22} {:>7} {:>9} {:>6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "WORKLOAD",
            "CLIENTS",
            "REQUESTS",
            "ERRORS",
            "REQ/S",
            "P50 ms",
            "P90 ms",
            "P99 ms",
            "P99.9 ms",
            "MAX ms"
        );
        println!(
            "{:<22} {:>7} {:>9} {:>6} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            report.workload,
            report.clients,
            report.requests,
            report.errors,
            report.requests_per_second,
            report.latency_milliseconds_p50,
            report.latency_milliseconds_p90,
            report.latency_milliseconds_p99,
            report.latency_milliseconds_p999,
            report.latency_milliseconds_max
        );
    }
    Ok(())
}
