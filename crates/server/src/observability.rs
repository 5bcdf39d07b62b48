//! The member's HTTP endpoints for operators: `/metrics` (Prometheus), and
//! `/health`, `/livez`, `/readyz` (see `health.rs`), as one axum `Router`.
//!
//! The router is served on `--listen-metrics-urls` (etcd's flag: its own
//! listener, so scrapes and probes never queue behind client traffic), and is
//! meant to be merged into the client port's HTTP router as well, where etcd
//! serves the same paths.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::grpc::Services;
use crate::health::{self, LIVEZ_CHECKS, READYZ_CHECKS};
use crate::metrics::{self, MemberMetrics};

/// What the endpoints read: the metrics, and the way into the member.
#[derive(Clone)]
pub struct Observability {
    metrics: Arc<MemberMetrics>,
    services: Services,
}

impl Observability {
    /// Endpoints over `metrics` and the member behind `services`.
    pub fn new(metrics: Arc<MemberMetrics>, services: Services) -> Observability {
        Observability { metrics, services }
    }
}

/// `/metrics`, `/health`, `/livez[/check]` and `/readyz[/check]`.
pub fn router(observability: Observability) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/health", get(serve_health))
        .route("/livez", get(serve_livez))
        .route("/livez/{check}", get(serve_livez_check))
        .route("/readyz", get(serve_readyz))
        .route("/readyz/{check}", get(serve_readyz_check))
        .with_state(observability)
}

/// Serves `router` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, router: Router) {
    let address = listener.local_addr().ok();
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(?address, %error, "serving metrics and health stopped");
    }
}

/// Binds `address` for [`serve`].
pub async fn bind(address: SocketAddr) -> Result<TcpListener, crate::ServerError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| crate::ServerError::Listen { address, source })
}

async fn serve_metrics(State(observability): State<Observability>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        observability.metrics.encode(),
    )
        .into_response()
}

/// The values of query parameter `name`, and whether `flag` appears at all.
/// Check and alarm names need no percent-decoding (letters and `_`).
fn query_values(query: &Option<String>, name: &str) -> Vec<String> {
    query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(key, value)| *key == name && !value.is_empty())
        .flat_map(|(_, value)| value.split(',').map(str::to_string))
        .collect()
}

fn query_has(query: &Option<String>, flag: &str) -> bool {
    query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|pair| pair.split('=').next() == Some(flag))
}

async fn serve_health(
    State(observability): State<Observability>,
    RawQuery(query): RawQuery,
) -> Response {
    let excluded = query_values(&query, "exclude");
    let serializable = query_values(&query, "serializable")
        .iter()
        .any(|value| value == "true");
    let health = health::health(&observability.services, &excluded, serializable).await;
    let code = if health.is_healthy() {
        StatusCode::OK
    } else {
        tracing::warn!(reason = %health.reason, "/health answered unhealthy");
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&health).expect("two strings serialize"),
    )
        .into_response()
}

async fn checks_response(
    observability: &Observability,
    kind: &str,
    checks: &[&'static str],
    query: &Option<String>,
) -> Response {
    let excluded = query_values(query, "exclude");
    let report = health::run_checks(&observability.services, checks, &excluded).await;
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if report.passed() {
        let mut body = String::new();
        if query_has(query, "verbose") {
            body.push_str(&report.lines());
        }
        body.push_str("ok\n");
        (StatusCode::OK, text_plain, body).into_response()
    } else {
        let lines = report.lines();
        tracing::warn!(check = kind, failed = %lines.trim_end(), "health check failed");
        (StatusCode::SERVICE_UNAVAILABLE, text_plain, lines).into_response()
    }
}

async fn serve_livez(
    State(observability): State<Observability>,
    RawQuery(query): RawQuery,
) -> Response {
    checks_response(&observability, "livez", LIVEZ_CHECKS, &query).await
}

async fn serve_readyz(
    State(observability): State<Observability>,
    RawQuery(query): RawQuery,
) -> Response {
    checks_response(&observability, "readyz", READYZ_CHECKS, &query).await
}

async fn one_check(
    observability: &Observability,
    kind: &str,
    checks: &[&'static str],
    name: &str,
    query: &Option<String>,
) -> Response {
    match checks.iter().find(|&&check| check == name) {
        Some(&check) => checks_response(observability, kind, &[check], query).await,
        None => (
            StatusCode::NOT_FOUND,
            format!(
                "no {kind} check named {name:?}; the checks are: {}\n",
                checks.join(", ")
            ),
        )
            .into_response(),
    }
}

async fn serve_livez_check(
    State(observability): State<Observability>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    one_check(&observability, "livez", LIVEZ_CHECKS, &name, &query).await
}

async fn serve_readyz_check(
    State(observability): State<Observability>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    one_check(&observability, "readyz", READYZ_CHECKS, &name, &query).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_as_etcd_takes_them() {
        let query = Some("exclude=NOSPACE&exclude=CORRUPT,leader&verbose&serializable=true".into());
        assert_eq!(
            query_values(&query, "exclude"),
            vec!["NOSPACE", "CORRUPT", "leader"]
        );
        assert_eq!(query_values(&query, "serializable"), vec!["true"]);
        assert!(query_has(&query, "verbose"));
        assert!(!query_has(&None, "verbose"));
    }
}
