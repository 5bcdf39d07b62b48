//! The operations commands on real processes: `keel status` (with a member
//! down), `keel member` with a real joining member, backups saved by etcdctl
//! and by keel and restored into a new cluster, and `keel defrag`, `keel
//! alarm` and `keel move-leader` with their etcdctl-like messages.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{etcdctl, run_etcdctl, Cluster, CONVERGE_TIMEOUT};

fn keel(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .expect("keel runs")
}

/// Runs keel and returns its standard output; panics with its errors if it fails.
fn keel_ok(arguments: &[&str]) -> String {
    let output = keel(arguments);
    assert!(
        output.status.success(),
        "keel {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Runs keel until it succeeds (a learner is promoted only once it has caught
/// up), for at most [`CONVERGE_TIMEOUT`].
fn keel_until_ok(arguments: &[&str]) -> String {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let output = keel(arguments);
        if output.status.success() {
            return String::from_utf8(output.stdout).expect("utf-8 output");
        }
        assert!(
            Instant::now() < deadline,
            "keel {arguments:?} kept failing: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

/// `keel member list -o json`'s members.
fn members(endpoints: &str) -> Vec<serde_json::Value> {
    let list = json(&keel_ok(&[
        "member",
        "list",
        "-o",
        "json",
        "--endpoints",
        endpoints,
    ]));
    list["members"].as_array().expect("members").clone()
}

/// Waits until `count` members have announced their client URLs (members
/// publish them through the log shortly after they start), so that commands
/// that reach every member can find them all.
fn wait_for_client_urls(endpoints: &str, count: usize) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let announced = members(endpoints)
            .iter()
            .filter(|member| {
                !member["client_urls"]
                    .as_array()
                    .expect("client_urls")
                    .is_empty()
            })
            .count();
        if announced == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {announced} of {count} members announced client URLs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A member process started by a test outside a [`Cluster`], killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn status_shows_every_member_and_marks_a_dead_one_unreachable() {
    let mut cluster = Cluster::start(3, 24500);
    // Only one endpoint is given: the other members are found through the
    // membership list.
    let first = cluster.members[0].endpoint();
    wait_for_client_urls(&first, 3);

    let table = keel_ok(&["status", "--endpoints", &first]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "a header and one row per member:\n{table}");
    assert!(
        lines[0].starts_with("NAME  ID")
            && lines[0].contains("LEADER  TERM  RAFT INDEX  APPLIED INDEX  REVISION  DB SIZE"),
        "{table}"
    );
    let leader_cells: Vec<&str> = lines[1..]
        .iter()
        .map(|line| line.split_whitespace().nth(3).expect("a LEADER cell"))
        .collect();
    assert_eq!(
        leader_cells.iter().filter(|cell| **cell == "yes").count(),
        1,
        "exactly one leader:\n{table}"
    );

    let status = json(&keel_ok(&["status", "--endpoints", &first, "-o", "json"]));
    let rows = status["members"].as_array().expect("members");
    assert_eq!(rows.len(), 3, "{status}");
    assert!(rows.iter().all(|row| row["reachable"] == true), "{status}");
    let mut names: Vec<&str> = rows
        .iter()
        .map(|row| row["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["m1", "m2", "m3"]);
    assert_eq!(
        rows.iter().filter(|row| row["leader"] == true).count(),
        1,
        "{status}"
    );
    for row in rows {
        assert!(row["term"].as_u64().unwrap() >= 1, "{row}");
        assert!(row["applied_index"].as_u64().unwrap() >= 1, "{row}");
        assert!(row["revision"].as_i64().unwrap() >= 1, "{row}");
        assert_eq!(row["learner"], false, "{row}");
    }

    // With m3 dead the command still succeeds, and says which member is down.
    cluster.kill(2);
    let status = json(&keel_ok(&["status", "--endpoints", &first, "-o", "json"]));
    let rows = status["members"].as_array().expect("members");
    assert_eq!(rows.len(), 3, "{status}");
    for row in rows {
        let expected_reachable = row["name"] != "m3";
        assert_eq!(row["reachable"], expected_reachable, "{row}");
    }
    let table = keel_ok(&["status", "--endpoints", &first]);
    let m3_row = table
        .lines()
        .find(|line| line.starts_with("m3 "))
        .unwrap_or_else(|| panic!("a row for m3:\n{table}"));
    assert!(m3_row.contains("unreachable"), "{table}");
}

#[test]
fn member_add_promote_update_and_remove_with_a_real_joining_member() {
    let cluster = Cluster::start(3, 24510);
    let endpoints = cluster.endpoints();
    wait_for_client_urls(&endpoints, 3);
    let peer_url = "http://127.0.0.1:24517";
    let client_url = "http://127.0.0.1:24516";

    let added = keel_ok(&[
        "member",
        "add",
        "m4",
        "--peer-urls",
        peer_url,
        "--learner",
        "--endpoints",
        &endpoints,
    ]);
    let first_line = added.lines().next().expect("a first line");
    let words: Vec<&str> = first_line.split_whitespace().collect();
    assert_eq!(
        (words[0], &words[2..6]),
        ("Member", &["added", "as", "learner", "to"][..]),
        "{added}"
    );
    let (id, cluster_id) = (words[1], words[7]);
    assert_eq!(id.len(), 16, "{added}");

    // Start the new member with exactly the flags printed, plus its own data
    // directory and client URLs.
    let command_line = added
        .lines()
        .find_map(|line| line.strip_prefix("keel "))
        .unwrap_or_else(|| panic!("no command line to start the member:\n{added}"));
    assert!(
        command_line.contains("--initial-cluster-state existing")
            && command_line.contains("m4=http://127.0.0.1:24517")
            && command_line.contains("m1=http://127.0.0.1:24511"),
        "{command_line}"
    );
    let data = tempfile::tempdir().expect("temporary directory");
    let log_path = data.path().join("m4.log");
    let mut joiner = Process(
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(command_line.split_whitespace())
            .arg("--data-dir")
            .arg(data.path().join("m4"))
            .args(["--listen-client-urls", client_url])
            .args(["--advertise-client-urls", client_url])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).expect("log file"))
            .spawn()
            .expect("keel server starts"),
    );

    // Promotion is refused until the learner has caught up; then it is a voter.
    let promote = ["member", "promote", id, "--endpoints", &endpoints];
    assert_eq!(
        keel_until_ok(&promote),
        format!("Member {id} promoted in cluster {cluster_id}\n")
    );
    wait_for_client_urls(&endpoints, 4);
    let list = keel_ok(&["member", "list", "--endpoints", &endpoints]);
    let m4_row: Vec<&str> = list
        .lines()
        .find(|line| line.starts_with(id))
        .unwrap_or_else(|| panic!("m4 listed:\n{list}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        m4_row,
        [id, "started", "m4", peer_url, client_url, "no"],
        "{list}"
    );
    let status = json(&keel_ok(&[
        "status",
        "--endpoints",
        &endpoints,
        "-o",
        "json",
    ]));
    let rows = status["members"].as_array().expect("members");
    assert_eq!(rows.len(), 4, "{status}");
    assert!(rows.iter().all(|row| row["reachable"] == true), "{status}");

    // Removing it makes it stop by itself.
    assert_eq!(
        keel_ok(&["member", "remove", id, "--endpoints", &endpoints]),
        format!("Member {id} removed from cluster {cluster_id}\n")
    );
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while joiner.0.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "the removed member kept running; its log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(members(&endpoints).len(), 3);

    // A learner that never starts is listed as unstarted; update changes its
    // peer URLs.
    let added = json(&keel_ok(&[
        "member",
        "add",
        "m5",
        "--peer-urls",
        "http://127.0.0.1:24519",
        "--learner",
        "--endpoints",
        &endpoints,
        "-o",
        "json",
    ]));
    let id = added["member"]["id_hex"]
        .as_str()
        .expect("id_hex")
        .to_string();
    assert_eq!(
        keel_ok(&[
            "member",
            "update",
            &id,
            "--peer-urls",
            "http://127.0.0.1:24521",
            "--endpoints",
            &endpoints
        ]),
        format!("Member {id} updated in cluster {cluster_id}\n")
    );
    let list = keel_ok(&["member", "list", "--endpoints", &endpoints]);
    let m5_row: Vec<&str> = list
        .lines()
        .find(|line| line.starts_with(&id))
        .unwrap_or_else(|| panic!("m5 listed:\n{list}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        m5_row,
        [id.as_str(), "unstarted", "http://127.0.0.1:24521", "yes"],
        "{list}"
    );
    keel_ok(&["member", "remove", &id, "--endpoints", &endpoints]);
    assert_eq!(members(&endpoints).len(), 3);
}

/// `keel snapshot status -o json` of a backup file.
fn backup_status(file: &Path) -> serde_json::Value {
    json(&keel_ok(&[
        "snapshot",
        "status",
        file.to_str().unwrap(),
        "-o",
        "json",
    ]))
}

/// The keys under `backup/` and the revision, as etcdctl sees them.
fn keys_and_revision(endpoints: &str) -> (serde_json::Value, i64) {
    let answer = json(&etcdctl(
        endpoints,
        &["get", "--prefix", "backup/", "-w", "json"],
    ));
    let revision = answer["header"]["revision"].as_i64().expect("revision");
    (answer["kvs"].clone(), revision)
}

#[test]
fn backups_saved_by_etcdctl_and_keel_agree_and_restore_into_a_new_cluster() {
    let cluster = Cluster::start(3, 24520);
    let endpoints = cluster.endpoints();
    for index in 0..20 {
        etcdctl(
            &endpoints,
            &[
                "put",
                &format!("backup/{index:02}"),
                &format!("value {index}"),
            ],
        );
    }
    etcdctl(&endpoints, &["del", "backup/00"]);
    etcdctl(&endpoints, &["put", "backup/01", "changed"]);
    let (keys, revision) = keys_and_revision(&endpoints);
    assert_eq!(keys.as_array().unwrap().len(), 19);
    // A backup is one member's applied state: let every member apply every
    // write first, so both backups hold the same data whichever member serves.
    let leader = cluster.wait_for_leader();
    let commit_index = cluster
        .status(leader)
        .expect("the leader answers")
        .raft_index;
    cluster.wait_for_applied(commit_index);

    let directory = tempfile::tempdir().expect("temporary directory");
    let etcdctl_file = directory.path().join("etcdctl.backup");
    let keel_file = directory.path().join("keel.backup");
    // etcdctl insists on exactly one endpoint for a snapshot.
    let saved = etcdctl(
        &cluster.members[0].endpoint(),
        &["snapshot", "save", etcdctl_file.to_str().unwrap()],
    );
    assert!(saved.contains("Snapshot saved at"), "{saved}");
    let saved = keel_ok(&[
        "snapshot",
        "save",
        keel_file.to_str().unwrap(),
        "--endpoints",
        &endpoints,
    ]);
    assert!(
        saved.starts_with(&format!(
            "Snapshot saved at {} (revision {revision}, 19 keys, ",
            keel_file.display()
        )),
        "{saved}"
    );
    assert!(!directory.path().join("keel.backup.part").exists());

    let from_etcdctl = backup_status(&etcdctl_file);
    let from_keel = backup_status(&keel_file);
    assert_eq!(from_keel["revision"], revision, "{from_keel}");
    assert_eq!(from_keel["total_keys"], 19, "{from_keel}");
    for field in ["revision", "total_keys", "hash"] {
        assert_eq!(from_etcdctl[field], from_keel[field], "{field}");
    }
    let table = keel_ok(&["snapshot", "status", keel_file.to_str().unwrap()]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0], "HASH      REVISION  TOTAL KEYS  TOTAL SIZE",
        "{table}"
    );
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells[1..3],
        [revision.to_string().as_str(), "19"],
        "{table}"
    );

    // A backup with one flipped byte is refused and nothing is created.
    let damaged_file = directory.path().join("damaged.backup");
    let mut bytes = std::fs::read(&keel_file).expect("backup");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&damaged_file, bytes).expect("damaged backup");
    let damaged_data = directory.path().join("damaged-data");
    let refused = keel(&[
        "snapshot",
        "restore",
        damaged_file.to_str().unwrap(),
        "--name",
        "m1",
        "--data-dir",
        damaged_data.to_str().unwrap(),
        "--initial-cluster",
        "m1=http://127.0.0.1:24531",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:24531",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("damaged.backup cannot be restored")
            && stderr.contains("SHA-256 mismatch: the file is damaged"),
        "{stderr}"
    );
    assert!(
        !damaged_data.exists(),
        "a refused restore created its data directory"
    );
    let refused = keel(&["snapshot", "status", damaged_file.to_str().unwrap()]);
    assert!(!refused.status.success());

    // Restore keel's backup into three new members and start them as a new cluster.
    let mut restored = Cluster::unstarted(3, 24530);
    for index in 0..3 {
        let member = &restored.members[index];
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let output = keel_ok(&[
            "snapshot",
            "restore",
            keel_file.to_str().unwrap(),
            "--name",
            &member.name,
            "--data-dir",
            member.data_dir.to_str().unwrap(),
            "--initial-cluster",
            restored.initial_cluster(),
            "--initial-advertise-peer-urls",
            &peer_url,
        ]);
        assert!(
            output.starts_with(&format!(
                "Restored {} into {} as member {}",
                keel_file.display(),
                member.data_dir.display(),
                member.name
            )),
            "{output}"
        );
    }
    for index in 0..3 {
        restored.start_member(index);
    }
    restored.wait_for_leader();
    let restored_endpoints = restored.endpoints();
    assert_eq!(
        keys_and_revision(&restored_endpoints),
        (keys, revision),
        "the restored cluster holds the same keys at the same revision"
    );
    let restored_members = members(&restored_endpoints);
    assert_eq!(restored_members.len(), 3, "{restored_members:?}");
    // Writes continue from the backup's revision.
    assert_eq!(
        etcdctl(&restored_endpoints, &["put", "backup/new", "v"]),
        "OK\n"
    );
    assert_eq!(keys_and_revision(&restored_endpoints).1, revision + 1);
}

#[test]
fn defrag_alarm_and_move_leader_print_what_etcdctl_prints() {
    let cluster = Cluster::start_with(3, 24540, &["--quota-backend-bytes", "65536"]);
    let endpoints = cluster.endpoints();
    let first = cluster.members[0].endpoint();
    let defragmented = keel_ok(&["defrag", "--endpoints", &endpoints]);
    let expected: String = endpoints
        .split(',')
        .map(|endpoint| format!("Finished defragmenting member[{endpoint}]\n"))
        .collect();
    assert_eq!(defragmented, expected);
    wait_for_client_urls(&first, 3);
    let defragmented = keel_ok(&["defrag", "--cluster", "--endpoints", &first]);
    assert_eq!(defragmented.lines().count(), 3, "{defragmented}");
    for member in &cluster.members {
        assert!(
            defragmented.contains(&format!(
                "Finished defragmenting member[{}]\n",
                member.url()
            )),
            "{defragmented}"
        );
    }

    assert_eq!(
        keel_ok(&["alarm", "list", "--endpoints", &endpoints]),
        "(no alarms)\n"
    );
    assert_eq!(
        json(&keel_ok(&[
            "alarm",
            "list",
            "-o",
            "json",
            "--endpoints",
            &endpoints
        ])),
        serde_json::json!({ "alarms": [] })
    );

    // Fill the space quota: NOSPACE is raised and listed.
    let value = "x".repeat(4096);
    let refusal = (0..64).find_map(|sequence| {
        let key = format!("fill/{sequence:03}");
        let (code, _, error) = run_etcdctl(&endpoints, &["put", &key, &value], None);
        (code != 0).then_some(error)
    });
    let refusal = refusal.expect("the quota was never reached");
    assert!(refusal.contains("database space exceeded"), "{refusal}");
    // The member that answers may apply the alarm a moment after the member
    // that refused the write.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let alarms = loop {
        let alarms = keel_ok(&["alarm", "list", "--endpoints", &endpoints]);
        if alarms != "(no alarms)\n" || Instant::now() > deadline {
            break alarms;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let alarm_lines: Vec<&str> = alarms.lines().collect();
    assert_eq!(alarm_lines.len(), 1, "{alarms}");
    assert!(
        alarm_lines[0].starts_with("memberID:") && alarm_lines[0].ends_with(" alarm:NOSPACE"),
        "{alarms}"
    );
    let listed = json(&keel_ok(&[
        "alarm",
        "list",
        "-o",
        "json",
        "--endpoints",
        &endpoints,
    ]));
    assert_eq!(listed["alarms"][0]["alarm"], "NOSPACE", "{listed}");

    // Free the space, defragment and disarm: writes work again.
    etcdctl(&endpoints, &["del", "--prefix", "fill/"]);
    let revision = json(&etcdctl(&endpoints, &["get", "fill/", "-w", "json"]))["header"]
        ["revision"]
        .as_i64()
        .expect("revision");
    etcdctl(&endpoints, &["compaction", &revision.to_string()]);
    keel_ok(&["defrag", "--endpoints", &endpoints]);
    assert_eq!(
        keel_ok(&["alarm", "disarm", "--endpoints", &endpoints]),
        alarms
    );
    assert_eq!(
        keel_ok(&["alarm", "list", "--endpoints", &endpoints]),
        "(no alarms)\n"
    );
    assert_eq!(etcdctl(&endpoints, &["put", "after", "ok"]), "OK\n");

    // Hand leadership to a follower, naming it by id as etcdctl does.
    let leader = cluster.wait_for_leader();
    let target = (leader + 1) % 3;
    let member_id = |index: usize| {
        cluster
            .status(index)
            .and_then(|status| status.header)
            .expect("the member answers")
            .member_id
    };
    let (leader_id, target_id) = (member_id(leader), member_id(target));
    assert_eq!(
        keel_ok(&[
            "move-leader",
            &format!("{target_id:x}"),
            "--endpoints",
            &first
        ]),
        format!("Leadership transferred from {leader_id:016x} to {target_id:016x}\n")
    );
    assert_eq!(cluster.wait_for_leader(), target);
    let refused = keel(&["move-leader", "1234", "--endpoints", &first]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no member has ID 0000000000001234"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
