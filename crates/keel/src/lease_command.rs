//! `keel lease grant|revoke|keep-alive|ttl|list`: etcd's Lease service from the
//! command line, as `etcdctl lease` offers it. Lease ids are printed and read
//! in hexadecimal, as etcdctl does, so ids can be passed between the two.
//! Human-readable output by default, `-o json` (one object per line) for scripts.
//!
//! This module also holds [`KeptLease`], the background keep-alive that
//! `keel lock` and `keel elect` hold their keys with.

use std::time::Duration;

use anyhow::Context;
use keel_server::api::etcdserverpb::lease_client::LeaseClient;
use keel_types::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::kv::connect;

/// Keep-alives are sent this many times per TTL, as etcd's client does (every
/// third of the TTL), so that two can be lost before the lease expires.
const KEEP_ALIVES_PER_TTL: u32 = 3;
/// The shortest interval between keep-alives, so a 1 s TTL does not flood the server.
const KEEP_ALIVE_INTERVAL_MIN: Duration = Duration::from_millis(300);
/// How long to wait before opening a new keep-alive stream after one failed.
const KEEP_ALIVE_RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// Keep-alive requests queued on one stream before the sender waits.
const KEEP_ALIVE_QUEUE_MAX: usize = 4;

/// Options of `keel lease`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Output format: "table" (human-readable) or "json".
    #[arg(short = 'o', long = "output", global = true, default_value = "table")]
    output: String,
    #[command(subcommand)]
    command: LeaseCommand,
}

#[derive(Debug, clap::Subcommand)]
enum LeaseCommand {
    /// Grant a lease that expires TTL seconds after its last keep-alive.
    Grant {
        /// Time to live, in seconds.
        ttl: i64,
    },
    /// Revoke a lease, deleting every key attached to it.
    Revoke {
        /// The lease id, in hexadecimal.
        id: String,
    },
    /// Keep a lease alive until Ctrl-C (or once, with --once).
    KeepAlive {
        /// The lease id, in hexadecimal.
        id: String,
        /// Send one keep-alive and exit.
        #[arg(long)]
        once: bool,
    },
    /// Show a lease's granted and remaining time to live.
    Ttl {
        /// The lease id, in hexadecimal.
        id: String,
        /// Also list the keys attached to the lease.
        #[arg(long)]
        keys: bool,
    },
    /// List every lease.
    List,
}

/// Parses a lease id the way etcdctl does: hexadecimal, with or without `0x`.
pub fn parse_lease_id(text: &str) -> anyhow::Result<i64> {
    let digits = text.trim_start_matches("0x");
    i64::from_str_radix(digits, 16)
        .with_context(|| format!("bad lease ID {text:?}: expected a hexadecimal number"))
}

/// Whether to print for people or for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Human-readable lines.
    Table,
    /// One JSON object per line.
    Json,
}

impl Output {
    /// Parses `-o`.
    pub fn parse(text: &str) -> anyhow::Result<Output> {
        match text {
            "table" | "simple" => Ok(Output::Table),
            "json" => Ok(Output::Json),
            other => anyhow::bail!("-o must be \"table\" or \"json\", not {other:?}"),
        }
    }
}

/// A gRPC status as an error with etcd's message (what etcdctl prints).
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

/// Runs one `keel lease` command.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let output = Output::parse(&arguments.output)?;
    let channel = connect(&arguments.endpoints).await?;
    let mut client = LeaseClient::new(channel.clone());
    match arguments.command {
        LeaseCommand::Grant { ttl } => {
            let response = client
                .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                .await
                .map_err(status_error)?
                .into_inner();
            if !response.error.is_empty() {
                anyhow::bail!("{}", response.error);
            }
            match output {
                Output::Table => println!(
                    "lease {:016x} granted with TTL({}s)",
                    response.id, response.ttl
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "id": response.id,
                        "id_hex": format!("{:016x}", response.id),
                        "ttl": response.ttl,
                        "revision": response.header.map_or(0, |header| header.revision),
                    })
                ),
            }
        }
        LeaseCommand::Revoke { id } => {
            let id = parse_lease_id(&id)?;
            let response = client
                .lease_revoke(LeaseRevokeRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Output::Table => println!("lease {id:016x} revoked"),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "id": id,
                        "revoked": true,
                        "revision": response.header.map_or(0, |header| header.revision),
                    })
                ),
            }
        }
        LeaseCommand::KeepAlive { id, once } => {
            keep_alive_command(channel, parse_lease_id(&id)?, once, output).await?
        }
        LeaseCommand::Ttl { id, keys } => {
            let id = parse_lease_id(&id)?;
            let response = client
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys })
                .await
                .map_err(status_error)?
                .into_inner();
            let key_names: Vec<String> = response
                .keys
                .iter()
                .map(|key| String::from_utf8_lossy(key).into_owned())
                .collect();
            match output {
                Output::Table if response.ttl == -1 => {
                    println!("lease {id:016x} already expired")
                }
                Output::Table if keys => println!(
                    "lease {id:016x} granted with TTL({}s), remaining({}s), attached keys({})",
                    response.granted_ttl,
                    response.ttl,
                    key_names.join(", ")
                ),
                Output::Table => println!(
                    "lease {id:016x} granted with TTL({}s), remaining({}s)",
                    response.granted_ttl, response.ttl
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "id": id,
                        "granted_ttl": response.granted_ttl,
                        "ttl": response.ttl,
                        "expired": response.ttl == -1,
                        "keys": key_names,
                    })
                ),
            }
        }
        LeaseCommand::List => {
            let response = client
                .lease_leases(LeaseLeasesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let ids: Vec<i64> = response.leases.iter().map(|lease| lease.id).collect();
            match output {
                Output::Table => {
                    println!(
                        "{} lease{}",
                        ids.len(),
                        if ids.len() == 1 { "" } else { "s" }
                    );
                    for id in &ids {
                        println!("{id:016x}");
                    }
                }
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "count": ids.len(),
                        "leases": ids,
                        "leases_hex": ids.iter().map(|id| format!("{id:016x}")).collect::<Vec<_>>(),
                    })
                ),
            }
        }
    }
    Ok(())
}

/// `keel lease keep-alive`: prints every acknowledgement; fails when the lease
/// is gone (the server answers TTL 0), as `etcdctl lease keep-alive` does.
async fn keep_alive_command(
    channel: Channel,
    id: i64,
    once: bool,
    output: Output,
) -> anyhow::Result<()> {
    let mut interrupts = Interrupts::listen()?;
    let mut client = LeaseClient::new(channel);
    let (requests, receiver) = mpsc::channel(KEEP_ALIVE_QUEUE_MAX);
    let mut responses = client
        .lease_keep_alive(ReceiverStream::new(receiver))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut interval: Option<Duration> = None;
    loop {
        if requests.send(LeaseKeepAliveRequest { id }).await.is_err() {
            anyhow::bail!("the keep-alive stream closed");
        }
        let response = tokio::select! {
            response = responses.message() => response.map_err(status_error)?,
            () = interrupts.received() => return Ok(()),
        };
        let Some(response) = response else {
            anyhow::bail!("the server closed the keep-alive stream");
        };
        if response.ttl <= 0 {
            match output {
                Output::Table => println!("lease {id:016x} expired or revoked."),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "id": id, "ttl": 0, "expired": true })
                ),
            }
            anyhow::bail!("lease {id:016x} expired or revoked");
        }
        match output {
            Output::Table => println!("lease {id:016x} keepalived with TTL({})", response.ttl),
            Output::Json => println!(
                "{}",
                serde_json::json!({ "id": id, "ttl": response.ttl, "expired": false })
            ),
        }
        if once {
            return Ok(());
        }
        let every = *interval.get_or_insert_with(|| keep_alive_interval(response.ttl));
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = interrupts.received() => return Ok(()),
        }
    }
}

/// How often to send keep-alives for a lease of `ttl_seconds`.
fn keep_alive_interval(ttl_seconds: i64) -> Duration {
    let ttl = Duration::from_secs(ttl_seconds.max(1) as u64);
    (ttl / KEEP_ALIVES_PER_TTL).max(KEEP_ALIVE_INTERVAL_MIN)
}

/// Ctrl-C (SIGINT) and SIGTERM, listened for from creation on.
///
/// One listener lives for the whole command: a signal that arrives between
/// two waits is kept until the next one, whereas a listener created per wait
/// would miss it (and, tokio's handler being installed, the process would no
/// longer die of it either).
pub struct Interrupts {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Starts listening.
    pub fn listen() -> anyhow::Result<Interrupts> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Interrupts {
            interrupt: signal(SignalKind::interrupt()).context("listening for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// Completes when Ctrl-C or SIGTERM has arrived (since the last call).
    pub async fn received(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// A lease granted for a session (a lock or an election) and kept alive by a
/// background task until it is revoked or dropped.
///
/// The task knows the lease is lost when the server answers a keep-alive with
/// TTL 0 (expired or revoked) and also, by its own clock, when no keep-alive
/// has been acknowledged for a whole TTL: a process that was paused (SIGSTOP,
/// a long stall) past its TTL learns at once on waking that its lease, and so
/// its lock, may be gone, without waiting for the server's answer.
pub struct KeptLease {
    /// The lease id.
    pub id: i64,
    /// The TTL the server granted, in seconds.
    pub ttl_seconds: i64,
    channel: Channel,
    /// Why the lease was lost; `None` while it is held.
    lost: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeptLease {
    /// Grants a lease of `ttl_seconds` and starts keeping it alive.
    pub async fn grant(channel: Channel, ttl_seconds: i64) -> anyhow::Result<KeptLease> {
        let mut client = LeaseClient::new(channel.clone());
        let granted_at = Instant::now();
        let response = client
            .lease_grant(LeaseGrantRequest {
                ttl: ttl_seconds,
                id: 0,
            })
            .await
            .map_err(status_error)
            .context("granting the session's lease")?
            .into_inner();
        if !response.error.is_empty() {
            anyhow::bail!("granting the session's lease: {}", response.error);
        }
        let (lost_sender, lost) = watch::channel(None);
        let task = tokio::spawn(keep_alive_task(
            channel.clone(),
            response.id,
            response.ttl,
            granted_at,
            lost_sender,
        ));
        Ok(KeptLease {
            id: response.id,
            ttl_seconds: response.ttl,
            channel,
            lost,
            task,
        })
    }

    /// Completes when the lease is lost, with the reason.
    pub async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        let reason = match lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the keep-alive task stopped".to_string(),
        };
        reason
    }

    /// Stops keeping the lease alive and revokes it, which deletes every key
    /// attached to it (the lock or candidate key among them).
    pub async fn revoke(self) -> anyhow::Result<()> {
        self.task.abort();
        let mut client = LeaseClient::new(self.channel.clone());
        match client
            .lease_revoke(LeaseRevokeRequest { id: self.id })
            .await
        {
            Ok(_) => Ok(()),
            // Already gone (expired): nothing left to release.
            Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(status) => Err(status_error(status)).context("revoking the session's lease"),
        }
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps lease `id` alive until it is lost, then says why on `lost`.
async fn keep_alive_task(
    channel: Channel,
    id: i64,
    ttl_seconds: i64,
    granted_at: Instant,
    lost: watch::Sender<Option<String>>,
) {
    let ttl = Duration::from_secs(ttl_seconds.max(1) as u64);
    let interval = keep_alive_interval(ttl_seconds);
    // The lease is known to live until this instant: a TTL after the last
    // keep-alive the server acknowledged (counted from when it was sent).
    let mut expires_at = granted_at + ttl;
    let reason = 'session: loop {
        let mut client = LeaseClient::new(channel.clone());
        let (requests, receiver) = mpsc::channel(KEEP_ALIVE_QUEUE_MAX);
        let stream = tokio::select! {
            stream = client.lease_keep_alive(ReceiverStream::new(receiver)) => stream,
            () = tokio::time::sleep_until(expires_at) => {
                break 'session format!("no keep-alive was acknowledged within the lease's TTL ({ttl_seconds}s)");
            }
        };
        let mut responses = match stream {
            Ok(response) => response.into_inner(),
            Err(_) => {
                tokio::time::sleep(KEEP_ALIVE_RETRY_INTERVAL).await;
                continue;
            }
        };
        loop {
            let sent_at = Instant::now();
            if sent_at >= expires_at {
                break 'session format!(
                    "no keep-alive was acknowledged within the lease's TTL ({ttl_seconds}s)"
                );
            }
            if requests.send(LeaseKeepAliveRequest { id }).await.is_err() {
                break;
            }
            let response = tokio::select! {
                response = responses.message() => response,
                () = tokio::time::sleep_until(expires_at) => {
                    break 'session format!(
                        "no keep-alive was acknowledged within the lease's TTL ({ttl_seconds}s)"
                    );
                }
            };
            match response {
                Ok(Some(response)) if response.ttl <= 0 => {
                    break 'session "the lease expired or was revoked".to_string();
                }
                Ok(Some(response)) => {
                    expires_at = sent_at + Duration::from_secs(response.ttl as u64);
                }
                // The stream broke (a leader change, a lost connection): open
                // another one, as long as the lease may still be alive.
                Ok(None) | Err(_) => {
                    tokio::time::sleep(KEEP_ALIVE_RETRY_INTERVAL).await;
                    break;
                }
            }
            tokio::time::sleep(interval).await;
        }
    };
    let _ = lost.send(Some(reason));
}
