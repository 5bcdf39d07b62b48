//! `GET /v1/events`: the events log, oldest first, filtered by type
//! (`?type=node.down&type=allocation` or `?type=node,check`; a family name
//! selects all its types) and by age (`?since=10m`, or Unix milliseconds);
//! as server-sent events when the client asks for `text/event-stream` or
//! calls `/v1/events/stream`: the matching history first, then every new
//! event as the agent's watch of `/keel/events/` delivers it.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::Shared;
use crate::definition;
use crate::events::{self, Event, EventType};

/// Events one list answer holds at most (the newest win).
pub const EVENTS_LIST_MAX: usize = 10_000;
/// Events a list answer holds unless `limit` says otherwise.
pub const EVENTS_LIST_DEFAULT: usize = 1_000;
/// Server-sent event streams one agent serves at once; more are refused.
pub const EVENT_STREAMS_MAX: usize = 64;
/// Events waiting to be written to one stream's connection.
const STREAM_QUEUE_MAX: usize = 64;
/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Streams open now, against [`EVENT_STREAMS_MAX`].
static OPEN_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventQuery {
    pub filters: Vec<String>,
    pub since_unix_ms: u64,
    pub limit: usize,
}

/// Reads `type`, `since` and `limit`, naming what is wrong.
pub fn parse_query(
    parameters: &[(String, String)],
    now_unix_ms: u64,
) -> Result<EventQuery, String> {
    let mut query = EventQuery {
        filters: Vec::new(),
        since_unix_ms: 0,
        limit: EVENTS_LIST_DEFAULT,
    };
    for (name, value) in parameters {
        match name.as_str() {
            "type" => {
                for filter in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if !EventType::ALL.iter().any(|kind| kind.matches(filter)) {
                        return Err(format!(
                            "type: {filter:?} is no event type or family (one of: {})",
                            EventType::ALL.map(EventType::as_str).join(", ")
                        ));
                    }
                    query.filters.push(filter.to_string());
                }
            }
            "since" => query.since_unix_ms = parse_since(value, now_unix_ms)?,
            "limit" => {
                query.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|limit| (1..=EVENTS_LIST_MAX).contains(limit))
                    .ok_or_else(|| {
                        format!("limit: {value:?} is not a number from 1 to {EVENTS_LIST_MAX}")
                    })?;
            }
            _ => {}
        }
    }
    Ok(query)
}

/// `since`: a duration back from now (`90s`, `10m`, `2h`) or Unix milliseconds.
pub fn parse_since(text: &str, now_unix_ms: u64) -> Result<u64, String> {
    if let Ok(unix_ms) = text.parse::<u64>() {
        return Ok(unix_ms);
    }
    let duration = definition::parse_duration(text).map_err(|reason| {
        format!("since: {text:?} is neither a duration (10m) nor Unix milliseconds: {reason}")
    })?;
    Ok(now_unix_ms.saturating_sub(duration.as_millis() as u64))
}

fn selected(query: &EventQuery, event: &Event) -> bool {
    event.time_unix_ms >= query.since_unix_ms
        && (query.filters.is_empty() || query.filters.iter().any(|f| event.kind.matches(f)))
}

pub async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(parameters): Query<Vec<(String, String)>>,
) -> Response {
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/event-stream"));
    if wants_stream {
        return stream(State(shared), Query(parameters)).await;
    }
    let query = match parse_query(&parameters, events::now_unix_ms()) {
        Ok(query) => query,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    match events::list(
        &shared.client,
        query.since_unix_ms,
        &query.filters,
        query.limit,
    )
    .await
    {
        Ok(events) => axum::Json(events).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the events log from the store: {error}"),
        )
            .into_response(),
    }
}

/// Releases a stream's place when its task ends.
struct StreamSlot;

impl Drop for StreamSlot {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn stream(
    State(shared): State<Arc<Shared>>,
    Query(parameters): Query<Vec<(String, String)>>,
) -> Response {
    let mut query = match parse_query(&parameters, events::now_unix_ms()) {
        Ok(query) => query,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let history_wanted = parameters.iter().any(|(name, _)| name == "since");
    if !history_wanted {
        query.since_unix_ms = events::now_unix_ms();
    }
    if OPEN_STREAMS.fetch_add(1, Ordering::Relaxed) >= EVENT_STREAMS_MAX {
        OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this agent already serves {EVENT_STREAMS_MAX} event streams"),
        )
            .into_response();
    }
    let slot = StreamSlot;
    // Subscribe before reading the history, so nothing falls between them.
    let mut feed = shared.observed.feed.subscribe();
    let (sender, receiver) = mpsc::channel::<Result<SseEvent, Infallible>>(STREAM_QUEUE_MAX);
    tokio::spawn(async move {
        let _slot = slot;
        let mut sent: BTreeSet<String> = BTreeSet::new();
        if history_wanted {
            match events::list(
                &shared.client,
                query.since_unix_ms,
                &query.filters,
                query.limit,
            )
            .await
            {
                Ok(history) => {
                    for event in history {
                        sent.insert(event.id.clone());
                        if sender.send(Ok(sse_event(&event))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    let warning = SseEvent::default()
                        .event("error")
                        .data(format!("cannot read the events log: {error}"));
                    if sender.send(Ok(warning)).await.is_err() {
                        return;
                    }
                }
            }
        }
        loop {
            tokio::select! {
                received = feed.recv() => match received {
                    Ok(event) => {
                        // An event of the history may arrive again from the feed.
                        if !selected(&query, &event) || sent.remove(&event.id) {
                            continue;
                        }
                        if sender.send(Ok(sse_event(&event))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let warning = SseEvent::default()
                            .event("lagged")
                            .data(format!("{missed} events were skipped; list /v1/events to catch up"));
                        if sender.send(Ok(warning)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = sender.closed() => return,
            }
        }
    });
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL))
        .into_response()
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.id.clone())
        .data(serde_json::to_string(event).expect("events serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameters(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn queries_are_read_and_bad_ones_named() {
        let query = parse_query(
            &parameters(&[
                ("type", "node,check.status"),
                ("type", "leader.elected"),
                ("since", "10m"),
            ]),
            1_000_000,
        )
        .unwrap();
        assert_eq!(query.filters, ["node", "check.status", "leader.elected"]);
        assert_eq!(query.since_unix_ms, 400_000);
        assert_eq!(
            parse_query(&parameters(&[("since", "1234")]), 5)
                .unwrap()
                .since_unix_ms,
            1234
        );
        let error = parse_query(&parameters(&[("type", "nodes")]), 0).unwrap_err();
        assert!(
            error.contains("\"nodes\"") && error.contains("node.down"),
            "{error}"
        );
        let error = parse_query(&parameters(&[("since", "yesterday")]), 0).unwrap_err();
        assert!(error.starts_with("since:"), "{error}");
        let error = parse_query(&parameters(&[("limit", "0")]), 0).unwrap_err();
        assert!(error.starts_with("limit:"), "{error}");
    }
}
