//! Lease expiry as a history operation: when a lease may expire, and the operation that
//! lets the search place its expiry.
//!
//! A lease's keys vanish when it is revoked (a client's request, in the history) or when it
//! expires, which no client asks for: the store's clock decides. So that the linearizability
//! search can explain keys vanishing without a revocation, [`with_lease_expiries`] adds one
//! [`Input::LeaseExpire`] per lease, with an unknown outcome: it may take effect at any time
//! after its call, or never. Its call time is the earliest instant the lease may expire:
//!
//! ```text
//! anchor + guaranteed lifetime(TTL)
//! ```
//!
//! where the anchor is the call time of the lease's last acknowledged keep-alive (answered
//! with a TTL above 0), or of its grant when no keep-alive was acknowledged, and the
//! guaranteed lifetime is the TTL as the store's clock counts it, shortened by how much
//! faster than the history's clock that clock may run ([`LeaseExpiryBound`]). So:
//!
//! - a key that vanishes **before** its lease may expire, with no revocation or delete to
//!   explain it, makes the history illegal: the store expired the lease early, or deleted
//!   the key without cause;
//! - a key that vanishes after it is explained by the expiry, however late: how long a lease
//!   may outlive its TTL depends on leader changes and is not checked here;
//! - the expiry deletes every key attached to the lease at one revision, like a revocation,
//!   so a key that outlives a sibling's expiry is illegal too.
//!
//! The anchor is the call, not the answer, of the keep-alive: a store that counts the TTL
//! from when the request arrived (or later) gives at least that much, and a client can only
//! rely on when it asked. A keep-alive whose answer never came, or that failed, is left out
//! of the history: it may have extended the lease, which the open-ended expiry allows, and
//! it cannot have shortened it.
//!
//! A lease revoked by an acknowledged revocation gets no expiry: either order of the two
//! leaves the same state (the revocation found the lease, so the expiry came after it and
//! found nothing), and leaving it out spares the search an unknown operation.
//!
//! The expiry is also called no earlier than the last call of a request that found the
//! lease alive (a put with it that succeeded, a keep-alive that found it): such a request
//! took effect after its call, and the expiry after it, so this removes only orders that
//! the model would reject anyway. It matters for speed: a lease may outlive its earliest
//! expiry and still be used, and without it the search would try ending every such lease
//! early, and every subset of them, before finding the orders that work.

use std::collections::BTreeMap;

use crate::history::{Input, Operation, Output};

/// How early a lease may legally expire, relative to its TTL.
///
/// The store counts a TTL with its own clock (keel: the leader's ticks). If that clock can
/// run faster than the clock the history's times come from, the TTL can pass in less real
/// time: the guaranteed lifetime is the TTL divided by the fastest rate, minus the clock's
/// resolution (a tick may come at once after the keep-alive arrives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseExpiryBound {
    /// History time units in one second of TTL: 1,000,000,000 for nanoseconds.
    pub time_units_per_second: u64,
    /// The fastest the store's clock may run, in parts per thousand of the history's clock:
    /// 1,000 for a clock that never runs fast, 1,250 for one up to 25% fast.
    pub clock_rate_per_mille_max: u64,
    /// Subtracted from the lifetime: the resolution of the store's clock (one tick), in
    /// history time units.
    pub clock_resolution: u64,
}

impl LeaseExpiryBound {
    /// A store whose clock is exact, for histories timed in nanoseconds.
    pub const fn exact_nanoseconds() -> LeaseExpiryBound {
        LeaseExpiryBound {
            time_units_per_second: 1_000_000_000,
            clock_rate_per_mille_max: 1_000,
            clock_resolution: 0,
        }
    }

    /// The least time, in history time units, a lease of `ttl_seconds` lives after its
    /// anchor.
    pub fn guaranteed_lifetime(&self, ttl_seconds: i64) -> u64 {
        let ttl = u128::from(ttl_seconds.max(0) as u64) * u128::from(self.time_units_per_second);
        let lifetime = ttl * 1_000 / u128::from(self.clock_rate_per_mille_max.max(1));
        u64::try_from(lifetime)
            .unwrap_or(u64::MAX)
            .saturating_sub(self.clock_resolution)
    }
}

/// What the history says about one lease.
#[derive(Default)]
struct LeaseFacts {
    ttl_seconds: Option<i64>,
    /// The call time of the grant, or of the last acknowledged keep-alive.
    anchor: Option<u64>,
    /// The last call of a request that found the lease alive.
    last_found_alive: u64,
    revoked: bool,
    already_has_expiry: bool,
}

/// The history plus one [`Input::LeaseExpire`] per granted lease (see the module
/// documentation), appended after the recorded operations in lease order. Leases revoked by
/// an acknowledged revocation, and leases whose expiry the history already holds, get none.
pub fn with_lease_expiries(history: &[Operation], bound: &LeaseExpiryBound) -> Vec<Operation> {
    let mut leases: BTreeMap<i64, LeaseFacts> = BTreeMap::new();
    for operation in history {
        let Some(lease_id) = operation.input.lease_id() else {
            continue;
        };
        let facts = leases.entry(lease_id).or_default();
        let anchor = match (&operation.input, &operation.output) {
            (Input::LeaseGrant { ttl_seconds, .. }, _) => {
                facts.ttl_seconds = Some(*ttl_seconds);
                Some(operation.call_time)
            }
            (Input::LeaseKeepAlive { .. }, Output::LeaseKeepAlive { ttl_seconds }) => {
                (*ttl_seconds > 0).then_some(operation.call_time)
            }
            (Input::PutWithLease { .. }, Output::Put { .. }) => {
                facts.last_found_alive = facts.last_found_alive.max(operation.call_time);
                None
            }
            (Input::LeaseRevoke { .. }, Output::LeaseRevoke { .. }) => {
                facts.revoked = true;
                None
            }
            (Input::LeaseExpire { .. }, _) => {
                facts.already_has_expiry = true;
                None
            }
            _ => None,
        };
        if let Some(anchor) = anchor {
            facts.anchor = Some(facts.anchor.map_or(anchor, |known| known.max(anchor)));
        }
    }
    let mut extended = history.to_vec();
    for (lease_id, facts) in leases {
        let (Some(ttl_seconds), Some(anchor)) = (facts.ttl_seconds, facts.anchor) else {
            // Never granted in this history: the lease cannot exist, nothing can expire.
            continue;
        };
        if facts.revoked || facts.already_has_expiry {
            continue;
        }
        let earliest = anchor.saturating_add(bound.guaranteed_lifetime(ttl_seconds));
        extended.push(Operation {
            client_id: 0,
            call_time: earliest.max(facts.last_found_alive),
            return_time: None,
            input: Input::LeaseExpire { lease_id },
            output: Output::Unknown,
        });
    }
    extended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operation(call_time: u64, return_time: u64, input: Input, output: Output) -> Operation {
        Operation {
            client_id: 1,
            call_time,
            return_time: Some(return_time),
            input,
            output,
        }
    }

    #[test]
    fn lifetime_is_shortened_by_the_fastest_clock_and_its_resolution() {
        let bound = LeaseExpiryBound {
            time_units_per_second: 1_000,
            clock_rate_per_mille_max: 1_250,
            clock_resolution: 80,
        };
        assert_eq!(bound.guaranteed_lifetime(5), 5_000 * 4 / 5 - 80);
        assert_eq!(bound.guaranteed_lifetime(0), 0);
        assert_eq!(
            LeaseExpiryBound::exact_nanoseconds().guaranteed_lifetime(2),
            2_000_000_000
        );
    }

    #[test]
    fn expiry_is_anchored_at_the_last_acknowledged_keep_alive() {
        let bound = LeaseExpiryBound {
            time_units_per_second: 100,
            ..LeaseExpiryBound::exact_nanoseconds()
        };
        let history = vec![
            operation(
                10,
                20,
                Input::LeaseGrant {
                    lease_id: 7,
                    ttl_seconds: 3,
                },
                Output::LeaseGrant { revision: 1 },
            ),
            operation(
                100,
                110,
                Input::LeaseKeepAlive { lease_id: 7 },
                Output::LeaseKeepAlive { ttl_seconds: 3 },
            ),
            // Not found: it anchors nothing.
            operation(
                500,
                510,
                Input::LeaseKeepAlive { lease_id: 7 },
                Output::LeaseKeepAlive { ttl_seconds: 0 },
            ),
            // Never granted here: no expiry.
            operation(
                1,
                2,
                Input::LeaseKeepAlive { lease_id: 8 },
                Output::LeaseKeepAlive { ttl_seconds: 0 },
            ),
        ];
        let extended = with_lease_expiries(&history, &bound);
        assert_eq!(extended.len(), history.len() + 1);
        let expiry = extended.last().unwrap();
        assert_eq!(expiry.input, Input::LeaseExpire { lease_id: 7 });
        assert_eq!(expiry.call_time, 100 + 300);
        assert_eq!(expiry.return_time, None);
        assert_eq!(expiry.output, Output::Unknown);
    }

    #[test]
    fn expiry_comes_no_earlier_than_a_put_that_found_the_lease() {
        let bound = LeaseExpiryBound {
            time_units_per_second: 100,
            ..LeaseExpiryBound::exact_nanoseconds()
        };
        let history = vec![
            operation(
                0,
                10,
                Input::LeaseGrant {
                    lease_id: 7,
                    ttl_seconds: 3,
                },
                Output::LeaseGrant { revision: 1 },
            ),
            // The lease outlived its earliest expiry (300) and was still used at 350.
            operation(
                350,
                360,
                Input::PutWithLease {
                    key: "k".into(),
                    value: "v".into(),
                    lease_id: 7,
                },
                Output::Put { revision: 2 },
            ),
        ];
        let extended = with_lease_expiries(&history, &bound);
        assert_eq!(extended.last().unwrap().call_time, 350);
    }

    #[test]
    fn revoked_leases_get_no_expiry() {
        let history = vec![
            operation(
                0,
                1,
                Input::LeaseGrant {
                    lease_id: 7,
                    ttl_seconds: 3,
                },
                Output::LeaseGrant { revision: 1 },
            ),
            operation(
                2,
                3,
                Input::LeaseRevoke { lease_id: 7 },
                Output::LeaseRevoke { revision: 1 },
            ),
        ];
        let extended = with_lease_expiries(&history, &LeaseExpiryBound::exact_nanoseconds());
        assert_eq!(extended, history);
    }
}
