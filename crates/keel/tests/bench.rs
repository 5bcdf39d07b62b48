//! `keel bench` against a real three-member keel cluster: every workload with
//! a small total and `-o json`, checked on the parsed report (operations
//! done, no errors, ordered percentiles, every watch event delivered, txn
//! successes and conflicts adding up), a paced run with `--duration` and
//! `--rate`, the table output, and bad flags refused with the flag named.
//!
//! Last, `--protocol zookeeper` against a real ZooKeeper server (Debian's).
//!
//! Ports 24600-24649 belong to this file.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Cluster;
use serde_json::Value;

/// How long one `keel bench` run may take before the test kills it.
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished `keel bench` run left.
struct BenchOutput {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `keel bench` with `arguments`, its output going to files in
/// `directory`; kills it if it outlives [`BENCH_TIMEOUT`].
fn run_bench(directory: &Path, arguments: &[&str]) -> BenchOutput {
    let stdout_path = directory.join("bench.stdout");
    let stderr_path = directory.join("bench.stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("bench")
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("starting keel bench");
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for keel bench") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "keel bench {arguments:?} did not finish within {BENCH_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    BenchOutput {
        code: status.code(),
        stdout: std::fs::read_to_string(&stdout_path).expect("stdout"),
        stderr: std::fs::read_to_string(&stderr_path).expect("stderr"),
    }
}

/// Runs `keel bench -o json` against the cluster; returns the parsed report.
fn bench_json(cluster: &Cluster, arguments: &[&str]) -> Value {
    let endpoints = cluster.endpoints();
    let mut all = vec!["--endpoints", &endpoints, "-o", "json"];
    all.extend_from_slice(arguments);
    let output = run_bench(cluster.directory.path(), &all);
    assert_eq!(
        output.code,
        Some(0),
        "keel bench {all:?} failed; stderr:\n{}",
        output.stderr
    );
    serde_json::from_str(output.stdout.trim())
        .unwrap_or_else(|error| panic!("report is not JSON ({error}):\n{}", output.stdout))
}

fn number(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {report}"))
}

fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count in {report}"))
}

/// Latency figures are present, positive and in order.
fn assert_latency_ordered(report: &Value) {
    let figures: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|name| number(report, &format!("latency_milliseconds_{name}")))
        .collect();
    assert!(figures[0] > 0.0, "p50 is zero in {report}");
    assert!(
        figures.windows(2).all(|pair| pair[0] <= pair[1]),
        "percentiles out of order {figures:?} in {report}"
    );
    let mean = number(report, "latency_milliseconds_mean");
    assert!(mean > 0.0 && mean <= figures[4], "mean {mean} in {report}");
}

/// Every operation was answered without error.
fn assert_all_done(report: &Value, total: u64) {
    assert_eq!(count(report, "operations"), total, "{report}");
    assert_eq!(count(report, "errors"), 0, "{report}");
    assert_eq!(
        report["errors_by_kind"],
        Value::Array(Vec::new()),
        "{report}"
    );
    assert!(number(report, "operations_per_second") > 0.0, "{report}");
    assert_latency_ordered(report);
}

#[test]
fn every_workload_against_a_three_member_cluster() {
    let cluster = Cluster::start(3, 24600);
    let common = ["--clients", "4", "--connections", "2", "--total", "60"];
    let with = |extra: &[&'static str]| {
        let mut arguments = common.to_vec();
        arguments.extend_from_slice(extra);
        arguments
    };

    // In order, every key of the key space exactly once (at random, 60 puts
    // over 60 keys would leave about a third of them unwritten).
    let sequential = bench_json(
        &cluster,
        &with(&["--key-space-size", "60", "--sequential-keys", "put"]),
    );
    assert_all_done(&sequential, 60);
    let written = cluster
        .local_range(
            cluster.wait_for_leader(),
            keel_types::etcdserverpb::RangeRequest {
                key: b"bench/".to_vec(),
                range_end: b"bench0".to_vec(),
                count_only: true,
                ..Default::default()
            },
        )
        .expect("the leader answers")
        .count;
    assert_eq!(written, 60, "--sequential-keys wrote every key once");

    let put = bench_json(&cluster, &with(&["put"]));
    assert_eq!(put["workload"], "put");
    assert_eq!(count(&put, "clients"), 4);
    assert_eq!(count(&put, "connections"), 2);
    assert_all_done(&put, 60);

    for (flag, workload) in [
        (None, "range-linearizable"),
        (Some("--serializable"), "range-serializable"),
    ] {
        let mut arguments = with(&["range"]);
        arguments.extend(flag);
        let range = bench_json(&cluster, &arguments);
        assert_eq!(range["workload"], workload);
        assert_all_done(&range, 60);
    }

    // Two keys for four clients: some swaps must lose to another client's.
    let txn = bench_json(&cluster, &with(&["--key-space-size", "2", "txn"]));
    assert_all_done(&txn, 60);
    assert_eq!(
        count(&txn["txn"], "successes") + count(&txn["txn"], "conflicts"),
        60,
        "{txn}"
    );

    for prefix in [false, true] {
        let mut arguments = with(&["watch", "--watchers", "6", "--streams", "3"]);
        if prefix {
            arguments.push("--prefix");
        }
        let watch = bench_json(&cluster, &arguments);
        assert_all_done(&watch, 60);
        let events = &watch["watch"];
        assert_eq!(events["prefix"], prefix);
        assert_eq!(count(events, "events_expected"), 60 * 6, "{watch}");
        assert_eq!(count(events, "events_delivered"), 60 * 6, "{watch}");
        assert_latency_ordered(events);
    }

    let lease = bench_json(
        &cluster,
        &with(&["lease", "--ttl", "5s", "--keep-alives", "2"]),
    );
    assert_all_done(&lease, 60);
    assert_eq!(count(&lease["lease"], "ttl_seconds"), 5);
    assert_eq!(count(&lease["lease"], "keep_alives"), 120, "{lease}");
    assert_latency_ordered(&lease["lease"]);
}

#[test]
fn a_paced_run_for_a_duration_sends_on_schedule() {
    let cluster = Cluster::start(3, 24610);
    // 50 operations per second for one second: sends are intended at 0, 20,
    // …, 980 ms (two clients interleaved), so exactly 50 go out.
    let endpoints = cluster.endpoints();
    let output = run_bench(
        cluster.directory.path(),
        &[
            "--endpoints",
            &endpoints,
            "--clients",
            "2",
            "--duration",
            "1s",
            "--rate",
            "50",
            "--progress",
            "-o",
            "json",
            "put",
        ],
    );
    assert_eq!(output.code, Some(0), "stderr:\n{}", output.stderr);
    let report: Value = serde_json::from_str(output.stdout.trim()).expect("JSON report");
    assert_eq!(count(&report, "rate_target_per_second"), 50);
    assert_all_done(&report, 50);
    assert!(number(&report, "seconds") >= 0.98, "{report}");
    // --progress writes the line even though stderr is a file here.
    assert!(
        output.stderr.contains("put: 50 operations"),
        "progress line missing from stderr:\n{}",
        output.stderr
    );

    let table = run_bench(
        cluster.directory.path(),
        &["--endpoints", &endpoints, "--total", "10", "txn"],
    );
    assert_eq!(table.code, Some(0), "stderr:\n{}", table.stderr);
    for expected in [
        "txn: 10 operations",
        "LATENCY (ms)",
        "P99.9",
        "read + txn",
        "conflicts",
    ] {
        assert!(
            table.stdout.contains(expected),
            "{expected:?} missing:\n{}",
            table.stdout
        );
    }
    assert!(
        table.stderr.is_empty(),
        "no progress line without a terminal:\n{}",
        table.stderr
    );
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let directory = tempfile::tempdir().expect("temporary directory");
    // Nothing listens here: a refused flag must fail before connecting.
    let endpoints = "127.0.0.1:24649";
    for (arguments, flag) in [
        (&["--rate", "0", "put"][..], "--rate"),
        (&["--value-size", "2000000", "put"], "--value-size"),
        (&["--clients", "0", "put"], "--clients"),
        (&["--duration", "10", "put"], "--duration"),
        (&["--total", "5", "--duration", "1s", "put"], "--duration"),
        (&["watch", "--watchers", "2", "--streams", "3"], "--streams"),
        (&["lease", "--ttl", "0s"], "--ttl"),
    ] {
        let mut all = vec!["--endpoints", endpoints];
        all.extend_from_slice(arguments);
        let output = run_bench(directory.path(), &all);
        assert_ne!(output.code, Some(0), "{arguments:?} was accepted");
        assert!(
            output.stderr.contains(flag),
            "{arguments:?}: the error does not name {flag}:\n{}",
            output.stderr
        );
        assert!(output.stdout.is_empty(), "{arguments:?} printed a report");
    }
    // A good flag set against no server fails on connecting, naming the endpoint.
    let output = run_bench(directory.path(), &["--endpoints", endpoints, "put"]);
    assert_ne!(output.code, Some(0));
    assert!(output.stderr.contains(endpoints), "{}", output.stderr);
}

/// A ZooKeeper server (Debian's), killed by PID on drop.
struct ZooKeeper {
    process: std::process::Child,
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[test]
fn the_zookeeper_protocol_drives_a_real_zookeeper() {
    const ZOOKEEPER_PORT: u16 = 24640;
    let directory = tempfile::tempdir().expect("temporary directory");
    let configuration = directory.path().join("zoo.cfg");
    std::fs::write(
        &configuration,
        format!(
            "tickTime=2000\ndataDir={}\nclientPort={ZOOKEEPER_PORT}\nclientPortAddress=127.0.0.1\n\
             forceSync=yes\nadmin.enableServer=false\n",
            directory.path().join("data").display()
        ),
    )
    .expect("configuration");
    let log = std::fs::File::create(directory.path().join("zookeeper.log")).expect("log");
    let process = Command::new("java")
        .arg(format!(
            "-Dzookeeper.log.dir={}",
            directory.path().display()
        ))
        .args(["-cp", "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar"])
        .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
        .arg(&configuration)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("java runs (scripts/test installs Debian's zookeeper)");
    let _zookeeper = ZooKeeper { process };
    let endpoint = format!("127.0.0.1:{ZOOKEEPER_PORT}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&endpoint).is_err() {
        assert!(
            Instant::now() < deadline,
            "ZooKeeper did not listen on {endpoint} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let common = [
        "--protocol",
        "zookeeper",
        "--endpoints",
        &endpoint,
        "-o",
        "json",
    ];
    for (workload, name) in [
        (&["put"][..], "put"),
        (&["range"], "range-linearizable"),
        (&["range", "--serializable"], "range-serializable"),
    ] {
        let mut arguments = common.to_vec();
        arguments.extend_from_slice(&[
            "--clients",
            "4",
            "--total",
            "400",
            "--key-space-size",
            "100",
        ]);
        arguments.extend_from_slice(workload);
        let output = run_bench(directory.path(), &arguments);
        assert_eq!(output.code, Some(0), "{workload:?}: {}", output.stderr);
        let report: Value = serde_json::from_str(output.stdout.trim()).expect("JSON report");
        assert_eq!(report["workload"], name);
        assert_all_done(&report, 400);
        assert_latency_ordered(&report);
    }
    let mut arguments = common.to_vec();
    arguments.push("txn");
    let output = run_bench(directory.path(), &arguments);
    assert_ne!(output.code, Some(0));
    assert!(
        output
            .stderr
            .contains("--protocol zookeeper runs put and range only"),
        "{}",
        output.stderr
    );
}
