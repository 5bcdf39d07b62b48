//! The gateway's JSON on the wire, as grpc-gateway (v1, etcd 3.4/3.5) writes
//! and reads it: request bodies, answers, streamed answers and errors.

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

/// Reads a request body of at most `body_bytes_max` bytes and decodes the
/// one JSON request in it; an empty body is the default request, as
/// grpc-gateway takes it (Patroni lists members with `{}`, curl users with
/// nothing). Anything wrong is answered with a 400 naming the problem.
pub(super) async fn read_request<T: DeserializeOwned + Default>(
    body: Body,
    body_bytes_max: usize,
) -> Result<T, Response> {
    let bytes = read_body(body, body_bytes_max).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|error| bad_request(&error))
}

/// Reads a streaming method's body: one or more JSON requests one after the
/// other (grpc-gateway decodes the body as a stream of them). An empty body is
/// no request at all.
pub(super) async fn read_requests<T: DeserializeOwned>(
    body: Body,
    body_bytes_max: usize,
) -> Result<Vec<T>, Response> {
    let bytes = read_body(body, body_bytes_max).await?;
    serde_json::Deserializer::from_slice(&bytes)
        .into_iter::<T>()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|error| bad_request(&error))
}

async fn read_body(body: Body, body_bytes_max: usize) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, body_bytes_max)
        .await
        .map_err(|error| {
            let error = error.into_inner();
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                invalid_argument(format!(
                    "request body is larger than the gateway's limit of {body_bytes_max} bytes"
                ))
            } else {
                invalid_argument(format!("reading the request body: {error}"))
            }
        })
}

fn bad_request(error: &serde_json::Error) -> Response {
    invalid_argument(format!("invalid JSON request body: {error}"))
}

fn invalid_argument(message: String) -> Response {
    error(&Status::invalid_argument(message))
}

/// A successful unary answer: the message alone, as grpc-gateway writes it.
pub(super) fn ok<T: Serialize>(message: &T) -> Response {
    match serde_json::to_vec(message) {
        Ok(bytes) => json_response(StatusCode::OK, bytes),
        Err(encoding) => error(&Status::internal(format!(
            "encoding the answer as JSON: {encoding}"
        ))),
    }
}

/// grpc-gateway's error body: the status message twice (`error` is the older
/// name clients such as Patroni still read) and the gRPC code as a number,
/// in etcd's order.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    code: i32,
}

/// A failed call, with the HTTP status grpc-gateway gives its gRPC code.
pub(super) fn error(status: &Status) -> Response {
    let body = ErrorBody {
        error: status.message(),
        code: status.code() as i32,
        message: status.message(),
    };
    let bytes = serde_json::to_vec(&body).expect("a struct of strings and a number encodes");
    json_response(http_status_of(status.code()), bytes)
}

/// Any other path under the gateway's prefixes: etcd's plain-text 404.
pub(super) async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Not Found\n",
    )
        .into_response()
}

/// grpc-gateway v1's `HTTPStatusFromCode`, which etcd 3.4 and 3.5 use.
pub(super) fn http_status_of(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One message of a streamed answer.
#[derive(Serialize)]
struct StreamResult<'a, T> {
    result: &'a T,
}

/// The error that ends a streamed answer (grpc-gateway's stream error).
#[derive(Serialize)]
struct StreamError<'a> {
    error: StreamErrorBody<'a>,
}

#[derive(Serialize)]
struct StreamErrorBody<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

/// A streamed answer: every message as `{"result": …}` followed by a newline
/// (grpc-gateway's JSON delimiter), sent as it comes, and an error as
/// `{"error": {…}}`. The response status is 200 since it is sent before the
/// first message; the stream ends with the method's.
pub(super) fn stream_response<S, T>(messages: S) -> Response
where
    S: Stream<Item = Result<T, Status>> + Send + 'static,
    T: Serialize,
{
    let chunks = messages.map(|message| {
        let mut bytes = match &message {
            Ok(message) => serde_json::to_vec(&StreamResult { result: message }),
            Err(status) => {
                let http_status = http_status_of(status.code());
                serde_json::to_vec(&StreamError {
                    error: StreamErrorBody {
                        grpc_code: status.code() as i32,
                        http_code: http_status.as_u16(),
                        message: status.message(),
                        http_status: http_status.canonical_reason().unwrap_or(""),
                    },
                })
            }
        }
        .unwrap_or_else(|encoding| {
            serde_json::json!({"error": {
                "grpc_code": Code::Internal as i32,
                "http_code": 500,
                "message": format!("encoding the answer as JSON: {encoding}"),
                "http_status": "Internal Server Error",
            }})
            .to_string()
            .into_bytes()
        });
        bytes.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(chunks),
    )
        .into_response()
}

fn json_response(status: StatusCode, bytes: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}
