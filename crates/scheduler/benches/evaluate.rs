//! The controller's evaluation of a big job, with no store around it: how
//! fast placement and reconciliation decide, which bounds how fast the
//! controller can place (issue 12 asks for the placement throughput of a
//! 1,000-allocation job over 3 nodes).
//!
//! - `place_1000`: a new job of 1,000 instances (100 millicores, 64 MiB, one
//!   dynamic port each) over 3 nodes: one plan with 1,000 placements.
//! - `steady_1000`: the same job, all running: an evaluation that finds
//!   nothing to do (what every node or allocation change costs).
//! - `node_lost_1000`: one of the 3 nodes down past its grace: its 333
//!   allocations stopped as lost and replaced on the other two.
//!
//! Run with `cargo bench -p keel-scheduler --bench evaluate`.

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keel_scheduler::{
    evaluate, ClientState, ClientStatus, Cluster, Evaluation, Job, JobState, Node, NodeStatus,
    PortRange, Resources, SchedulerAlgorithm, Time,
};

const INSTANCES: u32 = 1000;

fn job() -> Job {
    Job::from_toml_validated(&format!(
        "name = \"big\"\n[group.big]\ncount = {INSTANCES}\n[group.big.task.main]\nconfig = {{ command = \"serve\" }}\nport.http = {{}}\nresources = {{ cpu_millicores = 100, memory_mib = 64 }}\n"
    ))
    .expect("the benchmark job is valid")
}

fn nodes() -> Vec<Node> {
    (0..3)
        .map(|number| Node {
            name: format!("node-{number}"),
            labels: BTreeMap::new(),
            attributes: BTreeMap::new(),
            capacity: Resources {
                cpu_millicores: 200_000,
                memory_mib: 131_072,
            },
            port_range: PortRange {
                first: 20000,
                last: 31999,
            },
            eligible: true,
            drain: None,
            status: NodeStatus::Alive,
        })
        .collect()
}

fn plan_for(state: &JobState, cluster: &Cluster, now: Time) -> keel_scheduler::Plan {
    evaluate(&Evaluation {
        job: state,
        cluster,
        now,
        seed: 7,
        algorithm: SchedulerAlgorithm::Binpack,
    })
}

fn benchmarks(criterion: &mut Criterion) {
    let state = JobState::new(job());
    let empty = Cluster {
        nodes: nodes(),
        ..Cluster::default()
    };
    let now = Time(1_000_000);

    let mut group = criterion.benchmark_group("evaluate");
    group.throughput(Throughput::Elements(u64::from(INSTANCES)));
    group.bench_function("place_1000", |bencher| {
        bencher.iter(|| {
            let plan = plan_for(&state, &empty, now);
            assert_eq!(plan.placements.len(), INSTANCES as usize);
            plan
        })
    });

    let mut running = empty.clone();
    plan_for(&state, &empty, now).apply(&mut state.clone(), &mut running, now);
    for allocation in &mut running.allocations {
        allocation.client = ClientState {
            status: ClientStatus::Running,
            started_at: Some(now),
            ready_since: Some(now),
            finished_at: None,
        };
    }
    group.bench_function("steady_1000", |bencher| {
        bencher.iter(|| {
            let plan = plan_for(&state, &running, now);
            assert!(plan.is_empty());
            plan
        })
    });

    let mut one_down = running.clone();
    one_down.nodes[0].status = NodeStatus::Down { since: Time(0) };
    let lost = one_down
        .allocations
        .iter()
        .filter(|allocation| allocation.node == "node-0")
        .count();
    group.throughput(Throughput::Elements(lost as u64));
    group.bench_function("node_lost_1000", |bencher| {
        bencher.iter(|| {
            let plan = plan_for(&state, &one_down, now);
            assert_eq!(plan.placements.len(), lost);
            plan
        })
    });
    group.finish();
}

criterion_group!(scheduler, benchmarks);
criterion_main!(scheduler);
