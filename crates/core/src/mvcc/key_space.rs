//! The key space itself: its indexes, reads, single writes and compaction.
//!
//! Two ordered maps hold the state. `keys` maps each key to its history, so a range over
//! `[key, range_end)` is one `range` walk, O(log n + k) for k keys in the
//! range (k counts keys whose history is retained even if they are deleted at the read
//! revision, as etcd's index does). `revisions` maps every retained change's revision
//! to its key, which gives revision order for the hash, the event feed and compaction
//! without scanning every key. Keys are shared between the two maps through `Arc`.
//!
//! Both maps are persistent B-trees (`imbl::OrdMap`: nodes shared through `Arc`, copied
//! on the first write after a clone), and each history sits behind an `Arc` too. So
//! cloning a `KeySpace` costs O(1) whatever its size: that is how a snapshot or a
//! corruption check captures the key space at one revision on the member loop and then
//! encodes or hashes it on another thread while writes go on. A write after a clone
//! copies the O(log n) nodes on its path once, and the history it appends to.

use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;
use keel_types::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_types::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader,
};
use keel_types::mvccpb::{event::EventType, Event, KeyValue};

use super::history::{KeyHistory, Revision, StoredVersion};
use super::validate::{validate_delete_range, validate_put, validate_range};
use super::KeySpaceError;

/// What [`KeySpace::approximate_bytes`] adds per retained version on top of its key and
/// value: roughly the revision, counters and index entries that version costs.
pub const VERSION_OVERHEAD_BYTES: u64 = 64;

/// etcd's MVCC key space: every key's versions and tombstones, the current revision and
/// the compacted revision. See the [module documentation](super) for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    /// Every key with retained history, in key order.
    pub(super) keys: OrdMap<Arc<[u8]>, Arc<KeyHistory>>,
    /// The key of every retained change, in revision order.
    pub(super) revisions: OrdMap<Revision, Arc<[u8]>>,
    /// The revision of the newest committed change (1 for an empty store, as in etcd).
    pub(super) current_revision: i64,
    /// The revision of the last compaction; -1 before the first one, as in etcd.
    pub(super) compact_revision: i64,
    /// How many keys exist at the current revision.
    pub(super) live_key_count: usize,
    /// Sum over retained versions of key, value and [`VERSION_OVERHEAD_BYTES`].
    pub(super) approximate_bytes: u64,
}

/// A batch of events read from the history by [`KeySpace::events`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventBatch {
    /// Events in revision order, then sub-revision order. Each carries `prev_kv` when
    /// the key existed just before the event's revision and that version is retained;
    /// the caller drops it for watchers that did not ask for it. A DELETE event's `kv`
    /// holds the key and, as in etcd, `mod_revision` set to the deleting revision.
    pub events: Vec<Event>,
    /// The revision to ask for next: every event below it (and at or above the start)
    /// is in this batch or an earlier one.
    pub next_revision: i64,
}

/// The changes made by one write request (a put, a delete, a whole txn), which all
/// share the main revision `begin_revision + 1`.
#[derive(Debug)]
pub(super) struct WriteBatch {
    /// The store's current revision when the write began.
    begin_revision: i64,
    /// How many changes the write has made so far: the next change's sub-revision.
    change_count: i64,
}

impl WriteBatch {
    /// The revision the write's changes get.
    pub fn write_revision(&self) -> i64 {
        self.begin_revision + 1
    }

    /// The revision reads inside the write observe: the write's own revision once it
    /// has changed something, so a txn reads its own earlier writes, as in etcd.
    pub fn read_revision(&self) -> i64 {
        if self.change_count > 0 {
            self.begin_revision + 1
        } else {
            self.begin_revision
        }
    }

    /// Whether the write has changed anything yet.
    pub fn has_changes(&self) -> bool {
        self.change_count > 0
    }
}

/// A response header carrying only the revision; the caller fills the rest.
pub(super) fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..ResponseHeader::default()
    })
}

impl Default for KeySpace {
    fn default() -> Self {
        Self::new()
    }
}

impl KeySpace {
    /// An empty key space at revision 1 that has never been compacted.
    pub fn new() -> Self {
        KeySpace {
            keys: OrdMap::new(),
            revisions: OrdMap::new(),
            current_revision: 1,
            compact_revision: -1,
            live_key_count: 0,
            approximate_bytes: 0,
        }
    }

    /// The revision of the newest change; 1 for an empty store.
    pub fn current_revision(&self) -> i64 {
        self.current_revision
    }

    /// The revision of the last compaction, or -1 if there has been none (etcd reports
    /// the same -1, for example in `HashKV`). Reads below it fail.
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// How many keys exist at the current revision.
    pub fn key_count(&self) -> usize {
        self.live_key_count
    }

    /// How many versions and tombstones are retained (for all keys and revisions).
    pub fn version_count(&self) -> usize {
        self.revisions.len()
    }

    /// An estimate of the memory the retained history takes, in bytes: what keel
    /// reports as its database size. It shrinks on compaction.
    pub fn approximate_bytes(&self) -> u64 {
        self.approximate_bytes
    }

    /// Every key that exists at the current revision with a lease attached, and
    /// its lease: what the lease table's key index is rebuilt from after a restore.
    pub fn live_leases(&self) -> impl Iterator<Item = (&[u8], i64)> + '_ {
        self.keys.iter().filter_map(|(key, history)| {
            history
                .live_at(self.current_revision)
                .filter(|version| version.lease != 0)
                .map(|version| (&**key, version.lease))
        })
    }

    /// Reads a key or a key range, at the current revision or at `request.revision`.
    ///
    /// Follows etcd's applier exactly: when the request sorts or filters on revisions,
    /// every key in the range is fetched and the filters, the sort and then `limit` are
    /// applied; otherwise `limit + 1` keys are fetched in key order (so a `sort_target`
    /// other than KEY with `sort_order` NONE sorts only those, ascending). `count` is the
    /// number of keys in the range at the read revision, before limit and filters. The
    /// header's revision is the current revision even for a historical read.
    /// `serializable` is not looked at: which member may answer is the caller's choice.
    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse, KeySpaceError> {
        validate_range(request)?;
        self.range_at(request, self.current_revision)
    }

    /// Writes one key: a new version at a new revision.
    ///
    /// With `ignore_value` (or `ignore_lease`) the key keeps its current value (or
    /// lease), and must exist. The lease is stored as given: the caller checks that it
    /// exists first, as etcd's applier does before it writes.
    pub fn put(&mut self, request: &PutRequest) -> Result<PutResponse, KeySpaceError> {
        validate_put(request)?;
        let mut batch = self.begin_write();
        let response = self.apply_put(&mut batch, request)?;
        self.commit_write(batch);
        Ok(response)
    }

    /// Deletes a key or a key range. The revision advances only if a key was deleted.
    pub fn delete_range(
        &mut self,
        request: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, KeySpaceError> {
        validate_delete_range(request)?;
        let mut batch = self.begin_write();
        let response = self.apply_delete_range(&mut batch, request);
        self.commit_write(batch);
        Ok(response)
    }

    /// Deletes the given keys (those that exist) at one revision, in key order: what
    /// etcd's lessor does when a lease is revoked or expires. The revision advances only
    /// if a key was deleted; the response says how many were and at what revision.
    pub fn delete_keys<K: AsRef<[u8]>>(&mut self, keys: &[K]) -> DeleteRangeResponse {
        let mut sorted_keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        sorted_keys.sort_unstable();
        sorted_keys.dedup();
        let mut batch = self.begin_write();
        let mut deleted = 0;
        for key in sorted_keys {
            let request = DeleteRangeRequest {
                key: key.to_vec(),
                ..DeleteRangeRequest::default()
            };
            deleted += self.apply_delete_range(&mut batch, &request).deleted;
        }
        let revision = self.commit_write(batch);
        DeleteRangeResponse {
            header: header(revision),
            deleted,
            prev_kvs: Vec::new(),
        }
    }

    /// Discards the history that reads at `request.revision` or later do not need.
    ///
    /// Per key, etcd v3.5 (since 3.5.16) keeps the newest change at or before the
    /// compact revision, unless it is a tombstone older than the compact revision, and
    /// drops everything before it. A tombstone exactly at the compact revision is kept so
    /// that a watch starting there still sees the delete; the next compaction drops it.
    /// Compaction is synchronous here, so `physical` makes no difference.
    pub fn compact(
        &mut self,
        request: &CompactionRequest,
    ) -> Result<CompactionResponse, KeySpaceError> {
        let revision = request.revision;
        if revision <= self.compact_revision {
            return Err(KeySpaceError::Compacted);
        }
        if revision > self.current_revision {
            return Err(KeySpaceError::FutureRevision);
        }
        // Only keys changed since the previous compaction can have history to drop:
        // every other key retains a single change at or before the previous compact
        // revision, which stays its newest change at or before this one. A tombstone
        // left exactly at the previous compact revision is in this range too.
        let touched_keys: Vec<Arc<[u8]>> = {
            let mut keys: Vec<Arc<[u8]>> = self
                .revisions
                .range(Revision::first_of(self.compact_revision)..=Revision::last_of(revision))
                .map(|(_, key)| Arc::clone(key))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        };
        for key in touched_keys {
            let history = Arc::make_mut(
                self.keys
                    .get_mut(&key)
                    .expect("every key in the revision index has a history"),
            );
            let count_at_or_before = history
                .versions
                .partition_point(|version| version.revision.main <= revision);
            let newest = &history.versions[count_at_or_before - 1];
            let keep_newest = !(newest.deleted && newest.revision.main < revision);
            let drop_count = count_at_or_before - usize::from(keep_newest);
            for dropped in history.versions.drain(..drop_count) {
                self.revisions.remove(&dropped.revision);
                self.approximate_bytes -= version_bytes(&key, &dropped);
            }
            if history.versions.is_empty() {
                self.keys.remove(&key);
            } else {
                history.shrink_after_compaction();
            }
        }
        self.compact_revision = revision;
        Ok(CompactionResponse {
            header: header(self.current_revision),
        })
    }

    /// Reads the changes made at revisions `start_revision` and later, as watch events,
    /// for a watcher catching up (or for the caller to learn what the write it just
    /// applied changed).
    ///
    /// At most `events_max` events are returned, except that the changes of one
    /// revision are never split across batches: a batch ends early only at a revision
    /// boundary, so it may exceed `events_max` by one revision's changes. As in etcd's
    /// watch, a start below the compacted revision fails with
    /// [`KeySpaceError::Compacted`]; a start at the compacted revision is allowed.
    pub fn events(
        &self,
        start_revision: i64,
        events_max: usize,
    ) -> Result<EventBatch, KeySpaceError> {
        self.events_matching(start_revision, events_max, |_| true)
    }

    /// As [`KeySpace::events`], but only for changes to keys for which `matches` is
    /// true. Changes to other keys still count towards `events_max` (they are scanned),
    /// but they are skipped before their event is built: a watcher of one key behind
    /// many large values of other keys costs no copies of those values.
    pub fn events_matching(
        &self,
        start_revision: i64,
        events_max: usize,
        matches: impl Fn(&[u8]) -> bool,
    ) -> Result<EventBatch, KeySpaceError> {
        if start_revision < self.compact_revision {
            return Err(KeySpaceError::Compacted);
        }
        let mut events = Vec::new();
        let mut last_main = None;
        let changes = self.revisions.range(Revision::first_of(start_revision)..);
        for (scanned, (revision, key)) in changes.enumerate() {
            if scanned >= events_max && last_main != Some(revision.main) {
                return Ok(EventBatch {
                    events,
                    next_revision: revision.main,
                });
            }
            last_main = Some(revision.main);
            if !matches(key) {
                continue;
            }
            let history = self
                .keys
                .get(key)
                .expect("every change in the revision index has a history");
            let version = history
                .at_revision(*revision)
                .expect("every change in the revision index is in its key's history");
            let (event_type, kv) = if version.deleted {
                let kv = KeyValue {
                    key: key.to_vec(),
                    mod_revision: revision.main,
                    ..KeyValue::default()
                };
                (EventType::Delete, kv)
            } else {
                (EventType::Put, version.key_value(key))
            };
            let prev_kv = history
                .newest_before(revision.main)
                .filter(|previous| !previous.deleted)
                .map(|previous| previous.key_value(key));
            events.push(Event {
                r#type: event_type as i32,
                kv: Some(kv),
                prev_kv,
            });
        }
        Ok(EventBatch {
            events,
            next_revision: start_revision.max(self.current_revision + 1),
        })
    }

    /// Asserts that the indexes agree with each other and with the counters. It walks
    /// the whole key space, so it is meant for tests and simulation, after every step.
    pub fn check_invariants(&self) {
        assert!(self.current_revision >= 1, "revision starts at 1");
        assert!(
            self.compact_revision >= -1 && self.compact_revision <= self.current_revision,
            "compact revision {} outside [-1, {}]",
            self.compact_revision,
            self.current_revision
        );
        let mut version_count = 0;
        let mut live_key_count = 0;
        let mut approximate_bytes = 0;
        for (key, history) in &self.keys {
            assert!(!key.is_empty(), "no key is empty");
            assert!(
                !history.versions.is_empty(),
                "a key without history is removed"
            );
            assert!(
                history
                    .versions
                    .windows(2)
                    .all(|pair| pair[0].revision < pair[1].revision),
                "a key's history is in revision order"
            );
            let at_or_before_compaction = history
                .versions
                .iter()
                .filter(|version| version.revision.main <= self.compact_revision)
                .count();
            assert!(
                at_or_before_compaction <= 1,
                "compaction keeps at most one change per key at or before it"
            );
            for version in &history.versions {
                assert!(
                    version.revision.main <= self.current_revision,
                    "no change is newer than the current revision"
                );
                assert_eq!(
                    self.revisions.get(&version.revision),
                    Some(key),
                    "the revision index names the change's key"
                );
                if version.deleted {
                    assert!(
                        version.revision.main >= self.compact_revision,
                        "tombstones older than the compact revision are dropped"
                    );
                } else {
                    assert!(version.version >= 1, "a put has a version of at least 1");
                    assert!(
                        version.create_revision >= 1
                            && version.create_revision <= version.revision.main,
                        "a key is created before or when it is written"
                    );
                }
                approximate_bytes += version_bytes(key, version);
            }
            version_count += history.versions.len();
            if history.live_at(self.current_revision).is_some() {
                live_key_count += 1;
            }
        }
        assert_eq!(version_count, self.revisions.len(), "revision index size");
        assert_eq!(live_key_count, self.live_key_count, "live key count");
        assert_eq!(
            approximate_bytes, self.approximate_bytes,
            "approximate bytes"
        );
    }

    // ---------------------------------------------------------------------------------
    // Internals shared with the txn, hash and snapshot modules.
    // ---------------------------------------------------------------------------------

    /// Starts a write request.
    pub(super) fn begin_write(&self) -> WriteBatch {
        WriteBatch {
            begin_revision: self.current_revision,
            change_count: 0,
        }
    }

    /// Ends a write request, advancing the revision if it changed anything, and returns
    /// the revision its response reports.
    pub(super) fn commit_write(&mut self, batch: WriteBatch) -> i64 {
        assert_eq!(
            batch.begin_revision, self.current_revision,
            "write requests are applied one at a time"
        );
        if batch.has_changes() {
            self.current_revision += 1;
        }
        self.current_revision
    }

    /// The keys whose history lies in the range a request names, in key order, with
    /// etcd's conventions: an empty `range_end` names the single key `key`, `"\0"` names
    /// every key at or after `key`, and a `range_end` at or before `key` names nothing.
    pub(super) fn keys_in<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
    ) -> impl Iterator<Item = (&'a Arc<[u8]>, &'a KeyHistory)> + 'a {
        let bounds: Option<KeyBounds> = if range_end.is_empty() {
            Some((Bound::Included(key), Bound::Included(key)))
        } else if range_end == [0] {
            Some((Bound::Included(key), Bound::Unbounded))
        } else if range_end > key {
            Some((Bound::Included(key), Bound::Excluded(range_end)))
        } else {
            None
        };
        bounds
            .into_iter()
            .flat_map(move |bounds| self.keys.range::<_, [u8]>(bounds))
            .map(|(key, history)| (key, &**history))
    }

    /// A range read as of `current_revision`: the store's current revision, or inside a
    /// txn the revision the txn reads at. The request has been validated.
    pub(super) fn range_at(
        &self,
        request: &RangeRequest,
        current_revision: i64,
    ) -> Result<RangeResponse, KeySpaceError> {
        if request.revision > current_revision {
            return Err(KeySpaceError::FutureRevision);
        }
        let read_revision = if request.revision <= 0 {
            current_revision
        } else {
            request.revision
        };
        if read_revision < self.compact_revision {
            return Err(KeySpaceError::Compacted);
        }

        let filters_or_sorts = request.sort_order != SortOrder::None as i32
            || request.min_mod_revision != 0
            || request.max_mod_revision != 0
            || request.min_create_revision != 0
            || request.max_create_revision != 0;
        // etcd fetches one key more than the limit to learn whether there are more,
        // unless it must fetch everything to filter and sort first.
        let fetch_limit = match usize::try_from(request.limit) {
            Ok(limit) if limit > 0 && !filters_or_sorts => Some(limit.saturating_add(1)),
            _ => None,
        };

        let mut count: i64 = 0;
        let mut found: Vec<(&[u8], &StoredVersion)> = Vec::new();
        for (key, history) in self.keys_in(&request.key, &request.range_end) {
            let Some(version) = history.live_at(read_revision) else {
                continue;
            };
            count += 1;
            if !request.count_only && fetch_limit.is_none_or(|limit| found.len() < limit) {
                found.push((key, version));
            }
        }

        found.retain(|(_, version)| {
            let mod_revision = version.revision.main;
            let create_revision = version.create_revision;
            !(request.max_mod_revision != 0 && mod_revision > request.max_mod_revision
                || request.min_mod_revision != 0 && mod_revision < request.min_mod_revision
                || request.max_create_revision != 0
                    && create_revision > request.max_create_revision
                || request.min_create_revision != 0
                    && create_revision < request.min_create_revision)
        });

        sort_found(&mut found, request);

        let mut more = false;
        if let Ok(limit) = usize::try_from(request.limit) {
            if limit > 0 && found.len() > limit {
                found.truncate(limit);
                more = true;
            }
        }

        let kvs = found
            .into_iter()
            .map(|(key, version)| {
                let mut kv = version.key_value(key);
                if request.keys_only {
                    kv.value = Vec::new();
                }
                kv
            })
            .collect();
        Ok(RangeResponse {
            header: header(current_revision),
            kvs,
            more,
            count,
        })
    }

    /// Applies a validated put as part of `batch`.
    pub(super) fn apply_put(
        &mut self,
        batch: &mut WriteBatch,
        request: &PutRequest,
    ) -> Result<PutResponse, KeySpaceError> {
        let key = request.key.as_slice();
        let previous = self
            .keys
            .get(key)
            .and_then(|history| history.live_at(batch.read_revision()));
        if (request.ignore_value || request.ignore_lease) && previous.is_none() {
            return Err(KeySpaceError::KeyNotFound);
        }
        let value = match previous {
            Some(previous) if request.ignore_value => previous.value.clone(),
            _ => request.value.clone(),
        };
        let lease = match previous {
            Some(previous) if request.ignore_lease => previous.lease,
            _ => request.lease,
        };
        let prev_kv = previous
            .filter(|_| request.prev_kv)
            .map(|previous| previous.key_value(key));
        let (create_revision, version) = match previous {
            Some(previous) => (previous.create_revision, previous.version + 1),
            None => (batch.write_revision(), 1),
        };
        if previous.is_none() {
            self.live_key_count += 1;
        }
        self.append(
            batch,
            key,
            StoredVersion {
                revision: Revision::first_of(0),
                create_revision,
                version,
                value,
                lease,
                deleted: false,
            },
        );
        Ok(PutResponse {
            header: header(batch.write_revision()),
            prev_kv,
        })
    }

    /// Applies a validated delete as part of `batch`.
    pub(super) fn apply_delete_range(
        &mut self,
        batch: &mut WriteBatch,
        request: &DeleteRangeRequest,
    ) -> DeleteRangeResponse {
        let read_revision = batch.read_revision();
        let mut deleted_keys = Vec::new();
        let mut prev_kvs = Vec::new();
        for (key, history) in self.keys_in(&request.key, &request.range_end) {
            if let Some(version) = history.live_at(read_revision) {
                deleted_keys.push(Arc::clone(key));
                if request.prev_kv {
                    prev_kvs.push(version.key_value(key));
                }
            }
        }
        for key in &deleted_keys {
            self.append(batch, key, StoredVersion::tombstone(Revision::first_of(0)));
            self.live_key_count -= 1;
        }
        let revision = if batch.has_changes() {
            batch.write_revision()
        } else {
            batch.begin_revision
        };
        DeleteRangeResponse {
            header: header(revision),
            deleted: i64::try_from(deleted_keys.len()).expect("key count fits in i64"),
            prev_kvs,
        }
    }

    /// Records one change to `key` in `batch`, giving it the batch's next revision.
    fn append(&mut self, batch: &mut WriteBatch, key: &[u8], mut version: StoredVersion) {
        version.revision = Revision {
            main: batch.write_revision(),
            sub: batch.change_count,
        };
        batch.change_count += 1;
        self.approximate_bytes += version_bytes(key, &version);
        let revision = version.revision;
        // One walk of the key map per change (a lookup, then an entry, cost two more
        // walks each): a restart replays up to a snapshot's worth of writes here.
        let key: Arc<[u8]> = match self.keys.get_key_value_mut(key) {
            Some((existing, history)) => {
                let existing = Arc::clone(existing);
                let history = Arc::make_mut(history);
                if let Some(last) = history.versions.last() {
                    assert!(
                        last.revision < version.revision,
                        "history only grows forwards"
                    );
                }
                history.push(version);
                existing
            }
            None => {
                let key: Arc<[u8]> = Arc::from(key);
                let mut history = KeyHistory::default();
                history.push(version);
                self.keys.insert(Arc::clone(&key), Arc::new(history));
                key
            }
        };
        let previous_key = self.revisions.insert(revision, key);
        assert!(previous_key.is_none(), "a revision is given out once");
    }

    /// Installs the histories recovered from a snapshot, already checked by the
    /// caller: `histories` in key order, `revisions` naming every change's key.
    /// Each map is built in one pass of sorted inserts (no lookups), which is
    /// most of what a restart of a large key space costs. Fails with the
    /// duplicated revision if two changes share one.
    pub(super) fn restore_histories(
        &mut self,
        histories: Vec<(Arc<[u8]>, KeyHistory)>,
        revisions: Vec<(Revision, Arc<[u8]>)>,
    ) -> Result<(), Revision> {
        let revision_count = revisions.len();
        for (key, history) in &histories {
            for version in &history.versions {
                self.approximate_bytes += version_bytes(key, version);
            }
        }
        // The two maps do not depend on each other: a large key space builds them
        // on two threads (after reading the files, a restart's largest cost). The
        // result is the same either way, so the node stays deterministic.
        let mut histories = Some(histories);
        let mut revisions = Some(revisions);
        let parallel = if revision_count >= PARALLEL_RESTORE_VERSIONS_MIN {
            std::thread::scope(|scope| {
                let revisions = &mut revisions;
                let spawned = std::thread::Builder::new()
                    .name("keel-restore".to_owned())
                    .spawn_scoped(scope, move || {
                        build_revision_map(revisions.take().expect("taken once"))
                    });
                // No thread to be had: the maps are built one after the other below.
                spawned.ok().map(|handle| {
                    let keys = build_key_map(histories.take().expect("taken once"));
                    let revisions = handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    (keys, revisions)
                })
            })
        } else {
            None
        };
        let (keys, revisions) = match parallel {
            Some(maps) => maps,
            None => (
                build_key_map(histories.take().expect("not taken")),
                build_revision_map(revisions.take().expect("not taken")),
            ),
        };
        self.keys = keys;
        self.revisions = revisions?;
        Ok(())
    }
}

/// A restore of at least this many versions builds the key and revision maps
/// on two threads; below it, a thread costs more than it saves.
const PARALLEL_RESTORE_VERSIONS_MIN: usize = 50_000;

/// The key map of a restore, from histories in key order.
fn build_key_map(histories: Vec<(Arc<[u8]>, KeyHistory)>) -> OrdMap<Arc<[u8]>, Arc<KeyHistory>> {
    histories
        .into_iter()
        .map(|(key, history)| (key, Arc::new(history)))
        .collect()
}

/// The revision map of a restore, or the revision given to two changes.
fn build_revision_map(
    mut revisions: Vec<(Revision, Arc<[u8]>)>,
) -> Result<OrdMap<Revision, Arc<[u8]>>, Revision> {
    revisions.sort_unstable_by_key(|(revision, _)| *revision);
    if let Some(pair) = revisions.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(pair[0].0);
    }
    Ok(revisions.into_iter().collect())
}

/// The bounds of a key range, as `OrdMap::range` takes them.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// What one retained version counts for in [`KeySpace::approximate_bytes`].
pub(super) fn version_bytes(key: &[u8], version: &StoredVersion) -> u64 {
    let payload = key.len() + version.value.len();
    u64::try_from(payload).expect("sizes fit in u64") + VERSION_OVERHEAD_BYTES
}

/// Sorts range results as etcd's applier does: a `sort_target` other than KEY with
/// `sort_order` NONE sorts ascending, and KEY with NONE (or ASCEND) keeps key order.
/// etcd sorts with Go's unstable `sort.Sort`; keel sorts stably, so equal elements stay
/// in key order (as Go's insertion sort also leaves them for up to 12 results).
fn sort_found(found: &mut [(&[u8], &StoredVersion)], request: &RangeRequest) {
    // The request has been validated, so both enums are known values.
    let target = SortTarget::try_from(request.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(request.sort_order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if order == SortOrder::None || (target == SortTarget::Key && order == SortOrder::Ascend) {
        return;
    }
    let compare = |left: &(&[u8], &StoredVersion), right: &(&[u8], &StoredVersion)| match target {
        SortTarget::Key => left.0.cmp(right.0),
        SortTarget::Version => left.1.version.cmp(&right.1.version),
        SortTarget::Create => left.1.create_revision.cmp(&right.1.create_revision),
        SortTarget::Mod => left.1.revision.main.cmp(&right.1.revision.main),
        SortTarget::Value => left.1.value.cmp(&right.1.value),
    };
    match order {
        SortOrder::Descend => found.sort_by(|left, right| compare(right, left)),
        _ => found.sort_by(compare),
    }
}
