//! The reconciler and placement, one rule per test.

mod common;

use std::collections::BTreeSet;

use common::{node, seconds, simple_job, World};
use keel_scheduler::{
    drain_complete, plan_job, ClientStatus, DeploymentStatus, DesiredStatus, Drain, JobState,
    NodeStatus, PlacementReason, StopReason, Time,
};

fn three_nodes() -> Vec<keel_scheduler::Node> {
    vec![
        node("n1", "a", 4000, 4096),
        node("n2", "b", 4000, 4096),
        node("n3", "c", 4000, 4096),
    ]
}

#[test]
fn a_new_job_is_placed_on_distinct_nodes_with_ports() {
    let mut world = World::new(simple_job("web", 3, 500, 256, ""), three_nodes());
    let plan = world.step();
    assert_eq!(plan.placements.len(), 3);
    let nodes: BTreeSet<&str> = plan
        .placements
        .iter()
        .map(|allocation| allocation.node.as_str())
        .collect();
    assert_eq!(
        nodes.len(),
        3,
        "job anti-affinity spreads one group's instances: {nodes:?}"
    );
    let indexes: BTreeSet<u32> = plan
        .placements
        .iter()
        .map(|allocation| allocation.index)
        .collect();
    assert_eq!(indexes, BTreeSet::from([0, 1, 2]));
    for allocation in &plan.placements {
        let port = allocation.ports["http"];
        assert!((20000..=20099).contains(&port));
        assert_eq!(allocation.placement_reason, PlacementReason::New);
    }
    world.agents_act();
    assert!(world.step().is_empty(), "a converged job needs nothing");
}

#[test]
fn evaluation_is_deterministic_given_the_seed() {
    let world = World::new(simple_job("web", 5, 100, 64, ""), three_nodes());
    let evaluate = |seed| {
        keel_scheduler::evaluate(&keel_scheduler::Evaluation {
            job: &world.state,
            cluster: &world.cluster,
            now: world.now,
            seed,
            algorithm: Default::default(),
        })
    };
    assert_eq!(evaluate(7), evaluate(7));
    assert_ne!(evaluate(7).placements[0].id, evaluate(8).placements[0].id);
}

#[test]
fn binpacking_fills_the_busier_node_first() {
    // A job already uses half of n2; a big single instance goes there, not
    // to the empty nodes.
    let mut world = World::new(
        simple_job(
            "other",
            1,
            2000,
            2048,
            "[[group.other.constraint]]\nattribute = \"${meta.zone}\"\nvalue = \"b\"",
        ),
        three_nodes(),
    );
    world.settle(5);
    let state = JobState::new(simple_job("web", 1, 1000, 1024, ""));
    let plan = plan_job(&state.current().job, None, &world.cluster, world.now, 3);
    assert_eq!(plan.placements[0].node, "n2");
}

#[test]
fn spread_divides_instances_over_attribute_values() {
    let nodes = vec![
        node("a1", "a", 8000, 8192),
        node("a2", "a", 8000, 8192),
        node("a3", "a", 8000, 8192),
        node("b1", "b", 8000, 8192),
    ];
    let spread = "[[group.web.spread]]\nattribute = \"${meta.zone}\"\nweight = 100";
    let mut world = World::new(simple_job("web", 4, 100, 64, spread), nodes);
    world.settle(5);
    let in_b = world
        .active()
        .iter()
        .filter(|allocation| allocation.node == "b1")
        .count();
    assert_eq!(in_b, 2, "half the instances go to zone b's only node");
}

#[test]
fn constraints_filter_nodes_and_failures_say_why() {
    let constraint =
        "[[group.web.constraint]]\nattribute = \"${meta.zone}\"\noperator = \"!=\"\nvalue = \"a\"";
    let mut world = World::new(simple_job("web", 3, 3000, 256, constraint), three_nodes());
    let plan = world.step();
    assert!(plan
        .placements
        .iter()
        .all(|allocation| allocation.node != "n1"));
    assert_eq!(
        plan.placements.len(),
        2,
        "n1 is excluded and each other node fits one"
    );
    assert_eq!(plan.failed_placements.len(), 1);
    let failure = &plan.failed_placements[0].failure;
    assert_eq!(failure.nodes_evaluated, 3);
    assert_eq!(failure.nodes_filtered.get("${meta.zone} != a"), Some(&1));
    assert_eq!(failure.nodes_exhausted.get("cpu"), Some(&2));
}

#[test]
fn count_changes_place_and_stop_by_index() {
    let mut world = World::new(simple_job("web", 2, 100, 64, ""), three_nodes());
    world.settle(5);
    world.register(simple_job("web", 4, 100, 64, ""));
    let plan = world.step();
    let indexes: BTreeSet<u32> = plan
        .placements
        .iter()
        .map(|allocation| allocation.index)
        .collect();
    assert_eq!(indexes, BTreeSet::from([2, 3]));
    assert_eq!(
        plan.in_place_updates.len(),
        2,
        "a count change updates the others in place"
    );
    world.agents_act();
    world.register(simple_job("web", 1, 100, 64, ""));
    let plan = world.step();
    assert_eq!(plan.stops.len(), 3);
    assert!(plan
        .stops
        .iter()
        .all(|stop| stop.reason == StopReason::ScaledDown));
    world.agents_act();
    assert_eq!(world.active().len(), 1);
    assert_eq!(world.active()[0].index, 0);
}

#[test]
fn a_down_node_loses_its_allocations_only_after_the_grace() {
    let mut world = World::new(
        simple_job(
            "web",
            3,
            100,
            64,
            "[group.web.disconnect]\nlost_after = \"30s\"",
        ),
        three_nodes(),
    );
    world.settle(5);
    let victim = world
        .active()
        .iter()
        .find(|allocation| allocation.node == "n1")
        .unwrap()
        .id
        .clone();
    let since = world.now;
    world.node_mut("n1").status = NodeStatus::Down { since };
    world.advance(seconds(10));
    let plan = world.step();
    assert!(plan.is_empty(), "within the grace nothing moves: {plan:?}");
    assert_eq!(plan.next_evaluation_at, Some(since.after(seconds(30))));

    world.advance(seconds(20));
    let plan = world.step();
    assert_eq!(plan.stops.len(), 1);
    assert_eq!(
        (plan.stops[0].allocation.clone(), plan.stops[0].reason),
        (victim.clone(), StopReason::Lost)
    );
    assert_eq!(plan.placements.len(), 1);
    let replacement = &plan.placements[0];
    assert_eq!(replacement.previous_allocation, Some(victim));
    assert_eq!(replacement.placement_reason, PlacementReason::Lost);
    assert_ne!(replacement.node, "n1");
}

#[test]
fn a_node_back_within_the_grace_keeps_everything() {
    let mut world = World::new(
        simple_job(
            "web",
            3,
            100,
            64,
            "[group.web.disconnect]\nlost_after = \"30s\"",
        ),
        three_nodes(),
    );
    world.settle(5);
    let before: Vec<_> = world
        .active()
        .iter()
        .map(|allocation| allocation.id.clone())
        .collect();
    world.node_mut("n2").status = NodeStatus::Down { since: world.now };
    world.advance(seconds(29));
    assert!(world.step().is_empty());
    world.node_mut("n2").status = NodeStatus::Alive;
    world.advance(seconds(60));
    assert!(world.step().is_empty());
    let after: Vec<_> = world
        .active()
        .iter()
        .map(|allocation| allocation.id.clone())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn issue_10341_a_suspect_node_moves_nothing() {
    let mut world = World::new(simple_job("web", 3, 100, 64, ""), three_nodes());
    world.settle(5);
    world.node_mut("n3").status = NodeStatus::Suspect;
    for _ in 0..10 {
        world.advance(seconds(60));
        assert!(world.step().is_empty());
    }
    assert_eq!(world.active_on("n3"), 1);
}

#[test]
fn issue_10953_a_returning_node_finds_its_replaced_allocations_stopped() {
    let mut world = World::new(simple_job("web", 3, 100, 64, ""), three_nodes());
    world.settle(5);
    let old = world
        .active()
        .iter()
        .find(|allocation| allocation.node == "n1")
        .unwrap()
        .id
        .clone();
    world.node_mut("n1").status = NodeStatus::Down { since: world.now };
    world.advance(seconds(1));
    world.step();
    world.agents_act();
    // The node comes back still running its old allocation.
    world.node_mut("n1").status = NodeStatus::Alive;
    let returned = world
        .cluster
        .allocations
        .iter()
        .find(|allocation| allocation.id == old)
        .unwrap();
    assert_eq!(
        returned.desired_status,
        DesiredStatus::Stop(StopReason::Lost)
    );
    assert_eq!(
        returned.client.status,
        ClientStatus::Running,
        "the agent has not acted yet"
    );
    assert!(
        world.step().is_empty(),
        "nothing resurrects the stopped allocation"
    );
    world.agents_act();
    assert_eq!(world.active().len(), 3);
    assert!(
        world
            .cluster
            .allocations
            .iter()
            .filter(|allocation| allocation.client.status == ClientStatus::Running)
            .count()
            == 3
    );
}

#[test]
fn issue_12680_two_allocations_in_one_slot_keep_only_one() {
    let mut world = World::new(simple_job("web", 2, 100, 64, ""), three_nodes());
    world.settle(5);
    // A race (a deposed controller's write, say) left a second allocation
    // wanted running in slot 0.
    let mut duplicate = world.active()[0].clone();
    duplicate.id = keel_scheduler::AllocationId("duplicate".into());
    duplicate.node = "n3".into();
    duplicate.created_at = world.now.after(seconds(1));
    world.cluster.allocations.push(duplicate);
    world.advance(seconds(2));
    let plan = world.step();
    assert_eq!(plan.stops.len(), 1);
    assert_eq!(plan.stops[0].reason, StopReason::Duplicate);
    assert_ne!(
        plan.stops[0].allocation.0, "duplicate",
        "the newest of equals is kept"
    );
    assert!(plan.placements.is_empty());
}

#[test]
fn issue_1461_a_lost_allocation_is_replaced_once_capacity_exists() {
    // Two nodes with room for one instance each; the job needs both.
    let mut world = World::new(
        simple_job("web", 2, 3000, 256, ""),
        vec![node("n1", "a", 4000, 4096), node("n2", "b", 4000, 4096)],
    );
    world.settle(5);
    world.node_mut("n1").status = NodeStatus::Down { since: world.now };
    world.advance(seconds(1));
    let plan = world.step();
    assert_eq!(plan.stops[0].reason, StopReason::Lost);
    assert!(plan.placements.is_empty());
    assert_eq!(plan.failed_placements.len(), 1);
    assert_eq!(plan.failed_placements[0].reason, PlacementReason::Lost);
    // Still no room: the empty slot is retried at every evaluation.
    assert_eq!(world.step().failed_placements.len(), 1);
    world.cluster.nodes.push(node("n3", "c", 4000, 4096));
    let plan = world.step();
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].node, "n3");
}

#[test]
fn failed_allocations_are_rescheduled_with_growing_delays_away_from_their_node() {
    let reschedule = "[group.web.reschedule]\ndelay = \"10s\"\ndelay_function = \"exponential\"\nmax_delay = \"1m\"";
    // Six nodes: every node of the chain is penalised, and one stays free.
    let nodes = (1..=6)
        .map(|number| node(&format!("n{number}"), "a", 4000, 4096))
        .collect();
    let mut world = World::new(simple_job("web", 1, 100, 64, reschedule), nodes);
    world.settle(5);
    let mut delays = Vec::new();
    let mut used_nodes = BTreeSet::new();
    for _ in 0..5 {
        let failed = world.active()[0].clone();
        world.fail(&failed.id.0);
        let plan = world.step();
        assert!(plan.placements.is_empty());
        let later = &plan.reschedule_later[0];
        assert_eq!(plan.next_evaluation_at, Some(later.at));
        delays.push(later.delay.as_secs());
        world.now = later.at;
        let plan = world.step();
        assert_eq!(plan.stops[0].reason, StopReason::Rescheduled);
        let replacement = &plan.placements[0];
        assert_eq!(replacement.placement_reason, PlacementReason::Rescheduled);
        used_nodes.insert(failed.node.clone());
        assert!(
            !used_nodes.contains(&replacement.node),
            "the nodes it failed on are penalised"
        );
        assert_eq!(
            replacement
                .reschedule_events
                .last()
                .unwrap()
                .previous_allocation,
            failed.id
        );
        world.agents_act();
    }
    assert_eq!(delays, [10, 20, 40, 60, 60]);
}

#[test]
fn reschedule_attempts_run_out() {
    let reschedule = "[group.web.reschedule]\nattempts = 1\ninterval = \"1h\"\ndelay = \"5s\"\nunlimited = false";
    let mut world = World::new(simple_job("web", 1, 100, 64, reschedule), three_nodes());
    world.settle(5);
    let first = world.active()[0].id.0.clone();
    world.fail(&first);
    world.advance(seconds(5));
    assert_eq!(world.step().placements.len(), 1);
    world.agents_act();
    let second = world.active()[0].id.0.clone();
    world.fail(&second);
    world.advance(seconds(600));
    let plan = world.step();
    assert!(
        plan.is_empty() && plan.reschedule_later.is_empty(),
        "{plan:?}"
    );
}

#[test]
fn a_rolling_update_replaces_max_parallel_at_a_time_and_marks_the_version_stable() {
    let update = "[group.web.update]\nmax_parallel = 1\nmin_healthy_time = \"10s\"\nhealthy_deadline = \"1m\"";
    let mut world = World::new(simple_job("web", 3, 100, 64, update), three_nodes());
    world.settle(3);
    world.advance(seconds(10));
    let plan = world.step();
    assert_eq!(plan.mark_stable, Some(0));
    assert_eq!(
        plan.deployment.as_ref().map(|deployment| deployment.status),
        Some(DeploymentStatus::Successful)
    );
    world.agents_act();

    world.register(simple_job("web", 3, 200, 64, update));
    for round in 0..3 {
        let plan = world.step();
        assert_eq!(plan.placements.len(), 1, "round {round}: one at a time");
        assert_eq!(plan.stops.len(), 1);
        assert_eq!(plan.stops[0].reason, StopReason::Updated);
        world.agents_act();
        world.advance(seconds(5));
        assert!(
            world.step().placements.is_empty(),
            "round {round}: waits for min_healthy_time"
        );
        world.advance(seconds(5));
    }
    let plan = world.step();
    assert_eq!(plan.mark_stable, Some(1));
    assert!(world
        .active()
        .iter()
        .all(|allocation| allocation.job_version == 1));
}

#[test]
fn a_version_that_never_turns_healthy_is_reverted() {
    let update = "[group.web.update]\nmax_parallel = 1\nmin_healthy_time = \"5s\"\nhealthy_deadline = \"30s\"\nauto_revert = true";
    let mut world = World::new(simple_job("web", 3, 100, 64, update), three_nodes());
    world.settle(3);
    world.advance(seconds(5));
    assert_eq!(world.step().mark_stable, Some(0));

    world.register(simple_job("web", 3, 200, 64, update));
    world.ready_after = None;
    world.step();
    world.agents_act();
    world.advance(seconds(30));
    let plan = world.step();
    assert_eq!(
        plan.deployment.as_ref().map(|deployment| deployment.status),
        Some(DeploymentStatus::Failed)
    );
    assert_eq!(plan.revert_to_version, Some(0));
    assert_eq!(
        world
            .active()
            .iter()
            .filter(|allocation| allocation.job_version == 0)
            .count(),
        2,
        "the old version kept serving"
    );

    // Version 2 is version 0's spec again: the old allocations are updated
    // in place, the bad one replaced, and the job settles on it.
    world.ready_after = Some(seconds(0));
    let plan = world.step();
    assert_eq!(plan.in_place_updates.len(), 2);
    assert_eq!(plan.placements.len(), 1);
    world.agents_act();
    world.advance(seconds(5));
    let plan = world.step();
    assert_eq!(plan.mark_stable, Some(2));
}

#[test]
fn drain_moves_max_parallel_at_a_time() {
    let migrate = "[group.web.migrate]\nmax_parallel = 1\nmin_healthy_time = \"10s\"\nhealthy_deadline = \"1m\"\n[[group.web.constraint]]\nattribute = \"${meta.zone}\"\noperator = \"!=\"\nvalue = \"c\"";
    let mut world = World::new(simple_job("web", 4, 100, 64, migrate), three_nodes());
    world.settle(5);
    assert_eq!(world.active_on("n1"), 2);
    let started_at = world.now;
    let drained = world.node_mut("n1");
    drained.drain = Some(Drain { started_at });
    drained.eligible = false;
    let mut moved_per_round = Vec::new();
    for _ in 0..6 {
        let plan = world.step();
        moved_per_round.push(
            plan.stops
                .iter()
                .filter(|stop| stop.reason == StopReason::Migrated)
                .count(),
        );
        assert!(plan
            .placements
            .iter()
            .all(|allocation| allocation.node == "n2"));
        world.agents_act();
        world.advance(seconds(5));
    }
    assert_eq!(
        moved_per_round,
        [1, 0, 1, 0, 0, 0],
        "the second moves once the first was ready 10s"
    );
    assert!(drain_complete(&world.cluster, "n1"));
    assert_eq!(world.active().len(), 4);
}

#[test]
fn autoscaling_follows_cpu_use_within_bounds_and_cooldown() {
    let scaling =
        "[group.web.scaling]\nmin = 1\nmax = 5\ntarget_cpu_percent = 50\ncooldown = \"1m\"";
    let mut world = World::new(simple_job("web", 2, 100, 64, scaling), three_nodes());
    world.settle(5);
    let ids: Vec<_> = world
        .active()
        .iter()
        .map(|allocation| allocation.id.clone())
        .collect();
    for id in &ids {
        world.cluster.cpu_usage_millicores.insert(id.clone(), 100);
    }
    let plan = world.step();
    assert_eq!(plan.scaling.len(), 1);
    assert_eq!(
        (
            plan.scaling[0].from,
            plan.scaling[0].to,
            plan.scaling[0].cpu_percent
        ),
        (2, 4, 100)
    );
    assert_eq!(world.state.current().job.groups["web"].count, 4);
    world.agents_act();
    // Still hot, but within the cooldown.
    world.advance(seconds(30));
    let plan = world.step();
    assert!(plan.scaling.is_empty());
    assert_eq!(plan.next_evaluation_at, Some(world.now.after(seconds(30))));
    world.agents_act();
    // Load gone: down to the minimum once the cooldown passed.
    world.cluster.cpu_usage_millicores.clear();
    let ids: Vec<_> = world
        .active()
        .iter()
        .map(|allocation| allocation.id.clone())
        .collect();
    for id in ids {
        world.cluster.cpu_usage_millicores.insert(id, 0);
    }
    world.advance(seconds(31));
    let plan = world.step();
    assert_eq!((plan.scaling[0].from, plan.scaling[0].to), (4, 1));
    // Within 10% of the target, nothing changes.
    world.advance(seconds(120));
    world.agents_act();
    world.step();
    world.agents_act();
    let active = world.active()[0].id.clone();
    world.cluster.cpu_usage_millicores.insert(active, 52);
    world.advance(seconds(120));
    assert!(world.step().scaling.is_empty());
}

#[test]
fn stopping_a_job_stops_everything() {
    let mut world = World::new(simple_job("web", 3, 100, 64, ""), three_nodes());
    world.settle(5);
    world.state.stopped = true;
    let plan = world.step();
    assert_eq!(plan.stops.len(), 3);
    assert!(plan
        .stops
        .iter()
        .all(|stop| stop.reason == StopReason::JobStopped));
    assert!(plan.placements.is_empty());
}

#[test]
fn job_plan_shows_placements_without_placing() {
    let world = World::new(simple_job("web", 3, 100, 64, ""), three_nodes());
    let plan = plan_job(&world.state.current().job, None, &world.cluster, Time(0), 1);
    assert_eq!(plan.placements.len(), 3);
    assert!(world.cluster.allocations.is_empty());
}
