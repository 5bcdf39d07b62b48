//! The member's HTTP endpoints for operators: `/metrics` (Prometheus),
//! `/health`, `/livez`, `/readyz` (see `health.rs`), and `/ui`, as one axum
//! `Router`.
//!
//! The web dashboard is the agents' (they hold the gossip and registry view
//! it shows); a member's `/ui` redirects to the dashboard of an agent
//! registered in its store (`/keel/nodes/`), so an operator who knows only a
//! member's address still finds it.
//!
//! The router is served on `--listen-metrics-urls` (etcd's flag: its own
//! listener, so scrapes and probes never queue behind client traffic), and is
//! merged into the client port's HTTP router (beside the JSON gateway), where
//! etcd serves the same paths.

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
        .route("/ui", get(serve_dashboard_redirect))
        .route("/ui/", get(serve_dashboard_redirect))
        .with_state(observability)
}

/// Where agents register their nodes (JSON with their `http_address`).
const NODES_PREFIX: &[u8] = b"/keel/nodes/";
/// Node records read to find an agent's dashboard.
const NODES_READ_MAX: i64 = 64;
/// How long finding an agent may take.
const DASHBOARD_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `/ui`: a temporary redirect to a registered agent's dashboard (the first
/// by node name, from this member's own view: serializable, so it answers
/// without a leader too), or 503 saying how to get one.
async fn serve_dashboard_redirect(State(observability): State<Observability>) -> Response {
    let mut range_end = NODES_PREFIX.to_vec();
    *range_end.last_mut().expect("not empty") += 1;
    let request = keel_types::etcdserverpb::RangeRequest {
        key: NODES_PREFIX.to_vec(),
        range_end,
        limit: NODES_READ_MAX,
        serializable: true,
        ..Default::default()
    };
    let read = tokio::time::timeout(
        DASHBOARD_LOOKUP_TIMEOUT,
        crate::api::etcdserverpb::kv_server::Kv::range(
            &observability.services,
            tonic::Request::new(request),
        ),
    )
    .await;
    let nodes = match read {
        Ok(Ok(response)) => response.into_inner().kvs,
        Ok(Err(status)) => {
            return unavailable(format!(
                "reading the registered agents: {}",
                status.message()
            ))
        }
        Err(_) => return unavailable("reading the registered agents took too long".to_owned()),
    };
    let dashboard = nodes.iter().find_map(|node| {
        let record: serde_json::Value = serde_json::from_slice(&node.value).ok()?;
        let address = record.get("http_address")?.as_str()?;
        Some(format!("http://{address}/ui"))
    });
    match dashboard {
        Some(location) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location.clone())],
            format!("the dashboard is served by the agents: {location}\n"),
        )
            .into_response(),
        None => unavailable(
            "no agent is registered: the dashboard is served by `keel agent` at /ui on its \
             HTTP address (keel dev starts three, the first on http://127.0.0.1:8500/ui)"
                .to_owned(),
        ),
    }
}

fn unavailable(message: String) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{message}\n")).into_response()
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
