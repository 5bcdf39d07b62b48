//! The agent's `/metrics` (Prometheus, see `agent_metrics.rs`), `/livez`
//! and `/readyz`. Ready means the agent holds its node lease (renewed
//! recently) and its view of the store is current (the watch is
//! established): only then do its discovery answers reflect the store.
//! The lines are etcd's `[+]name ok` / `[-]name failed: reason`, as the
//! members' own `/readyz` writes them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::agent::Shared;
use crate::agent_metrics::CONTENT_TYPE;

pub async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = shared.metrics.render(&shared);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

pub async fn livez() -> &'static str {
    "ok\n"
}

/// Each readiness check: name, and the reason it fails (None: ok).
pub fn readiness(shared: &Shared) -> Vec<(&'static str, Option<String>)> {
    let lease_id = shared.local.lock().expect("local state lock").node.lease_id;
    let view = shared.view.read().expect("view lock");
    vec![
        (
            "node_lease",
            if lease_id == 0 {
                Some("no node lease granted yet".to_string())
            } else if !view.lease_healthy {
                Some(format!("lease {lease_id:x} not renewed recently"))
            } else {
                None
            },
        ),
        (
            "view",
            if view.watch_healthy {
                None
            } else {
                Some("the watch of /keel/ is not established".to_string())
            },
        ),
    ]
}

pub async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let checks = readiness(&shared);
    let mut text = String::new();
    for (name, failure) in &checks {
        match failure {
            None => text.push_str(&format!("[+]{name} ok\n")),
            Some(reason) => text.push_str(&format!("[-]{name} failed: {reason}\n")),
        }
    }
    if checks.iter().all(|(_, failure)| failure.is_none()) {
        text.push_str("ok\n");
        (StatusCode::OK, text).into_response()
    } else {
        text.push_str("readyz check failed\n");
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    }
}
