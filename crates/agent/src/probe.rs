//! The check runners: one probe run each, bounded by the check's timeout and
//! output limit. HTTP (2xx passing, 429 warning, else critical), TCP, gRPC
//! (`grpc.health.v1`), and exec (exit 0 passing, 1 warning, else critical;
//! the command runs in its own process group, killed whole on timeout). TTL
//! checks have no runner: the service reports through the API.

use std::process::Stdio;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::check_state::CheckStatus;
use crate::definition::{CheckDefinition, Probe};

/// How long a killed exec check's process group gets to close its pipes.
const KILLED_GRACE: Duration = Duration::from_secs(1);
/// How many bytes are read at a time from a check's output.
const READ_CHUNK_BYTES: usize = 8192;

/// The HTTP client shared by every HTTP check of an agent (one connection
/// pool, so a check every second does not open a connection every second).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new HTTP client for checks.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2)
        .build(connector)
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub status: CheckStatus,
    pub output: String,
}

impl ProbeOutcome {
    fn new(status: CheckStatus, output: impl Into<String>) -> ProbeOutcome {
        ProbeOutcome {
            status,
            output: output.into(),
        }
    }
}

/// Runs `check` once (TTL checks are not run; they are reported).
pub async fn run(check: &CheckDefinition, http: &HttpClient) -> ProbeOutcome {
    let timeout = check.timeout;
    let limit = check.output_max_bytes;
    let outcome = match &check.probe {
        Probe::Http {
            url,
            method,
            headers,
            body,
        } => {
            tokio::time::timeout(timeout, http_probe(http, url, method, headers, body, limit)).await
        }
        Probe::Tcp { address } => tokio::time::timeout(timeout, tcp_probe(address)).await,
        Probe::Grpc { address, service } => {
            tokio::time::timeout(timeout, grpc_probe(address, service)).await
        }
        Probe::Exec { arguments } => return exec_probe(arguments, timeout, limit).await,
        Probe::Ttl { .. } => {
            return ProbeOutcome::new(CheckStatus::Critical, "TTL checks are not run")
        }
    };
    outcome.unwrap_or_else(|_| {
        ProbeOutcome::new(
            CheckStatus::Critical,
            format!("timed out after {timeout:?}"),
        )
    })
}

/// Cuts `text` to at most `limit` bytes on a character boundary.
pub fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

async fn http_probe(
    client: &HttpClient,
    url: &str,
    method: &str,
    headers: &[(String, String)],
    body: &str,
    limit: usize,
) -> ProbeOutcome {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header(hyper::header::USER_AGENT, "keel-agent health check");
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = match request.body(Full::new(Bytes::from(body.to_string()))) {
        Ok(request) => request,
        Err(error) => return ProbeOutcome::new(CheckStatus::Critical, error.to_string()),
    };
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(error) => {
            return ProbeOutcome::new(
                CheckStatus::Critical,
                format!("HTTP {method} {url}: {error}"),
            )
        }
    };
    let code = response.status();
    let status = if code.is_success() {
        CheckStatus::Passing
    } else if code == hyper::StatusCode::TOO_MANY_REQUESTS {
        CheckStatus::Warning
    } else {
        CheckStatus::Critical
    };
    // Read at most `limit` bytes of the body; the rest is not waited for.
    let mut body = response.into_body();
    let mut captured: Vec<u8> = Vec::new();
    while captured.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = limit - captured.len();
                    captured.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    let output = format!(
        "HTTP {method} {url}: {code} Output: {}",
        String::from_utf8_lossy(&captured)
    );
    ProbeOutcome::new(status, truncate(output, limit))
}

async fn tcp_probe(address: &str) -> ProbeOutcome {
    match tokio::net::TcpStream::connect(address).await {
        Ok(_) => ProbeOutcome::new(
            CheckStatus::Passing,
            format!("TCP connect {address}: Success"),
        ),
        Err(error) => ProbeOutcome::new(
            CheckStatus::Critical,
            format!("TCP connect {address}: {error}"),
        ),
    }
}

async fn grpc_probe(address: &str, service: &str) -> ProbeOutcome {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let target = format!("{address}/{service}");
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
        Ok(endpoint) => match endpoint.connect().await {
            Ok(channel) => channel,
            Err(error) => {
                return ProbeOutcome::new(
                    CheckStatus::Critical,
                    format!("gRPC {target}: cannot connect: {error}"),
                )
            }
        },
        Err(error) => {
            return ProbeOutcome::new(CheckStatus::Critical, format!("gRPC {target}: {error}"))
        }
    };
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(response) => {
            let serving = response.into_inner().status();
            let status = if serving == ServingStatus::Serving {
                CheckStatus::Passing
            } else {
                CheckStatus::Critical
            };
            ProbeOutcome::new(status, format!("gRPC {target}: {}", serving.as_str_name()))
        }
        Err(error) => ProbeOutcome::new(
            CheckStatus::Critical,
            format!("gRPC {target}: {}: {}", error.code(), error.message()),
        ),
    }
}

/// Reads `reader` to its end, keeping at most `limit` bytes (reading on past
/// them, so the command never blocks on a full pipe).
async fn read_bounded(reader: Option<impl AsyncRead + Unpin>, limit: usize) -> Vec<u8> {
    let Some(mut reader) = reader else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return kept,
            Ok(read) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..read.min(room)]);
            }
        }
    }
}

async fn exec_probe(arguments: &[String], timeout: Duration, limit: usize) -> ProbeOutcome {
    let mut command = tokio::process::Command::new(&arguments[0]);
    command
        .args(&arguments[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return ProbeOutcome::new(
                CheckStatus::Critical,
                format!("cannot run {:?}: {error}", arguments[0]),
            )
        }
    };
    let process_group = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let finished = tokio::time::timeout(timeout, async {
        tokio::join!(
            child.wait(),
            read_bounded(stdout, limit),
            read_bounded(stderr, limit)
        )
    })
    .await;
    match finished {
        Ok((exit, stdout, stderr)) => {
            let mut output = String::from_utf8_lossy(&stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&stderr));
            let output = truncate(output, limit);
            match exit.map(|status| status.code()) {
                Ok(Some(0)) => ProbeOutcome::new(CheckStatus::Passing, output),
                Ok(Some(1)) => ProbeOutcome::new(CheckStatus::Warning, output),
                Ok(code) => ProbeOutcome::new(
                    CheckStatus::Critical,
                    truncate(
                        format!(
                            "exit {}: {output}",
                            code.map_or("by signal".to_string(), |code| code.to_string())
                        ),
                        limit,
                    ),
                ),
                Err(error) => ProbeOutcome::new(CheckStatus::Critical, error.to_string()),
            }
        }
        Err(_) => {
            if let Some(process_group) = process_group {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(process_group as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = tokio::time::timeout(KILLED_GRACE, child.wait()).await;
            ProbeOutcome::new(
                CheckStatus::Critical,
                format!("timed out after {timeout:?}; process group killed"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::parse_json;

    fn check(json: &str) -> CheckDefinition {
        let service = format!(r#"{{"Name": "probe", "Check": {json}}}"#);
        parse_json(service.as_bytes())
            .expect("valid")
            .checks
            .remove(0)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn exec_maps_exit_codes_and_bounds_output() {
        runtime().block_on(async {
            let http = http_client();
            let passing = run(&check(r#"{"Args": ["sh", "-c", "echo ok"], "Interval": "1s"}"#), &http).await;
            assert_eq!(passing, ProbeOutcome::new(CheckStatus::Passing, "ok\n"));
            let warning = run(&check(r#"{"Args": ["sh", "-c", "exit 1"], "Interval": "1s"}"#), &http).await;
            assert_eq!(warning.status, CheckStatus::Warning);
            let critical = run(&check(r#"{"Args": ["sh", "-c", "exit 3"], "Interval": "1s"}"#), &http).await;
            assert_eq!(critical.status, CheckStatus::Critical);
            let long = run(
                &check(r#"{"Args": ["sh", "-c", "yes | head -c 100000"], "Interval": "1s", "OutputMaxSize": 100}"#),
                &http,
            )
            .await;
            assert_eq!(long.output.len(), 100);
            let missing = run(&check(r#"{"Args": ["/nonexistent/command"], "Interval": "1s"}"#), &http).await;
            assert_eq!(missing.status, CheckStatus::Critical);
        });
    }

    #[test]
    fn exec_timeout_kills_the_process_group() {
        runtime().block_on(async {
            let directory = tempfile::tempdir().expect("temporary directory");
            let marker = directory.path().join("survived");
            // The child of the shell would write the marker after 2 s if it
            // outlived the timeout.
            let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
            let definition = check(&format!(
                r#"{{"Args": ["sh", "-c", {script:?}], "Interval": "1s", "Timeout": "200ms"}}"#
            ));
            let started = std::time::Instant::now();
            let outcome = run(&definition, &http_client()).await;
            assert_eq!(outcome.status, CheckStatus::Critical);
            assert!(outcome.output.contains("timed out"), "{outcome:?}");
            assert!(started.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(
                !marker.exists(),
                "a process of the group outlived the timeout"
            );
        });
    }

    #[test]
    fn tcp_and_http_probes() {
        runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("address");
            let server = tokio::spawn(async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let mut request = vec![0u8; 1024];
                        let read = socket.read(&mut request).await.unwrap_or(0);
                        let text = String::from_utf8_lossy(&request[..read]).into_owned();
                        let (code, body) = if text.starts_with("GET /busy") {
                            ("429 Too Many Requests", "slow down")
                        } else if text.starts_with("GET /ok") {
                            ("200 OK", "fine")
                        } else {
                            ("500 Internal Server Error", "broken")
                        };
                        let response = format!(
                            "HTTP/1.1 {code}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = socket.write_all(response.as_bytes()).await;
                    });
                }
            });
            let http = http_client();
            let tcp = run(&check(&format!(r#"{{"TCP": "{address}", "Interval": "1s"}}"#)), &http).await;
            assert_eq!(tcp.status, CheckStatus::Passing);
            for (path, expected) in [
                ("ok", CheckStatus::Passing),
                ("busy", CheckStatus::Warning),
                ("fail", CheckStatus::Critical),
            ] {
                let outcome = run(
                    &check(&format!(r#"{{"HTTP": "http://{address}/{path}", "Interval": "1s"}}"#)),
                    &http,
                )
                .await;
                assert_eq!(outcome.status, expected, "{outcome:?}");
            }
            server.abort();
            let closed = run(&check(r#"{"TCP": "127.0.0.1:1", "Interval": "1s"}"#), &http).await;
            assert_eq!(closed.status, CheckStatus::Critical);
        });
    }
}
