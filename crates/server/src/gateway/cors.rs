//! etcd's CORS answer on the client port: etcd wraps its whole HTTP side in a
//! handler that, with its default `--cors=*`, lets any origin call it (so a
//! browser page can use the JSON gateway) and answers every OPTIONS
//! preflight with 200 itself. keel has no `--cors` flag and behaves as that
//! default.

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Adds etcd's `Access-Control-Allow-*` headers to every answer and answers
/// OPTIONS requests with 200 and nothing else.
pub async fn allow_any_origin(request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    response
}
