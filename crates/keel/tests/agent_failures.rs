//! Node failures with real processes: an agent paused (SIGSTOP) for half its
//! node TTL is suspected and then alive again with nothing deregistered; an
//! agent killed with SIGKILL is suspect within a few heartbeats, down within
//! its TTL + 1 s, its instances leave discovery and come back, without
//! duplicates, when it restarts; killing the keel leader loses no
//! registration and a waiting blocking query returns the next change.

mod agent_support;
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_support::{
    dig, get, node_status, passing_ids, put, request, wait_until, web_definition, Agents, Health,
    WebService,
};
use common::Cluster;

const MEMBERS_PORT_BASE: u16 = 25700;
const SERVICES_PORT_BASE: u16 = 25710;
const AGENTS_PORT_BASE: u16 = 25720;
const NODE_TTL: Duration = Duration::from_secs(10);

/// Every (observer, node, status) seen by polling `/v1/keel/nodes`.
struct Monitor {
    seen: Arc<Mutex<BTreeSet<(usize, String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(addresses: Vec<(usize, String)>) -> Monitor {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (observer, address) in &addresses {
                        let Ok(response) = get(address, "/v1/keel/nodes") else {
                            continue;
                        };
                        for node in response.json().as_array().into_iter().flatten() {
                            let name = node["Node"].as_str().unwrap_or_default().to_string();
                            let status = node["Status"].as_str().unwrap_or_default().to_string();
                            seen.lock().expect("lock").insert((*observer, name, status));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Monitor {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> BTreeSet<(usize, String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.seen.lock().expect("lock").clone()
    }
}

/// (node, id, create revision) of every instance in `catalog/service/web`.
fn catalog_web(address: &str) -> Vec<(String, String, u64)> {
    let entries = get(address, "/v1/catalog/service/web")
        .expect("catalog")
        .json();
    let mut instances: Vec<(String, String, u64)> = entries
        .as_array()
        .expect("an array")
        .iter()
        .map(|entry| {
            (
                entry["Node"].as_str().unwrap_or_default().to_string(),
                entry["ServiceID"].as_str().unwrap_or_default().to_string(),
                entry["CreateIndex"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    instances.sort();
    instances
}

#[test]
fn paused_killed_and_restarted_agents_and_a_killed_leader() {
    let mut cluster = Cluster::start(3, MEMBERS_PORT_BASE);
    let services: Vec<WebService> = (0..3)
        .map(|index| WebService::start(SERVICES_PORT_BASE + index))
        .collect();
    let mut agents = Agents::new(
        3,
        AGENTS_PORT_BASE,
        &cluster.endpoints(),
        &format!("{}s", NODE_TTL.as_secs()),
    );
    agents.start_all();
    let addresses: Vec<String> = agents
        .agents
        .iter()
        .map(|agent| agent.http_addr())
        .collect();
    for (index, address) in addresses.iter().enumerate() {
        let definition = web_definition(
            &format!("web-{}", index + 1),
            SERVICES_PORT_BASE + index as u16,
        );
        let response = put(address, "/v1/agent/service/register", Some(&definition));
        assert_eq!(response.status, 200, "register: {}", response.body);
    }
    let all = ["node1/web-1", "node2/web-2", "node3/web-3"];
    for address in &addresses {
        wait_until(Duration::from_secs(30), "3 passing instances", || {
            passing_ids(address, "web").filter(|ids| ids == &all)
        });
    }
    // Gossip has seen every node's heartbeats for a while (phi needs a mean).
    for address in &addresses {
        wait_until(Duration::from_secs(20), "every node has a phi", || {
            let nodes = get(address, "/v1/keel/nodes").ok()?.json();
            let with_phi = nodes
                .as_array()?
                .iter()
                .filter(|node| node["Phi"].is_number())
                .count();
            (with_phi == 2).then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    let registered = catalog_web(&addresses[0]);
    assert_eq!(registered.len(), 3);

    // SIGSTOP node3 for half its TTL: suspect, then alive; nothing
    // deregistered; the other nodes are never suspected.
    let monitor = Monitor::start(vec![(0, addresses[0].clone()), (1, addresses[1].clone())]);
    let stopped_at = Instant::now();
    agents.signal(2, "STOP");
    wait_until(NODE_TTL / 2, "node3 is suspect", || {
        (node_status(&addresses[0], "node3")? == "suspect").then_some(())
    });
    let suspected_after = stopped_at.elapsed();
    std::thread::sleep((NODE_TTL / 2).saturating_sub(stopped_at.elapsed()));
    agents.signal(2, "CONT");
    wait_until(Duration::from_secs(10), "node3 is alive again", || {
        (node_status(&addresses[0], "node3")? == "alive").then_some(())
    });
    wait_until(
        Duration::from_secs(10),
        "3 passing instances after the pause",
        || passing_ids(&addresses[0], "web").filter(|ids| ids == &all),
    );
    let seen = monitor.finish();
    eprintln!("pause: suspected after {suspected_after:?}");
    for (observer, node, status) in &seen {
        assert_ne!(
            status, "down",
            "agent {observer} saw {node} down during a pause"
        );
        if node != "node3" {
            assert_eq!(
                status, "alive",
                "agent {observer} saw {node} {status} during node3's pause"
            );
        }
    }
    assert_eq!(
        catalog_web(&addresses[0]),
        registered,
        "the pause deregistered something"
    );

    // SIGKILL node2: suspect within a few heartbeats, down within TTL + 1 s.
    let killed_at = Instant::now();
    agents.kill(1);
    wait_until(NODE_TTL, "node2 is suspect", || {
        (node_status(&addresses[0], "node2")? == "suspect").then_some(())
    });
    let suspect_after = killed_at.elapsed();
    wait_until(Duration::from_secs(10), "web-2 leaves discovery", || {
        passing_ids(&addresses[0], "web").filter(|ids| ids == &["node1/web-1", "node3/web-3"])
    });
    wait_until(
        (NODE_TTL + Duration::from_secs(1)).saturating_sub(killed_at.elapsed()),
        "node2 is down within its TTL + 1 s",
        || (node_status(&addresses[0], "node2")? == "down").then_some(()),
    );
    let down_after = killed_at.elapsed();
    eprintln!("kill -9: suspect after {suspect_after:?}, down after {down_after:?}");
    assert_eq!(catalog_web(&addresses[0]).len(), 2);
    assert_eq!(
        dig(agents.agents[0].dns_port, "web.service.keel", "SRV").len(),
        2
    );

    // Restarted, it registers its node and (persisted) instance again.
    agents.start(1);
    wait_until(Duration::from_secs(20), "node2 is alive again", || {
        (node_status(&addresses[0], "node2")? == "alive").then_some(())
    });
    wait_until(Duration::from_secs(20), "web-2 is back", || {
        passing_ids(&addresses[0], "web").filter(|ids| ids == &all)
    });
    let instances = catalog_web(&addresses[0]);
    let unique: BTreeSet<(String, String)> = instances
        .iter()
        .map(|(node, id, _)| (node.clone(), id.clone()))
        .collect();
    assert_eq!((instances.len(), unique.len()), (3, 3), "{instances:?}");

    // Kill -9 the keel leader while a blocking query waits: no registration
    // is lost, and the query returns the next change.
    let index = get(&addresses[0], "/v1/health/service/web")
        .expect("health")
        .index();
    let waiter = {
        let address = addresses[0].clone();
        std::thread::spawn(move || {
            request(
                &address,
                "GET",
                &format!("/v1/health/service/web?index={index}&wait=60s"),
                None,
                Duration::from_secs(70),
            )
            .expect("blocking query answers")
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "the blocking query returned without a change"
    );
    let leader = cluster.wait_for_leader();
    cluster.kill(leader);
    services[2].set(Health::Fail);
    let woken = waiter.join().expect("waiter");
    assert!(woken.index() > index);
    wait_until(
        Duration::from_secs(30),
        "web-3 is critical after the leader's death",
        || passing_ids(&addresses[0], "web").filter(|ids| ids == &["node1/web-1", "node2/web-2"]),
    );
    for address in &addresses {
        wait_until(Duration::from_secs(15), "no registration lost", || {
            (catalog_web(address).len() == 3).then_some(())
        });
    }
    services[2].set(Health::Ok);
    wait_until(Duration::from_secs(20), "web-3 passes again", || {
        passing_ids(&addresses[1], "web").filter(|ids| ids == &all)
    });
    drop(agents);
}
