//! Gossip at scale, in one process on loopback: how long N instances take to
//! converge (every one sees all N alive) and how long after an instance is
//! stopped every other one sees it suspect, with no healthy instance ever
//! suspect. In the suite it runs 10 instances and one stop; the numbers in
//! docs/BENCHMARKS.md come from the release build with 50 instances and
//! several stops:
//!
//! ```text
//! KEEL_GOSSIP_SCALE_INSTANCES=50 KEEL_GOSSIP_SCALE_STOPS=5 \
//!     cargo test --release -p keel-agent --test gossip_scale -- --nocapture
//! ```
//!
//! Ports 26220–26299 belong to this test (so at most 80 instances).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_agent::gossip::{Gossip, GossipConfig, GossipMember, GossipStatus};
use tokio::sync::watch;

const FIRST_PORT: u16 = 26220;
const INSTANCES_MAX: u16 = 80;

fn from_environment(name: &str, default: u16) -> u16 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

fn suspect_count(watches: &[watch::Receiver<Arc<Vec<GossipMember>>>], node: &str) -> usize {
    watches
        .iter()
        .filter(|members| {
            members
                .borrow()
                .iter()
                .any(|member| member.node_name == node && member.status == GossipStatus::Suspect)
        })
        .count()
}

/// Panics if any instance sees a node not in `stopped` as suspect.
fn assert_no_false_suspicion(
    watches: &[watch::Receiver<Arc<Vec<GossipMember>>>],
    stopped: &[String],
) {
    for members in watches {
        for member in members.borrow().iter() {
            assert!(
                member.status == GossipStatus::Alive || stopped.contains(&member.node_name),
                "{} is suspect but was never stopped",
                member.node_name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_converge_and_see_stopped_ones_suspect() {
    let instances = from_environment("KEEL_GOSSIP_SCALE_INSTANCES", 10);
    let stops = from_environment("KEEL_GOSSIP_SCALE_STOPS", 1);
    assert!(
        (2..=INSTANCES_MAX).contains(&instances),
        "2 to {INSTANCES_MAX} instances"
    );
    assert!(stops < instances, "fewer stops than instances");

    let started_at = Instant::now();
    let mut gossips = Vec::new();
    for index in 0..instances {
        let mut config = GossipConfig::new(
            format!("scale-{index}"),
            SocketAddr::from(([127, 0, 0, 1], FIRST_PORT + index)),
        );
        if index > 0 {
            config.join = vec![format!("127.0.0.1:{FIRST_PORT}")];
        }
        gossips.push(Gossip::start(config).await.expect("gossip starts"));
    }
    let mut watches: Vec<_> = gossips.iter().map(Gossip::subscribe).collect();
    let deadline = started_at + Duration::from_secs(60);
    loop {
        let converged = watches.iter().all(|members| {
            let members = members.borrow();
            members.len() == usize::from(instances)
                && members
                    .iter()
                    .all(|member| member.status == GossipStatus::Alive)
        });
        if converged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{instances} instances did not converge within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{instances} instances converged {:?} after the first started",
        started_at.elapsed()
    );

    // Let the detectors gather samples, as in a running cluster.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut stopped: Vec<String> = Vec::new();
    for _ in 0..stops {
        let gossip = gossips.pop().unwrap();
        watches.pop();
        let name = gossip.node_name().to_string();
        stopped.push(name.clone());
        drop(gossip);
        let stopped_at = Instant::now();
        let mut first_suspect = None;
        loop {
            assert_no_false_suspicion(&watches, &stopped);
            let suspects = suspect_count(&watches, &name);
            if suspects > 0 {
                first_suspect.get_or_insert(stopped_at.elapsed());
            }
            if suspects == watches.len() {
                break;
            }
            assert!(
                stopped_at.elapsed() < Duration::from_secs(30),
                "{name} not suspect everywhere within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "stopped {name}: suspect on the first instance after {:?}, on all {} after {:?}",
            first_suspect.unwrap(),
            watches.len(),
            stopped_at.elapsed()
        );
        // The others settle before the next stop.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_no_false_suspicion(&watches, &stopped);
    }
}
