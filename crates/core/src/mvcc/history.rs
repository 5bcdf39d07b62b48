//! One key's history: its versions and tombstones in revision order.
//!
//! A key's history is a vector sorted by revision, because writes only ever append to
//! it (revisions grow) and compaction only ever removes a prefix. A read at a revision
//! is then one binary search.

use keel_types::mvccpb::KeyValue;

/// A point in the store's history: the main revision a change was made at, and its
/// position among the changes of that revision (a txn changes several keys at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    /// The first revision of a main revision.
    pub fn first_of(main: i64) -> Revision {
        Revision { main, sub: 0 }
    }

    /// The last possible revision of a main revision.
    pub fn last_of(main: i64) -> Revision {
        Revision {
            main,
            sub: i64::MAX,
        }
    }
}

/// One change to a key: a put (a new version) or a delete (a tombstone).
///
/// A tombstone has `deleted` set and `create_revision`, `version`, `value` and `lease`
/// zero or empty, which is also how snapshots store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredVersion {
    pub revision: Revision,
    pub create_revision: i64,
    pub version: i64,
    pub value: Vec<u8>,
    pub lease: i64,
    pub deleted: bool,
}

impl StoredVersion {
    /// The tombstone a delete leaves at `revision`.
    pub fn tombstone(revision: Revision) -> StoredVersion {
        StoredVersion {
            revision,
            create_revision: 0,
            version: 0,
            value: Vec::new(),
            lease: 0,
            deleted: true,
        }
    }

    /// This version as etcd shows it to clients. Only meaningful for a put.
    pub fn key_value(&self, key: &[u8]) -> KeyValue {
        debug_assert!(!self.deleted, "a tombstone has no key-value to show");
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.revision.main,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }

    /// This change as etcd stores it in its backend: the full key-value for a put, and
    /// only the key for a tombstone. The hash covers exactly these bytes.
    pub fn stored_key_value(&self, key: &[u8]) -> KeyValue {
        if self.deleted {
            KeyValue {
                key: key.to_vec(),
                ..KeyValue::default()
            }
        } else {
            self.key_value(key)
        }
    }
}

/// Every retained change to one key, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyHistory {
    pub versions: Vec<StoredVersion>,
}

/// Versions up to which a history grows one slot at a time; beyond, it doubles.
const HISTORY_EXACT_GROWTH_VERSIONS_MAX: usize = 4;

impl KeyHistory {
    /// Appends a version. Most keys hold one to a few versions, and `Vec`'s
    /// first allocation is four slots (288 bytes here), so small histories grow
    /// one slot at a time: at a million single-version keys that saved about
    /// 200 MiB. Longer histories double as usual.
    pub fn push(&mut self, version: StoredVersion) {
        let length = self.versions.len();
        if length == self.versions.capacity() {
            let additional = if length < HISTORY_EXACT_GROWTH_VERSIONS_MAX {
                1
            } else {
                length
            };
            self.versions.reserve_exact(additional);
        }
        self.versions.push(version);
    }

    /// Gives back room left by a compaction that dropped most of the history.
    pub fn shrink_after_compaction(&mut self) {
        if self.versions.capacity() > 2 * self.versions.len() + HISTORY_EXACT_GROWTH_VERSIONS_MAX {
            self.versions.shrink_to_fit();
        }
    }

    /// The newest change at or before main revision `main`, tombstones included.
    pub fn newest_at(&self, main: i64) -> Option<&StoredVersion> {
        let count_at_or_before = self.versions.partition_point(|v| v.revision.main <= main);
        count_at_or_before
            .checked_sub(1)
            .map(|index| &self.versions[index])
    }

    /// The key's version as a read at main revision `main` sees it: `None` when the key
    /// did not exist then (never created, or deleted).
    pub fn live_at(&self, main: i64) -> Option<&StoredVersion> {
        self.newest_at(main).filter(|version| !version.deleted)
    }

    /// The change made at exactly `revision`, if it is retained.
    pub fn at_revision(&self, revision: Revision) -> Option<&StoredVersion> {
        self.versions
            .binary_search_by_key(&revision, |version| version.revision)
            .ok()
            .map(|index| &self.versions[index])
    }

    /// The newest change strictly before main revision `main`: what a read at `main - 1`
    /// sees, which is how etcd finds a watch event's previous key-value.
    pub fn newest_before(&self, main: i64) -> Option<&StoredVersion> {
        let count_before = self.versions.partition_point(|v| v.revision.main < main);
        count_before
            .checked_sub(1)
            .map(|index| &self.versions[index])
    }
}
