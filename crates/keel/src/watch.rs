//! `keel watch KEY [--prefix] [--rev N] [--prev-kv] [-o json]`: prints every
//! change to a key or prefix as it happens, from now or from a past revision,
//! until Ctrl-C.
//!
//! The default output is `etcdctl watch`'s: per event its type, then (with
//! `--prev-kv`) the previous key and value, then the key and value, each on
//! its own line. `-o json` prints one JSON object per response instead.
//!
//! If the connection breaks after the watch started, `keel watch` connects
//! again (to the first endpoint that answers) and resumes from the revision
//! after the last one it printed, so no event is lost or printed twice; the
//! server's guarantees (ordered, no gaps, no duplicates) make that exact.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use keel_server::api::etcdserverpb::watch_client::WatchClient;
use keel_types::etcdserverpb::watch_request::RequestUnion;
use keel_types::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use keel_types::mvccpb::event::EventType;
use keel_types::mvccpb::{Event, KeyValue};
use serde::Serialize;
// tonic re-exports tokio-stream for generated code; using it here saves the
// binary a dependency of its own.
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use crate::kv::{connect, prefix_end};

/// The first wait before reconnecting after the stream broke; doubled after
/// every failed attempt up to [`RECONNECT_DELAY_MAX`].
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);

/// The longest wait between two reconnection attempts.
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);

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

/// Why one connection's watch ended.
enum Interruption {
    /// The connection or stream failed: worth connecting again.
    Broken(anyhow::Error),
    /// The server refused or cancelled the watch, or stdout is gone: final.
    Final(anyhow::Error),
}

/// Watches, reconnecting and resuming after broken connections. The first
/// connection must succeed: failing to reach any endpoint at start is an
/// error, not something to wait out.
async fn watch(arguments: &WatchArguments, json: bool) -> anyhow::Result<()> {
    // The revision to ask for: 0 until the server has said where "now" is.
    let mut next_revision = arguments.rev;
    let mut started = false;
    let mut delay = RECONNECT_DELAY_MIN;
    loop {
        match watch_once(arguments, json, &mut next_revision, &mut started).await {
            Interruption::Final(error) => return Err(error),
            Interruption::Broken(error) if !started => return Err(error),
            Interruption::Broken(error) => {
                eprintln!(
                    "watch interrupted ({error:#}); resuming from revision {next_revision} \
                     in {delay:?}"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
            }
        }
    }
}

/// One connection's watch. Moves `next_revision` past every event printed
/// and every progress report, so that a new watch resumes exactly there.
async fn watch_once(
    arguments: &WatchArguments,
    json: bool,
    next_revision: &mut i64,
    started: &mut bool,
) -> Interruption {
    let channel = match connect(&arguments.endpoints).await {
        Ok(channel) => channel,
        Err(error) => return Interruption::Broken(error),
    };
    // Responses are bounded by the server (one revision, or its fragments).
    let mut client = WatchClient::new(channel).max_decoding_message_size(usize::MAX);
    let key = arguments.key.as_bytes().to_vec();
    let range_end = if arguments.prefix {
        prefix_end(&key)
    } else {
        Vec::new()
    };
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key,
            range_end,
            start_revision: *next_revision,
            prev_kv: arguments.prev_kv,
            ..WatchCreateRequest::default()
        })),
    };
    // The sender stays alive for the whole watch: closing it would tell the
    // server this client has nothing more to ask.
    let (requests, request_stream) = tokio::sync::mpsc::channel(1);
    if requests.send(create).await.is_err() {
        return Interruption::Broken(anyhow::anyhow!("the request stream closed"));
    }
    let mut responses = match client.watch(ReceiverStream::new(request_stream)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Interruption::Broken(anyhow::anyhow!("{}", status.message())),
    };
    loop {
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                return Interruption::Broken(anyhow::anyhow!("the server ended the stream"))
            }
            Err(status) => {
                return Interruption::Broken(anyhow::anyhow!(
                    "{} ({:?})",
                    status.message(),
                    status.code()
                ))
            }
        };
        if response.canceled {
            return Interruption::Final(cancellation(&response));
        }
        let header_revision = response.header.as_ref().map_or(0, |header| header.revision);
        if response.created {
            *started = true;
            if *next_revision == 0 {
                *next_revision = header_revision + 1;
            }
            continue;
        }
        if response.events.is_empty() {
            // A progress report: everything up to its revision was sent.
            *next_revision = (*next_revision).max(header_revision + 1);
            continue;
        }
        if let Err(error) = print_response(&response, json) {
            return Interruption::Final(error.context("writing to standard output"));
        }
        if let Some(last) = response.events.last().and_then(|event| event.kv.as_ref()) {
            *next_revision = last.mod_revision + 1;
        }
    }
}

/// The error for a watch the server cancelled.
fn cancellation(response: &WatchResponse) -> anyhow::Error {
    if response.compact_revision != 0 {
        anyhow::anyhow!(
            "watch canceled: the revisions it needed were compacted \
             (the oldest available is {}); start again with --rev {} or later",
            response.compact_revision,
            response.compact_revision
        )
    } else if response.cancel_reason.is_empty() {
        anyhow::anyhow!("watch canceled by the server")
    } else {
        anyhow::anyhow!("watch canceled: {}", response.cancel_reason)
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
