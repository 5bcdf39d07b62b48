//! `keel server`: one member, configured with etcd's own flag names and
//! defaults, so scripts written for etcd start keel unchanged.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use keel_server::config::{parse_initial_cluster, parse_url_address, parse_url_list, ServerConfig};
use keel_server::{InitialClusterState, Server};

/// etcd's member flags.
#[derive(Debug, clap::Args)]
pub struct ServerArguments {
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Path to the data directory (default: NAME.etcd, as etcd).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic.
    #[arg(long, default_value = "http://localhost:2379")]
    listen_client_urls: String,
    /// URLs advertised to clients.
    #[arg(long, default_value = "http://localhost:2379")]
    advertise_client_urls: String,
    /// URLs to serve /metrics, /health, /livez and /readyz on (plain HTTP),
    /// comma-separated; none by default, as etcd.
    #[arg(long)]
    listen_metrics_urls: Option<String>,
    /// URLs to listen on for peer traffic.
    #[arg(long, default_value = "http://localhost:2380")]
    listen_peer_urls: String,
    /// This member's peer URLs, as advertised to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
    /// Initial cluster configuration: name=peer-url,…
    #[arg(long, default_value = "default=http://localhost:2380")]
    initial_cluster: String,
    /// "new" to found a cluster, "existing" to join one.
    #[arg(long, default_value = "new")]
    initial_cluster_state: String,
    /// Token distinguishing this cluster from others built from the same URLs.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to time out.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Number of applied entries between snapshots.
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Entries kept behind a snapshot for slow followers to catch up from the
    /// log (etcd's flag of the same name).
    #[arg(long, default_value_t = 5_000)]
    experimental_snapshot_catchup_entries: u64,
    /// How often the leader records remaining lease TTLs in the log (etcd's
    /// flag; keel always checkpoints). Accepts etcd's duration forms: 5s, 500ms, 1m.
    #[arg(long, default_value = "5s")]
    experimental_lease_checkpoint_interval: String,
    /// Space quota in bytes: past it the NOSPACE alarm is raised and writes
    /// that add data are refused (0: etcd's default of 2 GiB).
    #[arg(long, default_value_t = 0)]
    quota_backend_bytes: u64,
    /// "periodic" (keep --auto-compaction-retention of history, e.g. 1h) or
    /// "revision" (keep that many revisions).
    #[arg(long, default_value = "periodic")]
    auto_compaction_mode: String,
    /// How much history to keep: a duration (periodic) or a revision count
    /// (revision); 0 turns auto-compaction off. keel keeps one hour by default,
    /// where etcd keeps everything: the key space is in memory.
    #[arg(long, default_value = "1h")]
    auto_compaction_retention: String,
    /// Time between the leader's comparisons of every member's key-value hash
    /// (a mismatch raises the CORRUPT alarm naming the member); 0 turns it off.
    #[arg(long, default_value = "1m")]
    experimental_corrupt_check_time: String,
    /// Fault injection for tests: this member applies a wrong value whenever
    /// a put of KEY is applied, as silent disk corruption would.
    #[arg(long, hide = true, value_name = "KEY")]
    unsafe_fault_corrupt_values_of_key: Option<String>,
    /// Serve `keel chaos` fault injection (partitions, drops, delays, clock rate, disk
    /// faults, kill and pause) to callers on the loopback interface. Off by default.
    #[arg(long)]
    experimental_enable_fault_injection: bool,
    /// A file holding the token (at least 16 characters) that callers outside the
    /// loopback interface must present to inject faults; without it only loopback.
    #[arg(
        long,
        value_name = "FILE",
        requires = "experimental_enable_fault_injection"
    )]
    experimental_fault_injection_token_file: Option<std::path::PathBuf>,
    /// Test-only, broken on purpose: acknowledge writes before they are durable, so the
    /// fault suite can show it catches the bug.
    #[arg(long, hide = true)]
    unsafe_fault_acknowledge_before_fsync: bool,
    /// Largest client request in bytes.
    #[arg(long, default_value_t = 1_572_864)]
    max_request_bytes: usize,
    /// Most operations allowed in one transaction.
    #[arg(long, default_value_t = 128)]
    max_txn_ops: usize,
    /// --log-level and --log-format.
    #[command(flatten)]
    log: crate::logging::LogArguments,
    /// Accepted for etcd compatibility; keel always logs structured lines to stderr.
    #[arg(long, default_value = "zap")]
    logger: String,
}

/// Parses a duration the way etcd's flags write them: `500ms`, `5s`, `1m`.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text
        .find(|character: char| !character.is_ascii_digit())
        .map(|position| text.split_at(position))
        .unwrap_or((text, "s"));
    let value: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 500ms, 5s, 1m or 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        "h" => Duration::from_secs(value * 3600),
        _ => anyhow::bail!("{text:?} is not a duration like 500ms, 5s or 1m"),
    };
    if duration.is_zero() {
        anyhow::bail!("{text:?} must be positive");
    }
    Ok(duration)
}

impl ServerArguments {
    fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let listen_client_urls = parse_url_list("listen-client-urls", &self.listen_client_urls)?;
        let listen_peer_urls = parse_url_list("listen-peer-urls", &self.listen_peer_urls)?;
        let initial_cluster_state = match self.initial_cluster_state.as_str() {
            "new" => InitialClusterState::New,
            "existing" => InitialClusterState::Existing,
            other => anyhow::bail!(
                "--initial-cluster-state must be \"new\" or \"existing\", not {other:?}"
            ),
        };
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)));
        let mut config = ServerConfig::single(
            &self.name,
            data_dir,
            parse_url_address(&listen_client_urls[0])?,
            parse_url_address(&listen_peer_urls[0])?,
        );
        config.listen_client_addresses = listen_client_urls
            .iter()
            .map(|url| parse_url_address(url))
            .collect::<Result<_, _>>()?;
        config.listen_peer_addresses = listen_peer_urls
            .iter()
            .map(|url| parse_url_address(url))
            .collect::<Result<_, _>>()?;
        config.advertise_client_urls =
            parse_url_list("advertise-client-urls", &self.advertise_client_urls)?;
        if let Some(urls) = &self.listen_metrics_urls {
            config.listen_metrics_addresses = parse_url_list("listen-metrics-urls", urls)?
                .iter()
                .map(|url| parse_url_address(url))
                .collect::<Result<_, _>>()?;
        }
        config.initial_advertise_peer_urls = parse_url_list(
            "initial-advertise-peer-urls",
            &self.initial_advertise_peer_urls,
        )?;
        config.initial_cluster = parse_initial_cluster(&self.initial_cluster)?;
        config.initial_cluster_state = initial_cluster_state;
        config.initial_cluster_token = self.initial_cluster_token.clone();
        config.heartbeat_interval = Duration::from_millis(self.heartbeat_interval);
        config.election_timeout = Duration::from_millis(self.election_timeout);
        config.snapshot_count = self.snapshot_count;
        config.snapshot_catch_up_entries = self.experimental_snapshot_catchup_entries;
        config.corruption_check_interval = match self.experimental_corrupt_check_time.as_str() {
            "0" => None,
            text => Some(parse_duration(text).context("--experimental-corrupt-check-time")?),
        };
        config.enable_fault_injection = self.experimental_enable_fault_injection;
        config.fault_injection_token = self
            .experimental_fault_injection_token_file
            .as_deref()
            .map(crate::chaos::read_token_file)
            .transpose()?;
        config.unsafe_acknowledge_before_fsync = self.unsafe_fault_acknowledge_before_fsync;
        config.corrupt_values_of_key = self
            .unsafe_fault_corrupt_values_of_key
            .clone()
            .map(String::into_bytes);
        if self.quota_backend_bytes > 0 {
            config.quota_bytes = self.quota_backend_bytes;
        }
        config.auto_compaction = match (
            self.auto_compaction_mode.as_str(),
            self.auto_compaction_retention.as_str(),
        ) {
            (_, "0") => keel_server::config::AutoCompaction::Off,
            ("periodic", retention) => keel_server::config::AutoCompaction::Periodic(
                parse_duration(retention).context("--auto-compaction-retention")?,
            ),
            ("revision", retention) => {
                keel_server::config::AutoCompaction::Revision(retention.parse().with_context(
                    || format!("--auto-compaction-retention {retention:?} is not a revision count"),
                )?)
            }
            (other, _) => anyhow::bail!(
                "--auto-compaction-mode must be \"periodic\" or \"revision\", not {other:?}"
            ),
        };
        config.lease_checkpoint_interval =
            parse_duration(&self.experimental_lease_checkpoint_interval)
                .context("--experimental-lease-checkpoint-interval")?;
        config.request_bytes_max = self.max_request_bytes;
        config.txn_operations_max = self.max_txn_ops;
        config.validate()?;
        Ok(config)
    }
}

/// Runs a member until SIGINT or SIGTERM, then stops it cleanly.
pub async fn run(arguments: ServerArguments) -> anyhow::Result<()> {
    crate::logging::init(&arguments.log)?;
    let config = arguments.to_config()?;
    let mut server = Server::start(config).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, stopping"),
        _ = terminate.recv() => tracing::info!("terminated, stopping"),
        reason = server.stopped() => match reason {
            keel_server::StopReason::Removed => {
                tracing::warn!("this member was removed from the cluster; exiting");
                return Ok(());
            }
            _ => anyhow::bail!("the member stopped because its storage failed; see the log above"),
        }
    }
    server.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
