//! `ClientError`: what went wrong, keeping the gRPC code and etcd's message
//! when a member answered, and saying whether a write may have taken effect
//! when no answer came.
//!
//! The classification of a failed attempt ([`Failure`]) is what the retry
//! loop decides with: a request that provably never left the client
//! (connection refused, connect timeout, circuit open) may always be retried;
//! one that was sent and got no answer may be retried only if it is a read.

use std::error::Error as _;
use std::time::Duration;

/// Everything a keel client call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A member answered with an error: etcd's gRPC code and message.
    #[error("{message} (gRPC {code:?} from {endpoint})")]
    Status {
        /// The endpoint that answered.
        endpoint: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// etcd's message, such as "etcdserver: mvcc: required revision has been compacted".
        message: String,
    },
    /// No connection could be made to the endpoint: the request was not sent.
    #[error("cannot connect to {endpoint}: {message}")]
    Unreachable {
        /// The endpoint that could not be reached.
        endpoint: String,
        /// Why, from the transport.
        message: String,
    },
    /// The request was sent but no answer came: the connection broke, the
    /// attempt timed out, or the member had no leader to serve it. A write
    /// may or may not have taken effect.
    #[error("no answer from {endpoint}: {message}")]
    NoAnswer {
        /// The endpoint the request was sent to.
        endpoint: String,
        /// The gRPC code (Unavailable, DeadlineExceeded, …).
        code: tonic::Code,
        /// The member's or the transport's message.
        message: String,
    },
    /// Every endpoint's circuit breaker is open: nothing was sent.
    #[error("no endpoint available: the circuit breaker of every endpoint is open")]
    NoEndpointAvailable,
    /// A retry was needed but the retry budget is spent (the cluster is
    /// failing many requests; retrying would only add load).
    #[error("retry budget exhausted; last error: {last}")]
    RetryBudgetExhausted {
        /// The failure that would have been retried.
        last: Box<ClientError>,
    },
    /// The request's deadline passed before it succeeded.
    #[error(
        "request deadline of {timeout:?} passed after {attempts} attempt(s); last error: {last}"
    )]
    DeadlineExceeded {
        /// The deadline that passed.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: Box<ClientError>,
        /// Some attempt was sent and got no answer: a write may have taken effect.
        outcome_unknown: bool,
    },
    /// Every allowed attempt failed.
    #[error("gave up after {attempts} attempt(s); last error: {last}")]
    AttemptsExhausted {
        /// Attempts made (`retry_attempts_max`).
        attempts: u32,
        /// The last attempt's failure.
        last: Box<ClientError>,
        /// Some attempt was sent and got no answer: a write may have taken effect.
        outcome_unknown: bool,
    },
    /// The request is bigger than `request_bytes_max`; it was not sent.
    #[error("request of {bytes} bytes exceeds request_bytes_max ({limit} bytes)")]
    RequestTooLarge {
        /// The encoded request's size.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An endpoint is not a usable URL or address.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting of [`crate::ClientConfig`] cannot work.
    #[error("invalid client configuration: {field} {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A watch needs revisions that were compacted away; it has ended.
    #[error(
        "watch needs revision {revision}, which was compacted (the oldest available is {compact_revision})"
    )]
    Compacted {
        /// The revision the watch needed next.
        revision: i64,
        /// The compaction revision the member reported.
        compact_revision: i64,
    },
    /// The member cancelled a watch for another reason; it has ended.
    #[error("watch canceled by the server: {reason}")]
    WatchCanceled {
        /// The member's reason.
        reason: String,
    },
    /// A kept-alive lease is gone (expired, revoked, or not renewed within its TTL).
    #[error("lease {id:x} lost: {reason}")]
    LeaseLost {
        /// The lease id.
        id: i64,
        /// Why it is considered lost.
        reason: String,
    },
    /// A member's answer broke the protocol (a missing field, a stream that
    /// ended before answering).
    #[error("unexpected answer from {endpoint}: {message}")]
    Protocol {
        /// The endpoint.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
}

impl ClientError {
    /// The gRPC code this error corresponds to (the member's, when it answered).
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::Status { code, .. } | ClientError::NoAnswer { code, .. } => *code,
            ClientError::Unreachable { .. } | ClientError::NoEndpointAvailable => {
                tonic::Code::Unavailable
            }
            ClientError::RetryBudgetExhausted { last }
            | ClientError::AttemptsExhausted { last, .. } => last.code(),
            ClientError::DeadlineExceeded { .. } => tonic::Code::DeadlineExceeded,
            ClientError::RequestTooLarge { .. }
            | ClientError::InvalidEndpoint { .. }
            | ClientError::InvalidConfig { .. } => tonic::Code::InvalidArgument,
            ClientError::Compacted { .. } => tonic::Code::OutOfRange,
            ClientError::WatchCanceled { .. } => tonic::Code::Cancelled,
            ClientError::LeaseLost { .. } => tonic::Code::NotFound,
            ClientError::Protocol { .. } => tonic::Code::Internal,
        }
    }

    /// The member's message when it answered (etcd's text, as etcdctl prints
    /// it), otherwise this error's description.
    pub fn message(&self) -> String {
        match self {
            ClientError::Status { message, .. } => message.clone(),
            ClientError::RetryBudgetExhausted { last }
            | ClientError::AttemptsExhausted { last, .. }
            | ClientError::DeadlineExceeded { last, .. } => last.message(),
            other => other.to_string(),
        }
    }

    /// Whether a write that failed with this error may nevertheless have
    /// taken effect (it reached a member that did not answer).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            ClientError::NoAnswer { .. } => true,
            ClientError::DeadlineExceeded {
                outcome_unknown, ..
            }
            | ClientError::AttemptsExhausted {
                outcome_unknown, ..
            } => *outcome_unknown,
            ClientError::RetryBudgetExhausted { last } => last.outcome_unknown(),
            _ => false,
        }
    }

    /// Whether a member answered "not found" (a lease or member that does not exist).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ClientError::Status {
                code: tonic::Code::NotFound,
                ..
            }
        )
    }
}

/// How one attempt failed, which decides whether to retry and whether the
/// endpoint's breaker counts a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The request never reached a member: safe to retry anything.
    NotSent,
    /// It was sent (or may have been) and no answer came: the endpoint is
    /// failing; only reads may be retried.
    NoAnswer,
    /// The member is shedding load: retry reads elsewhere, but the endpoint
    /// is alive.
    Busy,
    /// The member answered with an error: final.
    Answered,
}

impl Failure {
    /// Whether the endpoint's breaker counts this as a failure.
    pub(crate) fn counts_against_endpoint(self) -> bool {
        matches!(self, Failure::NotSent | Failure::NoAnswer)
    }
}

/// Classifies a failed call's status and turns it into a [`ClientError`].
pub(crate) fn classify(endpoint: &str, status: &tonic::Status) -> (Failure, ClientError) {
    // The transport's own errors carry their cause as the status's source;
    // a status decoded from a member's trailers has none.
    let mut source = status.source();
    let mut transport = source.is_some();
    while let Some(cause) = source {
        if cause.downcast_ref::<tonic::ConnectError>().is_some() {
            return (
                Failure::NotSent,
                ClientError::Unreachable {
                    endpoint: endpoint.to_string(),
                    message: describe_chain(cause),
                },
            );
        }
        source = cause.source();
    }
    let code = status.code();
    // Statuses tonic makes itself when the connection failed carry no source
    // in a few paths; their messages say "transport error".
    if status.message().starts_with("transport error")
        || status.message().starts_with("h2 protocol error")
    {
        transport = true;
    }
    let message = status.message().to_string();
    if transport
        || matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        )
    {
        let message = match status.source() {
            Some(cause) if transport => format!("{message}: {}", describe_chain(cause)),
            _ => message,
        };
        return (
            Failure::NoAnswer,
            ClientError::NoAnswer {
                endpoint: endpoint.to_string(),
                code,
                message,
            },
        );
    }
    let failure = if code == tonic::Code::ResourceExhausted && message.contains("too many requests")
    {
        Failure::Busy
    } else {
        Failure::Answered
    };
    (
        failure,
        ClientError::Status {
            endpoint: endpoint.to_string(),
            code,
            message,
        },
    )
}

fn describe_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_error_is_final_and_keeps_code_and_message() {
        let status =
            tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted");
        let (failure, error) = classify("http://127.0.0.1:1", &status);
        assert_eq!(failure, Failure::Answered);
        assert_eq!(error.code(), tonic::Code::OutOfRange);
        assert_eq!(
            error.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        assert!(!error.outcome_unknown());
        assert!(!failure.counts_against_endpoint());
    }

    #[test]
    fn no_leader_from_a_member_is_no_answer() {
        let status = tonic::Status::unavailable("etcdserver: no leader");
        let (failure, error) = classify("e", &status);
        assert_eq!(failure, Failure::NoAnswer);
        assert!(error.outcome_unknown());
        assert!(failure.counts_against_endpoint());
    }

    #[test]
    fn too_many_requests_is_busy() {
        let status = tonic::Status::resource_exhausted("etcdserver: too many requests");
        assert_eq!(classify("e", &status).0, Failure::Busy);
        let status = tonic::Status::resource_exhausted("etcdserver: mvcc: database space exceeded");
        assert_eq!(classify("e", &status).0, Failure::Answered);
    }

    #[test]
    fn wrapped_errors_report_the_innermost_members_message() {
        let last = ClientError::Status {
            endpoint: "e".into(),
            code: tonic::Code::NotFound,
            message: "etcdserver: requested lease not found".into(),
        };
        let error = ClientError::RetryBudgetExhausted {
            last: Box::new(last),
        };
        assert_eq!(error.code(), tonic::Code::NotFound);
        assert_eq!(error.message(), "etcdserver: requested lease not found");
    }
}
