//! A fixed-size set of operation ids: the "which operations are linearized" half of a
//! memoisation cache key.

/// A set of integers below a capacity fixed at creation, one bit each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    /// An empty set that can hold `0..capacity`.
    pub(crate) fn new(capacity: usize) -> Bitset {
        Bitset {
            words: vec![0; capacity.div_ceil(64)],
        }
    }

    pub(crate) fn insert(&mut self, position: usize) {
        self.words[position / 64] |= 1 << (position % 64);
    }

    pub(crate) fn remove(&mut self, position: usize) {
        self.words[position / 64] &= !(1 << (position % 64));
    }

    /// Whether every member of `self` is in `other`, which has the same capacity.
    pub(crate) fn is_subset(&self, other: &Bitset) -> bool {
        debug_assert_eq!(self.words.len(), other.words.len());
        self.words
            .iter()
            .zip(&other.words)
            .all(|(mine, theirs)| mine & !theirs == 0)
    }

    pub(crate) fn contains(&self, position: usize) -> bool {
        self.words[position / 64] & (1 << (position % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_and_remove_across_words() {
        let mut bitset = Bitset::new(130);
        for position in [0, 63, 64, 129] {
            bitset.insert(position);
        }
        assert!(bitset.contains(64));
        assert!(!bitset.contains(65));
        bitset.remove(64);
        assert!(!bitset.contains(64));
        assert!(bitset.contains(129));

        let mut superset = bitset.clone();
        superset.insert(1);
        assert!(bitset.is_subset(&superset));
        assert!(!superset.is_subset(&bitset));
        assert!(Bitset::new(0).is_subset(&Bitset::new(0)));
    }
}
