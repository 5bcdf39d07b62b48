//! The `keel-check` binary re-checks dumped histories and reports through its exit status.

mod support;

use std::path::PathBuf;
use std::process::Command;

use keel_check::History;
use support::*;

/// Writes `history` to a file unique to this test process and `name`.
fn dump(name: &str, history: &History) -> PathBuf {
    let path = std::env::temp_dir().join(format!("keel-check-{}-{name}.json", std::process::id()));
    std::fs::write(&path, history.to_json()).unwrap();
    path
}

fn run(arguments: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keel-check"))
        .args(arguments)
        .output()
        .unwrap();
    let text =
        String::from_utf8(output.stdout).unwrap() + &String::from_utf8(output.stderr).unwrap();
    (output.status.code().unwrap(), text)
}

#[test]
fn linearizable_history_passes() {
    let history = History {
        operations: vec![
            put(1, 0, 10, "a", "1", 2),
            get(2, 20, 30, "a", Some("1"), 2, 2),
        ],
    };
    let path = dump("ok", &history);
    let (status, text) = run(&["--global", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(status, 0, "{text}");
    assert!(text.contains("linearizability: linearizable"), "{text}");
}

#[test]
fn stale_read_is_reported_with_status_one() {
    let history = History {
        operations: vec![
            put(1, 0, 10, "a", "1", 2),
            put(1, 20, 30, "a", "2", 3),
            get(2, 40, 50, "a", Some("1"), 2, 3),
        ],
    };
    let path = dump("stale", &history);
    let (status, text) = run(&["--timeout-seconds", "5", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(status, 1, "{text}");
    assert!(text.contains("not linearizable"), "{text}");
}

#[test]
fn bad_arguments_and_files_exit_with_status_three() {
    assert_eq!(run(&[]).0, 3);
    assert_eq!(run(&["--timeout-seconds", "soon", "x.json"]).0, 3);
    let (status, text) = run(&["/nonexistent/history.json"]);
    assert_eq!(status, 3);
    assert!(text.contains("cannot open"), "{text}");
}
