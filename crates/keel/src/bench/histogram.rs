//! A log-linear latency histogram with fixed memory, in the manner of
//! HdrHistogram: exact below [`SUB_BUCKETS`] nanoseconds, and above that
//! every power of two is split into [`SUB_BUCKETS`] / 2 equal buckets, so a
//! recorded value is known to within 1 / 128 of itself (0.8%).
//!
//! Counters are atomics so that every client task of a run records into one
//! shared histogram without a lock: memory stays [`BUCKETS`] counters per
//! histogram however many clients or operations there are, and the bench
//! needs no crate for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bits of precision kept below the leading bit.
const PRECISION_BITS: u32 = 7;

/// Values below this are counted exactly, one bucket each; it is also the
/// number of buckets per power of two above, doubled.
const SUB_BUCKETS: u64 = 1 << (PRECISION_BITS + 1);

/// The largest value told apart from larger ones: about 4.9 hours in
/// nanoseconds. Larger values are counted in the last bucket; the exact
/// maximum is still kept on its own.
const VALUE_MAX: u64 = (1 << 44) - 1;

/// Buckets in one histogram: the exact ones, then half of [`SUB_BUCKETS`] for
/// each power of two up to [`VALUE_MAX`].
const BUCKETS: usize = bucket_index(VALUE_MAX) + 1;

/// The bucket a value is counted in. Values keep their leading
/// `PRECISION_BITS + 1` bits; the shift that drops the rest picks the group.
const fn bucket_index(value: u64) -> usize {
    let value = if value > VALUE_MAX { VALUE_MAX } else { value };
    if value < SUB_BUCKETS {
        return value as usize;
    }
    let shift = 63 - value.leading_zeros() - PRECISION_BITS;
    let half = SUB_BUCKETS / 2;
    // `value >> shift` lies in [half, 2 * half): the group starts at
    // (shift + 1) * half, so groups follow each other without a gap.
    ((shift as u64 + 1) * half + (value >> shift) - half) as usize
}

/// The largest value counted in bucket `index`.
const fn bucket_value_highest(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB_BUCKETS {
        return index;
    }
    let half = SUB_BUCKETS / 2;
    let shift = index / half - 1;
    let leading = index % half + half;
    ((leading + 1) << shift) - 1
}

/// Counts of recorded values (nanoseconds) in log-linear buckets.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_nanoseconds: AtomicU64,
    max_nanoseconds: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanoseconds: AtomicU64::new(0),
            max_nanoseconds: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Counts one value.
    pub fn record(&self, duration: Duration) {
        let nanoseconds = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        // Relaxed is enough: readers only look after every recorder finished
        // (the progress line reads other counters).
        self.buckets[bucket_index(nanoseconds)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanoseconds
            .fetch_add(nanoseconds, Ordering::Relaxed);
        self.max_nanoseconds
            .fetch_max(nanoseconds, Ordering::Relaxed);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The exact largest value recorded (zero when empty).
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_nanoseconds.load(Ordering::Relaxed))
    }

    /// The exact mean (zero when empty).
    pub fn mean(&self) -> Duration {
        match self.count() {
            0 => Duration::ZERO,
            count => Duration::from_nanos(self.sum_nanoseconds.load(Ordering::Relaxed) / count),
        }
    }

    /// The smallest value that at least `quantile` (0 to 1) of the recorded
    /// values do not exceed, rounded up to its bucket's highest value (so
    /// never understated) but never above the exact maximum. Zero when empty.
    pub fn value_at_quantile(&self, quantile: f64) -> Duration {
        let count = self.count();
        if count == 0 {
            return Duration::ZERO;
        }
        let quantile = quantile.clamp(0.0, 1.0);
        // The rank of the value asked for, 1-based: at least the first.
        let rank = ((quantile * count as f64).ceil() as u64).clamp(1, count);
        let max = self.max_nanoseconds.load(Ordering::Relaxed);
        let mut seen = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                return Duration::from_nanos(bucket_value_highest(index).min(max));
            }
        }
        Duration::from_nanos(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_each_other_without_gap_or_overlap() {
        let mut previous_highest = None;
        for index in 0..BUCKETS {
            let highest = bucket_value_highest(index);
            if let Some(previous) = previous_highest {
                assert!(highest > previous, "bucket {index} does not grow");
                assert_eq!(
                    bucket_index(previous + 1),
                    index,
                    "gap before bucket {index}"
                );
            }
            assert_eq!(
                bucket_index(highest),
                index,
                "bucket {index}'s highest value"
            );
            previous_highest = Some(highest);
        }
        assert_eq!(bucket_value_highest(BUCKETS - 1), VALUE_MAX);
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn a_bucket_is_within_one_part_in_128_of_its_values() {
        for value in [0, 1, 255, 256, 257, 1_000, 123_456, 987_654_321, VALUE_MAX] {
            let highest = bucket_value_highest(bucket_index(value));
            assert!(highest >= value);
            assert!(
                (highest - value) as f64 <= value as f64 / 128.0,
                "{value} is counted as up to {highest}"
            );
        }
    }

    #[test]
    fn memory_is_fixed() {
        assert_eq!(BUCKETS, 38 * 128);
    }

    #[test]
    fn quantiles_of_an_empty_histogram_are_zero() {
        let histogram = Histogram::default();
        assert_eq!(histogram.value_at_quantile(0.5), Duration::ZERO);
        assert_eq!(histogram.max(), Duration::ZERO);
        assert_eq!(histogram.mean(), Duration::ZERO);
    }

    #[test]
    fn quantiles_of_one_to_a_thousand_microseconds() {
        let histogram = Histogram::default();
        for microseconds in (1..=1_000).rev() {
            histogram.record(Duration::from_micros(microseconds));
        }
        assert_eq!(histogram.count(), 1_000);
        assert_eq!(histogram.max(), Duration::from_micros(1_000));
        assert_eq!(histogram.mean(), Duration::from_nanos(500_500));
        for (quantile, expected_microseconds) in [
            (0.0, 1),
            (0.5, 500),
            (0.9, 900),
            (0.99, 990),
            (0.999, 999),
            (1.0, 1_000),
        ] {
            let value = histogram.value_at_quantile(quantile).as_nanos() as f64;
            let expected = expected_microseconds as f64 * 1_000.0;
            assert!(
                value >= expected && value <= expected * (1.0 + 1.0 / 128.0),
                "quantile {quantile}: {value} ns, expected about {expected}"
            );
        }
    }

    #[test]
    fn quantiles_are_ordered_and_capped_by_the_maximum() {
        let histogram = Histogram::default();
        // A skewed sample: many fast values and a few very slow ones.
        for index in 0..10_000u64 {
            let nanoseconds = if index % 1_000 == 0 {
                5_000_000_000 + index
            } else {
                200_000 + index * 7
            };
            histogram.record(Duration::from_nanos(nanoseconds));
        }
        let quantiles: Vec<Duration> = [0.5, 0.9, 0.99, 0.999, 1.0]
            .iter()
            .map(|&quantile| histogram.value_at_quantile(quantile))
            .collect();
        assert!(
            quantiles.windows(2).all(|pair| pair[0] <= pair[1]),
            "{quantiles:?}"
        );
        assert_eq!(quantiles[4], histogram.max());
        assert_eq!(histogram.max(), Duration::from_nanos(5_000_009_000));
    }

    #[test]
    fn values_beyond_the_range_keep_an_exact_maximum() {
        let histogram = Histogram::default();
        histogram.record(Duration::from_secs(100_000));
        assert_eq!(histogram.max(), Duration::from_secs(100_000));
        assert_eq!(
            histogram.value_at_quantile(0.5),
            Duration::from_nanos(VALUE_MAX)
        );
    }
}
