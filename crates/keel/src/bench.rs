//! `keel bench`: a load generator over etcd's v3 gRPC API, so the same run can
//! drive keel and etcd alike.
//!
//! Workloads (`keel bench [OPTIONS] WORKLOAD`):
//! - `put`: writes of random keys of the key space;
//! - `range [--serializable]`: reads of random keys, linearizable (a quorum
//!   round) unless serializable (answered by the contacted member);
//! - `txn`: compare-and-swap: read a key's mod revision r, then `txn if
//!   mod_revision(key) == r then put else get`; a failed compare is a
//!   conflict (another client changed the key in between), counted apart from
//!   errors;
//! - `watch`: watchers (`--watchers`, spread over `--streams` gRPC streams,
//!   spread over the connections) on one key or, with `--prefix`, on the
//!   whole key space; `--clients` writers put to it. Each value carries its
//!   put's intended send time (nanoseconds since the bench started, first 8
//!   bytes, big-endian), so every delivered event's latency is its receipt
//!   time minus that;
//! - `lease`: grant a lease (`--ttl`), then `--keep-alives` round trips on the
//!   client's bidirectional keep-alive stream; grants and keep-alives get
//!   latencies of their own. Leases are left to expire, not revoked.
//!
//! Load shape: `--clients` tasks, each with one operation in flight, share
//! `--connections` HTTP/2 connections round-robin (and the connections are
//! spread over `--endpoints`). Without `--rate` each client sends its next
//! operation when the previous one is answered (closed loop). With `--rate`
//! the clients together send that many operations per second on a fixed
//! schedule (open loop, see `pacer.rs`), and latency is measured from each
//! operation's intended send time, so a stall shows in the percentiles
//! instead of being hidden by the requests it delayed.
//!
//! The report (a table, or one JSON object with `-o json`) gives throughput,
//! latency mean, p50, p90, p99, p99.9 and max from a log-linear histogram
//! (`histogram.rs`), and errors grouped by request, gRPC code and message.
//! With `--protocol zookeeper` the same load drives a ZooKeeper ensemble
//! (`put`, `range` and `range --serializable` only; see `zookeeper.rs`).
//! The JSON field names are stable; they are listed in [`JSON_FIELDS_HELP`]
//! (shown by `keel bench --help`) and `bench/compare.sh` reads them.

mod clients;
mod histogram;
mod pacer;
mod progress;
mod report;
mod watchers;
mod zookeeper;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::Channel;

use progress::{Goal, Progress};
use report::{Recorder, Report};

/// Clients above this many are refused: each is a task with a request in flight.
const CLIENTS_MAX: usize = 10_000;
/// Connections above this many are refused: each is a socket and an HTTP/2 session.
const CONNECTIONS_MAX: usize = 1_000;
/// Watchers above this many are refused: each costs the server a watcher.
const WATCHERS_MAX: usize = 100_000;
/// Watch streams above this many are refused: each is a gRPC stream and a task.
const WATCH_STREAMS_MAX: usize = 10_000;
/// The largest value: it and its key must fit in one request, and etcd's and
/// keel's default request limit (`--max-request-bytes`) is 1.5 MiB.
const VALUE_SIZE_MAX: usize = 1024 * 1024;
/// The longest key (keys are written in every request, so keep them modest).
const KEY_SIZE_MAX: usize = 64 * 1024;
/// Keep-alive round trips per lease operation above this many are refused.
const KEEP_ALIVES_PER_OPERATION_MAX: u32 = 1_000;
/// The longest run, request timeout or lease TTL accepted.
const DURATION_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Operations when neither --total nor --duration is given.
const TOTAL_DEFAULT: u64 = 1_000;

/// Every key the bench writes starts with this, followed by the key's index
/// in the key space, zero-padded to `--key-size`.
const KEY_PREFIX: &str = "bench/";
/// Bytes at the start of a watch workload value that carry its send time.
const TIMESTAMP_BYTES: usize = 8;

/// The JSON report's fields, shown by `keel bench --help`.
pub const JSON_FIELDS_HELP: &str = "\
JSON output (-o json): one object with these fields.
  workload                 put, range-linearizable, range-serializable, txn, watch or lease
  endpoints, connections, clients, key_space_size, key_size_bytes, value_size_bytes
                           the load's shape, as run
  rate_target_per_second   --rate, or null for a closed loop
  operations               operations answered without error (txn: successes + conflicts;
                           watch: puts; lease: grants)
  errors                   failed requests in all; errors_by_kind lists them grouped as
                           {request, code, message, count}, most frequent first
  seconds, operations_per_second
  latency_milliseconds_mean, _p50, _p90, _p99, _p999, _max
                           per operation (txn: the read and the txn together; lease: the
                           grant), from the intended send time when --rate is given
  txn     {successes, conflicts}
  watch   {watchers, streams, prefix, events_expected, events_delivered, events_per_second,
           latency_milliseconds_*: from a put's intended send time to each event's receipt}
  lease   {ttl_seconds, keep_alives_per_operation, keep_alives, keep_alives_per_second,
           latency_milliseconds_*: of each keep-alive round trip}";

/// Options of `keel bench`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = JSON_FIELDS_HELP)]
pub struct BenchArguments {
    /// Comma-separated client endpoints; connections are spread over them.
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// The servers' protocol: etcd's v3 gRPC API (keel, etcd), or ZooKeeper's
    /// (put = setData, range = sync + getData, range --serializable = getData).
    #[arg(long, global = true, value_enum, default_value = "etcd")]
    protocol: Protocol,
    /// HTTP/2 connections to open [default: one per endpoint]. Clients (and
    /// watch streams) share them round-robin; where a server caps the
    /// concurrent streams on one connection, the excess waits in the client.
    #[arg(long, global = true)]
    connections: Option<usize>,
    /// Concurrent clients, each with one operation in flight (watch: writers).
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Operations in all [default: 1000 unless --duration is given].
    #[arg(long, global = true, conflicts_with = "duration")]
    total: Option<u64>,
    /// Run for this long instead of a total number of operations, e.g. 10s,
    /// 500ms, 2m.
    #[arg(long, global = true, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Target rate of all clients together, in operations per second. Open
    /// loop: each client sends on a fixed schedule whether or not its previous
    /// operation was answered, and latency is measured from the intended send
    /// time, so stalls are not hidden (no coordinated omission). A client
    /// still has one operation in flight: when the clients cannot keep up,
    /// the backlog shows as growing latency, so add --clients for high rates.
    /// Without --rate, each client sends as soon as its previous operation is
    /// answered.
    #[arg(long, global = true)]
    rate: Option<u64>,
    /// Distinct keys written or read (watch --prefix: written).
    #[arg(long, global = true, default_value_t = 10_000)]
    key_space_size: u64,
    /// Go through the key space in order instead of at random: client c of C
    /// uses keys c, c + C, c + 2C, ... (wrapping), so `put --total N
    /// --key-space-size N --sequential-keys` writes every key exactly once.
    #[arg(long, global = true)]
    sequential_keys: bool,
    /// Bytes per key: "bench/" and the key's zero-padded index.
    #[arg(long, global = true, default_value_t = 16)]
    key_size: usize,
    /// Bytes per value (watch: at least 8, for the send time).
    #[arg(long, global = true, default_value_t = 256)]
    value_size: usize,
    /// How long one operation may take before it counts as an error (and,
    /// for watch, how long events may take to arrive after the last put).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Show the progress line on stderr even when stderr is not a terminal.
    #[arg(long, global = true)]
    progress: bool,
    /// Output format: "table" or "json".
    #[arg(short = 'o', long = "output", global = true, default_value = "table")]
    output: String,
    /// The workload.
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    // Plain comments: clap prints doc comments as a long list under --help.
    // etcd's v3 gRPC API.
    Etcd,
    // ZooKeeper's client protocol.
    Zookeeper,
}

#[derive(Debug, Clone, Copy, clap::Subcommand)]
enum Workload {
    /// Writes of random keys.
    Put,
    /// Reads of random keys (linearizable unless --serializable).
    Range {
        /// Answer from the contacted member without a quorum round.
        #[arg(long)]
        serializable: bool,
    },
    /// Compare-and-swap: read a key's mod revision, then put if it is unchanged.
    Txn,
    /// Watch fan-out: writers put, watchers receive every change.
    Watch {
        /// Watchers in all.
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// gRPC watch streams the watchers are spread over.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Watch (and write) the whole key space instead of one key.
        #[arg(long)]
        prefix: bool,
    },
    /// Lease grants, each followed by keep-alive round trips.
    Lease {
        /// Time to live of each lease, in whole seconds, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        ttl: Duration,
        /// Keep-alive round trips after each grant.
        #[arg(long, default_value_t = 1)]
        keep_alives: u32,
    },
}

impl Workload {
    /// The workload's name in the report.
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Range { serializable: true } => "range-serializable",
            Workload::Range {
                serializable: false,
            } => "range-linearizable",
            Workload::Txn => "txn",
            Workload::Watch { .. } => "watch",
            Workload::Lease { .. } => "lease",
        }
    }

    /// The requests one operation makes, as a timed-out operation's error names them.
    fn request_name(self) -> &'static str {
        match self {
            Workload::Put | Workload::Watch { .. } => "put",
            Workload::Range { .. } => "range",
            Workload::Txn => "range + txn",
            Workload::Lease { .. } => "grant + keep-alive",
        }
    }
}

/// A validated `keel bench` run.
#[derive(Debug)]
struct Plan {
    protocol: Protocol,
    workload: Workload,
    endpoints: Vec<String>,
    connections: usize,
    clients: usize,
    goal: Goal,
    rate_per_second: Option<u64>,
    key_space_size: u64,
    sequential_keys: bool,
    key_size: usize,
    value_size: usize,
    request_timeout: Duration,
    progress: bool,
    json: bool,
}

impl Plan {
    /// Checks every option; an error names the flag at fault.
    fn new(arguments: BenchArguments, stderr_is_terminal: bool) -> anyhow::Result<Plan> {
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
        anyhow::ensure!(!endpoints.is_empty(), "--endpoints is empty");
        let connections = arguments.connections.unwrap_or(endpoints.len());
        anyhow::ensure!(
            (1..=CONNECTIONS_MAX).contains(&connections),
            "--connections must be between 1 and {CONNECTIONS_MAX}, not {connections}"
        );
        anyhow::ensure!(
            (1..=CLIENTS_MAX).contains(&arguments.clients),
            "--clients must be between 1 and {CLIENTS_MAX}, not {}",
            arguments.clients
        );
        let goal = match (arguments.total, arguments.duration) {
            (Some(0), _) => anyhow::bail!("--total must be at least 1"),
            (Some(total), _) => Goal::Operations(total),
            (None, Some(duration)) => {
                anyhow::ensure!(
                    duration <= DURATION_MAX,
                    "--duration must be at most {DURATION_MAX:?}"
                );
                Goal::Duration(duration)
            }
            (None, None) => Goal::Operations(TOTAL_DEFAULT),
        };
        if let Some(rate) = arguments.rate {
            anyhow::ensure!(
                rate >= 1,
                "--rate must be at least 1 operation per second (leave it out for a closed loop)"
            );
        }
        anyhow::ensure!(
            arguments.key_space_size >= 1,
            "--key-space-size must be at least 1"
        );
        let key_size_min = KEY_PREFIX.len() + decimal_digits(arguments.key_space_size - 1);
        anyhow::ensure!(
            (key_size_min..=KEY_SIZE_MAX).contains(&arguments.key_size),
            "--key-size must be between {key_size_min} (\"{KEY_PREFIX}\" and the digits of \
             --key-space-size {}) and {KEY_SIZE_MAX}, not {}",
            arguments.key_space_size,
            arguments.key_size
        );
        anyhow::ensure!(
            arguments.value_size <= VALUE_SIZE_MAX,
            "--value-size must be at most {VALUE_SIZE_MAX} bytes (a request must fit the \
             server's request size limit), not {}",
            arguments.value_size
        );
        anyhow::ensure!(
            arguments.request_timeout <= DURATION_MAX,
            "--request-timeout must be at most {DURATION_MAX:?}"
        );
        match arguments.workload {
            Workload::Watch {
                watchers, streams, ..
            } => {
                anyhow::ensure!(
                    arguments.value_size >= TIMESTAMP_BYTES,
                    "--value-size must be at least {TIMESTAMP_BYTES} for the watch workload \
                     (values carry their send time), not {}",
                    arguments.value_size
                );
                anyhow::ensure!(
                    (1..=WATCHERS_MAX).contains(&watchers),
                    "--watchers must be between 1 and {WATCHERS_MAX}, not {watchers}"
                );
                anyhow::ensure!(
                    (1..=WATCH_STREAMS_MAX.min(watchers)).contains(&streams),
                    "--streams must be between 1 and --watchers ({watchers}) and at most \
                     {WATCH_STREAMS_MAX}, not {streams}"
                );
            }
            Workload::Lease { ttl, keep_alives } => {
                anyhow::ensure!(
                    ttl.subsec_nanos() == 0 && ttl >= Duration::from_secs(1) && ttl <= DURATION_MAX,
                    "--ttl must be a whole number of seconds between 1s and {DURATION_MAX:?}, \
                     not {ttl:?}"
                );
                anyhow::ensure!(
                    keep_alives <= KEEP_ALIVES_PER_OPERATION_MAX,
                    "--keep-alives must be at most {KEEP_ALIVES_PER_OPERATION_MAX}, not \
                     {keep_alives}"
                );
            }
            Workload::Put | Workload::Range { .. } | Workload::Txn => {}
        }
        if arguments.protocol == Protocol::Zookeeper {
            anyhow::ensure!(
                matches!(arguments.workload, Workload::Put | Workload::Range { .. }),
                "--protocol zookeeper runs put and range only, not {}",
                arguments.workload.name()
            );
        }
        Ok(Plan {
            protocol: arguments.protocol,
            workload: arguments.workload,
            endpoints,
            connections,
            clients: arguments.clients,
            goal,
            rate_per_second: arguments.rate,
            key_space_size: arguments.key_space_size,
            sequential_keys: arguments.sequential_keys,
            key_size: arguments.key_size,
            value_size: arguments.value_size,
            request_timeout: arguments.request_timeout,
            progress: arguments.progress || stderr_is_terminal,
            json,
        })
    }

    /// The key with index `index` in the key space.
    fn key(&self, index: u64) -> Vec<u8> {
        let width = self.key_size - KEY_PREFIX.len();
        format!("{KEY_PREFIX}{index:0width$}").into_bytes()
    }
}

/// Digits of `number` in decimal.
fn decimal_digits(number: u64) -> usize {
    number.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// Parses a duration such as `10s`, `500ms`, `1.5s`, `2m` or `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let number_end = text
        .find(|character: char| !(character.is_ascii_digit() || character == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_end);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 10s, 500ms or 2m"))?;
    let unit_seconds = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "" => return Err(format!("{text:?} needs a unit: ms, s, m or h")),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s, m or h"
            ))
        }
    };
    let seconds = number * unit_seconds;
    if !(seconds > 0.0 && seconds <= DURATION_MAX.as_secs_f64()) {
        return Err(format!(
            "{text:?} must be more than zero and at most {DURATION_MAX:?}"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Opens the connections, spread over the endpoints round-robin; fails
/// (naming the endpoint) if one does not answer, rather than measuring a
/// cluster with a member missing.
async fn connect_all(plan: &Plan) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let endpoint = &plan.endpoints[index % plan.endpoints.len()];
        channels.push(
            crate::kv::connect(endpoint)
                .await
                .with_context(|| format!("connecting to {endpoint}"))?,
        );
    }
    Ok(channels)
}

/// One connection the clients share: an HTTP/2 channel or a ZooKeeper session.
#[derive(Clone)]
enum Connection {
    Etcd(Channel),
    ZooKeeper(zookeeper_client::Client),
}

/// Runs the benchmark and prints its report.
pub async fn run(arguments: BenchArguments) -> anyhow::Result<()> {
    let plan = Arc::new(Plan::new(arguments, std::io::stderr().is_terminal())?);
    let (channels, connections): (Vec<Channel>, Vec<Connection>) = match plan.protocol {
        Protocol::Etcd => {
            let channels = connect_all(&plan).await?;
            let connections = channels.iter().cloned().map(Connection::Etcd).collect();
            (channels, connections)
        }
        Protocol::Zookeeper => {
            let sessions = zookeeper::connect_all(&plan).await?;
            zookeeper::prepare(&plan, &sessions[0]).await?;
            (
                Vec::new(),
                sessions.into_iter().map(Connection::ZooKeeper).collect(),
            )
        }
    };
    let recorder = Arc::new(Recorder::default());
    let start = tokio::time::Instant::now();
    let progress = plan.progress.then(|| {
        Progress::start(
            plan.workload.name(),
            recorder.completed.clone(),
            plan.goal,
            start,
        )
    });
    let result = match plan.workload {
        Workload::Watch {
            watchers,
            streams,
            prefix,
        } => {
            watchers::run(
                &plan, &channels, &recorder, start, watchers, streams, prefix,
            )
            .await
        }
        _ => Ok(clients::run(&plan, &connections, &recorder, start).await),
    };
    if let Some(progress) = progress {
        progress.finish().await;
    }
    let timings = result?;
    let report = Report::new(&plan, &recorder, timings);
    if plan.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        arguments: BenchArguments,
    }

    /// Parses and validates `keel bench` arguments.
    fn plan(arguments: &[&str]) -> Result<Plan, String> {
        let command =
            Command::try_parse_from(std::iter::once("bench").chain(arguments.iter().copied()))
                .map_err(|error| error.to_string())?;
        Plan::new(command.arguments, false).map_err(|error| format!("{error:#}"))
    }

    fn error_of(arguments: &[&str]) -> String {
        plan(arguments).expect_err("the arguments are refused")
    }

    #[test]
    fn defaults() {
        let plan = plan(&["put"]).expect("valid");
        assert_eq!(plan.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(plan.connections, 1);
        assert_eq!(plan.clients, 1);
        assert!(matches!(plan.goal, Goal::Operations(1_000)));
        assert_eq!(plan.rate_per_second, None);
        assert_eq!(plan.key(42), b"bench/0000000042");
        assert!(!plan.json && !plan.progress);
    }

    #[test]
    fn options_may_follow_the_workload() {
        let plan = plan(&["range", "--serializable", "--total", "5", "-o", "json"]).expect("valid");
        assert!(matches!(plan.goal, Goal::Operations(5)));
        assert!(plan.json);
        assert_eq!(plan.workload.name(), "range-serializable");
    }

    #[test]
    fn connections_default_to_one_per_endpoint() {
        let plan = plan(&["--endpoints", "a:1,b:2, c:3", "txn"]).expect("valid");
        assert_eq!(plan.connections, 3);
    }

    #[test]
    fn a_duration_replaces_the_total() {
        let plan = plan(&["--duration", "1.5s", "put"]).expect("valid");
        assert!(
            matches!(plan.goal, Goal::Duration(duration) if duration == Duration::from_millis(1_500))
        );
        let error = error_of(&["--duration", "1s", "--total", "5", "put"]);
        assert!(
            error.contains("--total") && error.contains("--duration"),
            "{error}"
        );
    }

    #[test]
    fn bad_flags_are_named() {
        for (arguments, flag) in [
            (&["--rate", "0", "put"][..], "--rate"),
            (&["--value-size", "2000000", "put"], "--value-size"),
            (&["--clients", "0", "put"], "--clients"),
            (&["--connections", "0", "put"], "--connections"),
            (&["--total", "0", "put"], "--total"),
            (&["--key-space-size", "0", "put"], "--key-space-size"),
            (&["--key-size", "8", "put"], "--key-size"),
            (&["--duration", "10", "put"], "--duration"),
            (&["--duration", "0s", "put"], "--duration"),
            (&["--request-timeout", "3x", "put"], "--request-timeout"),
            (&["--endpoints", ",", "put"], "--endpoints"),
            (&["-o", "yaml", "put"], "-o"),
            (&["--value-size", "4", "watch"], "--value-size"),
            (&["watch", "--watchers", "0"], "--watchers"),
            (&["watch", "--watchers", "2", "--streams", "3"], "--streams"),
            (&["lease", "--ttl", "1500ms"], "--ttl"),
            (&["lease", "--keep-alives", "100000"], "--keep-alives"),
            (&["--protocol", "zookeeper", "txn"], "--protocol zookeeper"),
        ] {
            let error = error_of(arguments);
            assert!(error.contains(flag), "{arguments:?}: {error}");
        }
    }

    #[test]
    fn keys_fill_the_key_size() {
        let plan = plan(&["--key-size", "10", "--key-space-size", "10000", "put"]).expect("valid");
        assert_eq!(plan.key(9_999), b"bench/9999");
        assert!(
            error_of(&["--key-size", "10", "--key-space-size", "10001", "put"])
                .contains("between 11")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("1000h").is_err());
    }

    #[test]
    fn decimal_digits_of_numbers() {
        assert_eq!(decimal_digits(0), 1);
        assert_eq!(decimal_digits(9), 1);
        assert_eq!(decimal_digits(10), 2);
        assert_eq!(decimal_digits(u64::MAX), 20);
    }
}
