//! `keel elect NAME VALUE` campaigns in a leader election through etcd's
//! Election service, and `keel elect NAME --listen` observes it.
//!
//! A candidate waits until elected, prints its leader key and value, and then
//! holds leadership until Ctrl-C, when it resigns. While it leads, every line
//! read from standard input is proclaimed as its new value. Its candidacy is
//! held by a lease that a background task keeps alive; when the lease is lost
//! (a pause or a partition longer than the TTL), so is leadership, and keel
//! exits with an error. The leader key's create revision is a fencing token,
//! as a lock's (see `keel lock --help`).
//!
//! An observer prints the leader at the start and whenever it or its value
//! changes, until Ctrl-C.

use anyhow::Context;
use keel_client::Client;
use keel_types::v3electionpb::LeaderKey;

use crate::kv::{client, client_error};
use crate::lease_command::{Interrupts, KeptLease, Output};

/// Lines of standard input read ahead of their proclamation.
const PROCLAIM_QUEUE_MAX: usize = 16;

/// Options of `keel elect`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Output format: "table" (human-readable) or "json".
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: String,
    /// Time to live of the candidate's lease, in seconds: how long leadership
    /// outlives this process if it dies or stalls (etcd's session default).
    #[arg(long, default_value_t = 60)]
    ttl: i64,
    /// Observe the election instead of campaigning: print each new leader.
    #[arg(short = 'l', long)]
    listen: bool,
    /// The election's name.
    name: String,
    /// The value to campaign with (required unless --listen).
    value: Option<String>,
}

/// Runs `keel elect`.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let output = Output::parse(&arguments.output)?;
    match (arguments.listen, arguments.value.clone()) {
        (true, None) => observe(&arguments, output).await,
        (false, Some(value)) => campaign(&arguments, value, output).await,
        (true, Some(_)) => {
            anyhow::bail!("a value was given with --listen: observers do not campaign")
        }
        (false, None) => anyhow::bail!("no value to campaign with (or --listen to observe)"),
    }
}

async fn campaign(arguments: &Arguments, value: String, output: Output) -> anyhow::Result<()> {
    let mut interrupts = Interrupts::listen()?;
    let client = client(&arguments.endpoints).await?;
    let lease = KeptLease::grant(&client, arguments.ttl).await?;
    // Dropping the Campaign call cancels it, and the server leaves the queue;
    // revoking the lease removes the candidate key anyway.
    let campaigned = tokio::select! {
        campaigned = client.campaign(
            arguments.name.clone().into_bytes(),
            lease.id,
            value.clone().into_bytes(),
        ) => campaigned,
        () = interrupts.received() => {
            lease.revoke().await?;
            anyhow::bail!("interrupted while campaigning in {:?}", arguments.name);
        }
        reason = lease.lost() => {
            anyhow::bail!("lost the session while campaigning in {:?}: {reason}", arguments.name);
        }
    };
    let leader = match campaigned {
        Ok(leader) => leader,
        Err(error) => {
            let _ = lease.revoke().await;
            return Err(client_error(error))
                .with_context(|| format!("campaigning in {:?}", arguments.name));
        }
    };
    print_leader(output, "elected", &leader.key, value.as_bytes(), leader.rev);
    let result = lead(&client, &lease, &leader, output, &mut interrupts).await;
    if result.is_ok() {
        client
            .resign(leader.clone())
            .await
            .map_err(client_error)
            .context("resigning")?;
        if output == Output::Table {
            println!("resigned");
        } else {
            println!("{}", serde_json::json!({ "event": "resigned" }));
        }
    }
    lease.revoke().await?;
    result
}

/// Leads until Ctrl-C, proclaiming each line of standard input.
async fn lead(
    client: &Client,
    lease: &KeptLease,
    leader: &LeaderKey,
    output: Output,
    interrupts: &mut Interrupts,
) -> anyhow::Result<()> {
    let mut lines = standard_input_lines();
    let mut input_open = true;
    loop {
        tokio::select! {
            () = interrupts.received() => return Ok(()),
            reason = lease.lost() => anyhow::bail!("leadership lost: {reason}"),
            line = lines.recv(), if input_open => match line {
                Some(value) => {
                    client
                        .proclaim(leader.clone(), value.clone().into_bytes())
                        .await
                        .map_err(client_error)
                        .context("proclaiming")?;
                    print_leader(output, "proclaimed", &leader.key, value.as_bytes(), leader.rev);
                }
                // No more input: keep leading until Ctrl-C.
                None => input_open = false,
            },
        }
    }
}

/// Lines of standard input, read on a thread of their own (reading a terminal
/// or pipe blocks), at most [`PROCLAIM_QUEUE_MAX`] ahead of the proclamations.
fn standard_input_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (sender, receiver) = tokio::sync::mpsc::channel(PROCLAIM_QUEUE_MAX);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if sender.blocking_send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

async fn observe(arguments: &Arguments, output: Output) -> anyhow::Result<()> {
    let mut interrupts = Interrupts::listen()?;
    let client = client(&arguments.endpoints).await?;
    // The observer resumes on another member if its stream breaks.
    let mut leaders = client
        .observe(arguments.name.clone().into_bytes())
        .await
        .map_err(client_error)
        .with_context(|| format!("observing {:?}", arguments.name))?;
    loop {
        let leader = tokio::select! {
            () = interrupts.received() => return Ok(()),
            leader = leaders.next() => leader,
        };
        let Some(leader) = leader else {
            anyhow::bail!("the observation of {:?} ended", arguments.name);
        };
        let leader = leader
            .map_err(client_error)
            .with_context(|| format!("observing {:?}", arguments.name))?;
        if let Some(kv) = leader.kv {
            print_leader(output, "leader", &kv.key, &kv.value, kv.create_revision);
        }
    }
}

fn print_leader(output: Output, event: &str, key: &[u8], value: &[u8], create_revision: i64) {
    let key = String::from_utf8_lossy(key);
    let value = String::from_utf8_lossy(value);
    match output {
        Output::Table => println!("{event} {key} = {value} (fencing token {create_revision})"),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "event": event,
                "key": key,
                "value": value,
                "revision": create_revision,
            })
        ),
    }
}
