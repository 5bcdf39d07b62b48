//! Operations commands, modelled on etcdctl's: `keel status` (a table of
//! every member), `keel member list|add|remove|update|promote`, `keel snapshot
//! save|status|restore`, `keel defrag`, `keel alarm list|disarm` and
//! `keel move-leader`. Each command prints a human-readable table by default
//! and one JSON document with `-o json`, for scripts.
//!
//! Member ids are printed and read in hexadecimal, as etcdctl does, so they can
//! be passed between the two tools. The commands talk to the cluster through
//! etcd's Cluster and Maintenance gRPC services only, so they work against any
//! member; `status` and `move-leader` then find the other members (and the
//! leader) through the membership list.

mod maintenance;
mod member;
mod snapshot;
mod status;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::Channel;

/// How long one request (other than a snapshot stream) may take before the
/// command gives up, so a member that accepts connections but never answers
/// cannot hang a script. Membership changes wait for a commit, and a leader
/// transfer for an election, so this is generous.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one attempt at one member may take through keel-client before
/// a read moves to another member (a write then fails: it may have happened).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting to one member may take (as `kv::connect` allows).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The operations commands, each with its own arguments.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// A table of every member: leader, term, index, applied, size, learner.
    Status(status::Arguments),
    /// List, add, remove, update and promote members.
    Member(member::Arguments),
    /// Save a backup, restore one into a new data directory, or check one.
    Snapshot(snapshot::Arguments),
    /// Defragment members' storage.
    Defrag(maintenance::DefragArguments),
    /// List or disarm alarms.
    Alarm(maintenance::AlarmArguments),
    /// Hand leadership to another member.
    MoveLeader(maintenance::MoveLeaderArguments),
}

/// Runs one operations command.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Status(arguments) => status::run(arguments).await,
        Command::Member(arguments) => member::run(arguments).await,
        Command::Snapshot(arguments) => snapshot::run(arguments).await,
        Command::Defrag(arguments) => maintenance::defrag(arguments).await,
        Command::Alarm(arguments) => maintenance::alarm(arguments).await,
        Command::MoveLeader(arguments) => maintenance::move_leader(arguments).await,
    }
}

/// Options every command that talks to the cluster shares.
#[derive(Debug, clap::Args)]
pub struct ClientOptions {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Output format: "table" (human-readable) or "json".
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl ClientOptions {
    /// The endpoints, in the order given.
    fn endpoint_list(&self) -> Vec<String> {
        self.endpoints
            .split(',')
            .map(str::trim)
            .filter(|endpoint| !endpoint.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// A channel to the first endpoint that accepts a connection (for the
    /// snapshot stream, which comes whole from one member).
    async fn connect(&self) -> anyhow::Result<Channel> {
        crate::kv::connect(&self.endpoints).await
    }

    /// A keel-client over the endpoints, for calls any member answers: it
    /// fails over between them. Each attempt may take [`ATTEMPT_TIMEOUT`],
    /// the whole request [`REQUEST_TIMEOUT`].
    async fn client(&self) -> anyhow::Result<keel_client::Client> {
        let config = keel_client::ClientConfig {
            attempt_timeout: ATTEMPT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            ..keel_client::ClientConfig::default()
        };
        keel_client::Client::connect(self.endpoint_list(), config)
            .await
            .map_err(|error| anyhow::anyhow!("--endpoints: {error}"))
    }
}

/// A channel to one member's client URL. Unlike `kv::connect`, which tries a
/// list, this keeps the transport error's causes ("Connection refused"), which
/// is what an operator reading a status table needs.
async fn connect_url(url: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("{url:?} is not a URL"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(anyhow::Error::new)
}

/// Whether to print for people or for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    // Plain comments, not doc comments: clap would print them under `--help`
    // as a list longer than the option's own description.
    // Human-readable lines and tables ("simple" is etcdctl's name for it).
    #[value(alias = "simple")]
    Table,
    // One JSON document on standard output.
    Json,
}

/// Sends one request with [`REQUEST_TIMEOUT`], turning a gRPC error into the
/// server's message (what etcdctl prints).
async fn request<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow::anyhow!("{}", status.message())),
        Err(_) => anyhow::bail!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
    }
}

/// A keel-client answer, or the member's message (what etcdctl prints).
fn answer<T>(result: Result<T, keel_client::ClientError>) -> anyhow::Result<T> {
    result.map_err(crate::kv::client_error)
}

/// Parses a member id the way etcdctl does: hexadecimal, with or without `0x`.
fn parse_member_id(text: &str) -> anyhow::Result<u64> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    u64::from_str_radix(digits, 16)
        .with_context(|| format!("bad member ID {text:?}: expected a hexadecimal number"))
}

/// A member id as every keel command prints it.
fn member_id_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// Sizes in decimal units, as etcdctl prints them ("2.1 MB").
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// Prints rows under a header, each column as wide as its widest cell (the
/// tables of every command: `keel member list`, `service`, `job`, `alloc`, …).
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Quotes a word for a POSIX shell only when it needs it, so printed command
/// lines can be pasted.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "-_./:=,@%+".contains(character));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_parse_as_etcdctl_prints_them() {
        assert_eq!(
            parse_member_id("8e9e05c52164694d").unwrap(),
            0x8e9e_05c5_2164_694d
        );
        assert_eq!(parse_member_id("0x1f").unwrap(), 0x1f);
        assert!(parse_member_id("m1").is_err());
        assert_eq!(member_id_hex(0x1f), "000000000000001f");
    }

    #[test]
    fn sizes_read_like_etcdctl() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(20_480), "20 kB");
        assert_eq!(human_bytes(2_100_000), "2.1 MB");
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(
            shell_word("a=http://127.0.0.1:2380,b=http://127.0.0.1:2382"),
            "a=http://127.0.0.1:2380,b=http://127.0.0.1:2382"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
