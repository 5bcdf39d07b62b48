//! A seeded Monte Carlo simulation of a repairable k-of-n system, to cross-check the
//! closed forms and the Markov chain, and to go where they cannot (Weibull lifetimes with
//! fewer repair crews than members).
//!
//! Each replication starts with every member up and runs to the horizon: a member fails
//! after a lifetime drawn from its distribution, waits for one of r repair crews (first
//! come first served), is repaired after an exponential time with mean MTTR, and is then as
//! good as new. The replication records the fraction of the horizon without a quorum and
//! whether quorum was lost before the mission time. Replications are independent, so the
//! confidence interval of the availability is the normal one over their means (at least
//! [`REPLICATIONS_MIN`] of them), and that of R(t) is Wilson's score interval.
//! Starting all-up biases the availability slightly upward; horizons of many MTTFs make the
//! bias negligible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::component::Lifetime;
use crate::{require_positive, AvailabilityError};

/// The fewest replications for which the normal confidence interval is used.
pub const REPLICATIONS_MIN: u32 = 30;
/// The most replications one run may ask for.
pub const REPLICATIONS_MAX: u32 = 1_000_000;
/// The most failure and repair events one run may simulate (all replications together),
/// which bounds its time to seconds.
pub const EVENTS_MAX: u64 = 200_000_000;
/// z for a two-sided 95% interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MonteCarloConfig {
    /// n.
    pub members: usize,
    /// k.
    pub required: usize,
    /// One member's lifetime.
    pub lifetime: Lifetime,
    /// Mean of the exponential repair time.
    pub mean_time_to_repair_hours: f64,
    /// r.
    pub repair_crews: usize,
    /// Length of each replication.
    pub horizon_hours: f64,
    /// The t of R(t); at most the horizon.
    pub mission_hours: f64,
    /// Number of independent replications.
    pub replications: u32,
    /// Seeds the one random number generator; equal seeds give equal results.
    pub seed: u64,
}

/// A point estimate with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// The point estimate.
    pub value: f64,
    /// The interval's lower end.
    pub low: f64,
    /// The interval's upper end.
    pub high: f64,
}

impl Estimate {
    /// Whether `value` lies in the interval.
    pub fn contains(&self, value: f64) -> bool {
        self.low <= value && value <= self.high
    }
}

/// What the simulation measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MonteCarloResult {
    /// Fraction of time without quorum (1 − availability).
    pub unavailability: Estimate,
    /// The fraction of replications that kept quorum through the mission time.
    pub reliability: Estimate,
    /// Losses of quorum seen in all replications; with none the unavailability interval
    /// is [0, 0] and says only that the event is rarer than the run could show.
    pub quorum_losses: u64,
    /// Failure and repair events simulated.
    pub events: u64,
}

/// Runs the simulation.
pub fn simulate(config: &MonteCarloConfig) -> Result<MonteCarloResult, AvailabilityError> {
    if config.members == 0 || config.required == 0 || config.required > config.members {
        return Err(AvailabilityError::invalid(
            "quorum",
            format!(
                "must be between 1 and {} members, not {}",
                config.members, config.required
            ),
        ));
    }
    if config.repair_crews == 0 {
        return Err(AvailabilityError::invalid(
            "repair crews",
            "must be at least 1",
        ));
    }
    require_positive("mttr", config.mean_time_to_repair_hours)?;
    require_positive("horizon", config.horizon_hours)?;
    require_positive("mission time", config.mission_hours)?;
    if config.mission_hours > config.horizon_hours {
        return Err(AvailabilityError::invalid(
            "mission time",
            "must not exceed the simulated horizon",
        ));
    }
    if !(REPLICATIONS_MIN..=REPLICATIONS_MAX).contains(&config.replications) {
        return Err(AvailabilityError::invalid(
            "replications",
            format!(
                "must be between {REPLICATIONS_MIN} and {REPLICATIONS_MAX}, not {}",
                config.replications
            ),
        ));
    }
    let mut random = StdRng::seed_from_u64(config.seed);
    let mut unavailabilities = Vec::with_capacity(config.replications as usize);
    let mut survivors = 0u64;
    let mut quorum_losses = 0u64;
    let mut events = 0u64;
    for _ in 0..config.replications {
        let replication = replicate(config, &mut random, &mut events)?;
        unavailabilities.push(replication.down_hours / config.horizon_hours);
        survivors += u64::from(replication.survived_mission);
        quorum_losses += replication.quorum_losses;
    }
    let count = f64::from(config.replications);
    let mean = unavailabilities.iter().sum::<f64>() / count;
    let variance = unavailabilities
        .iter()
        .map(|value| (value - mean).powi(2))
        .sum::<f64>()
        / (count - 1.0);
    let half_width = Z_95 * (variance / count).sqrt();
    Ok(MonteCarloResult {
        unavailability: Estimate {
            value: mean,
            low: (mean - half_width).max(0.0),
            high: (mean + half_width).min(1.0),
        },
        reliability: wilson(survivors, u64::from(config.replications)),
        quorum_losses,
        events,
    })
}

struct Replication {
    down_hours: f64,
    survived_mission: bool,
    quorum_losses: u64,
}

#[derive(Clone, Copy)]
enum MemberState {
    Up { fails_at: f64 },
    WaitingForRepair,
    InRepair { repaired_at: f64 },
}

fn draw_uniform(random: &mut StdRng) -> f64 {
    // (0, 1]: the logarithm in the inverse transform must never see zero.
    1.0 - random.gen::<f64>()
}

fn replicate(
    config: &MonteCarloConfig,
    random: &mut StdRng,
    events: &mut u64,
) -> Result<Replication, AvailabilityError> {
    let mut members: Vec<MemberState> = (0..config.members)
        .map(|_| MemberState::Up {
            fails_at: config.lifetime.inverse_survival(draw_uniform(random)),
        })
        .collect();
    let mut repair_queue = std::collections::VecDeque::with_capacity(config.members);
    let mut crews_busy = 0usize;
    let mut up_count = config.members;
    let mut now = 0.0f64;
    let mut down_hours = 0.0f64;
    let mut survived_mission = true;
    let mut quorum_losses = 0u64;
    loop {
        let (member, at) = members
            .iter()
            .enumerate()
            .filter_map(|(index, state)| match *state {
                MemberState::Up { fails_at } => Some((index, fails_at)),
                MemberState::InRepair { repaired_at } => Some((index, repaired_at)),
                MemberState::WaitingForRepair => None,
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("some member is up or in repair: crews are at least one");
        let until = at.min(config.horizon_hours);
        if up_count < config.required {
            down_hours += until - now;
        }
        if at >= config.horizon_hours {
            break;
        }
        now = at;
        *events += 1;
        if *events > EVENTS_MAX {
            return Err(AvailabilityError::LimitExceeded {
                what: "simulated events (lower the replications or the horizon)".to_owned(),
                limit: EVENTS_MAX,
            });
        }
        match members[member] {
            MemberState::Up { .. } => {
                let had_quorum = up_count >= config.required;
                up_count -= 1;
                if had_quorum && up_count < config.required {
                    quorum_losses += 1;
                    if now <= config.mission_hours {
                        survived_mission = false;
                    }
                }
                if crews_busy < config.repair_crews {
                    crews_busy += 1;
                    members[member] = MemberState::InRepair {
                        repaired_at: now + repair_time(config, random),
                    };
                } else {
                    members[member] = MemberState::WaitingForRepair;
                    repair_queue.push_back(member);
                }
            }
            MemberState::InRepair { .. } => {
                up_count += 1;
                members[member] = MemberState::Up {
                    fails_at: now + config.lifetime.inverse_survival(draw_uniform(random)),
                };
                match repair_queue.pop_front() {
                    Some(next) => {
                        members[next] = MemberState::InRepair {
                            repaired_at: now + repair_time(config, random),
                        };
                    }
                    None => crews_busy -= 1,
                }
            }
            MemberState::WaitingForRepair => unreachable!("waiting members have no event"),
        }
    }
    Ok(Replication {
        down_hours,
        survived_mission,
        quorum_losses,
    })
}

fn repair_time(config: &MonteCarloConfig, random: &mut StdRng) -> f64 {
    -draw_uniform(random).ln() * config.mean_time_to_repair_hours
}

/// Wilson's 95% score interval for `successes` out of `trials`, which stays inside [0, 1]
/// and is sensible at 0 and at `trials`.
pub fn wilson(successes: u64, trials: u64) -> Estimate {
    let trials_f = trials as f64;
    let proportion = successes as f64 / trials_f;
    let z_squared = Z_95 * Z_95;
    let denominator = 1.0 + z_squared / trials_f;
    let centre = (proportion + z_squared / (2.0 * trials_f)) / denominator;
    let half_width = Z_95
        * (proportion * (1.0 - proportion) / trials_f + z_squared / (4.0 * trials_f * trials_f))
            .sqrt()
        / denominator;
    Estimate {
        value: proportion,
        low: (centre - half_width).max(0.0),
        high: (centre + half_width).min(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markov::RepairableQuorum;
    use crate::quorum::{k_of_n_probability, UpDown};

    fn config(lifetime: Lifetime, repair_crews: usize) -> MonteCarloConfig {
        MonteCarloConfig {
            members: 3,
            required: 2,
            lifetime,
            mean_time_to_repair_hours: 1.0,
            repair_crews,
            horizon_hours: 2_000.0,
            mission_hours: 20.0,
            replications: 200,
            seed: 7,
        }
    }

    #[test]
    fn agrees_with_the_markov_chain_within_its_interval() {
        // λ = 0.1/h, μ = 1/h: the cluster is down about 2.5% of the time, measurable.
        let chain = RepairableQuorum::new(3, 2, 0.1, 1.0, 1).unwrap();
        let lifetime = Lifetime::exponential_rate(0.1).unwrap();
        let result = simulate(&config(lifetime, 1)).unwrap();
        let modelled = chain.availability().unwrap().down;
        assert!(
            result.unavailability.contains(modelled),
            "{modelled} outside {:?}",
            result.unavailability
        );
        let modelled_reliability = chain.reliability_curve(&[20.0]).unwrap()[0];
        assert!(
            result.reliability.contains(modelled_reliability),
            "{modelled_reliability} outside {:?}",
            result.reliability
        );
        assert!(result.quorum_losses > 100);
    }

    #[test]
    fn weibull_with_independent_repair_agrees_with_renewal_theory() {
        // Any lifetime: each member is up MTTF/(MTTF+MTTR) of the time, independently
        // when every member has its own crew.
        let lifetime = Lifetime::weibull(2.0, 10.0).unwrap();
        let member_down = 1.0 / (lifetime.mean_time_to_failure_hours() + 1.0);
        let expected = k_of_n_probability(2, 3, UpDown::from_down(member_down).unwrap())
            .unwrap()
            .down;
        let result = simulate(&config(lifetime, 3)).unwrap();
        assert!(
            result.unavailability.contains(expected),
            "{expected} outside {:?}",
            result.unavailability
        );
    }

    #[test]
    fn equal_seeds_give_equal_results() {
        let lifetime = Lifetime::exponential_rate(0.1).unwrap();
        assert_eq!(
            simulate(&config(lifetime, 1)).unwrap(),
            simulate(&config(lifetime, 1)).unwrap()
        );
    }

    #[test]
    fn wilson_interval_at_the_edges() {
        let all = wilson(100, 100);
        assert_eq!(all.value, 1.0);
        assert!(all.low > 0.95 && all.low < 1.0 && all.high == 1.0);
        let half = wilson(50, 100);
        assert!((half.low - 0.4038).abs() < 1e-3 && (half.high - 0.5962).abs() < 1e-3);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let lifetime = Lifetime::exponential_rate(0.1).unwrap();
        let mut too_few = config(lifetime, 1);
        too_few.replications = 5;
        assert!(simulate(&too_few).is_err());
        let mut long_mission = config(lifetime, 1);
        long_mission.mission_hours = 1e6;
        assert!(simulate(&long_mission).is_err());
    }
}
