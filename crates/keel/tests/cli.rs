//! The `keel` command line as a user meets it: `keel dev` (start, Ctrl-C,
//! resume), `keel kv` in both output formats, and clear errors for bad flags.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{etcdctl, Cluster};

fn keel(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(arguments)
        .output()
        .expect("keel runs")
}

/// Runs `keel dev` in its own process group until it prints that a leader is
/// elected; returns the child.
/// A running `keel dev` whose whole process group is killed if the test
/// fails before stopping it, so a failure leaves no member holding its ports.
struct DevProcess(Option<std::process::Child>);

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        }
    }
}

fn start_dev(data_dir: &std::path::Path, base_port: u16) -> DevProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["dev", "--base-port", &base_port.to_string(), "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("keel dev starts");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(remaining) {
            Ok(line) if line.contains("Ctrl-C stops") => return DevProcess(Some(child)),
            Ok(_) => continue,
            Err(_) => {
                drop(DevProcess(Some(child)));
                panic!("keel dev did not report a leader within 40 s");
            }
        }
    }
}

/// Sends SIGINT to the dev process group (as Ctrl-C in a terminal does) and
/// waits for a clean exit.
fn interrupt_dev(mut dev: DevProcess) {
    let mut child = dev.0.take().expect("running");
    let group = format!("-{}", child.id());
    let status = Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "keel dev exited with {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            panic!("keel dev did not stop within 20 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn dev_starts_stops_on_ctrl_c_and_resumes_its_data() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().join("keel-data");
    // keel dev puts members at +10000 and +20000: keep all three below the
    // kernel's ephemeral ports (32768 and up), which outgoing connections take.
    let base_port = 3700;
    let endpoints = "127.0.0.1:3700,127.0.0.1:13700,127.0.0.1:23700";

    let dev = start_dev(&data_dir, base_port);
    assert_eq!(etcdctl(endpoints, &["put", "survives", "restart"]), "OK\n");
    interrupt_dev(dev);
    for port in [3700, 3701, 13700, 13701, 23700, 23701] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !port_is_free(port) {
            assert!(
                Instant::now() < deadline,
                "port {port} still in use after stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let dev = start_dev(&data_dir, base_port);
    assert_eq!(
        etcdctl(endpoints, &["get", "survives"]),
        "survives\nrestart\n"
    );
    interrupt_dev(dev);
}

#[test]
fn kv_commands_print_tables_and_json() {
    let cluster = Cluster::start(3, 23800);
    let endpoints = cluster.endpoints();
    let put = keel(&["kv", "--endpoints", &endpoints, "put", "k1", "v1"]);
    assert!(put.status.success());
    assert!(String::from_utf8_lossy(&put.stdout).starts_with("OK (revision "));
    keel(&["kv", "--endpoints", &endpoints, "put", "k2", "v2"]);

    let get = keel(&["kv", "--endpoints", &endpoints, "get", "k", "--prefix"]);
    let table = String::from_utf8_lossy(&get.stdout);
    assert!(table.starts_with("KEY"), "{table}");
    assert!(table.contains("k1") && table.contains("v2"), "{table}");

    let get = keel(&["kv", "--endpoints", &endpoints, "-o", "json", "get", "k1"]);
    let json: serde_json::Value = serde_json::from_slice(&get.stdout).expect("json output");
    assert_eq!(json["kvs"][0]["value"], "v1");
    assert_eq!(json["count"], 1);

    let delete = keel(&[
        "kv",
        "--endpoints",
        &endpoints,
        "-o",
        "json",
        "del",
        "k",
        "--prefix",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&delete.stdout).expect("json output");
    assert_eq!(json["deleted"], 2);

    let bad = keel(&["kv", "--endpoints", &endpoints, "get", "k", "--rev", "999"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("future revision"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn bad_flags_get_a_clear_message_and_a_failing_exit() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["server", "--initial-cluster-state", "maybe"],
            "--initial-cluster-state",
        ),
        (
            &["server", "--listen-client-urls", "http://not-an-ip:1"],
            "--listen-client-urls",
        ),
        (
            &[
                "server",
                "--heartbeat-interval",
                "500",
                "--election-timeout",
                "1000",
            ],
            "--election-timeout",
        ),
        (
            &[
                "server",
                "--name",
                "a",
                "--initial-cluster",
                "b=http://127.0.0.1:1",
            ],
            "--initial-cluster",
        ),
        (&["server", "--snapshot-count", "lots"], "--snapshot-count"),
    ];
    for (arguments, expected) in cases {
        let output = keel(arguments);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{arguments:?} succeeded");
        assert!(stderr.contains(expected), "{arguments:?}: {stderr}");
    }
}
