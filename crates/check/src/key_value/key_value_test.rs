//! Unit tests of the key-value model's steps, partitions, preparation and descriptions.

use super::*;

fn put(key: &str, value: &str) -> Input {
    Input::Put {
        key: key.into(),
        value: value.into(),
    }
}

fn get(key: &str) -> Input {
    Input::Get {
        key: key.into(),
        serializable: false,
    }
}

fn read(value: Option<&str>, mod_revision: u64, revision: u64) -> Output {
    Output::Get {
        value: value.map(Bytes::from),
        mod_revision,
        revision,
    }
}

/// Runs `steps` from the initial state, returning the final state or the first failing
/// step's position.
fn run(model: KeyValueModel, steps: &[(Input, Output)]) -> Result<KeyValueState, usize> {
    let mut state = model.init();
    for (position, (input, output)) in steps.iter().enumerate() {
        state = model.step(&state, input, output).ok_or(position)?;
    }
    Ok(state)
}

#[test]
fn global_model_requires_the_exact_next_revision() {
    let model = KeyValueModel::global();
    assert!(run(model, &[(put("a", "1"), Output::Put { revision: 2 })]).is_ok());
    assert_eq!(
        run(model, &[(put("a", "1"), Output::Put { revision: 3 })]),
        Err(0)
    );
    assert_eq!(run(model, &[(get("a"), read(None, 0, 2))]), Err(0));
    assert!(run(model, &[(get("a"), read(None, 0, 1))]).is_ok());
}

#[test]
fn per_key_model_bounds_revisions_from_below() {
    let model = KeyValueModel::per_key();
    let steps = [
        (put("a", "1"), Output::Put { revision: 5 }),
        (get("a"), read(Some("1"), 5, 9)),
        (put("a", "2"), Output::Put { revision: 10 }),
    ];
    assert!(run(model, &steps).is_ok());
    let backwards = [
        (put("a", "1"), Output::Put { revision: 5 }),
        (get("a"), read(Some("1"), 5, 9)),
        (put("a", "2"), Output::Put { revision: 9 }),
    ];
    assert_eq!(run(model, &backwards), Err(2));
}

#[test]
fn per_key_model_learns_the_revision_of_an_unknown_write() {
    let model = KeyValueModel::per_key();
    let learned = [
        (put("a", "1"), Output::Put { revision: 5 }),
        (put("a", "2"), Output::Unknown),
        (get("a"), read(Some("2"), 7, 7)),
        (get("a"), read(Some("2"), 7, 8)),
    ];
    assert!(run(model, &learned).is_ok());
    let contradicted = [
        (put("a", "1"), Output::Put { revision: 5 }),
        (put("a", "2"), Output::Unknown),
        (get("a"), read(Some("2"), 7, 7)),
        (get("a"), read(Some("2"), 8, 8)),
    ];
    assert_eq!(run(model, &contradicted), Err(3));
    let too_old = [
        (put("a", "1"), Output::Put { revision: 5 }),
        (put("a", "2"), Output::Unknown),
        (get("a"), read(Some("2"), 5, 7)),
    ];
    assert_eq!(run(model, &too_old), Err(2));
}

#[test]
fn delete_and_compare_and_swap_follow_the_current_value() {
    for model in [KeyValueModel::per_key(), KeyValueModel::global()] {
        let steps = [
            (
                Input::CompareAndSwap {
                    key: "a".into(),
                    expected: None,
                    new_value: "1".into(),
                },
                Output::CompareAndSwap {
                    succeeded: true,
                    revision: 2,
                },
            ),
            (
                Input::CompareAndSwap {
                    key: "a".into(),
                    expected: None,
                    new_value: "2".into(),
                },
                Output::CompareAndSwap {
                    succeeded: false,
                    revision: 2,
                },
            ),
            (
                Input::Delete { key: "a".into() },
                Output::Delete {
                    deleted: 1,
                    revision: 3,
                },
            ),
            (
                Input::Delete { key: "a".into() },
                Output::Delete {
                    deleted: 0,
                    revision: 3,
                },
            ),
            (get("a"), read(None, 0, 3)),
        ];
        let state = run(model, &steps).unwrap();
        assert!(state.keys.is_empty());
        let wrong_outcome = [(
            Input::CompareAndSwap {
                key: "a".into(),
                expected: Some("1".into()),
                new_value: "2".into(),
            },
            Output::CompareAndSwap {
                succeeded: true,
                revision: 2,
            },
        )];
        assert_eq!(run(model, &wrong_outcome), Err(0));
    }
}

#[test]
fn mod_revision_above_revision_is_impossible() {
    let model = KeyValueModel::per_key();
    let steps = [
        (put("a", "1"), Output::Put { revision: 5 }),
        (get("a"), read(Some("1"), 5, 4)),
    ];
    assert_eq!(run(model, &steps), Err(1));
}

#[test]
fn partition_groups_by_key_and_skips_unconstraining_reads() {
    let operation = |input: Input, output: Output| Operation {
        client_id: 0,
        call_time: 0,
        return_time: (output != Output::Unknown).then_some(1),
        input,
        output,
    };
    let history = [
        operation(put("b", "1"), Output::Put { revision: 2 }),
        operation(put("a", "1"), Output::Put { revision: 3 }),
        operation(get("b"), Output::Unknown),
        operation(
            Input::Get {
                key: "a".into(),
                serializable: true,
            },
            read(None, 0, 1),
        ),
        operation(get("b"), read(Some("1"), 2, 3)),
    ];
    assert_eq!(
        KeyValueModel::per_key().partition(&history),
        vec![vec![1], vec![0, 4]]
    );
    assert_eq!(
        KeyValueModel::global().partition(&history),
        vec![vec![0, 1, 4]]
    );
}

#[test]
fn prepare_bounds_observed_writes_and_erases_unread_values() {
    let operation = |call_time, return_time, input, output| Operation {
        client_id: 0,
        call_time,
        return_time,
        input,
        output,
    };
    let part = vec![
        operation(0, None, put("a", "seen"), Output::Unknown),
        operation(1, None, put("a", "unread"), Output::Unknown),
        operation(2, None, put("a", "expected"), Output::Unknown),
        operation(3, None, put("a", "twice"), Output::Unknown),
        operation(4, Some(5), put("a", "twice"), Output::Put { revision: 2 }),
        operation(10, Some(20), get("a"), read(Some("seen"), 3, 3)),
        operation(12, Some(15), get("a"), read(Some("twice"), 2, 2)),
        operation(
            30,
            Some(40),
            Input::CompareAndSwap {
                key: "a".into(),
                expected: Some("expected".into()),
                new_value: "x".into(),
            },
            Output::CompareAndSwap {
                succeeded: false,
                revision: 4,
            },
        ),
    ];
    let prepared = KeyValueModel::per_key().prepare(part.clone());
    // Observed, and its only writer: it took effect before the read returned.
    assert_eq!(prepared[0].return_time, Some(20));
    // Never compared: the value becomes the placeholder.
    assert_eq!(
        prepared[1].input,
        put("a", "<a value nobody reads>"),
        "{:?}",
        prepared[1]
    );
    // Compared by a compare-and-swap, or written twice: left alone.
    assert_eq!(prepared[2], part[2]);
    assert_eq!(prepared[3], part[3]);
    assert_eq!(prepared[4..], part[4..]);
}

#[test]
fn placeholder_differs_from_every_value() {
    let part = vec![Operation {
        client_id: 0,
        call_time: 0,
        return_time: Some(1),
        input: put("a", "<a value nobody reads>"),
        output: Output::Put { revision: 2 },
    }];
    assert_eq!(
        unread_value_placeholder(&part),
        Bytes::from("<a value nobody reads>'")
    );
}

#[test]
fn descriptions_are_readable() {
    let model = KeyValueModel::per_key();
    assert_eq!(
        model.describe_operation(&put("a", "1"), &Output::Put { revision: 2 }),
        "put \"a\" = \"1\" -> revision 2"
    );
    let state = run(model, &[(put("a", "1"), Output::Unknown)]).unwrap();
    assert_eq!(
        model.describe_state(&state),
        "revision at least 0; \"a\" = \"1\" (mod_revision above 0)"
    );
    assert_eq!(
        KeyValueModel::global().describe_state(&KeyValueModel::global().init()),
        "revision 1; no keys"
    );
}

#[test]
fn leases_end_with_their_keys_and_are_described() {
    let model = KeyValueModel::per_key();
    let grant = Input::LeaseGrant {
        lease_id: 0x7,
        ttl_seconds: 5,
    };
    let put_with_lease = |key: &str| Input::PutWithLease {
        key: key.into(),
        value: "v".into(),
        lease_id: 0x7,
    };
    let state = run(
        model,
        &[
            (grant.clone(), Output::LeaseGrant { revision: 1 }),
            (put_with_lease("a"), Output::Put { revision: 2 }),
            (put_with_lease("b"), Output::Unknown),
        ],
    )
    .unwrap();
    assert_eq!(
        model.describe_state(&state),
        "revision at least 2; \"a\" = \"v\" (mod_revision 2, lease 0x7); \"b\" = \"v\" \
         (mod_revision above 2, lease 0x7); lease 0x7 (ttl 5 s)"
    );
    // The expiry ends the lease and both keys; a second grant of the id is refused.
    let expire = Input::LeaseExpire { lease_id: 0x7 };
    let after = model.step(&state, &expire, &Output::Unknown).unwrap();
    assert_eq!(model.describe_state(&after), "revision at least 2; no keys");
    assert!(model
        .step(&state, &grant, &Output::LeaseGrant { revision: 2 })
        .is_none());
    assert_eq!(
        model.describe_operation(&put_with_lease("a"), &Output::LeaseNotFound),
        "put \"a\" = \"v\" with lease 0x7 -> requested lease not found"
    );
    // A revocation that deleted keys must be answered above every revision seen.
    let revoke = Input::LeaseRevoke { lease_id: 0x7 };
    assert!(model
        .step(&state, &revoke, &Output::LeaseRevoke { revision: 2 })
        .is_none());
    assert!(model
        .step(&state, &revoke, &Output::LeaseRevoke { revision: 3 })
        .is_some());
}
