//! `grpc_server_started_total` and `grpc_server_handled_total`, with the labels
//! of go-grpc-prometheus (`grpc_type`, `grpc_service`, `grpc_method`,
//! `grpc_code`) that etcd exports, as a tower layer around tonic's services.
//!
//! As go-grpc-prometheus does when etcd registers its server, every method of
//! every service keel serves is pre-registered with every status code at 0, so
//! a dashboard's `rate()` has a series from the first scrape. The counters of
//! each method are resolved once at start into a table keyed by the request
//! path; a request then costs one hash lookup of its path and atomic adds. The
//! status code is read where gRPC puts it: in the response headers for an
//! immediate error (a "trailers-only" response), otherwise in the trailers at
//! the end of the body. A body dropped before its trailers (the client went
//! away) counts as `Canceled`, as a Go handler would see its context canceled.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// gRPC status codes by number, named as Go's `codes.Code.String()` names them.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CODE_CANCELED: usize = 1;
const CODE_UNKNOWN: usize = 2;

/// The methods keel serves: (service, method, go-grpc-prometheus type). These
/// are facts of etcd's API (`rpc.proto`, `v3lock.proto`, `v3election.proto`);
/// Auth is not served, so it is not here.
const METHODS: &[(&str, &str, &str)] = &[
    ("etcdserverpb.KV", "Range", "unary"),
    ("etcdserverpb.KV", "Put", "unary"),
    ("etcdserverpb.KV", "DeleteRange", "unary"),
    ("etcdserverpb.KV", "Txn", "unary"),
    ("etcdserverpb.KV", "Compact", "unary"),
    ("etcdserverpb.Watch", "Watch", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseGrant", "unary"),
    ("etcdserverpb.Lease", "LeaseRevoke", "unary"),
    ("etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseTimeToLive", "unary"),
    ("etcdserverpb.Lease", "LeaseLeases", "unary"),
    ("etcdserverpb.Cluster", "MemberAdd", "unary"),
    ("etcdserverpb.Cluster", "MemberRemove", "unary"),
    ("etcdserverpb.Cluster", "MemberUpdate", "unary"),
    ("etcdserverpb.Cluster", "MemberList", "unary"),
    ("etcdserverpb.Cluster", "MemberPromote", "unary"),
    ("etcdserverpb.Maintenance", "Alarm", "unary"),
    ("etcdserverpb.Maintenance", "Status", "unary"),
    ("etcdserverpb.Maintenance", "Defragment", "unary"),
    ("etcdserverpb.Maintenance", "Hash", "unary"),
    ("etcdserverpb.Maintenance", "HashKV", "unary"),
    ("etcdserverpb.Maintenance", "Snapshot", "server_stream"),
    ("etcdserverpb.Maintenance", "MoveLeader", "unary"),
    ("etcdserverpb.Maintenance", "Downgrade", "unary"),
    ("v3lockpb.Lock", "Lock", "unary"),
    ("v3lockpb.Lock", "Unlock", "unary"),
    ("v3electionpb.Election", "Campaign", "unary"),
    ("v3electionpb.Election", "Proclaim", "unary"),
    ("v3electionpb.Election", "Leader", "unary"),
    ("v3electionpb.Election", "Observe", "server_stream"),
    ("v3electionpb.Election", "Resign", "unary"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: String,
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: String,
    grpc_service: String,
    grpc_method: String,
    grpc_code: String,
}

/// One method's counters.
#[derive(Debug)]
pub struct MethodMetrics {
    started: Counter,
    /// By status code number.
    handled: [Counter; 17],
}

impl MethodMetrics {
    fn handled(&self, code: usize) {
        self.handled[code.min(CODE_NAMES.len() - 1)].inc();
    }
}

/// The counters of every served method, by request path (`/service/method`).
#[derive(Debug)]
pub struct GrpcMetrics {
    methods: HashMap<String, Arc<MethodMetrics>>,
}

impl GrpcMetrics {
    /// Registers both families in `registry` with every method and code at 0.
    pub fn new(registry: &mut Registry) -> GrpcMetrics {
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let mut methods = HashMap::new();
        for &(service, method, kind) in METHODS {
            let labels = MethodLabels {
                grpc_type: kind.into(),
                grpc_service: service.into(),
                grpc_method: method.into(),
            };
            let handled_by_code = CODE_NAMES.map(|code| {
                handled.get_or_create_owned(&HandledLabels {
                    grpc_type: kind.into(),
                    grpc_service: service.into(),
                    grpc_method: method.into(),
                    grpc_code: code.into(),
                })
            });
            methods.insert(
                format!("/{service}/{method}"),
                Arc::new(MethodMetrics {
                    started: started.get_or_create_owned(&labels),
                    handled: handled_by_code,
                }),
            );
        }
        registry.register(
            "grpc_server_started",
            "Total number of RPCs started on the server",
            started,
        );
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            handled,
        );
        GrpcMetrics { methods }
    }

    /// The counters of the method at `path`, if keel serves it. Requests for
    /// unknown paths are not counted: their labels would come from clients,
    /// an unbounded set.
    fn method(&self, path: &str) -> Option<&Arc<MethodMetrics>> {
        self.methods.get(path)
    }
}

/// The tower layer to put around tonic's services: `Server::builder().layer(…)`.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<GrpcMetrics>) -> GrpcMetricsLayer {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, RequestBody, ResponseBody> tower_service::Service<http::Request<RequestBody>>
    for GrpcMetricsService<S>
where
    S: tower_service::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
{
    type Response = http::Response<MeteredBody<ResponseBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let method = self.metrics.method(request.uri().path()).cloned();
        if let Some(method) = &method {
            method.started.inc();
        }
        ResponseFuture {
            inner: self.inner.call(request),
            method,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcMetricsService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        method: Option<Arc<MethodMetrics>>,
    }
}

impl<F, ResponseBody, Error> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, Error>>,
{
    type Output = Result<http::Response<MeteredBody<ResponseBody>>, Error>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(context));
        let method = this.method.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (an immediate error) carries its
                // status in the headers; otherwise it comes with the trailers.
                let pending = match status_code(response.headers()) {
                    Some(code) => {
                        if let Some(method) = &method {
                            method.handled(code);
                        }
                        None
                    }
                    None => method,
                };
                Ok(response.map(|inner| MeteredBody {
                    inner,
                    pending: PendingStatus(pending),
                }))
            }
            Err(error) => {
                if let Some(method) = method {
                    method.handled(CODE_UNKNOWN);
                }
                Err(error)
            }
        })
    }
}

/// The gRPC status code in `headers` (or trailers), if there is one.
fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|text| text.parse::<usize>().ok())
            .filter(|&code| code < CODE_NAMES.len())
            .unwrap_or(CODE_UNKNOWN),
    )
}

/// A method whose status is not known yet; counted `Canceled` if the body is
/// dropped before its trailers.
struct PendingStatus(Option<Arc<MethodMetrics>>);

impl PendingStatus {
    fn settle(&mut self, code: usize) {
        if let Some(method) = self.0.take() {
            method.handled(code);
        }
    }
}

impl Drop for PendingStatus {
    fn drop(&mut self) {
        self.settle(CODE_CANCELED);
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call as handled when its trailers pass.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        pending: PendingStatus,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(context));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.pending
                        .settle(status_code(trailers).unwrap_or(CODE_UNKNOWN));
                }
            }
            Some(Err(_)) => this.pending.settle(CODE_UNKNOWN),
            // gRPC always ends with trailers; a body that ends without them
            // answered with the HTTP status alone (treated as OK by clients
            // only when it is 200 with no error, which gRPC never sends).
            None => this.pending.settle(CODE_UNKNOWN),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_and_code_is_registered_at_zero() {
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::new(&mut registry);
        let put = metrics.method("/etcdserverpb.KV/Put").expect("served");
        put.started.inc();
        put.handled(0);
        assert!(metrics.method("/etcdserverpb.Auth/UserAdd").is_none());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(
            "grpc_server_started_total{grpc_type=\"unary\",grpc_service=\"etcdserverpb.KV\",grpc_method=\"Put\"} 1"
        ), "{text}");
        assert!(text.contains(
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"etcdserverpb.KV\",grpc_method=\"Put\",grpc_code=\"OK\"} 1"
        ), "{text}");
        assert!(text.contains(
            "grpc_server_handled_total{grpc_type=\"bidi_stream\",grpc_service=\"etcdserverpb.Watch\",grpc_method=\"Watch\",grpc_code=\"Unauthenticated\"} 0"
        ), "{text}");
    }
}
