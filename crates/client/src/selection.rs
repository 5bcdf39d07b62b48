//! Endpoint selection: which member the next attempt of a request goes to, as
//! a pure function of what the client knows about each endpoint.
//!
//! Writes (and keep-alives, elections: everything the leader answers) go to
//! the leader when it is known and reachable, which saves the follower's
//! forwarding hop; everything else goes to the preferred endpoint (the last
//! one that answered), so a client keeps one warm connection. A retry goes to
//! an endpoint this request has not tried yet, if one is available: a member
//! that just failed is the least likely to answer next.

/// What a request needs of the member it is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The leader if known (writes, keep-alives, elections); any member otherwise.
    Leader,
    /// Any healthy member (linearizable and serializable reads, status, watches).
    Any,
}

/// What the selection knows of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its circuit breaker would let a request through now.
    pub available: bool,
    /// It is the member the cluster last reported as leader.
    pub leader: bool,
    /// This request already tried it.
    pub tried: bool,
}

/// Picks the endpoint for the next attempt, or `None` if every breaker is
/// open. `preferred` is where the rotation starts for [`Route::Any`] (and for
/// [`Route::Leader`] when no leader is known).
pub fn choose(candidates: &[Candidate], route: Route, preferred: usize) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    if route == Route::Leader {
        if let Some(leader) = candidates
            .iter()
            .position(|candidate| candidate.leader && candidate.available && !candidate.tried)
        {
            return Some(leader);
        }
    }
    let rotation = (0..candidates.len()).map(|offset| (preferred + offset) % candidates.len());
    let mut first_available_tried = None;
    for index in rotation {
        let candidate = candidates[index];
        if !candidate.available {
            continue;
        }
        if !candidate.tried {
            return Some(index);
        }
        first_available_tried.get_or_insert(index);
    }
    // Every available endpoint was tried already: go round again (the
    // backoff between attempts gives a member time to recover or elect).
    first_available_tried
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(text: &str) -> Vec<Candidate> {
        // One word per endpoint: letters a (available), l (leader), t (tried);
        // "-" for none.
        text.split_whitespace()
            .map(|word| Candidate {
                available: word.contains('a'),
                leader: word.contains('l'),
                tried: word.contains('t'),
            })
            .collect()
    }

    #[test]
    fn writes_go_to_the_leader_when_it_is_available() {
        assert_eq!(choose(&candidates("a al a"), Route::Leader, 0), Some(1));
        assert_eq!(choose(&candidates("a al a"), Route::Any, 0), Some(0));
        assert_eq!(choose(&candidates("a al a"), Route::Any, 2), Some(2));
    }

    #[test]
    fn an_unavailable_or_tried_leader_is_passed_over() {
        assert_eq!(choose(&candidates("a l a"), Route::Leader, 1), Some(2));
        assert_eq!(choose(&candidates("a alt a"), Route::Leader, 1), Some(2));
        assert_eq!(choose(&candidates("a alt a"), Route::Leader, 0), Some(0));
    }

    #[test]
    fn retries_prefer_endpoints_not_yet_tried() {
        assert_eq!(choose(&candidates("at a a"), Route::Any, 0), Some(1));
        assert_eq!(choose(&candidates("at at a"), Route::Any, 0), Some(2));
        // All tried: round again from the preferred one.
        assert_eq!(choose(&candidates("at at at"), Route::Any, 1), Some(1));
        assert_eq!(choose(&candidates("- at at"), Route::Any, 0), Some(1));
    }

    #[test]
    fn no_endpoint_when_every_breaker_is_open() {
        assert_eq!(choose(&candidates("- l t"), Route::Leader, 0), None);
        assert_eq!(choose(&[], Route::Any, 0), None);
    }

    #[test]
    fn the_preferred_index_wraps_around() {
        assert_eq!(choose(&candidates("a a a"), Route::Any, 5), Some(2));
    }
}
