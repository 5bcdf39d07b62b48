//! Hand-built histories with leases: keys attached to a lease vanish with it, at one revision,
//! and never before the lease may expire.
//!
//! Times here are in hundredths of a second (`time_units_per_second: 100`), so a 5 s TTL
//! (every grant in `support` is 5 s) is 500 units and the numbers stay readable.

mod support;

use std::time::Duration;

use keel_check::{
    check_model, with_lease_expiries, CheckOptions, CheckResult, Explanation, KeyValueModel,
    LeaseExpiryBound, Model, Operation, Output,
};
use support::*;

const TIMEOUT: Duration = Duration::from_secs(10);

const LEASE: i64 = 0x7;

/// An exact clock counting hundredths of a second.
const BOUND: LeaseExpiryBound = LeaseExpiryBound {
    time_units_per_second: 100,
    clock_rate_per_mille_max: 1_000,
    clock_resolution: 0,
};

fn verdict(model: KeyValueModel, history: &[Operation]) -> CheckResult {
    let history = with_lease_expiries(history, &BOUND);
    check_model(&model, &history, &CheckOptions::with_timeout(TIMEOUT)).unwrap()
}

fn assert_linearizable(history: &[Operation]) {
    assert_eq!(
        verdict(KeyValueModel::per_key(), history),
        CheckResult::Ok,
        "per-key"
    );
    assert_eq!(
        verdict(KeyValueModel::global(), history),
        CheckResult::Ok,
        "global"
    );
}

fn assert_illegal(history: &[Operation]) -> Explanation {
    assert!(
        verdict(KeyValueModel::global(), history).is_illegal(),
        "global"
    );
    match verdict(KeyValueModel::per_key(), history) {
        CheckResult::Illegal(explanation) => explanation,
        other => panic!("per-key: expected illegal, got {other}"),
    }
}

/// Lease 7 granted at 0, keys "a" and "b" put with it (revisions 2 and 3), both read back.
fn leased_keys() -> Vec<Operation> {
    vec![
        grant(1, 0, 10, LEASE, 1),
        put_with_lease(1, 20, 30, "a", "1", LEASE, Output::Put { revision: 2 }),
        put_with_lease(1, 40, 50, "b", "2", LEASE, Output::Put { revision: 3 }),
        get(2, 60, 70, "a", Some("1"), 2, 3),
    ]
}

#[test]
fn leased_keys_vanish_together_once_their_lease_may_expire() {
    let mut history = leased_keys();
    // The lease may expire from 0 + 500: the keys may be gone at 520, at one revision.
    history.push(get(2, 520, 530, "a", None, 0, 4));
    history.push(get(3, 540, 550, "b", None, 0, 4));
    assert_linearizable(&history);
    // Or still be there: an expiry may come late.
    let mut late = leased_keys();
    late.push(get(2, 900, 910, "a", Some("1"), 2, 3));
    assert_linearizable(&late);
}

#[test]
fn a_key_vanishing_before_its_lease_may_expire_is_illegal() {
    let mut history = leased_keys();
    // Kept alive at 100: the lease may not expire before 600.
    history.push(keep_alive(1, 100, 105, LEASE, 5));
    history.push(get(2, 520, 530, "a", None, 0, 4));
    let explanation = assert_illegal(&history);
    let text = explanation.to_string();
    assert!(
        text.contains("lease 0x7 expires (at the earliest at its call time) -> unknown"),
        "{text}"
    );
    assert!(text.contains("[600, unknown]"), "{text}");
    assert!(
        text.contains("then #5 client 2 [520, 530] get \"a\" -> absent"),
        "{text}"
    );
    // A keep-alive that found nothing moves nothing.
    let mut history = leased_keys();
    history.push(keep_alive(1, 100, 105, LEASE, 0));
    assert!(verdict(KeyValueModel::per_key(), &history).is_illegal());
}

#[test]
fn a_faster_clock_allows_an_earlier_expiry() {
    let mut history = leased_keys();
    history.push(get(2, 420, 430, "a", None, 0, 4));
    assert!(verdict(KeyValueModel::per_key(), &history).is_illegal());
    // A clock up to 25% fast may count the 5 s in 4 s.
    let fast = LeaseExpiryBound {
        clock_rate_per_mille_max: 1_250,
        ..BOUND
    };
    let extended = with_lease_expiries(&history, &fast);
    let options = CheckOptions::with_timeout(TIMEOUT);
    assert_eq!(
        check_model(&KeyValueModel::per_key(), &extended, &options).unwrap(),
        CheckResult::Ok
    );
}

#[test]
fn revocation_deletes_every_attached_key_at_one_revision() {
    let mut history = leased_keys();
    history.push(revoke(
        1,
        80,
        90,
        LEASE,
        Output::LeaseRevoke { revision: 4 },
    ));
    history.push(get(2, 100, 110, "a", None, 0, 4));
    history.push(get(3, 100, 110, "b", None, 0, 4));
    assert_linearizable(&history);

    // Two revisions for one revocation: the global model counts them.
    let mut two_revisions = leased_keys();
    two_revisions.push(revoke(
        1,
        80,
        90,
        LEASE,
        Output::LeaseRevoke { revision: 5 },
    ));
    let options = CheckOptions::with_timeout(TIMEOUT);
    let extended = with_lease_expiries(&two_revisions, &BOUND);
    assert!(check_model(&KeyValueModel::global(), &extended, &options)
        .unwrap()
        .is_illegal());
}

#[test]
fn a_key_outliving_its_revoked_sibling_is_illegal() {
    // The revocation's answer never came, and one key is seen gone: the other must be too.
    let mut history = leased_keys();
    history.push(revoke_unknown(1, 80, LEASE));
    history.push(get(2, 100, 110, "a", None, 0, 4));
    history.push(get(3, 120, 130, "b", Some("2"), 3, 4));
    let explanation = assert_illegal(&history);
    // Both keys and the lease are one part: the revocation touches them all.
    assert_eq!(explanation.partition_count, 1);
    assert_eq!(explanation.operations.len(), history.len() + 1);
}

#[test]
fn a_key_put_again_without_its_lease_outlives_the_lease() {
    let mut history = leased_keys();
    history.push(put(1, 60, 75, "a", "3", 4));
    history.push(revoke(
        1,
        80,
        90,
        LEASE,
        Output::LeaseRevoke { revision: 5 },
    ));
    history.push(get(2, 100, 110, "a", Some("3"), 4, 5));
    history.push(get(2, 100, 110, "b", None, 0, 5));
    assert_linearizable(&history);
}

#[test]
fn requests_naming_a_revoked_lease_find_nothing() {
    let revoked = || {
        let mut history = leased_keys();
        history.push(revoke(
            1,
            80,
            90,
            LEASE,
            Output::LeaseRevoke { revision: 4 },
        ));
        history
    };
    let mut history = revoked();
    history.push(put_with_lease(
        1,
        100,
        110,
        "c",
        "3",
        LEASE,
        Output::LeaseNotFound,
    ));
    history.push(keep_alive(1, 120, 130, LEASE, 0));
    history.push(revoke(1, 140, 150, LEASE, Output::LeaseNotFound));
    assert_linearizable(&history);

    let mut put_after = revoked();
    put_after.push(put_with_lease(
        1,
        100,
        110,
        "c",
        "3",
        LEASE,
        Output::Put { revision: 5 },
    ));
    assert_illegal(&put_after);
    let mut kept_alive_after = revoked();
    kept_alive_after.push(keep_alive(1, 100, 110, LEASE, 5));
    assert_illegal(&kept_alive_after);
    // A put refused while the lease still exists is just as wrong.
    let mut refused_early = leased_keys();
    refused_early.push(put_with_lease(
        1,
        60,
        70,
        "c",
        "3",
        LEASE,
        Output::LeaseNotFound,
    ));
    assert_illegal(&refused_early);
}

#[test]
fn unknown_grant_used_by_an_answered_put_took_effect() {
    let history = [
        Operation {
            client_id: 1,
            call_time: 0,
            return_time: None,
            input: keel_check::Input::LeaseGrant {
                lease_id: LEASE,
                ttl_seconds: 5,
            },
            output: Output::Unknown,
        },
        put_with_lease(1, 20, 30, "a", "1", LEASE, Output::Put { revision: 2 }),
        get(2, 40, 50, "a", Some("1"), 2, 2),
    ];
    assert_linearizable(&history);
    // Prepared, the grant must take effect by the put's return.
    let prepared = KeyValueModel::per_key().prepare(history.to_vec());
    assert_eq!(prepared[0].return_time, Some(30));
}

#[test]
fn leases_join_their_keys_into_one_part_and_nothing_else() {
    let mut history = leased_keys();
    history.push(put(3, 0, 10, "other", "x", 2));
    history.push(grant(3, 0, 10, 0x8, 1));
    let extended = with_lease_expiries(&history, &BOUND);
    let parts = KeyValueModel::per_key().partition(&extended);
    // "a", "b" and lease 7 (with its expiry); "other"; lease 8 (with its expiry).
    assert_eq!(parts, vec![vec![0, 1, 2, 3, 6], vec![4], vec![5, 7]]);
}
