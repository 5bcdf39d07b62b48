//! keel's Rust client: the one way keel's own tools (the CLI, the agent, the
//! controller) talk to the members, over etcd's v3 gRPC API.
//!
//! A [`Client`] holds one lazily connected channel per endpoint and decides,
//! for every request, where it goes and what happens when it fails:
//!
//! - **Routing** ([`selection`]): writes, keep-alives and elections go to the
//!   leader, learned from the members' Status and forgotten when it fails or a
//!   response shows a newer term; reads (linearizable or serializable) go to
//!   any healthy member, the last one that answered first.
//! - **Failover and retries**: a failed attempt moves to an endpoint this
//!   request has not tried, after an exponential backoff with full jitter
//!   ([`backoff`]). Reads, status, keep-alives, campaigns and watch
//!   resumptions are retried on any endpoint failure; a put, delete, txn or
//!   compact only when it provably never reached a member (connection
//!   refused, connect timeout, circuit open), never after a timeout once sent
//!   ([`ClientError::outcome_unknown`] says when a write may have happened).
//! - **Deadlines**: each attempt has `attempt_timeout`, each request
//!   `request_timeout` (per handle: [`Client::with_request_timeout`]).
//! - **Retry budget** ([`budget`]): a token bucket bounds retries to a fraction
//!   of requests plus a small reserve per second, so retries cannot amplify an
//!   outage.
//! - **Circuit breakers** ([`breaker`]): one per endpoint, closed/open/half-open,
//!   so a dead member costs nothing while it is down and is probed back in.
//!
//! The decisions ([`backoff`], [`budget`], [`breaker`], [`selection`]) are pure
//! and take time as a value; the tokio parts only carry them out. Watches
//! ([`Watcher`]) and lease keep-alives ([`LeaseKeeper`]) run in background
//! tasks that resume on another member after a failure.
//!
//! ```no_run
//! # async fn example() -> Result<(), keel_client::ClientError> {
//! use keel_client::{Client, ClientConfig, WatchOptions};
//!
//! let client = Client::connect(["127.0.0.1:2379", "127.0.0.1:22379"], ClientConfig::default()).await?;
//! client.put("greeting", "hello").await?;
//! let value = client.get("greeting").await?.map(|kv| kv.value);
//! let lease = client.grant_kept_lease(10).await?;
//! client.put_with_lease("/keel/nodes/n1", "{}", lease.id()).await?;
//! let mut watcher = client.watch(WatchOptions::prefix("/keel/")).await?;
//! while let Some(response) = watcher.next().await {
//!     for event in response?.events { /* … */ }
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

/// The gRPC client stubs for etcd's services, generated in this crate's
/// `build.rs` over `keel_types`' messages (so the client never depends on the
/// server crate).
#[allow(missing_docs, clippy::all)]
pub mod api {
    /// KV, Watch, Lease, Cluster, Maintenance and Auth.
    pub mod etcdserverpb {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    }
    /// The Lock service.
    pub mod v3lockpb {
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
    }
    /// The Election service.
    pub mod v3electionpb {
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    }
}

pub mod backoff;
pub mod breaker;
pub mod budget;
mod client;
mod cluster;
mod config;
mod election;
mod error;
mod kv;
mod lease;
pub mod selection;
pub mod txn;
mod watch;

pub use crate::breaker::BreakerState;
pub use crate::client::{endpoint_url, Client, EndpointStatus};
pub use crate::config::{ClientConfig, ENDPOINTS_MAX, REQUEST_BYTES_MAX, RESPONSE_BYTES_MAX};
pub use crate::election::Observer;
pub use crate::error::ClientError;
pub use crate::lease::{LeaseKeeper, LeaseState};
pub use crate::watch::{WatchOptions, Watcher};

/// Re-exported so users need not depend on `keel-types` for the messages.
pub use keel_types;

/// The end of the range holding every key that starts with `prefix`, as etcd
/// computes it (`[0]`, the whole key space, for an empty or all-0xff prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
