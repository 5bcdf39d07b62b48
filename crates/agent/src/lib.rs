//! `keel agent`, the node daemon of keel's fault-tolerance layer: it registers
//! its node and its services in the store (attached to the node's lease), runs
//! health checks, gossips with the other agents (phi-accrual suspicion, live
//! usage), and serves discovery (Consul's `/v1` HTTP API and DNS) from one
//! shared watch of `/keel/`. Decisions (definitions, the check state machine,
//! what to write) are pure functions; the tokio parts only read, write and run
//! probes. It is a client of the store and never reaches into `core`.

pub mod agent;
pub mod agent_metrics;
pub mod api;
pub mod api_client;
pub mod catalog;
pub mod chaos;
pub mod check_state;
pub mod definition;
pub mod dns;
pub mod events;
pub mod gossip;
pub mod local;
pub mod members;
pub mod observer;
pub mod probe;
pub mod resources;
pub mod workloads;
