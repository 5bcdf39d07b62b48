//! Range options: key ranges, limit, count, sorting, keys_only, count_only and the
//! revision filters, in the order etcd's applier applies them.

use keel_types::etcdserverpb::range_request::{SortOrder, SortTarget};

use super::*;
use crate::mvcc::KeySpaceError;

/// Keys chosen so that each sort target orders them differently:
///
/// | key | value | create | mod | version |
/// |-----|-------|--------|-----|---------|
/// | a   | "c"   | 4      | 4   | 1       |
/// | b   | "a"   | 2      | 7   | 3       |
/// | c   | "b"   | 3      | 5   | 2       |
/// | d   | "d"   | 8      | 8   | 1       |
fn sortable() -> KeySpace {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "b", "x"); // 2
    put(&mut key_space, "c", "x"); // 3
    put(&mut key_space, "a", "c"); // 4
    put(&mut key_space, "c", "b"); // 5
    put(&mut key_space, "b", "x"); // 6
    put(&mut key_space, "b", "a"); // 7
    put(&mut key_space, "d", "d"); // 8
    key_space
}

fn sorted_keys(key_space: &KeySpace, target: SortTarget, order: SortOrder) -> Vec<String> {
    let request = RangeRequest {
        sort_target: target as i32,
        sort_order: order as i32,
        ..range_request("a", "z")
    };
    keys_of(&range(key_space, &request).kvs)
}

#[test]
fn key_range_conventions() {
    let mut key_space = KeySpace::new();
    for key in ["a", "ab", "abc", "b", "c"] {
        put(&mut key_space, key, "v");
    }
    let keys = |key: &str, range_end: &str| {
        keys_of(&range(&key_space, &range_request(key, range_end)).kvs)
    };
    // An empty range_end names one key.
    assert_eq!(keys("ab", ""), ["ab"]);
    assert_eq!(keys("zz", ""), Vec::<String>::new());
    // A prefix: range_end is the prefix with its last byte incremented.
    assert_eq!(keys("ab", "ac"), ["ab", "abc"]);
    assert_eq!(keys("a", "b"), ["a", "ab", "abc"]);
    // "\0" means every key at or after the key.
    assert_eq!(keys("b", "\0"), ["b", "c"]);
    // "\0" to "\0" is every key.
    assert_eq!(keys("\0", "\0"), ["a", "ab", "abc", "b", "c"]);
    // A range_end at or before the key is an empty range, not an error.
    assert_eq!(keys("c", "a"), Vec::<String>::new());
    assert_eq!(keys("b", "b"), Vec::<String>::new());
}

#[test]
fn limit_sets_more_and_count_ignores_the_limit() {
    let mut key_space = KeySpace::new();
    for key in ["a", "b", "c", "d", "e"] {
        put(&mut key_space, key, "v");
    }
    let with_limit = |limit: i64| {
        let request = RangeRequest {
            limit,
            ..range_request("a", "z")
        };
        range(&key_space, &request)
    };
    let limited = with_limit(2);
    assert_eq!(keys_of(&limited.kvs), ["a", "b"]);
    assert!(limited.more);
    assert_eq!(limited.count, 5);

    let exact = with_limit(5);
    assert_eq!(exact.kvs.len(), 5);
    assert!(!exact.more);
    assert_eq!(exact.count, 5);

    let beyond = with_limit(10);
    assert_eq!(beyond.kvs.len(), 5);
    assert!(!beyond.more);

    // Zero and negative limits mean no limit.
    assert_eq!(with_limit(0).kvs.len(), 5);
    assert_eq!(with_limit(-1).kvs.len(), 5);
    assert!(!with_limit(-1).more);
}

#[test]
fn count_only_returns_the_count_and_no_key_values() {
    let mut key_space = KeySpace::new();
    for key in ["a", "b", "c"] {
        put(&mut key_space, key, "v");
    }
    delete(&mut key_space, "b", "");
    let request = RangeRequest {
        count_only: true,
        limit: 1,
        ..range_request("a", "z")
    };
    let response = range(&key_space, &request);
    assert_eq!(response.count, 2);
    assert_eq!(response.kvs, vec![]);
    assert!(!response.more);
    // count_only at a past revision counts the keys of then.
    let historical = RangeRequest {
        revision: 4,
        ..request
    };
    assert_eq!(range(&key_space, &historical).count, 3);
}

#[test]
fn keys_only_drops_values() {
    let mut key_space = KeySpace::new();
    put(&mut key_space, "a", "value");
    let request = RangeRequest {
        keys_only: true,
        ..range_request("a", "")
    };
    assert_eq!(range(&key_space, &request).kvs, vec![kv("a", "", 2, 2, 1)]);
}

#[test]
fn sort_by_each_target_and_order() {
    let key_space = sortable();
    let cases = [
        (SortTarget::Key, SortOrder::None, ["a", "b", "c", "d"]),
        (SortTarget::Key, SortOrder::Ascend, ["a", "b", "c", "d"]),
        (SortTarget::Key, SortOrder::Descend, ["d", "c", "b", "a"]),
        (SortTarget::Value, SortOrder::Ascend, ["b", "c", "a", "d"]),
        (SortTarget::Value, SortOrder::Descend, ["d", "a", "c", "b"]),
        (SortTarget::Create, SortOrder::Ascend, ["b", "c", "a", "d"]),
        (SortTarget::Create, SortOrder::Descend, ["d", "a", "c", "b"]),
        (SortTarget::Mod, SortOrder::Ascend, ["a", "c", "b", "d"]),
        (SortTarget::Mod, SortOrder::Descend, ["d", "b", "c", "a"]),
        // Versions tie (a and d are both at 1): ties stay in key order both ways.
        (SortTarget::Version, SortOrder::Ascend, ["a", "d", "c", "b"]),
        (
            SortTarget::Version,
            SortOrder::Descend,
            ["b", "c", "a", "d"],
        ),
        // A target other than KEY with no order sorts ascending.
        (SortTarget::Value, SortOrder::None, ["b", "c", "a", "d"]),
        (SortTarget::Mod, SortOrder::None, ["a", "c", "b", "d"]),
    ];
    for (target, order, expected) in cases {
        assert_eq!(
            sorted_keys(&key_space, target, order),
            expected,
            "{target:?} {order:?}"
        );
    }
}

#[test]
fn sorting_fetches_everything_before_applying_the_limit() {
    let key_space = sortable();
    let request = RangeRequest {
        sort_target: SortTarget::Mod as i32,
        sort_order: SortOrder::Descend as i32,
        limit: 2,
        ..range_request("a", "z")
    };
    let response = range(&key_space, &request);
    assert_eq!(keys_of(&response.kvs), ["d", "b"]);
    assert!(response.more);
    assert_eq!(response.count, 4);
}

#[test]
fn sort_target_without_order_sorts_only_the_first_limit_plus_one_keys() {
    // etcd decides whether to fetch everything from sort_order alone, so with
    // sort_order NONE it fetches limit + 1 keys in key order and then sorts those
    // ascending by the target: here a, b, c by mod revision, then truncates to 2.
    let key_space = sortable();
    let request = RangeRequest {
        sort_target: SortTarget::Mod as i32,
        limit: 2,
        ..range_request("a", "z")
    };
    let response = range(&key_space, &request);
    assert_eq!(keys_of(&response.kvs), ["a", "c"]);
    assert!(response.more);
    assert_eq!(response.count, 4);
}

#[test]
fn revision_filters_prune_before_the_limit_and_do_not_change_the_count() {
    let key_space = sortable();
    let filtered = |request: RangeRequest| {
        let response = range(&key_space, &request);
        assert_eq!(response.count, 4, "count ignores the filters");
        (keys_of(&response.kvs), response.more)
    };
    let base = range_request("a", "z");
    assert_eq!(
        filtered(RangeRequest {
            min_mod_revision: 5,
            ..base.clone()
        }),
        (vec!["b".to_owned(), "c".to_owned(), "d".to_owned()], false)
    );
    assert_eq!(
        filtered(RangeRequest {
            max_mod_revision: 5,
            ..base.clone()
        }),
        (vec!["a".to_owned(), "c".to_owned()], false)
    );
    assert_eq!(
        filtered(RangeRequest {
            min_create_revision: 3,
            max_create_revision: 4,
            ..base.clone()
        }),
        (vec!["a".to_owned(), "c".to_owned()], false)
    );
    // The limit counts only what the filters let through.
    assert_eq!(
        filtered(RangeRequest {
            min_mod_revision: 5,
            limit: 1,
            ..base.clone()
        }),
        (vec!["b".to_owned()], true)
    );
    assert_eq!(
        filtered(RangeRequest {
            min_mod_revision: 5,
            max_mod_revision: 7,
            limit: 2,
            ..base
        }),
        (vec!["b".to_owned(), "c".to_owned()], false)
    );
}

#[test]
fn filters_apply_to_historical_reads() {
    let key_space = sortable();
    // At revision 5: a(mod 4), b(mod 2), c(mod 5).
    let request = RangeRequest {
        revision: 5,
        min_mod_revision: 4,
        ..range_request("a", "z")
    };
    let response = range(&key_space, &request);
    assert_eq!(keys_of(&response.kvs), ["a", "c"]);
    assert_eq!(response.count, 3);
    assert_eq!(revision_of(&response.header), 8);
}

#[test]
fn invalid_requests_are_refused() {
    let key_space = sortable();
    let empty_key = key_space.range(&range_request("", "z")).unwrap_err();
    assert_eq!(empty_key, KeySpaceError::EmptyKey);
    assert_eq!(empty_key.to_string(), "etcdserver: key is not provided");

    let bad_order = RangeRequest {
        sort_order: 3,
        ..range_request("a", "")
    };
    let error = key_space.range(&bad_order).unwrap_err();
    assert_eq!(error, KeySpaceError::InvalidSortOption);
    assert_eq!(error.to_string(), "etcdserver: invalid sort option");
    let bad_target = RangeRequest {
        sort_target: 5,
        ..range_request("a", "")
    };
    assert_eq!(
        key_space.range(&bad_target),
        Err(KeySpaceError::InvalidSortOption)
    );
}
