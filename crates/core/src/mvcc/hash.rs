//! `HashKV`: a checksum of the key space's history up to a revision, which members
//! compare to detect a corrupted replica.
//!
//! The hash is etcd v3.5's, byte for byte: a CRC-32C (Castagnoli) over the bucket name
//! `key`, then, in revision order, every retained change's backend key (the revision as
//! 8 big-endian bytes of main revision, `_`, 8 of sub-revision, and a trailing `t` for a
//! tombstone) followed by its backend value (the protobuf `mvccpb.KeyValue`, only the key
//! for a tombstone). prost and gogoproto encode these messages identically.
//!
//! Changes at or below the compact revision are etcd's awkward part, kept exactly: they
//! are hashed only if they are the key's newest change at the hash revision and a put
//! (etcd's `keep` set), unless no key at all exists at the hash revision; and a tombstone
//! exactly at the compact revision is never hashed (etcd since 3.5.16 keeps that
//! tombstone and skips it here so that its hash equals older releases'). The hash at a
//! revision therefore does not change as later writes arrive, and is equal on members
//! that applied the same log, but it changes when a compaction happens: compare hashes
//! only between equal compact revisions, as etcd's corruption check does.

use keel_types::etcdserverpb::HashKvResponse;
use prost::Message;

use super::history::Revision;
use super::key_space::header;
use super::{KeySpace, KeySpaceError};

/// The name of etcd's backend bucket that holds the key space, the first bytes hashed.
const KEY_BUCKET_NAME: &[u8] = b"key";

impl KeySpace {
    /// Hashes every retained change up to `revision` (0: the current revision).
    ///
    /// Fails with [`KeySpaceError::Compacted`] for a positive revision below the compact
    /// revision and [`KeySpaceError::FutureRevision`] above the current one. As in etcd,
    /// a negative revision is not an error: it hashes no change. The response carries
    /// the hash, the compact revision, the hash revision and, in its header, the current
    /// revision.
    pub fn hash_kv(&self, revision: i64) -> Result<HashKvResponse, KeySpaceError> {
        if revision > 0 && revision < self.compact_revision {
            return Err(KeySpaceError::Compacted);
        }
        if revision > 0 && revision > self.current_revision {
            return Err(KeySpaceError::FutureRevision);
        }
        let hash_revision = if revision == 0 {
            self.current_revision
        } else {
            revision
        };
        // etcd skips compacted-away changes only when its keep set is non-empty, that
        // is when some key exists at the hash revision.
        let any_key_exists = self
            .keys
            .values()
            .any(|history| history.live_at(hash_revision).is_some());

        let mut hash = crc32c::crc32c(KEY_BUCKET_NAME);
        for (revision, key) in self.revisions.range(..=Revision::last_of(hash_revision)) {
            let history = self
                .keys
                .get(key)
                .expect("every change in the revision index has a history");
            let version = history
                .at_revision(*revision)
                .expect("every change in the revision index is in its key's history");
            if revision.main <= self.compact_revision {
                let kept = history
                    .newest_at(hash_revision)
                    .is_some_and(|newest| newest.revision == *revision && !newest.deleted);
                if any_key_exists && !kept {
                    continue;
                }
                if revision.main == self.compact_revision && version.deleted {
                    continue;
                }
            }
            hash = crc32c::crc32c_append(hash, &backend_key(*revision, version.deleted));
            hash = crc32c::crc32c_append(hash, &version.stored_key_value(key).encode_to_vec());
        }
        Ok(HashKvResponse {
            header: header(self.current_revision),
            hash,
            compact_revision: self.compact_revision,
            hash_revision,
        })
    }
}

/// The key etcd stores a change under in its backend.
fn backend_key(revision: Revision, deleted: bool) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(18);
    bytes.extend_from_slice(&revision.main.to_be_bytes());
    bytes.push(b'_');
    bytes.extend_from_slice(&revision.sub.to_be_bytes());
    if deleted {
        bytes.push(b't');
    }
    bytes
}
