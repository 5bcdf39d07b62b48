//! Writing the key space into a Raft snapshot and rebuilding it from one.
//!
//! The snapshot lists every retained change, ordered by key then revision, with the
//! current and compact revisions (`keelpb.StateMachineSnapshot`). Restoring checks
//! everything the key space relies on, because a snapshot arrives from another member
//! or from disk and a corrupt one must be refused, never trusted.

use keel_types::keelpb::{KeyVersion, StateMachineSnapshot};

use std::sync::Arc;

use super::history::{KeyHistory, Revision, StoredVersion};
use super::{KeySpace, KeySpaceError};

impl KeySpace {
    /// Every retained change, ordered by key then revision, as snapshots store them.
    pub fn snapshot_versions(&self) -> Vec<KeyVersion> {
        let mut versions = Vec::with_capacity(self.revisions.len());
        self.for_each_snapshot_version(|version| versions.push(version));
        versions
    }

    /// Calls `visit` with every retained change, ordered by key then revision, one at a
    /// time: a snapshot encoder streams them so that encoding never holds a second copy
    /// of every value.
    pub fn for_each_snapshot_version(&self, mut visit: impl FnMut(KeyVersion)) {
        for (key, history) in &self.keys {
            for version in &history.versions {
                visit(KeyVersion {
                    key: key.to_vec(),
                    create_revision: version.create_revision,
                    mod_revision: version.revision.main,
                    version: version.version,
                    value: version.value.clone(),
                    lease: version.lease,
                    deleted: version.deleted,
                    sub_revision: version.revision.sub,
                });
            }
        }
    }

    /// Fills the key space's part of a snapshot: `current_revision`, `compact_revision`
    /// and `versions`. The other fields are the caller's.
    pub fn write_snapshot(&self, snapshot: &mut StateMachineSnapshot) {
        snapshot.current_revision = self.current_revision;
        snapshot.compact_revision = self.compact_revision;
        snapshot.versions = self.snapshot_versions();
    }

    /// Rebuilds a key space from the `current_revision`, `compact_revision` and
    /// `versions` of a snapshot, failing with [`KeySpaceError::CorruptSnapshot`] if they
    /// do not describe a history that this module could have produced.
    pub fn from_snapshot(snapshot: &StateMachineSnapshot) -> Result<Self, KeySpaceError> {
        Self::take_from_snapshot(&mut snapshot.clone())
    }

    /// As [`KeySpace::from_snapshot`], but moves the values out of `snapshot`
    /// instead of copying them (they are left empty): a restart restores a
    /// million keys without a million extra allocations and copies.
    pub fn take_from_snapshot(snapshot: &mut StateMachineSnapshot) -> Result<Self, KeySpaceError> {
        let corrupt = |reason: String| Err(KeySpaceError::CorruptSnapshot(reason));
        let current_revision = snapshot.current_revision;
        let compact_revision = snapshot.compact_revision;
        // The upper bound leaves room for the next write's revision.
        if current_revision < 1 || current_revision == i64::MAX {
            return corrupt(format!(
                "current revision {current_revision} is out of range"
            ));
        }
        if compact_revision < -1 || compact_revision > current_revision {
            return corrupt(format!(
                "compact revision {compact_revision} is outside [-1, {current_revision}]"
            ));
        }

        let mut key_space = KeySpace {
            current_revision,
            compact_revision,
            ..KeySpace::new()
        };
        let mut histories: Vec<(Arc<[u8]>, KeyHistory)> = Vec::new();
        let mut revisions: Vec<(Revision, Arc<[u8]>)> = Vec::with_capacity(snapshot.versions.len());
        let mut previous: Option<&KeyVersion> = None;
        for entry in snapshot.versions.iter_mut() {
            // The value is moved out below; the checks of the next entry look at
            // this one's revisions, version and flags only, never at its value.
            let value = if entry.deleted || entry.value.is_empty() {
                Vec::new()
            } else {
                std::mem::take(&mut entry.value)
            };
            let entry: &KeyVersion = entry;
            let same_key = previous.is_some_and(|previous| previous.key == entry.key);
            let predecessor = previous.filter(|_| same_key);
            if let Err(reason) = check_entry(entry, predecessor, compact_revision, current_revision)
            {
                let key = String::from_utf8_lossy(&entry.key);
                return corrupt(format!(
                    "key {key:?} at revision {}/{}: {reason}",
                    entry.mod_revision, entry.sub_revision
                ));
            }
            if let Some(previous) = previous {
                if !same_key && previous.key > entry.key {
                    return corrupt("versions are not ordered by key".to_owned());
                }
                if !same_key && !previous.deleted {
                    key_space.live_key_count += 1;
                }
            }
            let revision = Revision {
                main: entry.mod_revision,
                sub: entry.sub_revision,
            };
            let version = StoredVersion {
                revision,
                create_revision: entry.create_revision,
                version: entry.version,
                value,
                lease: entry.lease,
                deleted: entry.deleted,
            };
            if !same_key {
                histories.push((Arc::from(entry.key.as_slice()), KeyHistory::default()));
            }
            let (key, history) = histories.last_mut().expect("pushed above");
            history.push(version);
            revisions.push((revision, Arc::clone(key)));
            previous = Some(entry);
        }
        if previous.is_some_and(|last| !last.deleted) {
            key_space.live_key_count += 1;
        }
        if let Err(revision) = key_space.restore_histories(histories, revisions) {
            return corrupt(format!(
                "revision {}/{} is given to two changes",
                revision.main, revision.sub
            ));
        }
        Ok(key_space)
    }
}

/// Checks one snapshot entry against the entry before it for the same key (if any).
fn check_entry(
    entry: &KeyVersion,
    predecessor: Option<&KeyVersion>,
    compact_revision: i64,
    current_revision: i64,
) -> Result<(), String> {
    if entry.key.is_empty() {
        return Err("empty key".to_owned());
    }
    if entry.mod_revision < 1 || entry.mod_revision > current_revision {
        return Err(format!("revision outside [1, {current_revision}]"));
    }
    if entry.sub_revision < 0 {
        return Err("negative sub-revision".to_owned());
    }
    if let Some(predecessor) = predecessor {
        let order = (predecessor.mod_revision, predecessor.sub_revision)
            .cmp(&(entry.mod_revision, entry.sub_revision));
        if order.is_ge() {
            return Err("versions of a key are not in revision order".to_owned());
        }
        if entry.mod_revision <= compact_revision {
            return Err("two changes at or before the compact revision".to_owned());
        }
    }
    if entry.deleted {
        if entry.create_revision != 0
            || entry.version != 0
            || !entry.value.is_empty()
            || entry.lease != 0
        {
            return Err("tombstone with a create revision, version, value or lease".to_owned());
        }
        return match predecessor {
            Some(predecessor) if predecessor.deleted => Err("tombstone after tombstone".to_owned()),
            Some(_) => Ok(()),
            // Compaction drops a key's history up to a tombstone, except a tombstone
            // exactly at the compact revision.
            None if entry.mod_revision == compact_revision => Ok(()),
            None => Err("history starts with a tombstone".to_owned()),
        };
    }
    let continues_incarnation = predecessor.is_some_and(|predecessor| !predecessor.deleted);
    if continues_incarnation {
        let predecessor = predecessor.expect("checked above");
        if entry.create_revision != predecessor.create_revision
            || entry.version != predecessor.version + 1
        {
            return Err("version does not continue the key's previous version".to_owned());
        }
    } else if predecessor.is_none() && entry.mod_revision <= compact_revision {
        // The only change retained at or before compaction may be any version of an
        // incarnation that began earlier.
        if entry.version < 1
            || entry.create_revision < 1
            || entry.create_revision > entry.mod_revision
        {
            return Err("invalid version or create revision".to_owned());
        }
    } else if entry.version != 1 || entry.create_revision != entry.mod_revision {
        return Err("a created key must start at version 1 at its create revision".to_owned());
    }
    Ok(())
}
