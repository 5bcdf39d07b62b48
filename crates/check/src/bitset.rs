//! A fixed-size set of operation ids: the "which operations are linearized" half of a
//! memoisation cache key.

/// A set of integers below a capacity fixed at creation, one bit each.
///
/// It also tracks its leading all-ones and trailing all-zeros words, so that
/// [`Bitset::compact`] costs what the set's ragged middle holds rather than its capacity: the
/// search inserts and removes near that middle, so keeping the bounds exact is cheap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Bitset {
    words: Vec<u64>,
    /// How many leading words are all ones.
    full_words: usize,
    /// One past the last non-zero word (0 when empty).
    end_words: usize,
}

impl Bitset {
    /// An empty set that can hold `0..capacity`.
    pub(crate) fn new(capacity: usize) -> Bitset {
        Bitset {
            words: vec![0; capacity.div_ceil(64)],
            full_words: 0,
            end_words: 0,
        }
    }

    pub(crate) fn insert(&mut self, position: usize) {
        let word = position / 64;
        self.words[word] |= 1 << (position % 64);
        while self.full_words < self.words.len() && self.words[self.full_words] == u64::MAX {
            self.full_words += 1;
        }
        self.end_words = self.end_words.max(word + 1);
    }

    pub(crate) fn remove(&mut self, position: usize) {
        let word = position / 64;
        self.words[word] &= !(1 << (position % 64));
        self.full_words = self.full_words.min(word);
        while self.end_words > 0 && self.words[self.end_words - 1] == 0 {
            self.end_words -= 1;
        }
    }

    /// Whether every member of `self` is in `other`, which has the same capacity.
    pub(crate) fn is_subset(&self, other: &Bitset) -> bool {
        debug_assert_eq!(self.words.len(), other.words.len());
        self.words
            .iter()
            .zip(&other.words)
            .all(|(mine, theirs)| mine & !theirs == 0)
    }

    /// A canonical copy without the leading all-ones and trailing all-zeros words, for sets
    /// that grow roughly in order (the linearized operations): its size follows the
    /// concurrency of the history rather than its length.
    pub(crate) fn compact(&self) -> CompactBitset {
        let full_words = self.full_words.min(self.end_words);
        CompactBitset {
            full_words,
            words: self.words[full_words..self.end_words].into(),
        }
    }

    /// The bytes the set takes, inline and on the heap.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of::<Bitset>() + self.words.len() * std::mem::size_of::<u64>()
    }

    pub(crate) fn contains(&self, position: usize) -> bool {
        self.words[position / 64] & (1 << (position % 64)) != 0
    }
}

/// A [`Bitset`] stored as a count of leading all-ones words and the words after them, up to
/// the last non-zero one; equal sets of the same capacity give equal values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CompactBitset {
    full_words: usize,
    words: Box<[u64]>,
}

impl CompactBitset {
    /// The bytes the set holds on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.len() * std::mem::size_of::<u64>()
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

    #[test]
    fn compact_form_is_canonical_and_small() {
        let mut bitset = Bitset::new(64 * 10);
        assert_eq!(bitset.compact().words.len(), 0);
        for position in 0..64 * 3 + 2 {
            bitset.insert(position);
        }
        bitset.insert(64 * 5);
        let compact = bitset.compact();
        assert_eq!(compact.full_words, 3);
        assert_eq!(compact.words.len(), 3);
        let mut same = Bitset::new(64 * 10);
        for position in (0..64 * 3 + 2).rev() {
            same.insert(position);
        }
        same.insert(64 * 5);
        same.insert(64 * 7);
        same.remove(64 * 7);
        assert_eq!(same.compact(), compact);
        let mut full = Bitset::new(128);
        for position in 0..128 {
            full.insert(position);
        }
        assert_eq!(full.compact().full_words, 2);
        assert_eq!(full.compact().words.len(), 0);
    }
}
