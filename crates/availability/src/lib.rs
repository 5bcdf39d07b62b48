//! Reliability and availability models for a keel cluster, as pure functions.
//!
//! The questions a team asks before deploying keel are "how many members?" and "what will
//! that give us?". This crate turns "members fail every 30 days on average and take an hour to
//! repair" into numbers, with the textbook models and a simulation that checks them:
//!
//! - [`component`]: one member's lifetime, exponential (a failure rate λ or its MTTF) or
//!   Weibull (shape and scale); reliability R(t) = P(no failure by t); steady-state
//!   availability A = MTTF / (MTTF + MTTR); nines and downtime per year.
//! - [`quorum`]: a k-of-n system (a Raft cluster of n members is up while a majority,
//!   k = ⌊n/2⌋ + 1, is up) built from independent components: R(t) and availability.
//! - [`markov`]: the continuous-time Markov chain of a repairable k-of-n system with r repair
//!   crews (exponential failures and repairs): steady-state availability by solving the
//!   generator, mean time to system failure by the absorbing chain, and R(t) with repair.
//! - [`block`]: series, parallel and k-of-n composition of blocks, with a small expression
//!   language (`series(0.9995, 2of3(720h/1h, 720h/1h, 720h/1h))`).
//! - [`monte_carlo`]: a seeded event simulation of the same repairable system (any lifetime
//!   distribution), giving availability and R(t) with confidence intervals.
//! - [`analysis`]: everything above for a list of cluster sizes, what `keel availability
//!   quorum` prints; [`plot`] draws it as an SVG.
//!
//! Time is in hours throughout (an `f64`); [`duration`] parses `30d`, `1h`, `90s`.
//! Nothing here touches a clock, a file or unseeded randomness.

pub mod analysis;
pub mod block;
pub mod component;
pub mod duration;
mod linear;
pub mod markov;
pub mod monte_carlo;
pub mod plot;
pub mod quorum;

pub use analysis::{analyse_quorums, QuorumAnalysis, QuorumQuestion};
pub use block::Block;
pub use component::{downtime_hours_per_year, nines, steady_state_availability, Lifetime};
pub use markov::RepairableQuorum;
pub use monte_carlo::{Estimate, MonteCarloConfig, MonteCarloResult};
pub use quorum::{k_of_n_probability, majority_quorum};

/// Hours in a (Julian) year, the unit of "downtime per year".
pub const HOURS_PER_YEAR: f64 = 365.25 * 24.0;

/// What is wrong with a model's input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AvailabilityError {
    /// A parameter is outside its domain (a negative rate, a probability above one, …).
    #[error("{name} {reason}")]
    InvalidParameter {
        /// The parameter's name as the user wrote it (`mttf`, `members`, …).
        name: String,
        /// Why it is refused, in words.
        reason: String,
    },
    /// A duration or a block expression could not be read.
    #[error("cannot read {text:?}: {reason}")]
    Parse {
        /// The text that was refused.
        text: String,
        /// What was expected.
        reason: String,
    },
    /// A computation would exceed one of the crate's named limits.
    #[error("{what} exceeds its limit of {limit}")]
    LimitExceeded {
        /// What grew too large.
        what: String,
        /// The limit.
        limit: u64,
    },
}

impl AvailabilityError {
    pub(crate) fn invalid(name: &str, reason: impl Into<String>) -> Self {
        AvailabilityError::InvalidParameter {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Refuses a value that is not a finite number above zero.
pub(crate) fn require_positive(name: &str, value: f64) -> Result<f64, AvailabilityError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(AvailabilityError::invalid(
            name,
            format!("must be a finite number above zero, not {value}"),
        ))
    }
}

/// Refuses a value that is not a probability.
pub(crate) fn require_probability(name: &str, value: f64) -> Result<f64, AvailabilityError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(AvailabilityError::invalid(
            name,
            format!("must be a probability between 0 and 1, not {value}"),
        ))
    }
}
