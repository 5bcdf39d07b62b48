//! A real Consul client library against a keel agent: python-consul (PyPI's
//! `py-consul`, installed by scripts/test) registers a service with a TTL
//! check, passes it, reads `health/service` (also as a blocking query) and
//! deregisters it.

mod agent_support;
mod common;

use std::process::Command;

use agent_support::Agents;
use common::Cluster;

const MEMBERS_PORT_BASE: u16 = 25800;
const AGENTS_PORT_BASE: u16 = 25810;

const SCRIPT: &str = r#"
import sys, time
import consul

client = consul.Consul(host="127.0.0.1", port=int(sys.argv[1]))
assert client.agent.service.register(
    "api", service_id="api-1", port=9000, tags=["py"], check=consul.Check.ttl("10s")
)
assert "api-1" in client.agent.services()
# A TTL check starts critical: not listed as passing until reported.
index, nodes = client.health.service("api", passing=True)
assert nodes == [], nodes
assert client.agent.check.ttl_pass("service:api-1", notes="all good")
deadline = time.time() + 20
while True:
    index, nodes = client.health.service("api", passing=True)
    if nodes:
        break
    assert time.time() < deadline, "api-1 never passed"
    time.sleep(0.1)
entry = nodes[0]
assert entry["Service"]["ID"] == "api-1", entry
assert entry["Service"]["Port"] == 9000, entry
assert entry["Service"]["Tags"] == ["py"], entry
assert entry["Node"]["Node"] == "node1", entry
check = [c for c in entry["Checks"] if c["CheckID"] == "service:api-1"][0]
assert check["Status"] == "passing" and check["Output"] == "all good", check
# A blocking query returns at the next change: the check fails.
assert client.agent.check.ttl_fail("service:api-1", notes="broken")
new_index, nodes = client.health.service("api", index=index, wait="20s", passing=True)
assert int(new_index) > int(index), (index, new_index)
if nodes:
    new_index, nodes = client.health.service("api", index=new_index, wait="20s", passing=True)
assert nodes == [], nodes
services = client.catalog.services()[1]
assert services.get("api") == ["py"], services
assert client.agent.service.deregister("api-1")
assert "api-1" not in client.agent.services()
print("ok")
"#;

#[test]
fn python_consul_registers_passes_and_reads_health() {
    let cluster = Cluster::start(1, MEMBERS_PORT_BASE);
    let mut agents = Agents::new(1, AGENTS_PORT_BASE, &cluster.endpoints(), "10s");
    agents.start_all();
    let output = Command::new("python3")
        .args(["-c", SCRIPT, &agents.agents[0].http_port.to_string()])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.trim() == "ok",
        "python-consul failed (scripts/test installs py-consul):\n{stdout}\n{stderr}\n{}",
        agents.logs()
    );
}
