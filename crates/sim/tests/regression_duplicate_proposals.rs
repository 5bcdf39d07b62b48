//! Regression: with `--duplicate-proposals` (seeds 27, 28, … of 0..1000; about 1 seed in
//! 8), the history is not linearizable: a put acknowledged at revision 144 is read back
//! with mod_revision 145 and the same (unique) value.
//!
//! A follower forwards a client's proposal to the leader as a raft `MsgPropose`. When that
//! message is delivered twice, the leader appends both copies and every member applies the
//! write twice: the value is written at two revisions, and the second copy may land after
//! (and silently undo) another client's acknowledged write. keel's TCP transport never
//! duplicates a message, so this is latent today; it becomes real with any transport or
//! proxy that resends after a reconnect, and it is the same hazard a client retry has
//! (§6.3 of Ongaro's thesis: the state machine must filter duplicate requests).
//!
//! Proposed fix (core): make applying idempotent per proposal. Every `LogRequest` carries
//! `(origin_member_id, request_id)`, unique per boot (`boot_epoch << 32 | counter`); the
//! state machine can keep, per origin member, the request ids applied recently (a bounded
//! window, in the snapshot so every member decides alike) and skip a repeat, answering it
//! as the first. Cheaper and nearly as good: the leader drops a `MsgPropose` whose id it
//! has appended in the current term.

#[test]
fn seed_27_with_duplicated_proposals_replays_without_violation() {
    let options = keel_sim::SimOptions {
        duplicate_proposals: true,
        ..keel_sim::SimOptions::default()
    };
    let report = keel_sim::run_seed(27, options);
    assert!(report.passed(), "{}", report.failure_text());
}
