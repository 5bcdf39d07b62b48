//! The retry rules against real sockets on loopback: a request to a port
//! that refuses connections was never sent and is retried (writes included);
//! a write that reached a member which never answered is not retried, and
//! says its outcome is unknown; a read is retried; the retry budget and the
//! deadline stop retries; breakers open on dead endpoints.
//!
//! Ports 25001-25009 (this file's range; nothing listens on the odd ones
//! 25001 and 25003, the test's silent listeners take 25005 and 25007).

use std::time::{Duration, Instant};

use keel_client::{BreakerState, Client, ClientConfig, ClientError};
use tokio::net::TcpListener;

const REFUSING: [&str; 2] = ["127.0.0.1:25001", "127.0.0.1:25003"];
const SILENT: [&str; 2] = ["127.0.0.1:25005", "127.0.0.1:25007"];

fn quick_config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_millis(500),
        attempt_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        leader_discovery_timeout: Duration::from_millis(100),
        random_seed: Some(1),
        ..ClientConfig::default()
    }
}

/// Accepts connections and never answers (holds them open until dropped).
async fn silent_listener(address: &str) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(address)
        .await
        .expect("bind silent listener");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    })
}

#[tokio::test]
async fn a_write_to_refusing_endpoints_is_retried_because_it_was_never_sent() {
    let config = ClientConfig {
        retry_attempts_max: 4,
        breaker_failures_to_open: 2,
        ..quick_config()
    };
    let client = Client::connect(REFUSING, config).await.expect("client");
    let error = client.put("k", "v").await.unwrap_err();
    match &error {
        ClientError::AttemptsExhausted { attempts, last, .. } => {
            assert_eq!(*attempts, 4);
            // Refused, or skipped because its breaker opened (the leader
            // discovery's Status calls count too): never sent either way.
            assert!(
                matches!(
                    **last,
                    ClientError::Unreachable { .. } | ClientError::NoEndpointAvailable
                ),
                "{last}"
            );
        }
        other => panic!("expected the attempts to run out, got {other}"),
    }
    assert!(!error.outcome_unknown(), "nothing was sent: {error}");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    // Two failures each: both breakers are open.
    for (endpoint, state) in client.breaker_states() {
        assert_eq!(state, BreakerState::Open, "{endpoint}");
    }
    // With every breaker open, nothing is even tried.
    let error = client
        .with_request_timeout(Duration::from_millis(50))
        .get("k")
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("circuit breaker"), "{text}");
}

#[tokio::test]
async fn a_write_that_reached_a_silent_member_is_not_retried() {
    let _listeners = (
        silent_listener(SILENT[0]).await,
        silent_listener(SILENT[1]).await,
    );
    let client = Client::connect(SILENT, quick_config())
        .await
        .expect("client");
    let started = Instant::now();
    let error = client.put("k", "v").await.unwrap_err();
    // One attempt, no retry: the error is the attempt's own.
    assert!(
        matches!(
            error,
            ClientError::NoAnswer {
                code: tonic::Code::DeadlineExceeded,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.outcome_unknown(), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A read is retried on the other endpoint, and again, up to the limit.
    let client = client.with_request_timeout(Duration::from_secs(10));
    let error = client.get("k").await.unwrap_err();
    match error {
        ClientError::AttemptsExhausted {
            attempts,
            outcome_unknown,
            ..
        } => {
            assert_eq!(attempts, client.config().retry_attempts_max);
            assert!(outcome_unknown);
        }
        // The breakers (3 failures to open) may refuse the last attempts.
        ClientError::RetryBudgetExhausted { .. } => {}
        other => panic!("expected a retried read, got {other}"),
    }
}

#[tokio::test]
async fn the_retry_budget_stops_retries() {
    let config = ClientConfig {
        retry_attempts_max: 100,
        retry_budget_tokens_max: 2.0,
        retry_budget_ratio: 0.0,
        retry_budget_reserve_per_second: 0.0,
        breaker_failures_to_open: 1_000,
        ..quick_config()
    };
    let client = Client::connect(REFUSING, config).await.expect("client");
    let error = client.get("k").await.unwrap_err();
    assert!(
        matches!(error, ClientError::RetryBudgetExhausted { .. }),
        "{error}"
    );
    // The budget is shared by every request of the client: the next one
    // gets no retry at all.
    let error = client.get("k").await.unwrap_err();
    match error {
        ClientError::RetryBudgetExhausted { last } => {
            assert!(matches!(*last, ClientError::Unreachable { .. }), "{last}")
        }
        other => panic!("expected no retry, got {other}"),
    }
}

#[tokio::test]
async fn the_request_deadline_stops_retries() {
    let config = ClientConfig {
        retry_attempts_max: 1_000_000,
        retry_budget_tokens_max: 1e9,
        breaker_failures_to_open: 1_000_000,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(20),
        ..quick_config()
    };
    let client = Client::connect(REFUSING, config)
        .await
        .expect("client")
        .with_request_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let error = client.get("k").await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(error, ClientError::DeadlineExceeded { .. }),
        "{error}"
    );
    assert_eq!(error.code(), tonic::Code::DeadlineExceeded);
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_sent() {
    let config = ClientConfig {
        request_bytes_max: 1_024,
        ..quick_config()
    };
    let client = Client::connect(REFUSING, config).await.expect("client");
    let error = client.put("k", vec![0u8; 2_000]).await.unwrap_err();
    assert!(
        matches!(error, ClientError::RequestTooLarge { limit: 1_024, .. }),
        "{error}"
    );
    assert_eq!(error.code(), tonic::Code::InvalidArgument);

    let error = Client::connect(Vec::<String>::new(), ClientConfig::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("endpoints"), "{error}");
    let error = Client::connect(["https://127.0.0.1:2379"], ClientConfig::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("https"), "{error}");
    let too_many: Vec<String> = (0..40)
        .map(|port| format!("127.0.0.1:{}", 25_400 + port))
        .collect();
    let error = Client::connect(too_many, ClientConfig::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("endpoints_max"), "{error}");
}
