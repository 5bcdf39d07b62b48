//! etcd's JSON gateway on keel, compared with Debian's etcd (real processes,
//! curl as the client, as etcd's gRPC-gateway documentation uses it).
//!
//! The documentation's examples (put, range, watch, txn, authenticate) and
//! the other gateway paths run against a reference etcd and against keel and
//! must give the same JSON once what differs by design is normalised: member
//! and cluster ids, raft terms, header revisions, lease ids and raft indexes.
//! Keys' own revisions and versions are compared as they are: both stores
//! start at revision 1. A watch over the gateway must see a put made through
//! gRPC on another member, and bad input must get a 400 naming the problem.
//!
//! Ports: keel 27300-27305, etcd 27390-27391.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{block_on, connect, Cluster, ReferenceEtcd};
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_types::etcdserverpb::PutRequest;
use serde_json::Value;

const KEEL_PORT_BASE: u16 = 27300;
const ETCD_CLIENT_PORT: u16 = 27390;
/// How long a streamed answer may take to show a message.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP answer: status and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", self.body))
    }

    /// The first message of a streamed answer.
    fn first_line_json(&self) -> Value {
        let line = self.body.lines().next().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line:?}"))
    }
}

/// `curl -X <method> -d <body> http://127.0.0.1:<port><path>`.
fn curl(port: u16, method: &str, path: &str, body: Option<&str>) -> Answer {
    let mut command = Command::new("curl");
    command
        .args(["-s", "-S", "-m", "10", "-X", method])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"));
    if let Some(body) = body {
        command.args(["--data-binary", body]);
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed (scripts/test installs it)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: status.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {path} gave no status: {text:?} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        }),
        body: body.to_string(),
    }
}

/// The status line's code and the `access-control-*` headers of an answer.
fn cors_headers(port: u16, method: &str, path: &str) -> (String, Vec<String>) {
    let output = Command::new("curl")
        .args([
            "-s",
            "-S",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-X",
            method,
        ])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&output.stdout).to_lowercase();
    let status = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut headers: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with("access-control-"))
        .map(|line| line.trim().to_string())
        .collect();
    headers.sort();
    (status, headers)
}

fn post(port: u16, path: &str, body: &str) -> Answer {
    curl(port, "POST", path, Some(body))
}

/// Replaces, wherever they occur, the values that differ between two
/// clusters by design; keeps which fields are present.
fn normalise(mut value: Value) -> Value {
    fn walk(value: &mut Value, inside_header: bool) {
        match value {
            Value::Object(fields) => {
                for (name, field) in fields.iter_mut() {
                    let differs_by_design = inside_header
                        || matches!(
                            name.as_str(),
                            "ID" | "cluster_id"
                                | "member_id"
                                | "raft_term"
                                | "leader"
                                | "raftIndex"
                                | "raftTerm"
                                | "raftAppliedIndex"
                        );
                    if differs_by_design && !field.is_object() {
                        *field = Value::String("N".into());
                    } else {
                        walk(field, name == "header");
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| walk(item, false)),
            _ => {}
        }
    }
    walk(&mut value, false);
    value
}

/// A `curl -N` watch whose messages arrive line by line; killed on drop.
struct WatchStream {
    process: Child,
    lines: mpsc::Receiver<String>,
}

impl WatchStream {
    fn open(port: u16, path: &str, body: &str) -> WatchStream {
        let mut process = Command::new("curl")
            .args(["-s", "-N", "-X", "POST", "--data-binary", body])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl is installed");
        let stdout = process.stdout.take().expect("piped");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        WatchStream { process, lines }
    }

    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(STREAM_TIMEOUT)
            .expect("a watch message within the timeout");
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"))
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Runs one request against both and asserts the same status and JSON.
fn same(etcd: u16, keel: u16, path: &str, body: &str) -> Value {
    let expected = post(etcd, path, body);
    let actual = post(keel, path, body);
    assert_eq!(
        (actual.status, normalise(actual.json())),
        (expected.status, normalise(expected.json())),
        "POST {path} {body}: keel (left) and etcd (right) differ"
    );
    actual.json()
}

#[test]
fn the_documented_curl_examples_answer_as_etcd_does() {
    let etcd_server = ReferenceEtcd::start(ETCD_CLIENT_PORT);
    let cluster = Cluster::start(3, KEEL_PORT_BASE);
    let etcd = ETCD_CLIENT_PORT;
    let keel = cluster.members[0].client_port;
    let _ = &etcd_server;

    // GET /version: the same fields (keel reports the etcd it is compatible with).
    let version = curl(keel, "GET", "/version", None);
    assert_eq!(version.status, 200);
    assert_eq!(
        version.json(),
        serde_json::json!({"etcdserver": "3.5.0", "etcdcluster": "3.5.0"})
    );
    let etcd_version = curl(etcd, "GET", "/version", None).json();
    assert!(etcd_version["etcdserver"].is_string() && etcd_version["etcdcluster"].is_string());

    // "Use curl to put and get a key" (foo is Zm9v, bar is YmFy).
    same(
        etcd,
        keel,
        "/v3/kv/put",
        r#"{"key": "Zm9v", "value": "YmFy"}"#,
    );
    let range = same(etcd, keel, "/v3/kv/range", r#"{"key": "Zm9v"}"#);
    assert_eq!(range["kvs"][0]["value"], "YmFy");
    assert_eq!(range["count"], "1", "int64 as a string");

    // "Use curl to watch a key", then put it again.
    let etcd_watch = WatchStream::open(etcd, "/v3/watch", r#"{"create_request": {"key":"Zm9v"} }"#);
    let keel_watch = WatchStream::open(keel, "/v3/watch", r#"{"create_request": {"key":"Zm9v"} }"#);
    let created = keel_watch.next();
    assert_eq!(normalise(created.clone()), normalise(etcd_watch.next()));
    assert_eq!(created["result"]["created"], true);
    same(
        etcd,
        keel,
        "/v3/kv/put",
        r#"{"key": "Zm9v", "value": "YmFy"}"#,
    );
    let event = keel_watch.next();
    assert_eq!(normalise(event.clone()), normalise(etcd_watch.next()));
    assert_eq!(event["result"]["events"][0]["kv"]["version"], "2");

    // "Issue a transaction" (requestRange as the documentation spells it).
    same(
        etcd,
        keel,
        "/v3/kv/put",
        r#"{"key": "Zm9v", "value": "YmF6"}"#,
    );
    same(
        etcd,
        keel,
        "/v3/kv/put",
        r#"{"key": "Zm9v", "value": "YmF6"}"#,
    );
    let txn = same(
        etcd,
        keel,
        "/v3/kv/txn",
        r#"{"compare":[{"version":"4","result":"EQUAL","target":"VERSION","key":"Zm9v"}],"success":[{"requestRange":{"key":"Zm9v"}}]}"#,
    );
    assert_eq!(txn["succeeded"], true);
    assert_eq!(
        txn["responses"][0]["response_range"]["kvs"][0]["value"],
        "YmF6"
    );
    let failed = same(
        etcd,
        keel,
        "/v3/kv/txn",
        r#"{"compare":[{"value":"YmFy","target":"VALUE","key":"Zm9v"}],"failure":[{"request_put":{"key":"Zm9v","value":"cXV4"}}]}"#,
    );
    assert_eq!(failed.get("succeeded"), None, "false is left out");

    // "Authenticate": neither has authentication enabled; same error, status 412.
    let refused = same(
        etcd,
        keel,
        "/v3/auth/authenticate",
        r#"{"name": "root", "password": "pass"}"#,
    );
    assert_eq!(refused["code"], 9);

    // The rest of the gateway's paths.
    same(
        etcd,
        keel,
        "/v3/kv/range",
        r#"{"key": "AA==", "range_end": "AA==", "sort_order": "DESCEND", "sort_target": "MOD", "keys_only": true}"#,
    );
    same(
        etcd,
        keel,
        "/v3beta/kv/range",
        r#"{"key": "Zm9v", "count_only": true}"#,
    );
    same(etcd, keel, "/v3/kv/range", r#"{"key": "bm9uZQ=="}"#);
    let grant = |port: u16| {
        let answer = post(port, "/v3/lease/grant", r#"{"TTL": 60}"#);
        let json = answer.json();
        let lease = json["ID"]
            .as_str()
            .expect("lease ID as a string")
            .to_string();
        ((answer.status, normalise(json)), lease)
    };
    let (keel_grant, keel_lease) = grant(keel);
    let (etcd_grant, etcd_lease) = grant(etcd);
    assert_eq!(keel_grant, etcd_grant);
    let attach =
        |lease: &str| format!(r#"{{"key": "bGVhc2Vk", "value": "eA==", "lease": "{lease}"}}"#);
    assert_eq!(post(keel, "/v3/kv/put", &attach(&keel_lease)).status, 200);
    assert_eq!(post(etcd, "/v3/kv/put", &attach(&etcd_lease)).status, 200);
    let keep_alive = |port: u16, lease: &str| {
        let answer = post(
            port,
            "/v3/lease/keepalive",
            &format!(r#"{{"ID": "{lease}"}}"#),
        );
        (answer.status, normalise(answer.first_line_json()))
    };
    assert_eq!(keep_alive(keel, &keel_lease), keep_alive(etcd, &etcd_lease));
    let time_to_live = |port: u16, lease: &str| {
        let answer = post(
            port,
            "/v3/lease/timetolive",
            &format!(r#"{{"ID": "{lease}", "keys": true}}"#),
        );
        let mut json = normalise(answer.json());
        // Seconds left depend on when the second ticked over.
        json["TTL"] = Value::String("T".into());
        (answer.status, json)
    };
    assert_eq!(
        time_to_live(keel, &keel_lease),
        time_to_live(etcd, &etcd_lease)
    );
    let leases = |port: u16| normalise(post(port, "/v3/lease/leases", "{}").json());
    assert_eq!(leases(keel), leases(etcd));
    let revoke = |port: u16, lease: &str| {
        let answer = post(port, "/v3/lease/revoke", &format!(r#"{{"ID": "{lease}"}}"#));
        (answer.status, normalise(answer.json()))
    };
    assert_eq!(revoke(keel, &keel_lease), revoke(etcd, &etcd_lease));
    // Revoking it again: NotFound, HTTP 404, etcd's message.
    let gone = same(etcd, keel, "/v3/lease/revoke", r#"{"ID": "12345"}"#);
    assert_eq!(gone["message"], "etcdserver: requested lease not found");
    same(
        etcd,
        keel,
        "/v3/kv/deleterange",
        r#"{"key": "Zm9v", "prev_kv": true}"#,
    );
    same(etcd, keel, "/v3/kv/compaction", r#"{"revision": "3"}"#);
    let compacted = same(
        etcd,
        keel,
        "/v3/kv/range",
        r#"{"key": "Zm9v", "revision": "2"}"#,
    );
    assert_eq!(compacted["code"], 11, "OutOfRange");

    // etcd's CORS headers, and its answer to a preflight.
    for (method, path) in [("OPTIONS", "/v3/kv/range"), ("POST", "/v3/kv/range")] {
        let keel_headers = cors_headers(keel, method, path);
        assert_eq!(
            keel_headers,
            cors_headers(etcd, method, path),
            "{method} {path}"
        );
        assert_eq!(keel_headers.1.len(), 3, "{keel_headers:?}");
    }
    // A path the gateway does not have: etcd's plain 404.
    let missing = |port: u16| {
        let answer = post(port, "/v3/kv/nothing", "{}");
        (answer.status, answer.body)
    };
    assert_eq!(missing(keel), missing(etcd));

    // Cluster and maintenance: keel's three members, with their client URLs
    // (Patroni finds the cluster's endpoints here).
    let members = post(keel, "/v3/cluster/member/list", "{}").json();
    let client_urls: Vec<&str> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|member| member["clientURLs"][0].as_str().expect("clientURLs"))
        .collect();
    assert_eq!(client_urls.len(), 3, "{members}");
    assert!(client_urls.contains(&cluster.members[2].url().as_str()));
    let etcd_members = post(etcd, "/v3/cluster/member/list", "{}").json();
    let fields = |json: &Value| -> Vec<String> {
        let mut names: Vec<String> = json["members"][0]
            .as_object()
            .expect("a member")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    };
    assert_eq!(fields(&members), fields(&etcd_members));
    // etcd's Cluster service puts no revision in its header.
    assert_eq!(
        normalise(members["header"].clone()),
        normalise(etcd_members["header"].clone())
    );
    let status = post(keel, "/v3/maintenance/status", "").json();
    assert_eq!(status["version"], "3.5.0");
    let etcd_status = post(etcd, "/v3/maintenance/status", "").json();
    for field in ["leader", "raftIndex", "raftTerm", "dbSize", "header"] {
        assert!(
            status.get(field).is_some() && etcd_status.get(field).is_some(),
            "{field}"
        );
    }
}

#[test]
fn a_watch_over_the_gateway_sees_a_put_made_through_grpc() {
    let cluster = Cluster::start(3, KEEL_PORT_BASE + 10);
    let watch = WatchStream::open(
        cluster.members[0].client_port,
        "/v3/watch",
        r#"{"create_request": {"key": "Z3JwYy1rZXk="}}"#,
    );
    assert_eq!(watch.next()["result"]["created"], true);
    let url = cluster.members[1].url();
    block_on(async move {
        let mut client = KvClient::new(connect(&url).await.expect("gRPC connection"));
        client
            .put(PutRequest {
                key: b"grpc-key".to_vec(),
                value: b"from gRPC".to_vec(),
                ..Default::default()
            })
            .await
            .expect("put over gRPC");
    });
    let deadline = Instant::now() + STREAM_TIMEOUT;
    loop {
        let message = watch.next();
        if let Some(events) = message["result"]["events"].as_array() {
            assert_eq!(events[0]["kv"]["key"], "Z3JwYy1rZXk=");
            assert_eq!(events[0]["kv"]["value"], "ZnJvbSBnUlBD");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event, last message {message}"
        );
    }
}

#[test]
fn bad_input_gets_a_400_naming_the_problem() {
    let cluster = Cluster::start(1, KEEL_PORT_BASE + 20);
    let keel = cluster.members[0].client_port;
    let refused = |path: &str, body: &str, named: &str| {
        let answer = post(keel, path, body);
        assert_eq!(answer.status, 400, "{path} {body}: {answer:?}");
        let json = answer.json();
        assert_eq!(json["code"], 3, "InvalidArgument: {json}");
        let message = json["message"].as_str().expect("a message");
        assert!(
            message.contains(named),
            "{path} {body}: message {message:?} does not name {named:?}"
        );
        assert_eq!(json["error"], json["message"]);
    };
    refused(
        "/v3/kv/put",
        r#"{"key": "Zm9v", "value": "#,
        "EOF while parsing",
    );
    refused("/v3/kv/put", "not json", "expected");
    refused(
        "/v3/kv/range",
        r#"{"key": "Zm9v", "limit": "many"}"#,
        "invalid digit",
    );
    refused("/v3/kv/range", r#"{"key": ["Zm9v"]}"#, "invalid type");
    refused("/v3/kv/range", r#"{"key": true}"#, "invalid type");
    refused("/v3/kv/put", r#"{"key": "!!not base64!!"}"#, "symbol");
    refused(
        "/v3/kv/range",
        r#"{"key": "Zm9v", "bogus": 1}"#,
        "unknown field `bogus`",
    );
    refused(
        "/v3/kv/txn",
        r#"{"compare": [{"target": "COLOUR", "key": "Zm9v"}]}"#,
        "COLOUR",
    );
    refused(
        "/v3/watch",
        r#"{"create_request": {"key": 7}}"#,
        "invalid type",
    );
    refused("/v3/lease/keepalive", r#"{"ID": "x"}"#, "invalid digit");
    // A body over the gateway's limit (from the default 1.5 MiB
    // --max-request-bytes): refused, named, and the member lives on.
    let huge = format!(
        r#"{{"key": "Zm9v", "value": "{}"}}"#,
        "A".repeat(3 * 1024 * 1024)
    );
    let body_file = cluster.directory.path().join("huge.json");
    std::fs::write(&body_file, huge).expect("body file");
    let answer = curl(
        keel,
        "POST",
        "/v3/kv/put",
        Some(&format!("@{}", body_file.display())),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.json()["message"]
        .as_str()
        .is_some_and(|message| message.contains("larger than the gateway's limit")));
    // Still serving, over both protocols.
    assert_eq!(
        post(keel, "/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#).status,
        200
    );
    assert_eq!(
        cluster
            .etcdctl(&["get", "foo", "--print-value-only"])
            .trim(),
        "bar"
    );
}
