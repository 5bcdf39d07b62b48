//! A small client of an agent's HTTP API, for the CLI (`keel service`,
//! `keel node`) and tests: JSON in and out, errors carrying the agent's own
//! message.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use serde_json::Value;

use crate::probe::{http_client, HttpClient};

/// The HTTP method of [`ApiClient::call`], re-exported so callers need not
/// depend on hyper.
pub use hyper::Method;

/// Largest response read from an agent.
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Deadline of one request (a blocking query is not made through this client).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a request to an agent failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("cannot reach the agent at {address}: {reason} (is `keel agent` running? set --agent-addr or KEEL_AGENT_ADDR)")]
    Unreachable { address: String, reason: String },
    #[error("the agent refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the agent's answer is not valid: {0}")]
    Invalid(String),
}

/// A client of one agent's HTTP API.
#[derive(Clone)]
pub struct ApiClient {
    address: String,
    client: HttpClient,
}

impl ApiClient {
    /// A client of the agent at `address` (`host:port` or `http://host:port`).
    pub fn new(address: &str) -> ApiClient {
        let address = address
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        ApiClient {
            address,
            client: http_client(),
        }
    }

    /// GETs `path` (with its query) and decodes the JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, ApiError> {
        let body = self.request(hyper::Method::GET, path, Bytes::new()).await?;
        serde_json::from_slice(&body).map_err(|error| ApiError::Invalid(error.to_string()))
    }

    /// PUTs `body` (JSON, or nothing) to `path`.
    pub async fn put(&self, path: &str, body: Option<&Value>) -> Result<(), ApiError> {
        let bytes = match body {
            Some(value) => Bytes::from(serde_json::to_vec(value).expect("JSON serialises")),
            None => Bytes::new(),
        };
        self.request(hyper::Method::PUT, path, bytes).await?;
        Ok(())
    }

    /// Sends `body` (JSON, or nothing) with `method` to `path` and decodes
    /// the JSON answer (the job API answers every call with JSON).
    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let bytes = match body {
            Some(value) => Bytes::from(serde_json::to_vec(value).expect("JSON serialises")),
            None => Bytes::new(),
        };
        let body = self.request(method, path, bytes).await?;
        serde_json::from_slice(&body).map_err(|error| ApiError::Invalid(error.to_string()))
    }

    /// GETs `path` and hands each piece of the answer to `sink` as it
    /// arrives, without a deadline (for streams: `keel alloc logs -f`).
    pub async fn get_streamed(
        &self,
        path: &str,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ApiError> {
        let unreachable = |reason: String| ApiError::Unreachable {
            address: self.address.clone(),
            reason,
        };
        let request = hyper::Request::get(format!("http://{}{}", self.address, path))
            .body(Full::new(Bytes::new()))
            .map_err(|error| unreachable(error.to_string()))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(|error| unreachable(error.to_string()))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let body = Limited::new(body, RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|error| ApiError::Invalid(error.to_string()))?
                .to_bytes();
            return Err(ApiError::Refused {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| ApiError::Invalid(error.to_string()))?;
            if let Ok(data) = frame.into_data() {
                sink(&data).map_err(|error| ApiError::Invalid(error.to_string()))?;
            }
        }
        Ok(())
    }

    async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, ApiError> {
        let unreachable = |reason: String| ApiError::Unreachable {
            address: self.address.clone(),
            reason,
        };
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.address, path))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|error| unreachable(error.to_string()))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(|error| unreachable(error.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|error| ApiError::Invalid(error.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(ApiError::Refused {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(body)
    }
}
