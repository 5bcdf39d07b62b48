//! Dense linear systems for the Markov chains (a few dozen states at most), by Gaussian
//! elimination with partial pivoting.

use crate::AvailabilityError;

/// Solves `matrix · x = right_hand_side`; `matrix` is row-major and square.
pub(crate) fn solve(
    mut matrix: Vec<Vec<f64>>,
    mut right_hand_side: Vec<f64>,
) -> Result<Vec<f64>, AvailabilityError> {
    let size = right_hand_side.len();
    assert_eq!(
        matrix.len(),
        size,
        "the matrix must have one row per unknown"
    );
    for column in 0..size {
        let pivot_row = (column..size)
            .max_by(|&a, &b| matrix[a][column].abs().total_cmp(&matrix[b][column].abs()))
            .expect("the column range is not empty");
        if matrix[pivot_row][column].abs() < f64::MIN_POSITIVE {
            return Err(AvailabilityError::invalid(
                "model",
                "gives a singular system (are all rates above zero?)",
            ));
        }
        matrix.swap(column, pivot_row);
        right_hand_side.swap(column, pivot_row);
        for row in column + 1..size {
            let factor = matrix[row][column] / matrix[column][column];
            if factor == 0.0 {
                continue;
            }
            let (above, below) = matrix.split_at_mut(row);
            for (target, source) in below[0][column..].iter_mut().zip(&above[column][column..]) {
                *target -= factor * source;
            }
            right_hand_side[row] -= factor * right_hand_side[column];
        }
    }
    let mut solution = vec![0.0; size];
    for row in (0..size).rev() {
        let known: f64 = (row + 1..size)
            .map(|entry| matrix[row][entry] * solution[entry])
            .sum();
        solution[row] = (right_hand_side[row] - known) / matrix[row][row];
    }
    Ok(solution)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_system_that_needs_pivoting() {
        // 0·x + 2y = 4; 3x + y = 5 → x = 1, y = 2.
        let solution = solve(vec![vec![0.0, 2.0], vec![3.0, 1.0]], vec![4.0, 5.0]).unwrap();
        assert!((solution[0] - 1.0).abs() < 1e-12 && (solution[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn refuses_a_singular_system() {
        assert!(solve(vec![vec![1.0, 2.0], vec![2.0, 4.0]], vec![1.0, 2.0]).is_err());
    }
}
