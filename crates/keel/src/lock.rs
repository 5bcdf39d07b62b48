//! `keel lock NAME [--ttl SECONDS] [-- COMMAND ARGS...]`: takes a distributed
//! lock through etcd's Lock service, held by a lease that a background task
//! keeps alive.
//!
//! With a command, runs it while holding the lock and releases the lock after;
//! keel exits with the command's exit code. Without one, prints the lock key
//! and its fencing token and holds the lock until Ctrl-C, as `etcdctl lock`.
//!
//! The fencing token is the lock key's create revision: it strictly increases
//! from one holder of the lock to the next. A lock alone cannot stop a holder
//! that was paused past its lease's TTL from acting after the next holder took
//! over; the token can. A command gets it in `KEEL_LOCK_REVISION` (and the key
//! in `KEEL_LOCK_KEY`) to guard its writes: in keel, by a Txn that compares
//! `create_revision(KEEL_LOCK_KEY) == KEEL_LOCK_REVISION`; elsewhere, by
//! passing the token to the resource, which refuses tokens lower than the
//! highest it has seen. See the server's `lock` module for the protocol.
//!
//! If the lease is lost while the command runs (a pause, a partition), keel
//! warns on standard error but lets the command finish: killing it would race
//! with its writes anyway, and the token is what makes them safe. keel then
//! exits with an error even if the command succeeded.

use anyhow::Context;
use keel_client::Client;

use crate::kv::{client, client_error};
use crate::lease_command::{Interrupts, KeptLease, Output};

/// Exit code when the command was killed by a signal, as shells report it: 128
/// plus the signal number.
const SIGNAL_EXIT_CODE_BASE: i32 = 128;

/// Options of `keel lock`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The fencing token (KEEL_LOCK_REVISION) is the lock key's create revision. It \
strictly increases across successive holders of the lock. A holder paused past \
its lease TTL may still believe it holds the lock; guard every write either with \
a Txn comparing create_revision(KEEL_LOCK_KEY) == KEEL_LOCK_REVISION, or by \
passing the token to the protected resource, which rejects any token lower than \
the highest it has seen.")]
pub struct Arguments {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Output format: "table" (human-readable) or "json".
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: String,
    /// Time to live of the session's lease, in seconds: how long the lock
    /// outlives this process if it dies or stalls.
    #[arg(long, default_value_t = 10)]
    ttl: i64,
    /// The lock's name.
    name: String,
    /// The command to run while holding the lock (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Runs `keel lock`.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let output = Output::parse(&arguments.output)?;
    let mut interrupts = Interrupts::listen()?;
    let client = client(&arguments.endpoints).await?;
    let lease = KeptLease::grant(&client, arguments.ttl).await?;
    // Dropping the Lock call (on Ctrl-C or a lost lease) cancels it, and the
    // server then leaves the queue; revoking the lease removes the key anyway.
    let locked = tokio::select! {
        locked = client.lock(arguments.name.clone().into_bytes(), lease.id) => locked,
        () = interrupts.received() => {
            lease.revoke().await?;
            anyhow::bail!("interrupted while waiting for lock {:?}", arguments.name);
        }
        reason = lease.lost() => {
            anyhow::bail!("lost the session while waiting for lock {:?}: {reason}", arguments.name);
        }
    };
    let key = match locked {
        Ok(response) => response.key,
        Err(error) => {
            let _ = lease.revoke().await;
            return Err(client_error(error))
                .with_context(|| format!("locking {:?}", arguments.name));
        }
    };
    let key_text = String::from_utf8_lossy(&key).into_owned();
    let token = match fencing_token(&client, &key).await {
        Ok(token) => token,
        Err(error) => {
            let _ = lease.revoke().await;
            return Err(error);
        }
    };

    if arguments.command.is_empty() {
        match output {
            Output::Table => {
                println!("{key_text}");
                println!("fencing token {token}; holding the lock until Ctrl-C");
            }
            Output::Json => println!(
                "{}",
                serde_json::json!({
                    "event": "locked",
                    "key": key_text,
                    "revision": token,
                    "lease": lease.id,
                    "ttl": lease.ttl_seconds,
                })
            ),
        }
        tokio::select! {
            () = interrupts.received() => {}
            reason = lease.lost() => {
                anyhow::bail!("lock {key_text} lost: {reason}");
            }
        }
        unlock(&client, &key).await;
        lease.revoke().await?;
        match output {
            Output::Table => println!("released {key_text}"),
            Output::Json => println!(
                "{}",
                serde_json::json!({ "event": "unlocked", "key": key_text })
            ),
        }
        return Ok(());
    }

    let spawned = tokio::process::Command::new(&arguments.command[0])
        .args(&arguments.command[1..])
        .env("KEEL_LOCK_KEY", &key_text)
        .env("KEEL_LOCK_REVISION", token.to_string())
        .spawn();
    let mut lost = None;
    let status = match spawned {
        Ok(mut child) => loop {
            tokio::select! {
                status = child.wait() => break status,
                reason = lease.lost(), if lost.is_none() => {
                    eprintln!(
                        "keel: lock {key_text} lost while the command runs: {reason}; \
                         writes guarded by fencing token {token} will be refused"
                    );
                    lost = Some(reason);
                }
                () = interrupts.received() => forward_termination(&child),
            }
        },
        Err(error) => Err(error),
    };
    // The keep-alive task may not have noticed a loss yet (a process paused
    // past its TTL races its command on waking): ask the cluster whether the
    // lock key is still the one this holder created.
    if lost.is_none() && fencing_token(&client, &key).await.ok() != Some(token) {
        lost = Some("the lock key is gone".to_string());
    }
    unlock(&client, &key).await;
    lease.revoke().await?;
    let status = status.with_context(|| format!("running {:?}", arguments.command.join(" ")))?;
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(signal)) => SIGNAL_EXIT_CODE_BASE + signal,
        (None, None) => 1,
    };
    if code != 0 {
        // The command's own exit code, after the lock is released.
        std::process::exit(code);
    }
    if let Some(reason) = lost {
        anyhow::bail!("the command finished, but lock {key_text} was lost while it ran: {reason}");
    }
    Ok(())
}

/// The fencing token: the lock key's create revision, read back (a holder
/// that waited got the header of a later read, not of its key's creation).
async fn fencing_token(client: &Client, key: &[u8]) -> anyhow::Result<i64> {
    let kv = client
        .get(key.to_vec())
        .await
        .map_err(client_error)
        .context("reading the lock key")?;
    kv.map(|kv| kv.create_revision)
        .context("lock lost on init: the lock key is already gone")
}

/// Passes Ctrl-C or SIGTERM on to the command as SIGTERM, so that it ends
/// (and the lock is released) however keel was asked to stop. A command run
/// from a terminal also gets Ctrl-C's SIGINT itself, as a member of the
/// foreground process group.
fn forward_termination(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

/// Releases the lock; a failure is only reported, as revoking the lease next
/// releases it too.
async fn unlock(client: &Client, key: &[u8]) {
    if let Err(error) = client.unlock(key.to_vec()).await {
        eprintln!(
            "keel: unlock failed ({}); revoking the lease releases it",
            error.message()
        );
    }
}
