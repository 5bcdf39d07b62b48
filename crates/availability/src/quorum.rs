//! k-of-n systems of independent components: a Raft cluster of n members serves while a
//! majority is up, so it is a ⌊n/2⌋+1-of-n system.
//!
//! Probabilities are carried as a pair, [`UpDown`], with the probability of being down
//! computed directly rather than as 1 − up: a five-member cluster's unavailability is near
//! 1e-9, and 1 − 0.999999999 has already lost most of its digits.

use serde::Serialize;

use crate::{require_probability, AvailabilityError};

/// The largest number of components in one k-of-n block; the computation is O(n²) and
/// no coordination cluster has more than a handful of voting members.
pub const COMPONENTS_MAX: usize = 1_001;

/// The probability that something is up and, computed separately, that it is down.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UpDown {
    /// P(up): reliability or availability.
    pub up: f64,
    /// P(down), kept precise when it is tiny.
    pub down: f64,
}

impl UpDown {
    /// From the probability of being up (precise when `up` is not close to one).
    pub fn from_up(up: f64) -> Result<Self, AvailabilityError> {
        require_probability("probability", up)?;
        Ok(UpDown { up, down: 1.0 - up })
    }

    /// From the probability of being down (precise when `down` is tiny).
    pub fn from_down(down: f64) -> Result<Self, AvailabilityError> {
        require_probability("probability of being down", down)?;
        Ok(UpDown {
            up: 1.0 - down,
            down,
        })
    }
}

/// The size of a majority of `members`: ⌊n/2⌋ + 1.
pub fn majority_quorum(members: usize) -> usize {
    members / 2 + 1
}

/// P(at least k of the components are up), each independently up with its own
/// probability. Exact: the distribution of the number of components up is built one
/// component at a time.
pub fn k_of_n(required: usize, components: &[UpDown]) -> Result<UpDown, AvailabilityError> {
    if components.is_empty() || components.len() > COMPONENTS_MAX {
        return Err(AvailabilityError::invalid(
            "components",
            format!(
                "must number between 1 and {COMPONENTS_MAX}, not {}",
                components.len()
            ),
        ));
    }
    if required == 0 || required > components.len() {
        return Err(AvailabilityError::invalid(
            "required",
            format!(
                "must be between 1 and the number of components ({}), not {required}",
                components.len()
            ),
        ));
    }
    // up_count[j] = P(exactly j of the components so far are up).
    let mut up_count = vec![0.0f64; components.len() + 1];
    up_count[0] = 1.0;
    for (seen, component) in components.iter().enumerate() {
        for j in (0..=seen + 1).rev() {
            let stays = up_count[j] * component.down;
            let arrives = if j > 0 {
                up_count[j - 1] * component.up
            } else {
                0.0
            };
            up_count[j] = stays + arrives;
        }
    }
    Ok(UpDown {
        up: up_count[required..].iter().sum(),
        down: up_count[..required].iter().sum(),
    })
}

/// P(at least k of n identical independent components are up): Σ_{i≥k} C(n,i) pⁱ(1−p)ⁿ⁻ⁱ.
pub fn k_of_n_probability(
    required: usize,
    members: usize,
    component: UpDown,
) -> Result<UpDown, AvailabilityError> {
    if members > COMPONENTS_MAX {
        return Err(AvailabilityError::LimitExceeded {
            what: "members".to_owned(),
            limit: COMPONENTS_MAX as u64,
        });
    }
    k_of_n(required, &vec![component; members])
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
    fn majorities() {
        assert_eq!(majority_quorum(1), 1);
        assert_eq!(majority_quorum(3), 2);
        assert_eq!(majority_quorum(4), 3);
        assert_eq!(majority_quorum(5), 3);
        assert_eq!(majority_quorum(7), 4);
    }

    #[test]
    fn one_of_one_is_the_component() {
        let component = UpDown::from_up(0.9).unwrap();
        let system = k_of_n_probability(1, 1, component).unwrap();
        assert_close(system.up, 0.9, 1e-15);
        assert_close(system.down, 0.1, 1e-15);
    }

    #[test]
    fn two_of_three_by_hand() {
        // 3p² − 2p³ with p = 0.9: 2.43 − 1.458 = 0.972.
        let system = k_of_n_probability(2, 3, UpDown::from_up(0.9).unwrap()).unwrap();
        assert_close(system.up, 0.972, 1e-12);
        // Down: q³ + 3pq² = 0.001 + 0.027 = 0.028.
        assert_close(system.down, 0.028, 1e-12);
    }

    #[test]
    fn three_of_five_by_hand() {
        // 10p³q² + 5p⁴q + p⁵ with p = 0.9: 0.0729 + 0.32805 + 0.59049 = 0.99144.
        let system = k_of_n_probability(3, 5, UpDown::from_up(0.9).unwrap()).unwrap();
        assert_close(system.up, 0.99144, 1e-12);
    }

    #[test]
    fn tiny_unavailability_keeps_its_digits() {
        // 3-of-5 with q = 1e-6 is down with probability ≈ C(5,3) q³ = 1e-17, which
        // 1 − up could never show.
        let system = k_of_n_probability(3, 5, UpDown::from_down(1e-6).unwrap()).unwrap();
        assert_close(system.down / 1e-17, 1.0, 1e-4);
    }

    #[test]
    fn mixed_components() {
        // Two of {0.9, 0.8, 0.7}: 0.9·0.8 + 0.9·0.7 + 0.8·0.7 − 2·0.9·0.8·0.7 = 0.902.
        let components: Vec<UpDown> = [0.9, 0.8, 0.7]
            .iter()
            .map(|&p| UpDown::from_up(p).unwrap())
            .collect();
        assert_close(k_of_n(2, &components).unwrap().up, 0.902, 1e-12);
        // Series (3 of 3) and parallel (1 of 3).
        assert_close(k_of_n(3, &components).unwrap().up, 0.504, 1e-12);
        assert_close(k_of_n(1, &components).unwrap().down, 0.006, 1e-12);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let component = UpDown::from_up(0.5).unwrap();
        assert!(k_of_n(0, &[component]).is_err());
        assert!(k_of_n(2, &[component]).is_err());
        assert!(k_of_n(1, &[]).is_err());
        assert!(UpDown::from_up(1.2).is_err());
    }
}
