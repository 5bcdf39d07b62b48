//! The agents' side of observability on real processes (issue 13): every
//! member and agent scraped, the agents' metrics present and moving with the
//! cluster (a check turning critical, a node going down) and read by Debian's
//! Prometheus with keel's alert rules, the events log
//! recording it (`keel events`, and `--follow` over server-sent events), an
//! agent's `/readyz` following the store; and the web dashboard in Debian's
//! headless Chromium (driven through chromedriver's WebDriver HTTP API): the
//! members table shows three members and one leader, and after the leader is
//! killed the page shows the new leader and the `leader.elected` event
//! without a reload. The screenshot is saved as `target/dashboard.png`.
//!
//! Ports: 31500–31599 (members 31500–31505 and 31520–31525, agents
//! 31510–31518 and 31530–31538, a checked service 31599, chromedriver 31590,
//! Prometheus 31591).

mod agent_support;
mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_support::{get, put, request, wait_until, web_definition, Agents, Health, WebService};
use base64::Engine as _;
use common::{block_on, connect, Cluster, CONVERGE_TIMEOUT};
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_types::etcdserverpb::PutRequest;
use serde_json::{json, Value};

/// The value of the sample written exactly `series` (name and labels).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()
    })
}

/// A sample of `name` with exactly these labels, in any order.
fn labelled(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (label_text, value) = rest.split_once("} ")?;
        let mut present: Vec<&str> = label_text.split(',').collect();
        present.sort_unstable();
        let mut wanted: Vec<String> = labels
            .iter()
            .map(|(key, value)| format!("{key}=\"{value}\""))
            .collect();
        wanted.sort_unstable();
        (present == wanted).then(|| value.split(' ').next()?.parse().ok())?
    })
}

fn scrape(address: &str) -> String {
    let response = get(address, "/metrics").unwrap_or_else(|error| panic!("{address}: {error}"));
    assert!(
        response
            .header("content-type")
            .is_some_and(|value| value.starts_with("application/openmetrics-text")),
        "{address}: content type {:?}",
        response.header("content-type")
    );
    response.body
}

/// Waits (bounded) until agent `address`'s scrape satisfies `condition`.
fn wait_for_metrics(address: &str, what: &str, condition: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while Instant::now() < deadline {
        last = scrape(address);
        if condition(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{address}: {what} not seen within {CONVERGE_TIMEOUT:?}; last scrape:\n{last}");
}

/// Metric names every agent exports (samples, so counters with `_total`).
const AGENT_SAMPLES: &[&str] = &[
    "keel_node_status",
    "keel_health_check_status",
    "keel_service_instances",
    "keel_services",
    "keel_gossip_members",
    "keel_gossip_phi",
    "keel_allocations",
    "keel_jobs",
    "keel_events_recorded_total",
    "keel_events_dropped_total",
    "keel_agent_event_reporter",
    "keel_agent_view_revision",
    "keel_agent_view_stale",
    "keel_agent_node_lease_healthy",
    "keel_agent_members_reachable",
    "keel_controller_active",
    "keel_controller_elections_total",
    "keel_controller_evaluations_total",
    "keel_controller_plans_total",
    "keel_controller_placements_total",
];

/// A `keel events --follow` process whose stdout lines arrive on a channel;
/// killed on drop.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(arguments: &[&str]) -> Follower {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("events")
            .arg("--follow")
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting keel events --follow");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// The first line satisfying `condition`, within `timeout`.
    fn wait_for(&self, timeout: Duration, condition: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if condition(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("keel events --follow printed no matching line within {timeout:?}; it printed {seen:#?}");
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `path` asking for server-sent events and returns what arrived up
/// to the first event's data (headers included), within 10 s.
fn first_server_sent_event(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("the agent accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {address}\r\naccept: text/event-stream\r\n\r\n"
    )
    .expect("request sent");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let complete = |text: &str| {
        text.find("data:")
            .is_some_and(|start| text[start..].contains("\n\n"))
    };
    while !complete(&String::from_utf8_lossy(&received)) {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

fn keel_events(arguments: &[&str]) -> Vec<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("events")
        .args(arguments)
        .output()
        .expect("keel events runs");
    assert!(
        output.status.success(),
        "keel events {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect()
}

#[test]
fn agents_export_metrics_and_record_events_that_follow_the_cluster() {
    let mut cluster = Cluster::start(3, 31500);
    let mut agents = Agents::new(3, 31510, &cluster.endpoints(), "3s");
    agents.start_all();
    let addresses: Vec<String> = agents
        .agents
        .iter()
        .map(|agent| agent.http_addr())
        .collect();

    // Every member is scraped on its client port; every agent is ready and
    // exports its names, with all three nodes alive.
    for member in &cluster.members {
        let text = scrape(&member.endpoint());
        assert!(
            text.lines()
                .any(|line| line.starts_with("etcd_server_has_leader ")),
            "{}: {text}",
            member.name
        );
    }
    // A member's /ui sends the operator to a registered agent's dashboard.
    let redirect = wait_until(CONVERGE_TIMEOUT, "a member's /ui redirects", || {
        agent_support::request(
            &cluster.members[0].endpoint(),
            "GET",
            "/ui",
            None,
            Duration::from_secs(5),
        )
        .ok()
        .filter(|response| response.status == 307)
    });
    let location = redirect.header("location").expect("a Location header");
    assert!(
        addresses
            .iter()
            .any(|address| location == format!("http://{address}/ui")),
        "{location}"
    );
    for address in &addresses {
        wait_until(CONVERGE_TIMEOUT, "the agent is ready", || {
            get(address, "/readyz").ok()
        });
        let text = wait_for_metrics(address, "three alive nodes, three members", |text| {
            (1..=3).all(|index| {
                labelled(
                    text,
                    "keel_node_status",
                    &[("node", &format!("node{index}")), ("status", "alive")],
                ) == Some(1.0)
            }) && labelled(text, "keel_gossip_members", &[("status", "alive")]) == Some(3.0)
                && sample(text, "keel_agent_members_reachable") == Some(3.0)
        });
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(sample(&text, "keel_agent_view_stale"), Some(0.0));
    }
    // One agent reports cluster-level events: node1, the smallest name.
    let before: Vec<String> = wait_until(CONVERGE_TIMEOUT, "one reporter, node1", || {
        let scrapes: Vec<String> = addresses.iter().map(|address| scrape(address)).collect();
        let reporters: Vec<f64> = scrapes
            .iter()
            .map(|text| sample(text, "keel_agent_event_reporter").unwrap_or(-1.0))
            .collect();
        (reporters == [1.0, 0.0, 0.0]).then_some(scrapes)
    });

    // A check turns critical on node2: its metric, its event (followed live).
    let follower = Follower::start(&[
        "--type",
        "check",
        "--since",
        "5m",
        "-o",
        "json",
        "--agent-addr",
        &addresses[0],
    ]);
    // The check passes first (a check starts critical, as Consul's), then fails.
    let service = WebService::start(31599);
    let response = put(
        &addresses[1],
        "/v1/agent/service/register",
        Some(&web_definition("db-1", 31599).replace("\"web\"", "\"db\"")),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    follower.wait_for(CONVERGE_TIMEOUT, |line| {
        line.contains("\"check.status\"") && line.contains("node2/db-1") && line.contains("passing")
    });
    service.set(Health::Fail);
    let critical = [
        ("service", "db"),
        ("check", "service:db-1"),
        ("node", "node2"),
        ("status", "critical"),
    ];
    for address in &addresses {
        let text = wait_for_metrics(address, "db-1's check critical", |text| {
            labelled(text, "keel_health_check_status", &critical) == Some(1.0)
        });
        assert_eq!(
            labelled(
                text.as_str(),
                "keel_service_instances",
                &[("service", "db"), ("status", "critical")]
            ),
            Some(1.0)
        );
        // Every name, now that a check exists.
        for name in AGENT_SAMPLES {
            assert!(
                text.lines()
                    .any(|line| line.starts_with(&format!("{name} "))
                        || line.starts_with(&format!("{name}{{"))),
                "{address}: no {name} in\n{text}"
            );
        }
    }
    let line = follower.wait_for(CONVERGE_TIMEOUT, |line| {
        line.contains("\"check.status\"") && line.contains("node2/db-1")
    });
    let event: Value = serde_json::from_str(&line).expect("JSON lines");
    assert_eq!(event["source"], "node2", "the check's own agent records it");
    assert_eq!(event["fields"]["status"], "critical");
    // A TTL check passed once and then left alone expires: recorded too.
    let definition = r#"{"Name": "batch", "ID": "batch-1", "Check": {"TTL": "1s"}}"#;
    let response = put(
        &addresses[0],
        "/v1/agent/service/register",
        Some(definition),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let response = put(&addresses[0], "/v1/agent/check/pass/service:batch-1", None);
    assert_eq!(response.status, 200, "{}", response.body);
    follower.wait_for(CONVERGE_TIMEOUT, |line| {
        line.contains("node1/batch-1")
            && line.contains("\"critical\"")
            && line.contains("TTL expired")
    });
    get(&addresses[0], "/v1/agent/self").expect("the agent still answers");

    for (index, address) in addresses.iter().enumerate() {
        let text = scrape(address);
        assert!(
            sample(&text, "keel_agent_view_revision").unwrap()
                > sample(&before[index], "keel_agent_view_revision").unwrap(),
            "{address}: the view's revision moves with the store"
        );
    }
    let recorded = |text: &str| sample(text, "keel_events_recorded_total").unwrap();
    assert!(recorded(&scrape(&addresses[1])) > recorded(&before[1]));

    // Debian's Prometheus scrapes the agents with keel's alert rules.
    let prometheus = Prometheus::start(31591, &addresses);

    // node3 is killed: down on every agent once its lease expires, and the
    // reporter records it once.
    agents.kill(2);
    for address in &addresses[..2] {
        wait_for_metrics(address, "node3 down", |text| {
            labelled(
                text,
                "keel_node_status",
                &[("node", "node3"), ("status", "down")],
            ) == Some(1.0)
                && labelled(
                    text,
                    "keel_node_status",
                    &[("node", "node3"), ("status", "alive")],
                ) == Some(0.0)
        });
    }
    let downs = wait_until(CONVERGE_TIMEOUT, "node.down listed by keel events", || {
        let events = keel_events(&[
            "--type",
            "node.down",
            "-o",
            "json",
            "--agent-addr",
            &addresses[1],
        ]);
        (!events.is_empty()).then_some(events)
    });
    assert!(
        downs.iter().all(|event| event["subject"] == "node3"),
        "{downs:?}"
    );
    // The active controller records it, once, whichever agents saw it go.
    assert_eq!(
        downs.len(),
        1,
        "node.down recorded more than once: {downs:?}"
    );
    let suspects = keel_events(&[
        "--type",
        "node.suspect",
        "--since",
        "5m",
        "-o",
        "json",
        "--agent-addr",
        &addresses[0],
    ]);
    assert!(
        suspects.iter().all(|event| event["subject"] == "node3"),
        "{suspects:?}"
    );
    // The alert rules read the agents' series: KeelNodeDown is pending (it
    // fires after a minute) for node3, KeelCheckCritical for db-1.
    let alerts =
        prometheus.wait_for_alerts(&[("KeelNodeDown", "node3"), ("KeelCheckCritical", "node2")]);
    drop(prometheus);
    assert!(
        alerts
            .iter()
            .all(|alert| alert["labels"]["alertname"] != "KeelNodeDown"
                || alert["labels"]["node"] == "node3"),
        "only node3 is down: {alerts:?}"
    );

    // `Accept: text/event-stream` on /v1/events gives the same stream.
    let streamed = first_server_sent_event(&addresses[0], "/v1/events?since=5m&type=node.down");
    assert!(
        streamed.contains("text/event-stream") && streamed.contains("\"node.down\""),
        "{streamed}"
    );
    // Bad input is named.
    let refused = request(
        &addresses[0],
        "GET",
        "/v1/events?type=nodes",
        None,
        Duration::from_secs(5),
    )
    .expect("answers");
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("\"nodes\""), "{}", refused.body);

    // An agent whose store is gone is not ready; it is again once it is back.
    for index in 0..3 {
        cluster.kill(index);
    }
    wait_until(
        Duration::from_secs(20),
        "node1 not ready without the store",
        || {
            let response = request(
                &addresses[0],
                "GET",
                "/readyz",
                None,
                Duration::from_secs(5),
            )
            .ok()?;
            (response.status == 503).then_some(response)
        },
    );
    for index in 0..3 {
        cluster.start_member(index);
    }
    cluster.wait_for_leader();
    let ready = wait_until(CONVERGE_TIMEOUT, "node1 ready again", || {
        get(&addresses[0], "/readyz").ok()
    });
    assert!(ready.body.contains("[+]node_lease ok") && ready.body.contains("[+]view ok"));
}

/// Debian's `prometheus` scraping the agents every second with keel's
/// alert rules; killed on drop.
struct Prometheus {
    process: Child,
    address: String,
    directory: tempfile::TempDir,
}

impl Prometheus {
    fn start(port: u16, agents: &[String]) -> Prometheus {
        let directory = tempfile::tempdir().expect("temporary directory");
        let rules =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/alerts.yml");
        let targets = agents
            .iter()
            .map(|address| format!("'{address}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let configuration = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: keel-agents\n    static_configs:\n      - targets: [{targets}]\n",
            rules.display()
        );
        let configuration_path = directory.path().join("prometheus.yml");
        std::fs::write(&configuration_path, configuration).expect("writing the configuration");
        let log = std::fs::File::create(directory.path().join("prometheus.log")).expect("log");
        let address = format!("127.0.0.1:{port}");
        let process = Command::new("prometheus")
            .arg(format!("--config.file={}", configuration_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("prometheus is installed (scripts/test installs Debian's prometheus)");
        Prometheus {
            process,
            address,
            directory,
        }
    }

    /// Waits (bounded) until each (alert, node) is pending or firing;
    /// returns the alerts.
    fn wait_for_alerts(&self, wanted: &[(&str, &str)]) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let alerts = get(&self.address, "/api/v1/alerts")
                .ok()
                .and_then(|response| response.json()["data"]["alerts"].as_array().cloned())
                .unwrap_or_default();
            let present = wanted.iter().all(|(name, node)| {
                alerts.iter().any(|alert| {
                    alert["labels"]["alertname"] == *name && alert["labels"]["node"] == *node
                })
            });
            if present {
                return alerts;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus raised no {wanted:?} within 60 s: {alerts:?}\n{}",
                std::fs::read_to_string(self.directory.path().join("prometheus.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// chromedriver, with one headless Chromium session; the session is closed
/// and chromedriver killed on drop.
struct Browser {
    driver: Child,
    address: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(port: u16, log: PathBuf) -> Browser {
        let log = std::fs::File::create(log).expect("chromedriver log");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("chromedriver is installed (scripts/test installs Debian's chromium-driver)");
        let address = format!("127.0.0.1:{port}");
        let profile = tempfile::tempdir().expect("profile directory");
        let mut browser = Browser {
            driver,
            address,
            session: String::new(),
            _profile: profile,
        };
        wait_until(Duration::from_secs(20), "chromedriver answers", || {
            let (_, status) = webdriver_request(&browser.address, "GET", "/status", None).ok()?;
            (status["value"]["ready"] == true).then_some(())
        });
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", "--window-size=1500,1900",
                    format!("--user-data-dir={}", browser._profile.path().display()),
                ],
            },
        }}});
        let answer = browser.call("POST", "/session", Some(capabilities));
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        browser
    }

    /// One WebDriver command; returns its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = webdriver_request(&self.address, method, path, body)
            .unwrap_or_else(|error| panic!("WebDriver {method} {path}: {error}"));
        let value = answer["value"].clone();
        assert_eq!(status, 200, "WebDriver {method} {path}: {value}");
        value
    }

    fn open(&self, url: &str) {
        self.call(
            "POST",
            &format!("/session/{}/url", self.session),
            Some(json!({"url": url})),
        );
    }

    /// Runs `script` (a function body) in the page and returns its result.
    fn run(&self, script: &str) -> Value {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(json!({"script": script, "args": []})),
        )
    }

    fn screenshot(&self, path: &std::path::Path) {
        let encoded = self.call(
            "GET",
            &format!("/session/{}/screenshot", self.session),
            None,
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 text"))
            .expect("a base64 PNG");
        std::fs::write(path, png).expect("writing the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = webdriver_request(
                &self.address,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One HTTP/1.1 request to chromedriver with hyper, which reads by
/// Content-Length (chromedriver says `Connection: close` but keeps the
/// connection open).
fn webdriver_request(
    address: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    use http_body_util::BodyExt;
    block_on(async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|error| format!("{address}: {error}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|error| error.to_string())?;
        tokio::spawn(connection);
        let body = body.map(|body| body.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", address)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|error| error.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(request))
            .await
            .map_err(|_| "no answer within 60 s".to_string())?
            .map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|error| error.to_string())?
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .map_err(|error| format!("{error}: {}", String::from_utf8_lossy(&bytes)))?;
        Ok((status, value))
    })
}

/// What the page shows of the members: rows, the leader row's name.
fn members_on_page(browser: &Browser) -> (u64, Vec<String>) {
    let answer = browser.run(
        "const rows = document.querySelectorAll('#members tbody tr');
         const leaders = Array.from(document.querySelectorAll('#members tbody tr[data-role=\"leader\"]'));
         return [rows.length, leaders.map((row) => row.dataset.member)];",
    );
    (
        answer[0].as_u64().unwrap_or(0),
        answer[1]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|name| name.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

fn put_keys(url: &str, count: usize) {
    block_on(async {
        let mut client = KvClient::new(connect(url).await.expect("connect"));
        for index in 0..count {
            client
                .put(PutRequest {
                    key: format!("/app/orders/{index:04}").into_bytes(),
                    value: format!("{{\"order\": {index}, \"state\": \"paid\"}}").into_bytes(),
                    ..Default::default()
                })
                .await
                .expect("put");
        }
    });
}

#[test]
fn the_dashboard_shows_a_new_leader_and_its_event_without_a_reload() {
    let mut cluster = Cluster::start(3, 31520);
    let mut agents = Agents::new(3, 31530, &cluster.endpoints(), "5s");
    for agent in &mut agents.agents {
        // The job's tasks take their ports from this test's own range.
        agent
            .arguments
            .extend(["--dynamic-ports".into(), "31900-31999".into()]);
    }
    agents.start_all();
    let address = agents.agents[0].http_addr();
    // Something to look at: a service on every node, checked through each
    // agent's own /readyz, and some keys written while the page watches.
    for agent in &agents.agents {
        let definition = format!(
            r#"{{"Name": "web", "ID": "web-{name}", "Port": 8080, "Tags": ["v1"],
                "Check": {{"HTTP": "http://{http}/readyz", "Interval": "1s"}}}}"#,
            name = agent.name,
            http = agent.http_addr()
        );
        let response = put(
            &agent.http_addr(),
            "/v1/agent/service/register",
            Some(&definition),
        );
        assert_eq!(response.status, 200, "{}", response.body);
    }

    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target");
    let browser = Browser::start(31590, target.join("chromedriver-dashboard.log"));
    browser.open(&format!("http://{address}/ui"));
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let leader = loop {
        let (rows, leaders) = members_on_page(&browser);
        if rows == 3 && leaders.len() == 1 {
            break leaders[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed 3 members and one leader: {rows} rows, leaders {leaders:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let leader_index = cluster
        .members
        .iter()
        .position(|member| member.name == leader)
        .unwrap_or_else(|| panic!("the page's leader {leader:?} is no member"));
    assert_eq!(
        leader_index,
        cluster.wait_for_leader(),
        "the page's leader is the cluster's"
    );
    let survivor = cluster.members[(leader_index + 1) % 3].url();
    put_keys(&survivor, 150);
    // The example job, placed by the controller and run by the supervisors.
    let job = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/jobs/web.toml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "job",
            "run",
            job.to_str().expect("UTF-8 path"),
            "--agent-addr",
            &address,
        ])
        .output()
        .expect("keel runs");
    assert!(
        output.status.success(),
        "keel job run: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_until(
        CONVERGE_TIMEOUT,
        "the job and its allocations on the page",
        || {
            let shown = browser.run(
            "return [document.querySelectorAll('#jobs .job').length,
                     document.querySelectorAll('#allocations tbody tr').length,
                     document.querySelector('#jobs .job') ? document.querySelector('#jobs .job').textContent : ''];",
        );
            (shown[0] == 1 && shown[1] == 3 && shown[2].as_str()?.contains("3 running"))
                .then_some(())
        },
    );

    // A mark the page would lose if it reloaded.
    browser.run("window.keelTestMark = 'still here'; return true;");
    cluster.kill(leader_index);
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(30);
    let (new_leader, event) = loop {
        let (_, leaders) = members_on_page(&browser);
        let events = browser.run(
            "return Array.from(document.querySelectorAll('#events li[data-type=\"leader.elected\"]'))
                 .map((item) => item.textContent);",
        );
        let new_leader = leaders.first().filter(|name| **name != leader).cloned();
        let event = new_leader.as_ref().and_then(|name| {
            events
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .find(|text| text.contains(&format!("{name} is the leader")))
                .map(str::to_string)
        });
        if let (Some(name), Some(event)) = (new_leader, event) {
            break (name, event);
        }
        assert!(
            Instant::now() < deadline,
            "30 s after killing {leader} the page shows leaders {leaders:?} and leader.elected events {events}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "the page showed {new_leader} as leader and its event {:.1} s after the kill: {event}",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(event.contains(&format!("was {leader}")), "{event}");
    assert_eq!(
        browser.run("return window.keelTestMark || null;"),
        json!("still here"),
        "the page was not reloaded"
    );
    let unreachable = browser.run(&format!(
        "const row = document.querySelector('#members tr[data-member=\"{leader}\"]');
         return row ? row.dataset.role : null;"
    ));
    assert_eq!(unreachable, json!("unreachable"));

    // The key browser lists what was written; then the picture, for a person.
    browser.run(
        "document.getElementById('kv-prefix').value = '/app/';
         document.getElementById('kv-form').requestSubmit(); return true;",
    );
    wait_until(
        Duration::from_secs(10),
        "the key browser lists /app/",
        || {
            let count = browser.run("return document.querySelectorAll('#kv-keys li .key').length;");
            (count.as_u64()? >= 100).then_some(())
        },
    );
    browser.run("document.querySelector('#kv-keys li').click(); return true;");
    wait_until(Duration::from_secs(10), "a value shown", || {
        let text = browser.run("return document.getElementById('kv-value').textContent;");
        text.as_str()?.contains("\"state\": \"paid\"").then_some(())
    });
    // Wait for a throughput sample that saw the puts, so the chart has a line.
    wait_until(Duration::from_secs(10), "samples on the chart", || {
        let count =
            browser.run("return document.querySelectorAll('#chart-throughput path').length;");
        (count.as_u64()? >= 2).then_some(())
    });
    let screenshot = target.join("dashboard.png");
    browser.screenshot(&screenshot);
    let size = std::fs::metadata(&screenshot)
        .expect("screenshot saved")
        .len();
    assert!(size > 50_000, "the screenshot is {size} bytes");
}
