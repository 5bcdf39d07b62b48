//! Three members and three real `keel agent`s, a service `web` with three
//! instances (small HTTP services this test starts) and an HTTP readiness
//! check each: discovery through the HTTP API and DNS, the anti-flap
//! thresholds, a blocking query, and the CLI.

mod agent_support;
mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use agent_support::{
    dig, get, passing_ids, put, request, wait_until, web_definition, Agents, Health, WebService,
};
use common::Cluster;

const MEMBERS_PORT_BASE: u16 = 25600;
const SERVICES_PORT_BASE: u16 = 25610;
const AGENTS_PORT_BASE: u16 = 25620;

fn keel(arguments: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(arguments)
        .output()
        .expect("keel runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn srv_ports(dns_port: u16) -> Vec<String> {
    dig(dns_port, "web.service.keel", "SRV")
        .iter()
        .filter_map(|line| line.split_whitespace().nth(2).map(str::to_string))
        .collect()
}

/// The ModifyIndex of check `id` in `health/checks/web`.
fn check_modify_index(address: &str, id: &str) -> u64 {
    let checks = get(address, "/v1/health/checks/web")
        .expect("checks")
        .json();
    checks
        .as_array()
        .expect("an array")
        .iter()
        .find(|check| check["CheckID"] == id)
        .and_then(|check| check["ModifyIndex"].as_u64())
        .expect("the check is listed")
}

#[test]
fn web_instances_are_discovered_leave_on_failure_and_ignore_flapping() {
    let cluster = Cluster::start(3, MEMBERS_PORT_BASE);
    let services: Vec<WebService> = (0..3)
        .map(|index| WebService::start(SERVICES_PORT_BASE + index))
        .collect();
    let mut agents = Agents::new(3, AGENTS_PORT_BASE, &cluster.endpoints(), "5s");
    // The first instance comes from --config-dir (TOML), the others from the API.
    std::fs::write(
        agents.agents[0].config_dir.join("web.toml"),
        format!(
            r#"
            name = "web"
            id = "web-1"
            port = {port}
            tags = ["v1"]
            [[checks]]
            http = "http://127.0.0.1:{port}/health"
            interval = "300ms"
            timeout = "1s"
            success_before_passing = 2
            failures_before_critical = 3
            "#,
            port = SERVICES_PORT_BASE
        ),
    )
    .expect("definition file");
    agents.start_all();
    let addresses: Vec<String> = agents
        .agents
        .iter()
        .map(|agent| agent.http_addr())
        .collect();
    for (index, address) in addresses.iter().enumerate().skip(1) {
        let definition = web_definition(
            &format!("web-{}", index + 1),
            SERVICES_PORT_BASE + index as u16,
        );
        let response = put(address, "/v1/agent/service/register", Some(&definition));
        assert_eq!(response.status, 200, "register: {}", response.body);
    }

    // A bad definition is refused as a whole, naming the field.
    let refused = put(
        &addresses[0],
        "/v1/agent/service/register",
        Some(
            r#"{"Name": "web", "ID": "web-9", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "soon"}}"#,
        ),
    );
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("check.interval"), "{}", refused.body);
    let local = get(&addresses[0], "/v1/agent/services")
        .expect("services")
        .json();
    assert!(
        local.get("web-9").is_none() && local.get("web-1").is_some(),
        "{local}"
    );

    let all = ["node1/web-1", "node2/web-2", "node3/web-3"];
    for address in &addresses {
        wait_until(
            Duration::from_secs(30),
            "every agent lists 3 passing instances",
            || passing_ids(address, "web").filter(|ids| ids == &all),
        );
    }
    let expected_ports: Vec<String> = (0..3)
        .map(|index| (SERVICES_PORT_BASE + index).to_string())
        .collect();
    let dns_port = agents.agents[0].dns_port;
    wait_until(Duration::from_secs(10), "DNS SRV lists 3", || {
        let mut ports = srv_ports(dns_port);
        ports.sort();
        (ports == expected_ports).then_some(())
    });
    assert_eq!(dig(dns_port, "node2.node.keel", "A"), ["127.0.0.1"]);
    assert_eq!(dig(dns_port, "v1.web.service.keel", "SRV").len(), 3);
    assert!(dig(dns_port, "v2.web.service.keel", "SRV").is_empty());

    // Results alternating faster than the thresholds change nothing: no
    // status change, so not even a store write of the check.
    let before = check_modify_index(&addresses[0], "service:web-2");
    let requests_before = services[1].requests.load(Ordering::Relaxed);
    services[1].set(Health::Alternate);
    wait_until(Duration::from_secs(20), "12 alternating results", || {
        (services[1].requests.load(Ordering::Relaxed) >= requests_before + 12).then_some(())
    });
    services[1].set(Health::Ok);
    assert_eq!(check_modify_index(&addresses[0], "service:web-2"), before);
    assert_eq!(passing_ids(&addresses[0], "web").expect("listed"), all);

    // A blocking query waits on agent 3 for the next change.
    let index = get(&addresses[2], "/v1/health/service/web?passing")
        .expect("health")
        .index();
    let waiter = {
        let address = addresses[2].clone();
        std::thread::spawn(move || {
            request(
                &address,
                "GET",
                &format!("/v1/health/service/web?passing&index={index}&wait=60s"),
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

    // One instance fails: critical after failures_before_critical results,
    // then gone from the HTTP API and from DNS.
    let requests_at_failure = services[1].requests.load(Ordering::Relaxed);
    services[1].set(Health::Fail);
    wait_until(
        Duration::from_secs(15),
        "web-2 leaves the passing instances",
        || passing_ids(&addresses[0], "web").filter(|ids| ids == &["node1/web-1", "node3/web-3"]),
    );
    let failed_results = services[1].requests.load(Ordering::Relaxed) - requests_at_failure;
    assert!(
        failed_results >= 3,
        "critical after {failed_results} failing results"
    );
    wait_until(Duration::from_secs(10), "DNS drops web-2", || {
        (srv_ports(dns_port).len() == 2).then_some(())
    });
    let woken = waiter.join().expect("waiter thread");
    assert!(
        woken.index() > index,
        "the blocking query returned the same index"
    );
    assert_eq!(woken.json().as_array().expect("entries").len(), 2);

    // Back after success_before_passing results.
    let requests_at_recovery = services[1].requests.load(Ordering::Relaxed);
    services[1].set(Health::Ok);
    wait_until(Duration::from_secs(15), "web-2 passes again", || {
        passing_ids(&addresses[0], "web").filter(|ids| ids == &all)
    });
    assert!(services[1].requests.load(Ordering::Relaxed) - requests_at_recovery >= 2);
    wait_until(Duration::from_secs(10), "DNS lists web-2 again", || {
        (srv_ports(dns_port).len() == 3).then_some(())
    });

    // The CLI: node list, service list and health, deregister and register.
    let agent_addr = addresses[0].as_str();
    let (ok, nodes, error) = keel(&["node", "list", "--agent-addr", agent_addr]);
    assert!(ok, "{error}");
    for name in ["node1", "node2", "node3"] {
        assert!(nodes.contains(name), "{nodes}");
    }
    assert!(
        nodes.contains("alive") && nodes.contains("rack=r2"),
        "{nodes}"
    );
    let (ok, health, error) = keel(&["service", "health", "web", "--agent-addr", agent_addr]);
    assert!(ok, "{error}");
    assert!(health.matches("passing").count() >= 3, "{health}");
    let (ok, list, error) = keel(&["service", "list", "--agent-addr", agent_addr]);
    assert!(ok && list.contains("web"), "{list}{error}");
    let (ok, _, error) = keel(&[
        "service",
        "deregister",
        "web-3",
        "--agent-addr",
        &addresses[2],
    ]);
    assert!(ok, "{error}");
    wait_until(Duration::from_secs(10), "web-3 is deregistered", || {
        passing_ids(&addresses[0], "web").filter(|ids| ids == &["node1/web-1", "node2/web-2"])
    });
    let file = agents.directory.path().join("web-3.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"web\"\nid = \"web-3\"\nport = {}\n[[checks]]\ntcp = \"127.0.0.1:{}\"\ninterval = \"300ms\"\n",
            SERVICES_PORT_BASE + 2,
            SERVICES_PORT_BASE + 2
        ),
    )
    .expect("file");
    let (ok, _, error) = keel(&[
        "service",
        "register",
        file.to_str().expect("utf-8"),
        "--agent-addr",
        &addresses[2],
    ]);
    assert!(ok, "{error}");
    wait_until(Duration::from_secs(10), "web-3 is back", || {
        passing_ids(&addresses[0], "web").filter(|ids| ids == &all)
    });
    std::fs::write(
        &file,
        "name = \"web\"\n[[checks]]\ntcp = \"nowhere\"\ninterval = \"1s\"\n",
    )
    .expect("file");
    let (ok, _, error) = keel(&[
        "service",
        "register",
        file.to_str().expect("utf-8"),
        "--agent-addr",
        &addresses[2],
    ]);
    assert!(!ok && error.contains("checks[0].tcp"), "{error}");
    drop(agents);
}
