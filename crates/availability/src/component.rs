//! One component (a member, a machine, a disk): its lifetime distribution, reliability,
//! and steady-state availability under repair.

use serde::Serialize;

use crate::{require_positive, require_probability, AvailabilityError, HOURS_PER_YEAR};

/// How long a component runs before it fails, in hours.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "distribution", rename_all = "snake_case")]
pub enum Lifetime {
    /// Memoryless failures at a constant rate λ = 1 / MTTF: R(t) = e^(−λt).
    Exponential {
        /// λ, failures per hour.
        failure_rate_per_hour: f64,
    },
    /// Weibull with shape β and scale η: R(t) = e^(−(t/η)^β). β < 1 is infant
    /// mortality, β = 1 is exponential, β > 1 is wear-out.
    Weibull {
        /// β, dimensionless.
        shape: f64,
        /// η, the characteristic life in hours (63.2% have failed by then).
        scale_hours: f64,
    },
}

impl Lifetime {
    /// An exponential lifetime with failure rate λ per hour.
    pub fn exponential_rate(failure_rate_per_hour: f64) -> Result<Self, AvailabilityError> {
        require_positive("failure rate", failure_rate_per_hour)?;
        Ok(Lifetime::Exponential {
            failure_rate_per_hour,
        })
    }

    /// An exponential lifetime with the given mean time to failure.
    pub fn exponential_mttf(mean_time_to_failure_hours: f64) -> Result<Self, AvailabilityError> {
        require_positive("mttf", mean_time_to_failure_hours)?;
        Ok(Lifetime::Exponential {
            failure_rate_per_hour: 1.0 / mean_time_to_failure_hours,
        })
    }

    /// A Weibull lifetime with shape β and scale η (hours).
    pub fn weibull(shape: f64, scale_hours: f64) -> Result<Self, AvailabilityError> {
        require_positive("weibull shape", shape)?;
        require_positive("weibull scale", scale_hours)?;
        // Shapes far outside this range describe no real component, and Γ(1 + 1/β)
        // overflows for β near zero.
        if !(0.05..=50.0).contains(&shape) {
            return Err(AvailabilityError::invalid(
                "weibull shape",
                format!("must be between 0.05 and 50, not {shape}"),
            ));
        }
        Ok(Lifetime::Weibull { shape, scale_hours })
    }

    /// R(t): the probability of running without failure for `hours`.
    pub fn reliability(&self, hours: f64) -> f64 {
        let hours = hours.max(0.0);
        match *self {
            Lifetime::Exponential {
                failure_rate_per_hour,
            } => (-failure_rate_per_hour * hours).exp(),
            Lifetime::Weibull { shape, scale_hours } => (-(hours / scale_hours).powf(shape)).exp(),
        }
    }

    /// The mean time to failure in hours: 1/λ, or η·Γ(1 + 1/β).
    pub fn mean_time_to_failure_hours(&self) -> f64 {
        match *self {
            Lifetime::Exponential {
                failure_rate_per_hour,
            } => 1.0 / failure_rate_per_hour,
            Lifetime::Weibull { shape, scale_hours } => scale_hours * gamma(1.0 + 1.0 / shape),
        }
    }

    /// The lifetime whose probability of lasting at least that long is `uniform`
    /// (inverse transform sampling; `uniform` in (0, 1]).
    pub fn inverse_survival(&self, uniform: f64) -> f64 {
        let exposure = -uniform.ln();
        match *self {
            Lifetime::Exponential {
                failure_rate_per_hour,
            } => exposure / failure_rate_per_hour,
            Lifetime::Weibull { shape, scale_hours } => scale_hours * exposure.powf(1.0 / shape),
        }
    }

    /// Whether the failure rate is constant, which the Markov model assumes.
    pub fn is_exponential(&self) -> bool {
        matches!(self, Lifetime::Exponential { .. })
    }
}

/// A = MTTF / (MTTF + MTTR): the long-run fraction of time a component that is repaired
/// (to as good as new) after every failure is up. It holds for any lifetime and repair
/// distribution (renewal-reward theorem), not only exponential ones.
pub fn steady_state_availability(
    mean_time_to_failure_hours: f64,
    mean_time_to_repair_hours: f64,
) -> Result<f64, AvailabilityError> {
    require_positive("mttf", mean_time_to_failure_hours)?;
    require_positive("mttr", mean_time_to_repair_hours)?;
    Ok(mean_time_to_failure_hours / (mean_time_to_failure_hours + mean_time_to_repair_hours))
}

/// The number of nines of an availability: −log10(1 − A) (0.999 → 3). Infinite for A = 1.
pub fn nines(availability: f64) -> Result<f64, AvailabilityError> {
    require_probability("availability", availability)?;
    Ok(-(1.0 - availability).log10())
}

/// Expected hours down per year at an availability.
pub fn downtime_hours_per_year(availability: f64) -> Result<f64, AvailabilityError> {
    require_probability("availability", availability)?;
    Ok((1.0 - availability) * HOURS_PER_YEAR)
}

/// Γ(x) for x > 0 by the Lanczos approximation (g = 7, nine coefficients; relative error
/// below 1e-13 on the range Weibull means need, x in [1, 21]).
pub fn gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Euler's reflection formula keeps the series in its accurate range.
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (index, coefficient) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += coefficient / (x + index as f64);
    }
    let t = x + G + 0.5;
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} is not within {tolerance} of {expected}"
        );
    }

    #[test]
    fn exponential_reliability_is_e_to_the_minus_lambda_t() {
        let lifetime = Lifetime::exponential_rate(0.001).unwrap();
        // e^(−0.1), by hand: 0.904837418...
        assert_close(lifetime.reliability(100.0), 0.904_837_418, 1e-9);
        assert_eq!(lifetime.mean_time_to_failure_hours(), 1_000.0);
        assert_eq!(
            Lifetime::exponential_mttf(720.0).unwrap(),
            Lifetime::exponential_rate(1.0 / 720.0).unwrap()
        );
    }

    #[test]
    fn weibull_means_use_the_gamma_function() {
        // β = 1 is exponential with mean η.
        let exponential_like = Lifetime::weibull(1.0, 500.0).unwrap();
        assert_close(exponential_like.mean_time_to_failure_hours(), 500.0, 1e-9);
        assert_close(exponential_like.reliability(500.0), (-1.0f64).exp(), 1e-12);
        // β = 2 (Rayleigh): mean η·√π/2.
        let wear_out = Lifetime::weibull(2.0, 1_000.0).unwrap();
        assert_close(
            wear_out.mean_time_to_failure_hours(),
            1_000.0 * std::f64::consts::PI.sqrt() / 2.0,
            1e-8,
        );
        // R(η) = e^(−1) whatever the shape.
        assert_close(wear_out.reliability(1_000.0), (-1.0f64).exp(), 1e-12);
        assert_close(gamma(5.0), 24.0, 1e-10);
        assert_close(gamma(0.5), std::f64::consts::PI.sqrt(), 1e-12);
    }

    #[test]
    fn inverse_survival_inverts_reliability() {
        for lifetime in [
            Lifetime::exponential_mttf(720.0).unwrap(),
            Lifetime::weibull(1.7, 300.0).unwrap(),
        ] {
            for uniform in [0.9, 0.5, 0.01] {
                assert_close(
                    lifetime.reliability(lifetime.inverse_survival(uniform)),
                    uniform,
                    1e-12,
                );
            }
        }
    }

    #[test]
    fn availability_nines_and_downtime() {
        let availability = steady_state_availability(720.0, 1.0).unwrap();
        assert_close(availability, 720.0 / 721.0, 1e-15);
        assert_close(nines(0.999).unwrap(), 3.0, 1e-9);
        // 99.99% is 52.6 minutes a year.
        assert_close(
            downtime_hours_per_year(0.9999).unwrap() * 60.0,
            52.596,
            1e-3,
        );
        assert!(nines(1.0).unwrap().is_infinite());
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        assert!(Lifetime::exponential_rate(-1.0)
            .unwrap_err()
            .to_string()
            .starts_with("failure rate"));
        assert!(Lifetime::weibull(0.0, 1.0).is_err());
        assert!(Lifetime::weibull(100.0, 1.0).is_err());
        assert!(steady_state_availability(720.0, 0.0)
            .unwrap_err()
            .to_string()
            .starts_with("mttr"));
        assert!(nines(1.5).is_err());
    }
}
