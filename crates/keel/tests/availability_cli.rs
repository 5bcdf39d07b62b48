//! `keel availability` end to end: the binary's table, JSON and SVG for the example in
//! the issue, and clear errors for bad input.

use std::process::Command;

fn keel(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(arguments)
        .output()
        .expect("the keel binary runs")
}

#[test]
fn quorum_prints_json_that_matches_the_closed_form_and_draws_a_plot() {
    let directory = tempfile::tempdir().unwrap();
    let plot = directory.path().join("quorum.svg");
    let output = keel(&[
        "availability",
        "quorum",
        "--members",
        "3,5",
        "--mttf",
        "30d",
        "--mttr",
        "1h",
        "--monte-carlo-replications",
        "50",
        "--plot",
        plot.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let document: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let clusters = document["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 2);
    // 2-of-3 with q = 1/721 per member: down = 3q²(1−q) + q³.
    let member_down = 1.0f64 / 721.0;
    let expected = 3.0 * member_down.powi(2) * (1.0 - member_down) + member_down.powi(3);
    let down = clusters[0]["availability"]["down"].as_f64().unwrap();
    assert!(
        ((down - expected) / expected).abs() < 1e-6,
        "{down} vs {expected}"
    );
    assert_eq!(clusters[1]["quorum"], 3);
    assert!(clusters[0]["monte_carlo"]["unavailability"]["high"].is_f64());
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 4);
}

#[test]
fn quorum_table_has_one_row_per_size() {
    let output = keel(&[
        "availability",
        "quorum",
        "--members",
        "3,5,7",
        "--mttf",
        "30d",
        "--mttr",
        "1h",
        "--repair-crews",
        "1",
        "--monte-carlo-replications",
        "0",
    ]);
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].contains("availability") && rows[0].contains("nines"));
    for (row, members) in rows[1..4].iter().zip(["3", "5", "7"]) {
        assert_eq!(row.split_whitespace().next(), Some(members), "{table}");
    }
}

#[test]
fn system_and_component_answer_and_bad_input_is_named() {
    let output = keel(&[
        "availability",
        "system",
        "2of3(0.9, 0.9, 0.9)",
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let document: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!((document["availability"].as_f64().unwrap() - 0.972).abs() < 1e-12);

    let output = keel(&[
        "availability",
        "component",
        "--mttf",
        "720h",
        "--mttr",
        "1h",
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let document: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!((document["availability"].as_f64().unwrap() - 720.0 / 721.0).abs() < 1e-12);

    let output = keel(&["availability", "component", "--mttf", "30", "--mttr", "1h"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs a unit"));
    let output = keel(&["availability", "system", "series(0.9"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected ')'"));
}
