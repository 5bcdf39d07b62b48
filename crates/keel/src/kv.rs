//! `keel kv put|get|del`: the basics of etcdctl, over the same gRPC API,
//! through keel-client (failover between the endpoints, retries of what is
//! safe to retry). Human-readable output by default, `-o json` for scripts.

use anyhow::Context;
use keel_client::{Client, ClientConfig, ClientError};
use keel_types::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest};
use serde::Serialize;
use tonic::transport::Channel;

/// Options shared by every `keel kv` command.
#[derive(Debug, clap::Args)]
pub struct KvArguments {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Output format: "table" (human-readable) or "json".
    #[arg(short = 'o', long = "output", global = true, default_value = "table")]
    output: String,
    #[command(subcommand)]
    command: KvCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KvCommand {
    /// Write a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Read a key, or every key with a prefix.
    Get {
        /// The key (or prefix, with --prefix).
        key: String,
        /// Read every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Read as of this revision (0: the newest).
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Return at most this many keys (0: no limit).
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Answer from the contacted member without a quorum round (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Delete a key, or every key with a prefix.
    Del {
        /// The key (or prefix, with --prefix).
        key: String,
        /// Delete every key starting with KEY.
        #[arg(long)]
        prefix: bool,
    },
}

#[derive(Serialize)]
struct JsonKeyValue {
    key: String,
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

/// The end of the range holding every key that starts with `prefix`, as etcd computes it.
pub use keel_client::prefix_end;

/// A keel-client over the comma-separated `--endpoints`. Nothing is dialled
/// until the first request, which fails over between the endpoints.
pub async fn client(endpoints: &str) -> anyhow::Result<Client> {
    let endpoints: Vec<&str> = endpoints
        .split(',')
        .map(str::trim)
        .filter(|endpoint| !endpoint.is_empty())
        .collect();
    if endpoints.is_empty() {
        anyhow::bail!("--endpoints is empty");
    }
    Client::connect(endpoints, ClientConfig::default())
        .await
        .map_err(|error| anyhow::anyhow!("--endpoints: {error}"))
}

/// A client error as the commands print it: etcd's message when a member
/// answered (as etcdctl prints it), otherwise what went wrong.
pub fn client_error(error: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{}", error.message())
}

/// Connects to the first endpoint that accepts a connection (for `keel
/// bench`, which measures raw gRPC on purpose, and per-member operations).
pub async fn connect(endpoints: &str) -> anyhow::Result<Channel> {
    let mut last_error = None;
    for endpoint in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let url = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        match Channel::from_shared(url.clone())
            .with_context(|| format!("endpoint {endpoint:?} is not a URL"))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect()
            .await
        {
            Ok(channel) => return Ok(channel),
            Err(error) => last_error = Some(anyhow::anyhow!("{url}: {error}")),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("--endpoints is empty")))
        .context("no endpoint answered")
}

/// Runs one `keel kv` command.
pub async fn run(arguments: KvArguments) -> anyhow::Result<()> {
    let json = match arguments.output.as_str() {
        "json" => true,
        "table" | "simple" => false,
        other => anyhow::bail!("-o must be \"table\" or \"json\", not {other:?}"),
    };
    let client = client(&arguments.endpoints).await?;
    match arguments.command {
        KvCommand::Put { key, value } => {
            let response = client
                .put_request(PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    ..Default::default()
                })
                .await
                .map_err(client_error)?;
            let revision = response.header.map_or(0, |header| header.revision);
            if json {
                println!("{}", serde_json::json!({ "revision": revision }));
            } else {
                println!("OK (revision {revision})");
            }
        }
        KvCommand::Get {
            key,
            prefix,
            rev,
            limit,
            serializable,
        } => {
            let key = key.into_bytes();
            let range_end = if prefix { prefix_end(&key) } else { Vec::new() };
            let response = client
                .range(RangeRequest {
                    key,
                    range_end,
                    revision: rev,
                    limit,
                    serializable,
                    ..Default::default()
                })
                .await
                .map_err(client_error)?;
            let revision = response.header.as_ref().map_or(0, |header| header.revision);
            if json {
                let kvs: Vec<JsonKeyValue> = response
                    .kvs
                    .iter()
                    .map(|kv| JsonKeyValue {
                        key: String::from_utf8_lossy(&kv.key).into_owned(),
                        value: String::from_utf8_lossy(&kv.value).into_owned(),
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                        version: kv.version,
                        lease: kv.lease,
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "revision": revision,
                        "count": response.count,
                        "more": response.more,
                        "kvs": kvs,
                    })
                );
            } else if response.kvs.is_empty() {
                println!("(no keys; revision {revision})");
            } else {
                let width = response
                    .kvs
                    .iter()
                    .map(|kv| kv.key.len())
                    .max()
                    .unwrap_or(3)
                    .max(3);
                println!("{:<width$}  {:>8}  VALUE", "KEY", "MOD_REV");
                for kv in &response.kvs {
                    println!(
                        "{:<width$}  {:>8}  {}",
                        String::from_utf8_lossy(&kv.key),
                        kv.mod_revision,
                        String::from_utf8_lossy(&kv.value)
                    );
                }
                if response.more {
                    println!("… {} keys in all", response.count);
                }
            }
        }
        KvCommand::Del { key, prefix } => {
            let key = key.into_bytes();
            let range_end = if prefix { prefix_end(&key) } else { Vec::new() };
            let response = client
                .delete_range(DeleteRangeRequest {
                    key,
                    range_end,
                    ..Default::default()
                })
                .await
                .map_err(client_error)?;
            let revision = response.header.map_or(0, |header| header.revision);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "deleted": response.deleted, "revision": revision })
                );
            } else {
                println!("deleted {} (revision {revision})", response.deleted);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
