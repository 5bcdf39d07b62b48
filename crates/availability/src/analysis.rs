//! Everything the model says about a list of cluster sizes with the same members: what
//! `keel availability quorum` prints and plots.

use serde::Serialize;

use crate::component::Lifetime;
use crate::markov::RepairableQuorum;
use crate::monte_carlo::{simulate, MonteCarloConfig, MonteCarloResult};
use crate::quorum::{k_of_n_probability, majority_quorum, UpDown};
use crate::{require_positive, AvailabilityError};

/// Points on each R(t) curve, from 0 to the mission time.
pub const CURVE_POINTS: usize = 60;
/// The most cluster sizes in one question.
pub const OPTIONS_MAX: usize = 32;

/// The cluster sizes to compare and what their members are like.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuorumQuestion {
    /// Cluster sizes, each with a majority quorum.
    pub members: Vec<usize>,
    /// One member's lifetime.
    pub lifetime: Lifetime,
    /// Mean time to repair one member (exponential in the Markov chain and simulation).
    pub mean_time_to_repair_hours: f64,
    /// Members repaired at once; `None` is one crew per member (independent repair).
    pub repair_crews: Option<usize>,
    /// The t of R(t).
    pub mission_hours: f64,
    /// Replications, horizon (hours) and seed of the Monte Carlo cross-check, if wanted.
    pub monte_carlo: Option<(u32, f64, u64)>,
}

/// The model's answer for one cluster size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuorumAnalysis {
    /// n.
    pub members: usize,
    /// k = ⌊n/2⌋ + 1.
    pub quorum: usize,
    /// n − k.
    pub failures_tolerated: usize,
    /// Repair crews used (n when repair is independent).
    pub repair_crews: usize,
    /// One member's availability, MTTF / (MTTF + MTTR).
    pub member_availability: f64,
    /// The cluster's availability with one crew per member: the binomial k-of-n of the
    /// member availability (any lifetime distribution).
    pub availability_independent_repair: UpDown,
    /// The cluster's availability with the given crews from the Markov chain (exponential
    /// lifetimes only).
    pub availability_markov: Option<UpDown>,
    /// The headline: Markov when it applies, else independent repair.
    pub availability: UpDown,
    /// Nines of the headline.
    pub nines: f64,
    /// Hours a year without quorum, from the headline.
    pub downtime_hours_per_year: f64,
    /// Mean time from all up to the first loss of quorum, with repair (Markov).
    pub mean_time_to_quorum_loss_hours: Option<f64>,
    /// P(quorum through the mission) if nothing is repaired.
    pub reliability_without_repair: f64,
    /// P(quorum through the mission) with repair (Markov).
    pub reliability_with_repair: Option<f64>,
    /// The simulation's cross-check, if asked for.
    pub monte_carlo: Option<MonteCarloResult>,
    /// R(t) without repair at [`QuorumAnalysis::curve_hours`], for the plot.
    #[serde(skip)]
    pub curve_without_repair: Vec<f64>,
    /// R(t) with repair (Markov), for the plot; empty for non-exponential lifetimes.
    #[serde(skip)]
    pub curve_with_repair: Vec<f64>,
    /// The times of the curves.
    #[serde(skip)]
    pub curve_hours: Vec<f64>,
}

/// Answers the question for every cluster size.
pub fn analyse_quorums(
    question: &QuorumQuestion,
) -> Result<Vec<QuorumAnalysis>, AvailabilityError> {
    if question.members.is_empty() || question.members.len() > OPTIONS_MAX {
        return Err(AvailabilityError::invalid(
            "members",
            format!("must list between 1 and {OPTIONS_MAX} cluster sizes"),
        ));
    }
    require_positive("mttr", question.mean_time_to_repair_hours)?;
    require_positive("mission time", question.mission_hours)?;
    question
        .members
        .iter()
        .map(|&members| analyse_one(question, members))
        .collect()
}

fn analyse_one(
    question: &QuorumQuestion,
    members: usize,
) -> Result<QuorumAnalysis, AvailabilityError> {
    if members == 0 || members > crate::markov::MARKOV_MEMBERS_MAX {
        return Err(AvailabilityError::invalid(
            "members",
            format!(
                "must be between 1 and {}, not {members}",
                crate::markov::MARKOV_MEMBERS_MAX
            ),
        ));
    }
    let quorum = majority_quorum(members);
    let repair_crews = question.repair_crews.unwrap_or(members).min(members);
    if repair_crews == 0 {
        return Err(AvailabilityError::invalid(
            "repair crews",
            "must be at least 1",
        ));
    }
    let mean_time_to_failure_hours = question.lifetime.mean_time_to_failure_hours();
    let repair = question.mean_time_to_repair_hours;
    let member = UpDown {
        up: mean_time_to_failure_hours / (mean_time_to_failure_hours + repair),
        down: repair / (mean_time_to_failure_hours + repair),
    };
    let availability_independent_repair = k_of_n_probability(quorum, members, member)?;
    let curve_hours: Vec<f64> = (0..CURVE_POINTS)
        .map(|point| question.mission_hours * point as f64 / (CURVE_POINTS - 1) as f64)
        .collect();
    let reliability_at = |hours: f64| -> Result<f64, AvailabilityError> {
        let survives = question.lifetime.reliability(hours);
        Ok(k_of_n_probability(
            quorum,
            members,
            UpDown {
                up: survives,
                down: -(-hours_exposure(&question.lifetime, hours)).exp_m1(),
            },
        )?
        .up)
    };
    let curve_without_repair = curve_hours
        .iter()
        .map(|&hours| reliability_at(hours))
        .collect::<Result<Vec<_>, _>>()?;
    let (availability_markov, mean_time_to_quorum_loss_hours, curve_with_repair) =
        match question.lifetime {
            Lifetime::Exponential {
                failure_rate_per_hour,
            } => {
                let chain = RepairableQuorum::new(
                    members,
                    quorum,
                    failure_rate_per_hour,
                    1.0 / repair,
                    repair_crews,
                )?;
                (
                    Some(chain.availability()?),
                    Some(chain.mean_time_to_failure_hours()?),
                    chain.reliability_curve(&curve_hours)?,
                )
            }
            Lifetime::Weibull { .. } => (None, None, Vec::new()),
        };
    let availability = availability_markov.unwrap_or(availability_independent_repair);
    let monte_carlo = match question.monte_carlo {
        Some((replications, horizon_hours, seed)) => Some(simulate(&MonteCarloConfig {
            members,
            required: quorum,
            lifetime: question.lifetime,
            mean_time_to_repair_hours: repair,
            repair_crews,
            horizon_hours,
            mission_hours: question.mission_hours,
            replications,
            seed,
        })?),
        None => None,
    };
    Ok(QuorumAnalysis {
        members,
        quorum,
        failures_tolerated: members - quorum,
        repair_crews,
        member_availability: member.up,
        availability_independent_repair,
        availability_markov,
        availability,
        // From the precise probability of being down, not from 1 − up.
        nines: -availability.down.max(0.0).log10(),
        downtime_hours_per_year: availability.down.max(0.0) * crate::HOURS_PER_YEAR,
        mean_time_to_quorum_loss_hours,
        reliability_without_repair: *curve_without_repair.last().expect("CURVE_POINTS > 0"),
        reliability_with_repair: curve_with_repair.last().copied(),
        monte_carlo,
        curve_without_repair,
        curve_with_repair,
        curve_hours,
    })
}

/// −ln R(t), the cumulative hazard, so that 1 − R(t) is computed without cancellation.
fn hours_exposure(lifetime: &Lifetime, hours: f64) -> f64 {
    match *lifetime {
        Lifetime::Exponential {
            failure_rate_per_hour,
        } => failure_rate_per_hour * hours,
        Lifetime::Weibull { shape, scale_hours } => (hours / scale_hours).powf(shape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_five_seven_with_mttf_30_days_and_mttr_1_hour() {
        let analyses = analyse_quorums(&QuorumQuestion {
            members: vec![1, 3, 5, 7],
            lifetime: Lifetime::exponential_mttf(720.0).unwrap(),
            mean_time_to_repair_hours: 1.0,
            repair_crews: None,
            mission_hours: 720.0,
            monte_carlo: None,
        })
        .unwrap();
        let member_down = 1.0 / 721.0;
        // 1 member: A = 720/721.
        assert!((analyses[0].availability.down - member_down).abs() < 1e-12);
        // 3 members: down ≈ 3q²(1−q) + q³.
        let three = 3.0 * member_down.powi(2) * (1.0 - member_down) + member_down.powi(3);
        assert!(((analyses[1].availability.down - three) / three).abs() < 1e-6);
        // More members, more nines, and the quorum tolerates more failures.
        assert!(analyses[1].nines > analyses[0].nines + 2.0);
        assert!(analyses[2].nines > analyses[1].nines + 2.0);
        assert_eq!(analyses[3].failures_tolerated, 3);
        // With repair, quorum outlives the mission far more often than without.
        for analysis in &analyses[1..] {
            assert!(
                analysis.reliability_with_repair.unwrap() > analysis.reliability_without_repair
            );
        }
        // Without repair, 1-of-1 over its MTTF is e^(−1).
        assert!((analyses[0].reliability_without_repair - (-1.0f64).exp()).abs() < 1e-12);
    }

    #[test]
    fn weibull_members_use_independent_repair_and_no_chain() {
        let analyses = analyse_quorums(&QuorumQuestion {
            members: vec![3],
            lifetime: Lifetime::weibull(1.5, 1_000.0).unwrap(),
            mean_time_to_repair_hours: 2.0,
            repair_crews: Some(1),
            mission_hours: 100.0,
            monte_carlo: Some((50, 20_000.0, 1)),
        })
        .unwrap();
        assert!(analyses[0].availability_markov.is_none());
        assert_eq!(
            analyses[0].availability,
            analyses[0].availability_independent_repair
        );
        assert!(analyses[0].monte_carlo.is_some());
    }

    #[test]
    fn empty_questions_are_refused() {
        let question = QuorumQuestion {
            members: vec![],
            lifetime: Lifetime::exponential_mttf(720.0).unwrap(),
            mean_time_to_repair_hours: 1.0,
            repair_crews: None,
            mission_hours: 720.0,
            monte_carlo: None,
        };
        assert!(analyse_quorums(&question).is_err());
        assert!(analyse_quorums(&QuorumQuestion {
            members: vec![0],
            ..question
        })
        .is_err());
    }
}
