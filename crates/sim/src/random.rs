//! The simulator's only source of randomness: a SplitMix64 generator seeded from the
//! run seed.
//!
//! It is written here rather than taken from `rand` because a recorded seed must replay
//! the same run forever, and `rand` does not promise that `StdRng`'s algorithm stays the
//! same across versions (storage's `SimDisk` uses SplitMix64 for the same reason). The
//! world draws every choice from one generator, in a fixed order, so a run is a pure
//! function of its seed.

/// SplitMix64 (Steele, Lea and Flood, 2014).
#[derive(Debug, Clone)]
pub struct SimRandom {
    state: u64,
}

impl SimRandom {
    /// A generator whose whole output is fixed by `seed`.
    pub fn new(seed: u64) -> SimRandom {
        SimRandom { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// A value in `0..bound`. The modulo bias (below 2^-40 for the bounds used here) does
    /// not matter for fault injection.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below() needs a non-empty range");
        self.next_u64() % bound
    }

    /// A value in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "between({low}, {high}) is an empty range");
        low + self.below(high - low + 1)
    }

    /// True with probability `parts_per_million / 1_000_000`.
    pub fn chance(&mut self, parts_per_million: u32) -> bool {
        self.below(1_000_000) < u64::from(parts_per_million)
    }

    /// An index into a non-empty slice of `length` elements.
    pub fn index(&mut self, length: usize) -> usize {
        assert!(length > 0, "index() of an empty slice");
        self.below(length as u64) as usize
    }

    /// A new generator for a separate purpose (a member's election jitter, a torn crash),
    /// so that what one consumer draws does not depend on how much another drew.
    pub fn fork(&mut self) -> u64 {
        self.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence_forever() {
        // Pinned values: if these change, every recorded seed replays a different run.
        let mut random = SimRandom::new(0);
        assert_eq!(random.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(random.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn ranges_are_respected() {
        let mut random = SimRandom::new(7);
        for _ in 0..1_000 {
            let value = random.between(3, 5);
            assert!((3..=5).contains(&value));
            assert!(random.below(1) == 0);
        }
        assert!(!random.chance(0));
        assert!(random.chance(1_000_000));
    }
}
