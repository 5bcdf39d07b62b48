//! Hand-built histories with known verdicts, for every checker of the crate.

mod support;

use std::time::{Duration, Instant};

use keel_check::{
    check, check_history, check_model, check_revisions, check_serializable_reads, CheckOptions,
    CheckResult, Explanation, KeyValueModel, NondeterministicModel, Operation, PowersetModel,
    RevisionViolation, SerializableReadViolation, UnknownReason,
};
use support::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn per_key(history: &[Operation]) -> CheckResult {
    check(history, TIMEOUT).unwrap()
}

fn global(history: &[Operation]) -> CheckResult {
    check_model(
        &KeyValueModel::global(),
        history,
        &CheckOptions::with_timeout(TIMEOUT),
    )
    .unwrap()
}

/// Asserts that both models accept the history.
fn assert_linearizable(history: &[Operation]) {
    assert_eq!(per_key(history), CheckResult::Ok, "per-key");
    assert_eq!(global(history), CheckResult::Ok, "global");
}

/// Asserts that both models reject the history, returning the per-key explanation.
fn assert_illegal(history: &[Operation]) -> Explanation {
    assert!(global(history).is_illegal(), "global");
    match per_key(history) {
        CheckResult::Illegal(explanation) => explanation,
        other => panic!("per-key: expected illegal, got {other}"),
    }
}

#[test]
fn sequential_history_is_linearizable() {
    let history = [
        put(1, 0, 10, "a", "1", 2),
        get(2, 20, 30, "a", Some("1"), 2, 2),
        put(1, 40, 50, "a", "2", 3),
        compare_and_swap(3, 60, 70, "a", Some("2"), "3", true, 4),
        delete(2, 80, 90, "a", 1, 5),
        get(1, 100, 110, "a", None, 0, 5),
        delete(3, 120, 130, "a", 0, 5),
    ];
    assert_linearizable(&history);
    assert_eq!(check_revisions(&history), Ok(()));
}

#[test]
fn concurrent_writes_are_linearizable_in_either_order() {
    for (first_revision, second_revision, seen, seen_revision) in [(2, 3, "2", 3), (3, 2, "1", 3)] {
        let history = [
            put(1, 0, 100, "a", "1", first_revision),
            put(2, 10, 90, "a", "2", second_revision),
            get(3, 110, 120, "a", Some(seen), seen_revision, 3),
        ];
        assert_linearizable(&history);
    }
}

#[test]
fn stale_read_after_a_returned_write_is_illegal() {
    let history = [
        put(1, 0, 10, "a", "1", 2),
        put(1, 20, 30, "a", "2", 3),
        get(2, 40, 50, "a", Some("1"), 2, 3),
    ];
    let explanation = assert_illegal(&history);
    let text = explanation.to_string();
    assert!(
        text.contains("#1 client 1 [20, 30] put \"a\" = \"2\" -> revision 3"),
        "{text}"
    );
    assert!(
        text.contains("#2 client 2 [40, 50] get \"a\" -> \"1\" (mod_revision 2, revision 3)"),
        "{text}"
    );
    assert_eq!(explanation.longest_prefix, vec![0, 1]);
    assert_eq!(explanation.blocking_operation, Some(2));
    assert!(
        text.contains("state after it: revision at least 3; \"a\" = \"2\""),
        "{text}"
    );
}

#[test]
fn unknown_put_that_a_later_read_sees_took_effect() {
    let history = [
        put_unknown(1, 0, "a", "1"),
        get(2, 50, 60, "a", Some("1"), 2, 2),
    ];
    assert_linearizable(&history);
}

#[test]
fn unknown_put_may_never_take_effect() {
    let history = [put_unknown(1, 0, "a", "1"), get(2, 50, 60, "a", None, 0, 1)];
    assert_linearizable(&history);
}

#[test]
fn unknown_put_may_take_effect_late_but_not_be_undone() {
    let late = [
        put_unknown(1, 0, "a", "1"),
        get(2, 50, 60, "a", None, 0, 1),
        get(2, 70, 80, "a", Some("1"), 2, 2),
    ];
    assert_linearizable(&late);
    let undone = [
        put_unknown(1, 0, "a", "1"),
        get(2, 50, 60, "a", Some("1"), 2, 2),
        get(2, 70, 80, "a", None, 0, 2),
    ];
    assert_illegal(&undone);
}

#[test]
fn unknown_put_cannot_take_effect_before_its_call() {
    let history = [
        get(2, 0, 10, "a", Some("1"), 2, 2),
        put_unknown(1, 20, "a", "1"),
    ];
    assert_illegal(&history);
}

#[test]
fn read_of_a_value_nobody_wrote_is_illegal() {
    let history = [
        put(1, 0, 10, "a", "1", 2),
        get(2, 5, 50, "a", Some("ghost"), 2, 2),
    ];
    let explanation = assert_illegal(&history);
    assert!(explanation.to_string().contains("\"ghost\""));
}

#[test]
fn only_one_of_two_racing_compare_and_swaps_may_succeed() {
    let one_wins = [
        compare_and_swap(1, 0, 100, "lock", None, "x", true, 2),
        compare_and_swap(2, 10, 90, "lock", None, "y", false, 2),
        get(3, 110, 120, "lock", Some("x"), 2, 2),
    ];
    assert_linearizable(&one_wins);
    let both_win = [
        compare_and_swap(1, 0, 100, "lock", None, "x", true, 2),
        compare_and_swap(2, 10, 90, "lock", None, "y", true, 3),
    ];
    assert_illegal(&both_win);
    let loser_seen = [
        compare_and_swap(1, 0, 100, "lock", None, "x", true, 2),
        compare_and_swap(2, 10, 90, "lock", None, "y", false, 2),
        get(3, 110, 120, "lock", Some("y"), 2, 2),
    ];
    assert_illegal(&loser_seen);
}

#[test]
fn unknown_compare_and_swap_takes_effect_only_if_it_matches() {
    let winner_seen = [
        compare_and_swap_unknown(1, 0, "lock", None, "x"),
        compare_and_swap(2, 10, 20, "lock", None, "y", true, 2),
        get(3, 30, 40, "lock", Some("y"), 2, 2),
    ];
    assert_linearizable(&winner_seen);
    let loser_seen = [
        compare_and_swap_unknown(1, 0, "lock", None, "x"),
        compare_and_swap(2, 10, 20, "lock", None, "y", true, 2),
        get(3, 30, 40, "lock", Some("x"), 3, 3),
    ];
    assert_illegal(&loser_seen);
    let unknown_wins_first = [
        compare_and_swap_unknown(1, 0, "lock", None, "x"),
        compare_and_swap(2, 10, 20, "lock", None, "y", false, 2),
        get(3, 30, 40, "lock", Some("x"), 2, 2),
    ];
    assert_linearizable(&unknown_wins_first);
}

#[test]
fn per_key_model_misses_cross_key_revisions_that_global_model_and_revision_check_catch() {
    let history = [put(1, 0, 10, "a", "1", 2), put(2, 20, 30, "b", "1", 2)];
    assert_eq!(per_key(&history), CheckResult::Ok);
    assert!(global(&history).is_illegal());
    assert!(matches!(
        check_revisions(&history),
        Err(RevisionViolation::DuplicateRevision { revision: 2, .. })
    ));
}

#[test]
fn smallest_failing_partition_is_explained() {
    let history = [
        put(1, 0, 10, "big", "1", 2),
        put(1, 20, 30, "big", "2", 3),
        put(1, 40, 50, "big", "3", 4),
        get(2, 60, 70, "big", Some("1"), 2, 5),
        put(3, 0, 10, "small", "1", 6),
        get(3, 20, 30, "small", Some("ghost"), 6, 7),
        put(4, 0, 10, "fine", "1", 8),
    ];
    let explanation = assert_illegal(&history);
    assert_eq!(explanation.partition_count, 3);
    let text = explanation.to_string();
    assert!(
        text.starts_with(
            "not linearizable: no valid order of a part of 2 operations, \
             the smallest failing of 3 parts"
        ),
        "{text}"
    );
    let indices: Vec<usize> = explanation
        .operations
        .iter()
        .map(|operation| operation.index)
        .collect();
    assert_eq!(indices, vec![4, 5]);
}

#[test]
fn revision_going_backwards_in_real_time_is_a_violation() {
    let read_below = [put(1, 0, 10, "a", "1", 5), get(2, 20, 30, "b", None, 0, 3)];
    let violation = check_revisions(&read_below).unwrap_err();
    assert!(matches!(
        &violation,
        RevisionViolation::RevisionWentBackwards {
            earlier_revision: 5,
            later_revision: 3,
            ..
        }
    ));
    let text = violation.to_string();
    assert!(text.contains("#1 client 2 [20, 30] get \"b\""), "{text}");
    assert!(text.contains("below 5"), "{text}");

    let write_not_above = [get(1, 0, 10, "a", None, 0, 5), put(2, 20, 30, "b", "1", 5)];
    assert!(matches!(
        check_revisions(&write_not_above),
        Err(RevisionViolation::RevisionWentBackwards {
            relation: "not above",
            ..
        })
    ));

    // Overlapping operations may see revisions in any order.
    let overlapping = [put(1, 0, 30, "a", "1", 5), get(2, 20, 40, "b", None, 0, 3)];
    assert_eq!(check_revisions(&overlapping), Ok(()));
}

#[test]
fn stale_serializable_read_does_not_lower_later_revisions_but_counts_as_earlier() {
    let stale_read = [
        put(1, 0, 10, "a", "1", 5),
        serializable_get(2, 20, 30, "a", None, 0, 3),
    ];
    assert_eq!(check_revisions(&stale_read), Ok(()));
    let after_serializable = [
        serializable_get(2, 0, 10, "a", None, 0, 5),
        get(1, 20, 30, "a", None, 0, 4),
    ];
    assert!(check_revisions(&after_serializable).is_err());
}

#[test]
fn mod_revision_above_revision_is_a_violation() {
    let history = [get(1, 0, 10, "a", Some("1"), 7, 6)];
    assert!(matches!(
        check_revisions(&history),
        Err(RevisionViolation::ModRevisionAboveRevision {
            mod_revision: 7,
            revision: 6,
            ..
        })
    ));
}

#[test]
fn deletes_and_failed_swaps_may_share_a_revision() {
    let history = [
        put(1, 0, 10, "a", "1", 2),
        delete(1, 20, 30, "b", 0, 2),
        compare_and_swap(1, 40, 50, "a", None, "2", false, 2),
        delete(1, 60, 70, "a", 1, 3),
    ];
    assert_eq!(check_revisions(&history), Ok(()));
    assert_linearizable(&history);
}

#[test]
fn serializable_reads_may_be_stale_but_not_made_up() {
    let stale = [
        put(1, 0, 10, "a", "1", 2),
        put(1, 20, 30, "a", "2", 3),
        serializable_get(2, 40, 50, "a", Some("1"), 2, 2),
        serializable_get(2, 60, 70, "a", None, 0, 1),
    ];
    assert_eq!(check_serializable_reads(&stale), Ok(()));
    // Serializable reads are left out of the linearizability search.
    assert_linearizable(&stale);

    let made_up = [
        put(1, 0, 10, "a", "1", 2),
        serializable_get(2, 40, 50, "a", Some("ghost"), 2, 2),
    ];
    assert!(matches!(
        check_serializable_reads(&made_up),
        Err(SerializableReadViolation::ValueNeverWritten { .. })
    ));

    let from_the_future = [
        serializable_get(2, 0, 10, "a", Some("1"), 2, 2),
        put(1, 20, 30, "a", "1", 2),
    ];
    assert!(check_serializable_reads(&from_the_future).is_err());

    let wrong_revision = [
        put(1, 0, 10, "a", "1", 2),
        serializable_get(2, 40, 50, "a", Some("1"), 3, 3),
    ];
    assert!(matches!(
        check_serializable_reads(&wrong_revision),
        Err(SerializableReadViolation::ModRevisionNotWritten { .. })
    ));

    let unknown_and_concurrent_writes = [
        put_unknown(1, 0, "a", "1"),
        compare_and_swap(1, 20, 60, "a", None, "2", true, 9),
        serializable_get(2, 40, 50, "a", Some("1"), 4, 4),
        serializable_get(2, 40, 50, "a", Some("2"), 9, 9),
    ];
    assert_eq!(
        check_serializable_reads(&unknown_and_concurrent_writes),
        Ok(())
    );

    let failed_swap = [
        compare_and_swap(1, 0, 10, "a", None, "2", false, 9),
        serializable_get(2, 40, 50, "a", Some("2"), 9, 9),
    ];
    assert!(check_serializable_reads(&failed_swap).is_err());
}

#[test]
fn history_report_combines_every_checker() {
    let history = [
        put(1, 0, 10, "a", "1", 2),
        put(1, 20, 30, "b", "1", 2),
        serializable_get(2, 40, 50, "a", Some("ghost"), 2, 2),
    ];
    let report = check_history(
        &history,
        &KeyValueModel::per_key(),
        &CheckOptions::with_timeout(TIMEOUT),
    )
    .unwrap();
    assert!(report.linearizability.is_ok());
    assert!(report.has_violation());
    assert!(!report.is_ok());
    let text = report.to_string();
    assert!(
        text.starts_with("linearizability: linearizable\nrevisions: two writes"),
        "{text}"
    );
    assert!(text.contains("serializable reads: #2"), "{text}");
}

#[test]
fn malformed_history_is_an_error_not_a_verdict() {
    let mut operation = put(1, 0, 10, "a", "1", 2);
    operation.return_time = None;
    assert!(check(&[operation], TIMEOUT).is_err());
}

#[test]
fn pathological_history_times_out_as_unknown() {
    // Forty concurrent writes of different keys whose outcome is unknown, and a read nobody
    // explains: the global model must try every subset of the writes (each leads to a
    // different store) before giving up.
    let mut history: Vec<Operation> = (0..40)
        .map(|writer| put_unknown(writer, writer, &format!("key{writer}"), "v"))
        .collect();
    history.push(get(99, 100, 200, "key0", Some("ghost"), 2, 2));
    let started = Instant::now();
    let result = check_model(
        &KeyValueModel::global(),
        &history,
        &CheckOptions::with_timeout(Duration::from_millis(20)),
    )
    .unwrap();
    assert_eq!(result, CheckResult::Unknown(UnknownReason::Timeout));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn many_unknown_writes_of_one_key_do_not_explode() {
    // Unknown writes nobody reads are interchangeable, so the illegal read is found quickly
    // although the search could place any subset of them before it.
    let mut history: Vec<Operation> = (0..40)
        .map(|writer| put_unknown(writer, writer, "a", &format!("v{writer}")))
        .collect();
    history.push(get(99, 100, 200, "a", Some("ghost"), 2, 2));
    assert!(per_key(&history).is_illegal());
    // The same holds when a read forces one of them to have happened by its return.
    history.pop();
    history.push(get(99, 100, 200, "a", Some("v7"), 9, 9));
    history.push(get(99, 300, 400, "a", Some("ghost"), 9, 9));
    assert!(per_key(&history).is_illegal());
    history.pop();
    assert_linearizable(&history);
}

#[test]
fn observed_unknown_write_cannot_be_left_out() {
    let history = [
        put_unknown(1, 0, "a", "u"),
        get(2, 10, 20, "a", Some("u"), 2, 2),
        put(3, 30, 40, "a", "w", 3),
        get(2, 50, 60, "a", Some("u"), 2, 3),
    ];
    assert_illegal(&history);
}

/// A register whose writes may be lost: a write leads to either the old or the new value.
struct LossyRegister;

impl NondeterministicModel for LossyRegister {
    /// `Some(value)` writes, `None` reads.
    type Input = Option<u8>;
    /// The value read (ignored for writes).
    type Output = u8;
    type State = u8;

    fn init(&self) -> Vec<u8> {
        vec![0]
    }

    fn step(&self, state: &u8, input: &Option<u8>, output: &u8) -> Vec<u8> {
        match input {
            Some(value) => vec![*state, *value],
            None if state == output => vec![*state],
            None => Vec::new(),
        }
    }

    fn describe_operation(&self, input: &Option<u8>, output: &u8) -> String {
        match input {
            Some(value) => format!("write {value}"),
            None => format!("read -> {output}"),
        }
    }

    fn describe_state(&self, state: &u8) -> String {
        state.to_string()
    }
}

fn register(
    call_time: u64,
    return_time: u64,
    input: Option<u8>,
    output: u8,
) -> Operation<Option<u8>, u8> {
    Operation {
        client_id: 0,
        call_time,
        return_time: Some(return_time),
        input,
        output,
    }
}

#[test]
fn powerset_model_forks_and_resolves_states() {
    let lost = [register(0, 10, Some(1), 0), register(20, 30, None, 0)];
    assert_eq!(
        check_model(
            &PowersetModel(LossyRegister),
            &lost,
            &CheckOptions::default()
        )
        .unwrap(),
        CheckResult::Ok
    );
    let kept = [register(0, 10, Some(1), 0), register(20, 30, None, 1)];
    assert_eq!(
        check_model(
            &PowersetModel(LossyRegister),
            &kept,
            &CheckOptions::default()
        )
        .unwrap(),
        CheckResult::Ok
    );
    let undone = [
        register(0, 10, Some(1), 0),
        register(20, 30, None, 1),
        register(40, 50, None, 0),
    ];
    let CheckResult::Illegal(explanation) = check_model(
        &PowersetModel(LossyRegister),
        &undone,
        &CheckOptions::default(),
    )
    .unwrap() else {
        panic!("a write cannot be lost after it was read");
    };
    assert_eq!(explanation.longest_prefix, vec![0, 1]);
    assert_eq!(explanation.state_after_prefix, "one of {1}");
    let after_write = check_model(
        &PowersetModel(LossyRegister),
        &[register(0, 10, Some(1), 0), register(20, 30, None, 2)],
        &CheckOptions::default(),
    )
    .unwrap();
    let CheckResult::Illegal(explanation) = after_write else {
        panic!("2 was never written")
    };
    assert_eq!(explanation.state_after_prefix, "one of {0 | 1}");
}
