//! `keel lease grant|revoke|keep-alive|ttl|list`: etcd's Lease service from the
//! command line, as `etcdctl lease` offers it. Lease ids are printed and read
//! in hexadecimal, as etcdctl does, so ids can be passed between the two.
//! Human-readable output by default, `-o json` (one object per line) for scripts.
//!
//! This module also holds [`KeptLease`], the background keep-alive that
//! `keel lock` and `keel elect` hold their keys with.

use std::time::Duration;

use anyhow::Context;
use keel_client::{Client, LeaseKeeper};

use crate::kv::{client, client_error};

/// Keep-alives are sent this many times per TTL, as etcd's client does (every
/// third of the TTL), so that two can be lost before the lease expires.
const KEEP_ALIVES_PER_TTL: u32 = 3;
/// The shortest interval between keep-alives, so a 1 s TTL does not flood the server.
const KEEP_ALIVE_INTERVAL_MIN: Duration = Duration::from_millis(300);

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

/// Runs one `keel lease` command.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let output = Output::parse(&arguments.output)?;
    let client = client(&arguments.endpoints).await?;
    match arguments.command {
        LeaseCommand::Grant { ttl } => {
            let response = client.lease_grant(ttl, 0).await.map_err(client_error)?;
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
            let response = client.lease_revoke(id).await.map_err(client_error)?;
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
            keep_alive_command(&client, parse_lease_id(&id)?, once, output).await?
        }
        LeaseCommand::Ttl { id, keys } => {
            let id = parse_lease_id(&id)?;
            let response = client
                .lease_time_to_live(id, keys)
                .await
                .map_err(client_error)?;
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
            let response = client.lease_leases().await.map_err(client_error)?;
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
    client: &Client,
    id: i64,
    once: bool,
    output: Output,
) -> anyhow::Result<()> {
    let mut interrupts = Interrupts::listen()?;
    let mut interval: Option<Duration> = None;
    loop {
        // Each keep-alive is retried by the client on another member if its
        // stream breaks (a keep-alive is safe to repeat).
        let response = tokio::select! {
            response = client.lease_keep_alive_once(id) => response.map_err(client_error)?,
            () = interrupts.received() => return Ok(()),
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

/// A lease granted for a session (a lock or an election) and kept alive by
/// keel-client's [`LeaseKeeper`] until it is revoked or dropped.
///
/// The keeper knows the lease is lost when a member answers a keep-alive with
/// TTL 0 (expired or revoked) and also, by its own clock, when no keep-alive
/// has been acknowledged for a whole TTL: a process that was paused (SIGSTOP,
/// a long stall) past its TTL learns at once on waking that its lease, and so
/// its lock, may be gone, without waiting for the server's answer. Keep-alives
/// fail over between the endpoints.
pub struct KeptLease {
    /// The lease id.
    pub id: i64,
    /// The TTL the server granted, in seconds.
    pub ttl_seconds: i64,
    client: Client,
    keeper: LeaseKeeper,
}

impl KeptLease {
    /// Grants a lease of `ttl_seconds` and starts keeping it alive.
    pub async fn grant(client: &Client, ttl_seconds: i64) -> anyhow::Result<KeptLease> {
        let response = client
            .lease_grant(ttl_seconds, 0)
            .await
            .map_err(client_error)
            .context("granting the session's lease")?;
        let keeper = client
            .keep_alive(response.id)
            .await
            .map_err(client_error)
            .context("keeping the session's lease alive")?;
        Ok(KeptLease {
            id: response.id,
            ttl_seconds: response.ttl,
            client: client.clone(),
            keeper,
        })
    }

    /// Completes when the lease is lost, with the reason.
    pub async fn lost(&self) -> String {
        match self.keeper.lost().await {
            keel_client::ClientError::LeaseLost { reason, .. } => reason,
            other => other.to_string(),
        }
    }

    /// Stops keeping the lease alive and revokes it, which deletes every key
    /// attached to it (the lock or candidate key among them).
    pub async fn revoke(self) -> anyhow::Result<()> {
        self.keeper.stop();
        match self.client.lease_revoke(self.id).await {
            Ok(_) => Ok(()),
            // Already gone (expired): nothing left to release.
            Err(error) if error.is_not_found() => Ok(()),
            Err(error) => Err(client_error(error)).context("revoking the session's lease"),
        }
    }
}
