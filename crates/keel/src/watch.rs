//! `keel watch KEY [--prefix] [--rev N] [--prev-kv] [-o json]`: prints every
//! change to a key or prefix as it happens, from now or from a past revision,
//! until Ctrl-C.
//!
//! The default output is `etcdctl watch`'s: per event its type, then (with
//! `--prev-kv`) the previous key and value, then the key and value, each on
//! its own line. `-o json` prints one JSON object per response instead.
//!
//! If the connection breaks after the watch started, keel-client's watcher
//! opens a new stream (on another member if need be) and resumes from the
//! revision after the last one printed, so no event is lost or printed
//! twice; the server's guarantees (ordered, no gaps, no duplicates) make
//! that exact.

use std::io::Write;

use anyhow::Context;
use keel_client::{ClientError, WatchOptions};
use keel_types::etcdserverpb::WatchResponse;
use keel_types::mvccpb::event::EventType;
use keel_types::mvccpb::{Event, KeyValue};
use serde::Serialize;

use crate::kv::{client, client_error, prefix_end};

/// Options of `keel watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArguments {
    /// The key (or prefix, with --prefix) to watch.
    key: String,
    /// Watch every key starting with KEY.
    #[arg(long)]
    prefix: bool,
    /// Start at this revision, replaying the changes made since (0: from now).
    #[arg(long, default_value_t = 0)]
    rev: i64,
    /// Print each event's previous key and value too.
    #[arg(long = "prev-kv")]
    prev_kv: bool,
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Output format: "table" (etcdctl's lines) or "json" (one object per response).
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: String,
}

/// Runs `keel watch` until Ctrl-C (success) or until the server cancels the
/// watch (an error, with the server's reason).
pub async fn run(arguments: WatchArguments) -> anyhow::Result<()> {
    let json = match arguments.output.as_str() {
        "json" => true,
        "table" | "simple" => false,
        other => anyhow::bail!("-o must be \"table\" or \"json\", not {other:?}"),
    };
    anyhow::ensure!(
        arguments.rev >= 0,
        "--rev must be 0 (from now) or a revision, not {}",
        arguments.rev
    );
    tokio::select! {
        result = watch(&arguments, json) => result,
        signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C"),
    }
}

/// Watches until the watch ends. The first stream must open: failing to
/// reach any endpoint at start is an error, not something to wait out. After
/// that, keel-client's [`keel_client::Watcher`] resumes on another member
/// from the revision after the last one printed.
async fn watch(arguments: &WatchArguments, json: bool) -> anyhow::Result<()> {
    let client = client(&arguments.endpoints).await?;
    let key = arguments.key.as_bytes().to_vec();
    let range_end = if arguments.prefix {
        prefix_end(&key)
    } else {
        Vec::new()
    };
    let options = WatchOptions {
        key,
        range_end,
        start_revision: arguments.rev,
        prev_kv: arguments.prev_kv,
        ..WatchOptions::default()
    };
    let mut watcher = client.watch(options).await.map_err(watch_error)?;
    while let Some(response) = watcher.next().await {
        let response = response.map_err(watch_error)?;
        print_response(&response, json).context("writing to standard output")?;
    }
    anyhow::bail!("the watch ended")
}

/// The error for a watch that cannot go on.
fn watch_error(error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Compacted {
            compact_revision, ..
        } => anyhow::anyhow!(
            "watch canceled: the revisions it needed were compacted \
             (the oldest available is {compact_revision}); start again with --rev {compact_revision} or later"
        ),
        ClientError::WatchCanceled { reason } => anyhow::anyhow!("watch canceled: {reason}"),
        other => client_error(other),
    }
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

#[derive(Serialize)]
struct JsonEvent {
    r#type: &'static str,
    kv: Option<JsonKeyValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_kv: Option<JsonKeyValue>,
}

fn json_key_value(kv: &KeyValue) -> JsonKeyValue {
    JsonKeyValue {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn type_name(event: &Event) -> &'static str {
    match event.r#type() {
        EventType::Put => "PUT",
        EventType::Delete => "DELETE",
    }
}

fn print_response(response: &WatchResponse, json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let events: Vec<JsonEvent> = response
            .events
            .iter()
            .map(|event| JsonEvent {
                r#type: type_name(event),
                kv: event.kv.as_ref().map(json_key_value),
                prev_kv: event.prev_kv.as_ref().map(json_key_value),
            })
            .collect();
        let object = serde_json::json!({
            "revision": response.header.as_ref().map_or(0, |header| header.revision),
            "watch_id": response.watch_id,
            "events": events,
        });
        writeln!(stdout, "{object}")?;
    } else {
        // etcdctl's simple format: the type, then the previous key-value if
        // asked for and known, then the key-value, each value on its own
        // line (empty for a DELETE).
        for event in &response.events {
            writeln!(stdout, "{}", type_name(event))?;
            for kv in event.prev_kv.iter().chain(event.kv.iter()) {
                writeln!(stdout, "{}", String::from_utf8_lossy(&kv.key))?;
                writeln!(stdout, "{}", String::from_utf8_lossy(&kv.value))?;
            }
        }
    }
    stdout.flush()?;
    Ok(())
}
