//! Watches on real keel processes: Debian's `etcdctl watch` (prefix, past
//! revision, previous values, interactive, compacted) compared with what a
//! real etcd prints for the same steps; a watch resumed on another member
//! after its member was killed; a slow watcher that must not delay anyone or
//! grow the member's memory; and `keel watch`.
//!
//! Every wait is for an expected line or response, with a timeout; every
//! process is killed when its guard is dropped, even if the test panics.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::{normalise_etcdctl_output as normalise, Cluster, ReferenceEtcd};
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_server::api::etcdserverpb::watch_client::WatchClient;
use keel_types::etcdserverpb::watch_request::RequestUnion;
use keel_types::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use keel_types::mvccpb::Event;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How long any one expected line or response may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Processes whose output is read line by line.
// ---------------------------------------------------------------------------

/// A running command (etcdctl or keel) whose standard output is read line by
/// line with bounded waits. Killed on drop.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std_mpsc::Receiver<String>,
    seen: Vec<String>,
    description: String,
}

impl Running {
    fn spawn(mut command: Command, description: String) -> Running {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("{description} starts: {error}"));
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            description,
        }
    }

    /// Waits until `count` lines in all have been printed.
    fn wait_lines(&mut self, count: usize) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.seen.len() < count {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "{}: expected {count} lines within {STEP_TIMEOUT:?}, got {:?}",
                    self.description, self.seen
                ),
            }
        }
    }

    fn write_stdin(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("writing stdin");
        stdin.flush().expect("flushing stdin");
    }

    /// Kills the process and returns everything it printed.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread ends at EOF; collect what it still has.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcdctl_command(endpoints: &str, arguments: &[&str]) -> Command {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=10s")
        .args(arguments);
    command
}

/// Runs etcdctl to completion: (exit code, stdout, stderr).
fn etcdctl_run(endpoints: &str, arguments: &[&str]) -> (i32, String, String) {
    common::run_etcdctl(endpoints, arguments, None)
}

fn etcdctl_ok(endpoints: &str, arguments: &[&str]) {
    let (code, _, error) = etcdctl_run(endpoints, arguments);
    assert_eq!(code, 0, "etcdctl {arguments:?} failed: {error}");
}

/// The same `etcdctl watch` steps against one endpoint list; returns each
/// step's name and normalised output. Both stores start empty, so the
/// revisions below are the same on both.
fn etcdctl_watch_session(endpoints: &str) -> Vec<(String, String)> {
    let mut outputs = Vec::new();
    for (key, value) in [
        ("foo", "bar"),   // 2
        ("foo1", "bar1"), // 3
        ("foo", "bar2"),  // 4
    ] {
        etcdctl_ok(endpoints, &["put", key, value]);
    }
    etcdctl_ok(endpoints, &["del", "foo1"]); // 5
    etcdctl_ok(endpoints, &["put", "zoo", "z"]); // 6
    etcdctl_ok(endpoints, &["put", "foo2", "x"]); // 7

    // A past revision, a prefix: five events of three lines each.
    let steps: [(&str, &[&str], usize); 3] = [
        (
            "prefix from revision 2",
            &["watch", "--prefix", "foo", "--rev", "2"],
            15,
        ),
        (
            "key with previous values",
            &["watch", "foo", "--rev", "2", "--prev-kv"],
            3 + 5,
        ),
        (
            "prefix as JSON",
            &["watch", "--prefix", "foo", "--rev", "2", "-w", "json"],
            1,
        ),
    ];
    for (name, arguments, lines) in steps {
        let mut watch = Running::spawn(
            etcdctl_command(endpoints, arguments),
            format!("etcdctl {arguments:?}"),
        );
        watch.wait_lines(lines);
        outputs.push((name.to_string(), normalise(&watch.finish())));
    }

    // Live changes with previous values. The explicit start revision makes
    // the output independent of when the watch is registered.
    let mut live = Running::spawn(
        etcdctl_command(endpoints, &["watch", "foo", "--prev-kv", "--rev", "8"]),
        "etcdctl watch foo --prev-kv".into(),
    );
    etcdctl_ok(endpoints, &["put", "foo", "live1"]); // 8
    live.wait_lines(5);
    etcdctl_ok(endpoints, &["del", "foo"]); // 9
    live.wait_lines(10);
    etcdctl_ok(endpoints, &["put", "foo", "live2"]); // 10
    live.wait_lines(13);
    outputs.push((
        "live with previous values".into(),
        normalise(&live.finish()),
    ));

    // Interactive: two watches from now, then a third on a past revision
    // whose replayed event shows that the stream has registered all three
    // (etcdctl puts them on one stream, which creates them in order).
    etcdctl_ok(endpoints, &["put", "sentinel", "s"]); // 11
    let mut interactive = Running::spawn(
        etcdctl_command(endpoints, &["watch", "-i"]),
        "etcdctl watch -i".into(),
    );
    interactive.write_stdin("watch foo\nwatch --prefix a\nwatch sentinel --rev 11\n");
    interactive.wait_lines(3);
    // Each change is waited for before the next, so the order of the two
    // watchers' events on the stream is the order of the writes.
    let writes: [(&[&str], usize); 4] = [
        (&["put", "foo", "i1"], 6), // 12
        (&["put", "a1", "x"], 9),   // 13
        (&["put", "a2", "y"], 12),  // 14
        (&["del", "foo"], 15),      // 15
    ];
    for (arguments, lines) in writes {
        etcdctl_ok(endpoints, arguments);
        interactive.wait_lines(lines);
    }
    outputs.push(("interactive".into(), normalise(&interactive.finish())));

    // A compacted start revision: etcdctl reports the cancellation and exits.
    etcdctl_ok(endpoints, &["compaction", "5"]);
    let (code, stdout, stderr) = etcdctl_run(endpoints, &["watch", "foo", "--rev", "2"]);
    outputs.push((
        "compacted".into(),
        format!(
            "exit {code}\n{}\n{}",
            normalise(&stdout),
            normalise(&stderr)
        ),
    ));
    outputs
}

#[test]
fn etcdctl_watch_prints_what_it_prints_on_etcd() {
    let keel = Cluster::start(3, 24000);
    let etcd = ReferenceEtcd::start(24006);
    let keel_outputs = etcdctl_watch_session(&keel.endpoints());
    let etcd_outputs = etcdctl_watch_session(&etcd.endpoint);
    assert_eq!(keel_outputs.len(), etcd_outputs.len());
    for ((name, keel_output), (_, etcd_output)) in keel_outputs.iter().zip(&etcd_outputs) {
        assert_eq!(
            keel_output, etcd_output,
            "etcdctl watch, {name}: keel printed\n{keel_output}\netcd printed\n{etcd_output}"
        );
    }
}

// ---------------------------------------------------------------------------
// gRPC clients.
// ---------------------------------------------------------------------------

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connecting to {url}: {error}"))
}

/// The client's end of one watch stream.
struct WatchStream {
    requests: tokio::sync::mpsc::Sender<WatchRequest>,
    responses: tonic::Streaming<WatchResponse>,
}

impl WatchStream {
    async fn open(url: &str) -> WatchStream {
        let mut client = WatchClient::new(channel(url).await).max_decoding_message_size(usize::MAX);
        let (requests, receiver) = tokio::sync::mpsc::channel(16);
        let responses = client
            .watch(ReceiverStream::new(receiver))
            .await
            .expect("watch stream opens")
            .into_inner();
        WatchStream {
            requests,
            responses,
        }
    }

    async fn create(&mut self, create: WatchCreateRequest) -> WatchResponse {
        self.requests
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create)),
            })
            .await
            .expect("request sent");
        let response = self.next().await.expect("a created response");
        assert!(response.created && !response.canceled, "{response:?}");
        response
    }

    /// The next response, or the stream's error.
    async fn next(&mut self) -> Result<WatchResponse, tonic::Status> {
        match tokio::time::timeout(STEP_TIMEOUT, self.responses.message()).await {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(tonic::Status::cancelled("stream ended")),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no watch response within {STEP_TIMEOUT:?}"),
        }
    }
}

fn watch_prefix(prefix: &str, start_revision: i64) -> WatchCreateRequest {
    let mut range_end = prefix.as_bytes().to_vec();
    *range_end.last_mut().expect("non-empty prefix") += 1;
    WatchCreateRequest {
        key: prefix.as_bytes().to_vec(),
        range_end,
        start_revision,
        ..WatchCreateRequest::default()
    }
}

/// (type, key, value, revision) of an event.
type EventSummary = (i32, Vec<u8>, Vec<u8>, i64);

fn summary(event: &Event) -> EventSummary {
    let kv = event.kv.clone().expect("events carry a key-value");
    (event.r#type, kv.key, kv.value, kv.mod_revision)
}

fn revision_of(event: &Event) -> i64 {
    event.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

async fn put(client: &mut KvClient<Channel>, key: &str, value: Vec<u8>) -> i64 {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.clone(),
            ..PutRequest::default()
        };
        match client.put(request).await {
            Ok(response) => return response.into_inner().header.expect("header").revision,
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "put {key} kept failing: {status}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The two members that are not the leader.
fn followers(cluster: &Cluster) -> (usize, usize) {
    let leader = cluster.wait_for_leader();
    let others: Vec<usize> = (0..cluster.members.len())
        .filter(|&index| index != leader)
        .collect();
    (others[0], others[1])
}

#[test]
fn a_watch_resumed_on_another_member_sees_exactly_the_events_it_missed() {
    let mut cluster = Cluster::start(3, 24010);
    let leader = cluster.wait_for_leader();
    let (watched, resumed_on) = followers(&cluster);
    let leader_url = cluster.members[leader].url();
    let watched_url = cluster.members[watched].url();
    let resumed_url = cluster.members[resumed_on].url();
    let runtime = runtime();

    // A writer on the leader: 100 changes, then (once the watched member is
    // killed) 200 more.
    let mut stream = runtime.block_on(WatchStream::open(&watched_url));
    let created = runtime.block_on(stream.create(watch_prefix("r/", 0)));
    let first_revision = created.header.expect("header").revision + 1;
    let (killed, killed_signal) = tokio::sync::oneshot::channel::<()>();
    let writer = runtime.spawn(async move {
        let mut client = KvClient::new(channel(&leader_url).await);
        for index in 0..100 {
            put(
                &mut client,
                &format!("r/{}", index % 10),
                format!("v{index}").into_bytes(),
            )
            .await;
        }
        let _ = killed_signal.await;
        let mut last = 0;
        for index in 100..300 {
            last = put(
                &mut client,
                &format!("r/{}", index % 10),
                format!("v{index}").into_bytes(),
            )
            .await;
        }
        last
    });

    // Read until 50 events, then kill the member serving the watch; whatever
    // arrived before the stream broke counts as seen.
    let mut seen: Vec<EventSummary> = Vec::new();
    while seen.len() < 50 {
        let response = runtime
            .block_on(stream.next())
            .expect("events before the kill");
        seen.extend(response.events.iter().map(summary));
    }
    cluster.kill(watched);
    while let Ok(response) = runtime.block_on(stream.next()) {
        seen.extend(response.events.iter().map(summary));
    }
    killed.send(()).expect("the writer waits");
    let last_seen = seen.last().expect("some events").3;

    // Resume on another member from the revision after the last one seen.
    let last_revision = runtime.block_on(writer).expect("writer finished");
    let mut resumed = runtime.block_on(WatchStream::open(&resumed_url));
    runtime.block_on(resumed.create(watch_prefix("r/", last_seen + 1)));
    let mut missed: Vec<EventSummary> = Vec::new();
    while missed.last().map(|event| event.3) != Some(last_revision) {
        let response = runtime.block_on(resumed.next()).expect("resumed events");
        missed.extend(response.events.iter().map(summary));
    }

    // The whole history, read afresh, is exactly what was seen and then missed.
    let mut reference_stream = runtime.block_on(WatchStream::open(&resumed_url));
    runtime.block_on(reference_stream.create(watch_prefix("r/", first_revision)));
    let mut reference: Vec<EventSummary> = Vec::new();
    while reference.last().map(|event| event.3) != Some(last_revision) {
        let response = runtime
            .block_on(reference_stream.next())
            .expect("reference events");
        reference.extend(response.events.iter().map(summary));
    }
    assert_eq!(reference.len(), 300, "every write is one event");
    assert!(
        !missed.is_empty(),
        "the kill happened before the last write"
    );
    let mut joined = seen.clone();
    joined.extend(missed.iter().cloned());
    assert_eq!(
        joined,
        reference,
        "seen ({}) + missed ({}) = all",
        seen.len(),
        missed.len()
    );
}

#[test]
fn a_compacted_start_revision_cancels_the_watcher_with_compact_revision() {
    let cluster = Cluster::start(3, 24030);
    let url = cluster.members[cluster.wait_for_leader()].url();
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = KvClient::new(channel(&url).await);
        for index in 0..5 {
            put(&mut client, "c", format!("{index}").into_bytes()).await; // 2..=6
        }
        client
            .compact(keel_types::etcdserverpb::CompactionRequest {
                revision: 5,
                physical: true,
            })
            .await
            .expect("compaction");
        let mut stream = WatchStream::open(&url).await;
        let created = stream
            .create(WatchCreateRequest {
                key: b"c".to_vec(),
                start_revision: 3,
                ..WatchCreateRequest::default()
            })
            .await;
        let response = stream.next().await.expect("the cancellation");
        assert_eq!(response.watch_id, created.watch_id);
        assert!(response.canceled);
        assert_eq!(response.compact_revision, 5);
        assert!(response.events.is_empty());
        // From the compact revision on, the watch works.
        stream
            .create(WatchCreateRequest {
                key: b"c".to_vec(),
                start_revision: 5,
                ..WatchCreateRequest::default()
            })
            .await;
        let response = stream.next().await.expect("events");
        let revisions: Vec<i64> = response.events.iter().map(revision_of).collect();
        assert_eq!(revisions, vec![5, 6]);
    });
}

// ---------------------------------------------------------------------------
// A slow watcher.
// ---------------------------------------------------------------------------

/// Resident and peak resident memory of a process, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kilobytes| kilobytes * 1024)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Values written while the slow watcher does not read: 96 MiB.
const SLOW_VALUES: usize = 96;
const SLOW_VALUE_BYTES: usize = 1024 * 1024;
/// A ping after every this many values.
const VALUES_PER_PING: usize = 8;
/// How many more big values than were written before it a ping on the slow
/// stream may wait for: the stream's queue (16), what HTTP/2 buffers, and
/// the response each watcher holds.
const SLOW_PING_WAIT_VALUES_MAX: usize = 24;
/// How much more memory the member serving the slow watcher may use than a
/// member serving no watch at all: the stream's queue (16 responses of 1 MiB
/// here), the feed's retained batches (8 MiB), one batch per watcher, HTTP/2
/// buffers, and allocator slack. Far below the 96 MiB it does not read.
const SLOW_MEMORY_MARGIN_BYTES: u64 = 56 * 1024 * 1024;

#[test]
fn a_slow_watcher_delays_no_one_and_its_member_memory_stays_bounded() {
    let cluster = Cluster::start(3, 24020);
    let leader = cluster.wait_for_leader();
    let (serving, control) = followers(&cluster);
    let serving_pid = cluster.members[serving].pid().expect("running");
    let control_pid = cluster.members[control].pid().expect("running");
    let leader_url = cluster.members[leader].url();
    let serving_url = cluster.members[serving].url();
    let runtime = runtime();

    runtime.block_on(async move {
        // The slow stream: a watcher on big values and one on pings, on the
        // same stream, which the client does not read for now.
        let mut slow_stream = WatchStream::open(&serving_url).await;
        let slow = slow_stream.create(watch_prefix("big/", 0)).await.watch_id;
        let ping_on_slow_stream = slow_stream
            .create(WatchCreateRequest {
                key: b"ping".to_vec(),
                ..WatchCreateRequest::default()
            })
            .await
            .watch_id;
        // Another stream, on its own connection, read as events come.
        let mut fast_stream = WatchStream::open(&serving_url).await;
        fast_stream
            .create(WatchCreateRequest {
                key: b"ping".to_vec(),
                ..WatchCreateRequest::default()
            })
            .await;
        let (arrivals, mut arrival) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let Ok(response) = fast_stream.next().await else {
                    return;
                };
                for event in &response.events {
                    let _ = arrivals.send((revision_of(event), Instant::now()));
                }
            }
        });

        let mut client = KvClient::new(channel(&leader_url).await);
        let mut big_revisions = Vec::new();
        let mut ping_revisions = Vec::new();
        let mut ping_latencies = Vec::new();
        let mut peak_difference: i64 = 0;
        for index in 0..SLOW_VALUES {
            let mut value = vec![b'0' + (index % 10) as u8; SLOW_VALUE_BYTES];
            value[0] = index as u8;
            big_revisions.push(put(&mut client, &format!("big/{index:03}"), value).await);
            if (index + 1) % VALUES_PER_PING == 0 {
                let written = Instant::now();
                let revision = put(&mut client, "ping", index.to_string().into_bytes()).await;
                ping_revisions.push(revision);
                let (seen, arrived) = tokio::time::timeout(STEP_TIMEOUT, arrival.recv())
                    .await
                    .expect("the fast watcher gets the ping within the step timeout")
                    .expect("reader running");
                assert_eq!(seen, revision);
                ping_latencies.push(arrived.duration_since(written));
                let (serving_rss, _) = memory_of(serving_pid);
                let (control_rss, _) = memory_of(control_pid);
                peak_difference = peak_difference.max(serving_rss as i64 - control_rss as i64);
            }
        }
        let (_, serving_peak) = memory_of(serving_pid);
        let (_, control_peak) = memory_of(control_pid);
        ping_latencies.sort();
        eprintln!(
            "ping latency on another stream while a watcher lags by up to {} MiB: \
             median {:?}, max {:?}; member memory: serving peak {} MiB, control peak {} MiB, \
             largest resident difference {} MiB",
            (SLOW_VALUES * SLOW_VALUE_BYTES) >> 20,
            ping_latencies[ping_latencies.len() / 2],
            ping_latencies.last().expect("pings"),
            serving_peak >> 20,
            control_peak >> 20,
            peak_difference >> 20,
        );
        assert!(
            peak_difference < SLOW_MEMORY_MARGIN_BYTES as i64,
            "the member serving the slow watcher used {} MiB more than one serving none",
            peak_difference >> 20
        );
        reader.abort();

        // Now the slow stream is read. The pings on it come after a bounded
        // number of the big values' responses, not after the whole backlog.
        let mut big_seen = Vec::new();
        let mut pings_seen = Vec::new();
        // For each ping, how many big values came before it on the stream.
        let mut big_before_ping = Vec::new();
        while big_seen.len() < SLOW_VALUES || pings_seen.len() < ping_revisions.len() {
            let response = slow_stream.next().await.expect("the slow stream delivers");
            if response.watch_id == slow {
                big_seen.extend(response.events.iter().map(revision_of));
            } else {
                assert_eq!(response.watch_id, ping_on_slow_stream);
                for event in &response.events {
                    pings_seen.push(revision_of(event));
                    big_before_ping.push(big_seen.len());
                }
            }
        }
        eprintln!(
            "on the slow stream, the pings (each written after {VALUES_PER_PING} more big \
             values) came after {big_before_ping:?} of {SLOW_VALUES} big values"
        );
        for (index, &before) in big_before_ping.iter().enumerate() {
            // Written after VALUES_PER_PING * (index + 1) big values; it may
            // wait for what was queued ahead of it, not for the backlog.
            assert!(
                before <= VALUES_PER_PING * (index + 1) + SLOW_PING_WAIT_VALUES_MAX,
                "ping {index} waited for {before} big values"
            );
        }
        assert_eq!(
            big_seen, big_revisions,
            "the slow watcher got everything, in order"
        );
        assert_eq!(pings_seen, ping_revisions);
    });
}

// ---------------------------------------------------------------------------
// keel watch.
// ---------------------------------------------------------------------------

fn keel_watch(endpoints: &str, arguments: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command
        .arg("watch")
        .args(arguments)
        .args(["--endpoints", endpoints]);
    command
}

/// Runs an etcdctl write until it succeeds (a member may be down or a
/// leader being elected), within the step timeout.
fn etcdctl_retry(endpoints: &str, arguments: &[&str]) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let (code, _, error) = etcdctl_run(endpoints, arguments);
        if code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "etcdctl {arguments:?} kept failing: {error}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The cluster's current revision, from a read's header.
fn current_revision(endpoints: &str) -> i64 {
    let (code, output, error) = etcdctl_run(endpoints, &["get", "any", "-w", "json"]);
    assert_eq!(code, 0, "etcdctl get failed: {error}");
    let response: serde_json::Value = serde_json::from_str(&output).expect("JSON");
    response["header"]["revision"].as_i64().expect("a revision")
}

#[test]
fn keel_watch_prints_changes_like_etcdctl_and_as_json() {
    let mut cluster = Cluster::start(3, 24040);
    let endpoints = cluster.endpoints();
    etcdctl_ok(&endpoints, &["put", "k1", "a"]); // 2
    etcdctl_ok(&endpoints, &["put", "k1", "b"]); // 3

    let mut table = Running::spawn(
        keel_watch(&endpoints, &["k", "--prefix", "--rev", "2", "--prev-kv"]),
        "keel watch --prefix".into(),
    );
    table.wait_lines(3 + 5);
    etcdctl_ok(&endpoints, &["del", "k1"]); // 4
    table.wait_lines(3 + 5 + 5);
    etcdctl_ok(&endpoints, &["put", "k2", "c"]); // 5
    table.wait_lines(3 + 5 + 5 + 3);
    assert_eq!(
        table.finish(),
        "PUT\nk1\na\n\
         PUT\nk1\na\nk1\nb\n\
         DELETE\nk1\nb\nk1\n\n\
         PUT\nk2\nc"
    );

    let mut json = Running::spawn(
        keel_watch(&endpoints, &["k2", "--rev", "5", "-o", "json"]),
        "keel watch -o json".into(),
    );
    json.wait_lines(1);
    let line = json.finish();
    let response: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
    assert_eq!(response["events"][0]["type"], "PUT");
    assert_eq!(response["events"][0]["kv"]["key"], "k2");
    assert_eq!(response["events"][0]["kv"]["value"], "c");
    assert_eq!(response["events"][0]["kv"]["mod_revision"], 5);
    assert!(response["revision"].as_i64().expect("revision") >= 5);

    // A compacted start revision is an error that says what to do.
    etcdctl_ok(&endpoints, &["compaction", "4"]);
    let output = keel_watch(&endpoints, &["k1", "--rev", "2"])
        .stdin(Stdio::null())
        .output()
        .expect("keel watch runs");
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("compacted") && error.contains("--rev 4"),
        "unexpected error: {error}"
    );
    // keel watch outlives the member it is connected to (the first endpoint):
    // it resumes on another from the revision after the last it printed.
    let next = current_revision(&endpoints) + 1;
    let mut resuming = Running::spawn(
        keel_watch(&endpoints, &["r/", "--prefix", "--rev", &next.to_string()]),
        "keel watch across a member's death".into(),
    );
    etcdctl_ok(&endpoints, &["put", "r/1", "1"]);
    resuming.wait_lines(3);
    cluster.kill(0);
    let survivors = format!(
        "{},{}",
        cluster.members[1].endpoint(),
        cluster.members[2].endpoint()
    );
    etcdctl_retry(&survivors, &["put", "r/2", "2"]);
    resuming.wait_lines(6);
    etcdctl_retry(&survivors, &["put", "r/3", "3"]);
    resuming.wait_lines(9);
    assert_eq!(resuming.finish(), "PUT\nr/1\n1\nPUT\nr/2\n2\nPUT\nr/3\n3");

    // No member to talk to: an error at once, not a wait.
    let output = keel_watch("127.0.0.1:24049", &["k1"])
        .stdin(Stdio::null())
        .output()
        .expect("keel watch runs");
    assert!(!output.status.success());
}
