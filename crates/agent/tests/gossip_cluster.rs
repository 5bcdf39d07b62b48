//! Gossip among real agents' gossip instances on loopback UDP, in one test
//! process. Each instance runs on its own thread with its own single-threaded
//! tokio runtime, so it can be stopped (its runtime dropped, its socket
//! closed: what the others see of a kill -9) or paused (its only thread
//! blocked: what SIGSTOP does, timers and sockets included) independently.
//!
//! Ports 26200–26299 belong to these tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use keel_agent::gossip::{Gossip, GossipConfig, GossipMember, GossipStatus};
use keel_agent::resources::Usage;
use tokio::sync::{mpsc, watch};

enum Command {
    /// Block the instance's runtime thread, as SIGSTOP would.
    Pause(Duration),
}

/// One gossip instance on its own thread and runtime. Dropping it stops the
/// instance (its runtime and socket go with the thread).
struct Instance {
    name: String,
    commands: Option<mpsc::UnboundedSender<Command>>,
    members: watch::Receiver<Arc<Vec<GossipMember>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Instance {
    fn start(name: &str, port: u16, join: &[u16]) -> Instance {
        let gossip_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut config = GossipConfig::new(name, gossip_addr);
        config.join = join
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        config.http_addr = Some(SocketAddr::from(([127, 0, 0, 1], port + 1000)));
        let (command_sender, mut command_receiver) = mpsc::unbounded_channel();
        let (started_sender, started_receiver) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("gossip-{name}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let gossip = Gossip::start(config).await.expect("gossip starts");
                    gossip
                        .publish_usage(&Usage {
                            cpu_percent: 1.0,
                            memory_used_bytes: u64::from(port),
                            disk_free_bytes: 1 << 30,
                            load_average: [0.0; 3],
                        })
                        .await;
                    started_sender.send(gossip.subscribe()).unwrap();
                    while let Some(command) = command_receiver.recv().await {
                        match command {
                            Command::Pause(duration) => thread::sleep(duration),
                        }
                    }
                    drop(gossip);
                });
            })
            .unwrap();
        let members = started_receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("the instance starts");
        Instance {
            name: name.to_string(),
            commands: Some(command_sender),
            members,
            thread: Some(thread),
        }
    }

    fn pause(&self, duration: Duration) {
        self.commands
            .as_ref()
            .unwrap()
            .send(Command::Pause(duration))
            .unwrap();
    }

    /// The status this instance gives `node`, if it lists it.
    fn status_of(&self, node: &str) -> Option<GossipStatus> {
        self.members
            .borrow()
            .iter()
            .find(|member| member.node_name == node)
            .map(|member| member.status)
    }

    fn sees_all_alive(&self, names: &[String]) -> bool {
        let members = self.members.borrow();
        members.len() == names.len()
            && names.iter().all(|name| {
                members.iter().any(|member| {
                    &member.node_name == name
                        && member.status == GossipStatus::Alive
                        && member.usage.is_some()
                })
            })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Closing the command channel ends the instance's loop.
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns
/// how long it took. While waiting, `invariant` must hold at every poll.
fn wait_for(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
    mut invariant: impl FnMut() -> Result<(), String>,
) -> Duration {
    let start = Instant::now();
    loop {
        if let Err(violation) = invariant() {
            panic!("while waiting for {what}: {violation}");
        }
        if condition() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// No instance in `observers` sees any node of `healthy` as suspect.
fn no_healthy_node_suspect(observers: &[&Instance], healthy: &[String]) -> Result<(), String> {
    for observer in observers {
        for node in healthy {
            if observer.status_of(node) == Some(GossipStatus::Suspect) {
                return Err(format!("{} sees healthy {node} suspect", observer.name));
            }
        }
    }
    Ok(())
}

fn start_cluster(prefix: &str, first_port: u16, count: u16) -> Vec<Instance> {
    (0..count)
        .map(|index| {
            // Everyone joins through the first instance; the first knows no one.
            let join = if index == 0 { vec![] } else { vec![first_port] };
            Instance::start(&format!("{prefix}-{index}"), first_port + index, &join)
        })
        .collect()
}

#[test]
fn members_converge_a_stopped_one_becomes_suspect_and_a_restarted_one_replaces_it() {
    let first_port = 26200;
    let mut instances = start_cluster("converge", first_port, 5);
    let names: Vec<String> = instances
        .iter()
        .map(|instance| instance.name.clone())
        .collect();
    let converged_after = wait_for(
        "every instance to see all five alive with their usage",
        Duration::from_secs(30),
        || {
            instances
                .iter()
                .all(|instance| instance.sees_all_alive(&names))
        },
        || Ok(()),
    );
    println!("5 instances converged in {converged_after:?}");
    let member = instances[0]
        .members
        .borrow()
        .iter()
        .find(|member| member.node_name == "converge-3")
        .cloned()
        .unwrap();
    assert_eq!(
        member.http_addr,
        Some(SocketAddr::from(([127, 0, 0, 1], first_port + 3 + 1000)))
    );
    assert_eq!(
        member.gossip_addr,
        SocketAddr::from(([127, 0, 0, 1], first_port + 3))
    );
    assert_eq!(
        member.usage.unwrap().memory_used_bytes,
        u64::from(first_port + 3)
    );

    // Stop the last instance: the others see it suspect, and no one else.
    let stopped = instances.pop().unwrap();
    let old_generation = instances[0]
        .members
        .borrow()
        .iter()
        .find(|member| member.node_name == stopped.name)
        .unwrap()
        .generation;
    let stopped_name = stopped.name.clone();
    drop(stopped);
    let healthy = &names[..4];
    let observers: Vec<&Instance> = instances.iter().collect();
    let suspect_after = wait_for(
        "the stopped instance to be suspect on every other",
        Duration::from_secs(20),
        || {
            observers
                .iter()
                .all(|observer| observer.status_of(&stopped_name) == Some(GossipStatus::Suspect))
        },
        || no_healthy_node_suspect(&observers, healthy),
    );
    println!("stopped instance suspect on all others after {suspect_after:?}");

    // Restart it on the same address: a newer generation replaces the old,
    // alive, and the node is listed once.
    instances.push(Instance::start(
        &stopped_name,
        first_port + 4,
        &[first_port],
    ));
    let observers: Vec<&Instance> = instances.iter().collect();
    wait_for(
        "the restarted instance to be alive everywhere",
        Duration::from_secs(20),
        || {
            observers
                .iter()
                .all(|observer| observer.sees_all_alive(&names))
        },
        || no_healthy_node_suspect(&observers[..4], healthy),
    );
    for observer in &observers[..4] {
        let members = observer.members.borrow();
        let restarted: Vec<&GossipMember> = members
            .iter()
            .filter(|member| member.node_name == stopped_name)
            .collect();
        assert_eq!(
            restarted.len(),
            1,
            "{} lists {stopped_name} once",
            observer.name
        );
        assert!(restarted[0].generation > old_generation);
    }
}

#[test]
fn a_paused_member_is_suspect_then_alive_and_no_one_else_is_ever_suspect() {
    let first_port = 26210;
    let instances = start_cluster("pause", first_port, 4);
    let names: Vec<String> = instances
        .iter()
        .map(|instance| instance.name.clone())
        .collect();
    let all: Vec<&Instance> = instances.iter().collect();
    wait_for(
        "every instance to see all four alive",
        Duration::from_secs(30),
        || all.iter().all(|instance| instance.sees_all_alive(&names)),
        || Ok(()),
    );

    let paused = &instances[3];
    let others: Vec<&Instance> = instances[..3].iter().collect();
    let healthy = &names[..3];
    let pause = Duration::from_secs(8);
    let paused_at = Instant::now();
    paused.pause(pause);
    // The paused instance's own view does not change while it is paused (its
    // refresh task does not run), so checking it too is sound.
    let suspect_after = wait_for(
        "the paused instance to be suspect on every other",
        pause - Duration::from_secs(1),
        || {
            others
                .iter()
                .all(|observer| observer.status_of(&paused.name) == Some(GossipStatus::Suspect))
        },
        || no_healthy_node_suspect(&all, healthy),
    );
    println!("paused instance suspect on all others after {suspect_after:?}");

    let resumed_at = paused_at + pause;
    wait_for(
        "the paused instance to be alive again everywhere after it resumes",
        pause + Duration::from_secs(20),
        || {
            Instant::now() > resumed_at
                && all.iter().all(|instance| instance.sees_all_alive(&names))
        },
        || no_healthy_node_suspect(&all, healthy),
    );
    println!(
        "paused instance alive again everywhere {:?} after resuming",
        resumed_at.elapsed()
    );

    // And for a while after, nobody is suspect anywhere: in particular the
    // resumed instance did not turn on the healthy ones.
    let settle = Instant::now();
    wait_for(
        "a quiet period",
        Duration::from_secs(10),
        || settle.elapsed() > Duration::from_secs(4),
        || no_healthy_node_suspect(&all, &names),
    );
}
