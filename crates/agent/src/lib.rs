//! `keel agent`: the per-machine daemon of keel's fault-tolerance layer. This
//! part holds the node's fast signals and its DNS interface: gossip among
//! agents with a phi-accrual failure detector (`gossip`), the node's capacity
//! and live usage (`resources`), and the DNS server over the registry (`dns`).

pub mod dns;
pub mod gossip;
pub mod resources;
