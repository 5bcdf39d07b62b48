//! Observability on real processes: every member's `/metrics` (etcd's names,
//! counters that move with traffic and leader changes), `/health`, `/livez`
//! and `/readyz` (not ready when cut off from the others, ready again after),
//! and Debian's Prometheus scraping a three-member cluster with keel's alert
//! rules and Grafana dashboard queries loaded.
//!
//! Ports: 27510–27599 (members' client and peer ports from `Cluster`, metrics
//! ports beside them, Prometheus on 27590).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{block_on, connect, Cluster, CONVERGE_TIMEOUT};
use http_body_util::BodyExt;
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_types::etcdserverpb::PutRequest;

/// An HTTP answer: status, content type and body.
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

/// GET `http://{address}{path}` with hyper (HTTP/1.1, one connection).
fn http_get(address: &str, path: &str) -> Result<Answer, String> {
    block_on(async {
        let stream = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(address),
        )
        .await
        .map_err(|_| format!("{address}: connect timed out"))?
        .map_err(|error| format!("{address}: {error}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|error| format!("{address}: {error}"))?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header("host", address)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("a valid request");
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .map_err(|_| format!("{address}{path}: no answer within 10 s"))?
            .map_err(|error| format!("{address}{path}: {error}"))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| format!("{address}{path}: {error}"))?
            .to_bytes();
        Ok(Answer {
            status,
            content_type,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    })
}

/// The value of the sample written exactly `series` (name and labels) in an
/// exposition, if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// The sum of every sample of `name` (any labels).
fn sum_of(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A cluster whose members serve metrics on `metrics_base + index`.
struct ObservedCluster {
    cluster: Cluster,
    metrics_base: u16,
}

impl ObservedCluster {
    fn start(port_base: u16, metrics_base: u16) -> ObservedCluster {
        let mut observed = ObservedCluster {
            cluster: Cluster::unstarted(3, port_base),
            metrics_base,
        };
        for index in 0..3 {
            observed.start_member(index);
        }
        observed.cluster.wait_for_leader();
        observed
    }

    fn metrics_address(&self, index: usize) -> String {
        format!("127.0.0.1:{}", self.metrics_base + index as u16)
    }

    fn start_member(&mut self, index: usize) {
        let url = format!("http://{}", self.metrics_address(index));
        self.cluster
            .start_member_with(index, &["--listen-metrics-urls", &url]);
    }

    /// Scrapes member `index`, checking the content type Prometheus expects.
    fn scrape(&self, index: usize) -> String {
        let answer = http_get(&self.metrics_address(index), "/metrics")
            .unwrap_or_else(|error| panic!("scraping m{}: {error}", index + 1));
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(
            answer
                .content_type
                .starts_with("application/openmetrics-text; version=1.0.0"),
            "content type {:?}",
            answer.content_type
        );
        answer.body
    }

    /// Waits (bounded) until `condition` holds for member `index`'s scrape.
    fn wait_for_metrics(
        &self,
        index: usize,
        what: &str,
        condition: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let text = self.scrape(index);
            if condition(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "m{}: {what} not seen within {CONVERGE_TIMEOUT:?}; last scrape:\n{text}",
                index + 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn get(&self, index: usize, path: &str) -> Answer {
        http_get(&self.metrics_address(index), path)
            .unwrap_or_else(|error| panic!("GET {path} on m{}: {error}", index + 1))
    }

    /// Waits (bounded) until `path` on member `index` answers `status`.
    fn wait_for_status(&self, index: usize, path: &str, status: u16, within: Duration) -> Answer {
        let deadline = Instant::now() + within;
        loop {
            let answer = http_get(&self.metrics_address(index), path);
            match answer {
                Ok(answer) if answer.status == status => return answer,
                other => assert!(
                    Instant::now() < deadline,
                    "m{} {path} did not answer {status} within {within:?}; last: {}",
                    index + 1,
                    match other {
                        Ok(answer) => format!("{} {}", answer.status, answer.body),
                        Err(error) => error,
                    }
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Metric names a scrape of every member must show (samples, so counters
/// appear with their `_total` and histograms with their buckets).
const REQUIRED_SAMPLES: &[&str] = &[
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_is_learner",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_slow_apply_total",
    "etcd_server_quota_backend_bytes",
    "etcd_server_version",
    "etcd_server_id",
    "etcd_disk_wal_fsync_duration_seconds_bucket",
    "etcd_disk_wal_write_bytes_total",
    "etcd_disk_backend_commit_duration_seconds_bucket",
    "etcd_network_peer_round_trip_time_seconds_bucket",
    "etcd_network_peer_sent_bytes_total",
    "etcd_network_peer_received_bytes_total",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_debugging_mvcc_keys_total",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "keel_raft_term",
];

fn put_keys(url: &str, prefix: &str, count: usize) {
    block_on(async {
        let mut client = KvClient::new(connect(url).await.expect("connect"));
        for index in 0..count {
            client
                .put(PutRequest {
                    key: format!("{prefix}/{index:03}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })
                .await
                .expect("put");
        }
    });
}

#[test]
fn members_export_etcd_metrics_that_follow_traffic_and_leader_changes() {
    let mut observed = ObservedCluster::start(27510, 27520);
    let cluster_leader = observed.cluster.wait_for_leader();

    let mut scrapes = Vec::new();
    for index in 0..3 {
        // Wait out the member's publication of its own attributes, so the
        // commit index moves only with our puts below.
        let text = observed.wait_for_metrics(index, "a leader", |text| {
            sample(text, "etcd_server_has_leader") == Some(1.0)
        });
        for name in REQUIRED_SAMPLES {
            assert!(
                text.lines()
                    .any(|line| line.starts_with(&format!("{name} "))
                        || line.starts_with(&format!("{name}{{"))),
                "m{}: no {name} in\n{text}",
                index + 1
            );
        }
        assert!(!text.contains("_total_total"), "{text}");
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        // The client port serves the same endpoints, as etcd's does.
        let endpoint = observed.cluster.members[index].endpoint();
        for path in ["/metrics", "/health", "/livez", "/readyz"] {
            let answer = http_get(&endpoint, path).expect("the client port answers HTTP/1.1");
            assert_eq!(answer.status, 200, "{endpoint}{path}: {}", answer.body);
        }
        scrapes.push(text);
    }
    let leaders: f64 = scrapes
        .iter()
        .map(|text| sample(text, "etcd_server_is_leader").unwrap())
        .sum();
    assert_eq!(leaders, 1.0, "exactly one member says it leads");
    // The member that leads at the scrape: under load an election may have
    // moved leadership since `wait_for_leader`. A leader elected moments ago
    // may not have had a heartbeat answered yet, so wait (bounded) for one.
    let leader_index = scrapes
        .iter()
        .position(|text| sample(text, "etcd_server_is_leader") == Some(1.0))
        .expect("one member leads");
    let leader_text = observed.wait_for_metrics(
        leader_index,
        "the leader timing heartbeats to its followers",
        |text| {
            sample(text, "etcd_server_is_leader") != Some(1.0)
                || sum_of(text, "etcd_network_peer_round_trip_time_seconds_count") > 0.0
        },
    );
    if sample(&leader_text, "etcd_server_is_leader") == Some(1.0) {
        assert!(sum_of(&leader_text, "etcd_network_peer_sent_bytes_total") > 0.0);
    }

    // Proposals committed grow by the puts made, on every member.
    let puts = 40;
    let committed_before: Vec<f64> = scrapes
        .iter()
        .map(|text| sample(text, "etcd_server_proposals_committed_total").unwrap())
        .collect();
    let put_series = r#"grpc_server_handled_total{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put",grpc_code="OK"}"#;
    let puts_before = sample(&scrapes[0], put_series).expect("pre-registered");
    put_keys(&observed.cluster.members[0].url(), "metrics", puts);
    for (index, before) in committed_before.iter().enumerate() {
        let text = observed.wait_for_metrics(index, "the puts applied", |text| {
            sample(text, "etcd_debugging_mvcc_keys_total") == Some(puts as f64)
        });
        let committed = sample(&text, "etcd_server_proposals_committed_total").unwrap();
        let grown = committed - before;
        assert!(
            grown >= puts as f64 && grown <= puts as f64 + 5.0,
            "m{}: committed grew by {grown} for {puts} puts",
            index + 1
        );
        let applied = sample(&text, "etcd_server_proposals_applied_total").unwrap();
        assert!(applied >= before + puts as f64);
        assert!(sum_of(&text, "etcd_disk_wal_fsync_duration_seconds_count") > 0.0);
    }
    let text = observed.scrape(0);
    assert_eq!(
        sample(&text, put_series).unwrap() - puts_before,
        puts as f64,
        "every put counted once as handled OK on the member that served it"
    );
    assert_eq!(
        sample(
            &text,
            r#"grpc_server_started_total{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put"}"#
        )
        .unwrap(),
        puts as f64
    );

    // A leader change: every survivor counts it.
    let changes_before: Vec<f64> = (0..3)
        .map(|index| {
            sample(
                &observed.scrape(index),
                "etcd_server_leader_changes_seen_total",
            )
            .unwrap()
        })
        .collect();
    observed.cluster.kill(cluster_leader);
    let new_leader = observed.cluster.wait_for_leader();
    assert_ne!(new_leader, cluster_leader);
    for index in (0..3).filter(|&index| index != cluster_leader) {
        let text = observed.wait_for_metrics(index, "the leader change counted", |text| {
            sample(text, "etcd_server_leader_changes_seen_total").unwrap() > changes_before[index]
                && sample(text, "etcd_server_has_leader") == Some(1.0)
        });
        assert_eq!(
            sample(&text, "etcd_server_is_leader"),
            Some(if index == new_leader { 1.0 } else { 0.0 })
        );
        // One log line per event, with member and term.
        let log = observed.cluster.log(index);
        assert!(
            log.lines().any(|line| line.contains("lost the leader")
                && line.contains("member=")
                && line.contains("term=")),
            "m{} logged no lost leader:\n{log}",
            index + 1
        );
        assert!(
            log.lines()
                .any(|line| line.contains("leader elected") && line.contains("term=")),
            "m{} logged no election:\n{log}",
            index + 1
        );
        for path in ["/health", "/livez", "/readyz"] {
            let answer = observed.get(index, path);
            assert_eq!(answer.status, 200, "m{} {path}: {}", index + 1, answer.body);
        }
        let health = observed.get(index, "/health");
        assert_eq!(health.body, r#"{"health":"true","reason":""}"#);
        assert_eq!(health.content_type, "application/json");
        assert_eq!(observed.get(index, "/readyz").body, "ok\n");
    }
}

#[test]
fn readyz_turns_not_ready_on_a_member_cut_off_and_ready_again_after() {
    let mut observed = ObservedCluster::start(27530, 27540);
    for index in 0..3 {
        observed.wait_for_status(index, "/readyz", 200, CONVERGE_TIMEOUT);
    }
    let verbose = observed.get(0, "/readyz?verbose");
    for check in [
        "[+]leader ok",
        "[+]data_corruption ok",
        "[+]no_space ok",
        "[+]serializable_read ok",
        "[+]linearizable_read ok",
    ] {
        assert!(verbose.body.contains(check), "{}", verbose.body);
    }
    assert_eq!(observed.get(0, "/readyz/leader").status, 200);
    assert_eq!(observed.get(0, "/readyz/no_such_check").status, 404);

    // Cut m1 off: the other two die. It stays alive but is no longer ready.
    observed.cluster.kill(1);
    observed.cluster.kill(2);
    // First the ReadIndex round cannot complete; once its election timer
    // runs out it knows it has no leader either.
    let deadline = Instant::now() + Duration::from_secs(20);
    let not_ready = loop {
        let answer = observed.get(0, "/readyz");
        if answer.status == 503 && answer.body.contains("[-]leader failed: no leader") {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "m1 still has a leader 20 s after losing its peers: {} {}",
            answer.status,
            answer.body
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        not_ready.body.contains("[-]linearizable_read failed"),
        "{}",
        not_ready.body
    );
    assert!(not_ready.body.contains("[+]serializable_read ok"));
    assert_eq!(
        observed.get(0, "/livez").status,
        200,
        "a member without peers is still alive"
    );
    let health = observed.get(0, "/health");
    assert_eq!(health.status, 503);
    assert_eq!(
        health.body,
        r#"{"health":"false","reason":"RAFT NO LEADER"}"#
    );
    assert_eq!(
        observed.get(0, "/health?serializable=true").status,
        200,
        "serializable health only asks the member itself"
    );
    assert_eq!(
        sample(&observed.scrape(0), "etcd_server_has_leader"),
        Some(0.0)
    );

    // The others come back: a leader again, and every member catches up.
    observed.start_member(1);
    observed.start_member(2);
    observed.cluster.wait_for_leader();
    for index in 0..3 {
        observed.wait_for_status(index, "/readyz", 200, CONVERGE_TIMEOUT);
    }
    let log = observed.cluster.log(0);
    assert!(log.contains("health check failed"), "{log}");
}

/// Debian's `prometheus`, killed on drop.
struct Prometheus {
    process: Child,
    address: String,
    _directory: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn deploy_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A Prometheus instant query's result, as JSON.
fn query(prometheus: &Prometheus, expression: &str) -> serde_json::Value {
    let mut encoded = String::new();
    for byte in expression.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    let answer = http_get(
        &prometheus.address,
        &format!("/api/v1/query?query={encoded}"),
    )
    .unwrap_or_else(|error| panic!("querying {expression}: {error}"));
    serde_json::from_str(&answer.body)
        .unwrap_or_else(|error| panic!("{expression}: {error}: {}", answer.body))
}

#[test]
fn prometheus_scrapes_the_cluster_and_loads_the_alert_rules() {
    for program in ["prometheus", "promtool"] {
        assert!(
            installed(program),
            "{program} is not installed: scripts/test installs Debian's prometheus"
        );
    }
    let deploy = deploy_directory();
    let rules = deploy.join("prometheus/alerts.yml");
    for arguments in [
        vec!["check".into(), "rules".into(), rules.clone()],
        vec![
            "check".into(),
            "config".into(),
            deploy.join("prometheus/prometheus.yml"),
        ],
    ] {
        let output = Command::new("promtool")
            .args(&arguments)
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {arguments:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let observed = ObservedCluster::start(27550, 27560);
    let directory = tempfile::tempdir().expect("temporary directory");
    let targets = (0..3)
        .map(|index| format!("'{}'", observed.metrics_address(index)))
        .collect::<Vec<_>>()
        .join(", ");
    let configuration = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - '{}'\n\
         scrape_configs:\n  - job_name: keel-members\n    static_configs:\n      - targets: [{targets}]\n",
        rules.display()
    );
    let configuration_path = directory.path().join("prometheus.yml");
    std::fs::write(&configuration_path, configuration).expect("writing the configuration");
    let address = "127.0.0.1:27590".to_string();
    let log = std::fs::File::create(directory.path().join("prometheus.log")).expect("log file");
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
        .expect("starting prometheus");
    let prometheus = Prometheus {
        process,
        address,
        _directory: directory,
    };
    let prometheus_log = || {
        std::fs::read_to_string(prometheus._directory.path().join("prometheus.log"))
            .unwrap_or_default()
    };

    // Its HTTP API answers sum(etcd_server_has_leader) == 3 once it scraped all three.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = http_get(
            &prometheus.address,
            "/api/v1/query?query=sum(etcd_server_has_leader)%20%3D%3D%203",
        );
        let result = answer
            .ok()
            .and_then(|answer| serde_json::from_str::<serde_json::Value>(&answer.body).ok())
            .and_then(|json| json["data"]["result"].as_array().cloned())
            .unwrap_or_default();
        if let Some(value) = result
            .first()
            .and_then(|sample| sample["value"][1].as_str())
        {
            assert_eq!(value, "3");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw three members with a leader; its log:\n{}",
            prometheus_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let targets = http_get(&prometheus.address, "/api/v1/targets").expect("targets");
    let targets: serde_json::Value = serde_json::from_str(&targets.body).expect("json");
    let active = targets["data"]["activeTargets"]
        .as_array()
        .expect("targets");
    assert_eq!(active.len(), 3);
    for target in active {
        assert_eq!(target["health"], "up", "{target}");
    }

    // The server loaded every rule of alerts.yml, and evaluates them cleanly.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = http_get(&prometheus.address, "/api/v1/rules").expect("rules");
        let rules: serde_json::Value = serde_json::from_str(&rules.body).expect("json");
        let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|group| group["rules"].as_array().expect("rules").iter())
            .collect();
        let names: Vec<&str> = loaded
            .iter()
            .map(|rule| rule["name"].as_str().unwrap_or(""))
            .collect();
        for expected in [
            "KeelNoLeader",
            "KeelFrequentLeaderChanges",
            "KeelHighFsyncDurations",
            "KeelNoSpace",
            "KeelNodeDown",
            "KeelCheckCritical",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} not loaded: {names:?}"
            );
        }
        let evaluated = loaded
            .iter()
            .all(|rule| rule["health"] == "ok" && rule["lastEvaluation"] != "0001-01-01T00:00:00Z");
        // A healthy cluster fires none of them. Until Prometheus has scraped
        // every member once, the quorum rule sees fewer targets than there are
        // and may turn pending for an evaluation; it must be inactive again
        // once all are scraped, so wait for that rather than judge the first.
        let inactive = loaded.iter().all(|rule| rule["state"] == "inactive");
        if evaluated && inactive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated healthy and inactive: {loaded:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Every query of the Grafana dashboard is valid PromQL over these metrics.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/keel-members.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expression = target["expr"]
                .as_str()
                .expect("an expression")
                .replace("$__rate_interval", "1m")
                .replace("$job", "keel-members")
                .replace("$instance", ".*");
            let answer = query(&prometheus, &expression);
            assert_eq!(answer["status"], "success", "{expression}: {answer}");
            queries += 1;
        }
    }
    assert!(queries > 20, "the dashboard has {queries} queries");
    let leader = query(
        &prometheus,
        "max by (server_id) (etcd_server_id * on (instance) group_left etcd_server_is_leader) == 1",
    );
    assert_eq!(
        leader["data"]["result"].as_array().map(Vec::len),
        Some(1),
        "the dashboard's leader panel names one member: {leader}"
    );
}
