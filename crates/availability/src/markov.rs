//! The continuous-time Markov chain of a repairable k-of-n system with r repair crews.
//!
//! Each of n members fails at rate λ while up; a failed member is repaired at rate μ, but
//! at most r at a time (r crews, first come first served), so with j members down the
//! chain leaves state j at rate (n − j)λ (a failure) plus min(j, r)μ (a repair). The
//! system is up while at least k members are up, that is in states j ≤ n − k.
//!
//! - Steady state: π solves πQ = 0 with Σπ = 1 for the generator Q; availability is the
//!   mass on the up states. With r = n (every member repaired on its own) this equals the
//!   binomial k-of-n with A = μ/(λ+μ) per member, which the tests check.
//! - Mean time to failure: make the down states absorbing; the expected times to absorption
//!   m solve (−Q_TT) m = 1 over the transient (up) states, starting with every member up.
//! - R(t) with repair: the probability of not yet having been absorbed at t, by
//!   uniformization of the transient chain.

use serde::Serialize;

use crate::quorum::UpDown;
use crate::{linear, require_positive, AvailabilityError};

/// The most members the chain is built for: solving is O(n³) in dense arithmetic.
pub const MARKOV_MEMBERS_MAX: usize = 101;

/// The most uniformization steps one R(t) evaluation may take (each step covers at most
/// one expected transition), bounding the time for very long missions.
pub const UNIFORMIZATION_STEPS_MAX: u64 = 10_000_000;

/// A repairable k-of-n system with exponential failures and repairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RepairableQuorum {
    /// n, the members.
    pub members: usize,
    /// k, the members that must be up for the system to be up.
    pub required: usize,
    /// λ, failures per hour of one up member.
    pub failure_rate_per_hour: f64,
    /// μ, repairs per hour of one crew.
    pub repair_rate_per_hour: f64,
    /// r, members repaired at once.
    pub repair_crews: usize,
}

impl RepairableQuorum {
    /// Checks the parameters.
    pub fn new(
        members: usize,
        required: usize,
        failure_rate_per_hour: f64,
        repair_rate_per_hour: f64,
        repair_crews: usize,
    ) -> Result<Self, AvailabilityError> {
        if members == 0 || members > MARKOV_MEMBERS_MAX {
            return Err(AvailabilityError::invalid(
                "members",
                format!("must be between 1 and {MARKOV_MEMBERS_MAX}, not {members}"),
            ));
        }
        if required == 0 || required > members {
            return Err(AvailabilityError::invalid(
                "quorum",
                format!("must be between 1 and {members} members, not {required}"),
            ));
        }
        if repair_crews == 0 {
            return Err(AvailabilityError::invalid(
                "repair crews",
                "must be at least 1",
            ));
        }
        require_positive("failure rate", failure_rate_per_hour)?;
        require_positive("repair rate", repair_rate_per_hour)?;
        Ok(RepairableQuorum {
            members,
            required,
            failure_rate_per_hour,
            repair_rate_per_hour,
            repair_crews,
        })
    }

    /// The highest number of failed members at which the system is still up.
    fn failures_tolerated(&self) -> usize {
        self.members - self.required
    }

    fn failure_rate_from(&self, failed: usize) -> f64 {
        (self.members - failed) as f64 * self.failure_rate_per_hour
    }

    fn repair_rate_from(&self, failed: usize) -> f64 {
        failed.min(self.repair_crews) as f64 * self.repair_rate_per_hour
    }

    /// The generator Q over states 0..=n (members failed), row-major.
    pub fn generator(&self) -> Vec<Vec<f64>> {
        let states = self.members + 1;
        let mut generator = vec![vec![0.0; states]; states];
        for failed in 0..states {
            if failed < self.members {
                generator[failed][failed + 1] = self.failure_rate_from(failed);
            }
            if failed > 0 {
                generator[failed][failed - 1] = self.repair_rate_from(failed);
            }
            generator[failed][failed] = -(generator[failed].iter().sum::<f64>());
        }
        generator
    }

    /// The long-run probability of each state (members failed), from πQ = 0, Σπ = 1.
    pub fn steady_state(&self) -> Result<Vec<f64>, AvailabilityError> {
        let generator = self.generator();
        let states = generator.len();
        // πQ = 0 is Qᵀπᵀ = 0; one of its equations is redundant, so the last is replaced
        // by the normalisation Σπ = 1.
        let mut transposed = vec![vec![0.0; states]; states];
        for (row, generator_row) in generator.iter().enumerate() {
            for (column, &rate) in generator_row.iter().enumerate() {
                transposed[column][row] = rate;
            }
        }
        transposed[states - 1] = vec![1.0; states];
        let mut right_hand_side = vec![0.0; states];
        right_hand_side[states - 1] = 1.0;
        linear::solve(transposed, right_hand_side)
    }

    /// Steady-state availability: the probability mass on the states with a quorum up.
    pub fn availability(&self) -> Result<UpDown, AvailabilityError> {
        let steady_state = self.steady_state()?;
        let tolerated = self.failures_tolerated();
        Ok(UpDown {
            up: steady_state[..=tolerated].iter().sum(),
            down: steady_state[tolerated + 1..]
                .iter()
                .map(|p| p.max(0.0))
                .sum(),
        })
    }

    /// Mean time (hours) from every member up to the first loss of quorum.
    pub fn mean_time_to_failure_hours(&self) -> Result<f64, AvailabilityError> {
        let transient = self.failures_tolerated() + 1;
        let generator = self.generator();
        let negated: Vec<Vec<f64>> = generator[..transient]
            .iter()
            .map(|row| row[..transient].iter().map(|rate| -rate).collect())
            .collect();
        let times = linear::solve(negated, vec![1.0; transient])?;
        Ok(times[0])
    }

    /// R(t) with repair at each of `hours` (ascending): the probability that quorum has not
    /// been lost once by then, starting with every member up.
    pub fn reliability_curve(&self, hours: &[f64]) -> Result<Vec<f64>, AvailabilityError> {
        let transient = self.failures_tolerated() + 1;
        let generator = self.generator();
        let uniformization_rate = (0..transient)
            .map(|state| -generator[state][state])
            .fold(0.0f64, f64::max);
        // P = I + Q/Λ restricted to the transient states: each row's missing mass is the
        // chance of being absorbed in that step.
        let step_matrix: Vec<Vec<f64>> = (0..transient)
            .map(|row| {
                (0..transient)
                    .map(|column| {
                        let identity = if row == column { 1.0 } else { 0.0 };
                        identity + generator[row][column] / uniformization_rate
                    })
                    .collect()
            })
            .collect();
        let mut distribution = vec![0.0; transient];
        distribution[0] = 1.0;
        let mut now = 0.0f64;
        let mut curve = Vec::with_capacity(hours.len());
        let mut steps_taken: u64 = 0;
        for &until in hours {
            if until < now {
                return Err(AvailabilityError::invalid(
                    "times",
                    "must be in ascending order",
                ));
            }
            // Steps of at most one expected transition keep e^(−Λh) far from underflow.
            let steps = ((until - now) * uniformization_rate).ceil().max(0.0) as u64;
            steps_taken += steps;
            if steps_taken > UNIFORMIZATION_STEPS_MAX {
                return Err(AvailabilityError::LimitExceeded {
                    what: "uniformization steps for R(t) (mission time × event rate)".to_owned(),
                    limit: UNIFORMIZATION_STEPS_MAX,
                });
            }
            if steps > 0 {
                let step_hours = (until - now) / steps as f64;
                for _ in 0..steps {
                    distribution = uniformized_step(
                        &distribution,
                        &step_matrix,
                        uniformization_rate * step_hours,
                    );
                }
            }
            now = until;
            curve.push(distribution.iter().sum::<f64>().clamp(0.0, 1.0));
        }
        Ok(curve)
    }
}

/// v·e^(Λh(P − I)) = Σ_m e^(−Λh)(Λh)^m/m! · v·P^m, summed until the Poisson weights left
/// are below 1e-16 (Λh ≤ 1, so a couple of dozen terms).
fn uniformized_step(
    distribution: &[f64],
    step_matrix: &[Vec<f64>],
    expected_events: f64,
) -> Vec<f64> {
    let mut power = distribution.to_vec();
    let mut weight = (-expected_events).exp();
    let mut weight_left = 1.0 - weight;
    let mut result: Vec<f64> = power.iter().map(|p| p * weight).collect();
    let mut term = 0u32;
    while weight_left > 1e-16 && term < 200 {
        term += 1;
        power = (0..power.len())
            .map(|column| {
                power
                    .iter()
                    .zip(step_matrix)
                    .map(|(probability, row)| probability * row[column])
                    .sum()
            })
            .collect();
        weight *= expected_events / f64::from(term);
        weight_left -= weight;
        for (accumulated, probability) in result.iter_mut().zip(&power) {
            *accumulated += weight * probability;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::k_of_n_probability;

    fn assert_relative(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            ((actual - expected) / expected).abs() <= tolerance,
            "{actual} is not within {tolerance} (relative) of {expected}"
        );
    }

    #[test]
    fn one_of_one_is_mttf_over_mttf_plus_mttr() {
        let chain = RepairableQuorum::new(1, 1, 1.0 / 720.0, 1.0, 1).unwrap();
        let availability = chain.availability().unwrap();
        assert_relative(availability.up, 720.0 / 721.0, 1e-12);
        assert_relative(availability.down, 1.0 / 721.0, 1e-9);
        assert_relative(chain.mean_time_to_failure_hours().unwrap(), 720.0, 1e-12);
    }

    #[test]
    fn independent_repair_matches_the_binomial_closed_form() {
        let (failure_rate, repair_rate) = (1.0 / 720.0, 1.0);
        let member = UpDown::from_down(failure_rate / (failure_rate + repair_rate)).unwrap();
        for (members, required) in [(3, 2), (5, 3), (7, 4), (4, 3)] {
            let chain =
                RepairableQuorum::new(members, required, failure_rate, repair_rate, members)
                    .unwrap();
            let markov = chain.availability().unwrap();
            let closed_form = k_of_n_probability(required, members, member).unwrap();
            assert_relative(markov.down, closed_form.down, 1e-6);
            assert_relative(markov.up, closed_form.up, 1e-12);
        }
    }

    #[test]
    fn one_crew_matches_the_birth_death_product_form() {
        // π_j ∝ Π_{i<j} (n−i)λ / (min(i+1, r)μ) for a birth-death chain.
        let (failure_rate, repair_rate) = (0.1, 0.5);
        let chain = RepairableQuorum::new(5, 3, failure_rate, repair_rate, 1).unwrap();
        let mut product = vec![1.0f64];
        for i in 0..5 {
            let previous = product[i];
            product.push(previous * (5 - i) as f64 * failure_rate / repair_rate);
        }
        let total: f64 = product.iter().sum();
        let steady_state = chain.steady_state().unwrap();
        for (solved, expected) in steady_state.iter().zip(&product) {
            assert_relative(*solved, expected / total, 1e-10);
        }
    }

    #[test]
    fn mean_time_to_failure_of_two_of_three_with_one_crew() {
        // By first-step analysis: MTTF = (5λ + μ) / (6λ²).
        let (failure_rate, repair_rate) = (0.01, 1.0);
        let chain = RepairableQuorum::new(3, 2, failure_rate, repair_rate, 1).unwrap();
        let expected = (5.0 * failure_rate + repair_rate) / (6.0 * failure_rate * failure_rate);
        assert_relative(chain.mean_time_to_failure_hours().unwrap(), expected, 1e-10);
    }

    #[test]
    fn reliability_without_repair_is_the_binomial_of_e_to_the_minus_lambda_t() {
        // A repair rate far below the failure rate is almost no repair; compare 3-of-5 with
        // R(t) = Σ C(5,i) pⁱqⁿ⁻ⁱ, p = e^(−λt): MTTF 47/(60λ) is the no-repair value too.
        let failure_rate = 0.01;
        let chain = RepairableQuorum::new(5, 3, failure_rate, 1e-12, 1).unwrap();
        let times = [10.0, 50.0, 100.0];
        let curve = chain.reliability_curve(&times).unwrap();
        for (time, reliability) in times.iter().zip(curve) {
            let member = UpDown::from_up((-failure_rate * time).exp()).unwrap();
            let expected = k_of_n_probability(3, 5, member).unwrap().up;
            assert_relative(reliability, expected, 1e-9);
        }
        assert_relative(
            chain.mean_time_to_failure_hours().unwrap(),
            47.0 / (60.0 * failure_rate),
            1e-8,
        );
    }

    #[test]
    fn reliability_with_repair_decays_at_one_over_the_mean_time_to_failure() {
        // With fast repair, the first failure of the system is close to exponential.
        let chain = RepairableQuorum::new(3, 2, 0.01, 1.0, 1).unwrap();
        let mean = chain.mean_time_to_failure_hours().unwrap();
        let reliability = chain.reliability_curve(&[mean]).unwrap()[0];
        assert!(
            (reliability - (-1.0f64).exp()).abs() < 0.01,
            "{reliability}"
        );
    }

    #[test]
    fn bad_chains_are_refused() {
        assert!(RepairableQuorum::new(0, 1, 1.0, 1.0, 1).is_err());
        assert!(RepairableQuorum::new(3, 4, 1.0, 1.0, 1).is_err());
        assert!(RepairableQuorum::new(3, 2, 1.0, 1.0, 0).is_err());
        assert!(RepairableQuorum::new(3, 2, -1.0, 1.0, 1).is_err());
        let chain = RepairableQuorum::new(3, 2, 1.0, 1.0, 1).unwrap();
        assert!(chain.reliability_curve(&[2.0, 1.0]).is_err());
    }
}
