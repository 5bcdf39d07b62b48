//! Backups: the file that Maintenance.Snapshot streams (`etcdctl snapshot
//! save`, `keel snapshot save`) and that `keel snapshot restore` turns into a
//! new member's data directory.
//!
//! Format: `KEELBAK1` magic, `u64` little-endian length of the body, the body
//! (a state machine snapshot: key space history, leases, alarms), zero padding
//! to a multiple of 512 bytes, and the SHA-256 of everything before it. The
//! padding and trailing digest are etcd's snapshot stream convention, which
//! `etcdctl snapshot save` checks for (size modulo 512 must be 32). The digest
//! is checked before anything is restored, so a truncated or damaged backup is
//! refused with a clear error.

use keel_types::keelpb::MemberRecord;
use raft::eraftpb::Snapshot;

use crate::node::BOOTSTRAP_INDEX;
use crate::state_machine::StateMachine;

const MAGIC: &[u8; 8] = b"KEELBAK1";

/// Why a backup file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The file does not start with the backup magic.
    #[error("not a keel backup (bad magic)")]
    NotABackup,
    /// The file is shorter than its header says.
    #[error("backup is truncated: {actual} bytes, expected {expected}")]
    Truncated {
        /// Bytes present.
        actual: usize,
        /// Bytes the header promises.
        expected: usize,
    },
    /// The SHA-256 digest does not match the content.
    #[error("backup SHA-256 mismatch: the file is damaged")]
    Checksum,
    /// The body is not a state machine snapshot.
    #[error(transparent)]
    Decode(#[from] crate::state_machine::SnapshotDecodeError),
}

/// Sector size the padded content is a multiple of (etcd's convention).
const PADDING_BYTES: usize = 512;
/// Length of the trailing SHA-256 digest.
const DIGEST_BYTES: usize = 32;

/// Wraps state machine snapshot bytes into a backup file.
pub fn encode(state_machine_bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut file = Vec::with_capacity(state_machine_bytes.len() + PADDING_BYTES + DIGEST_BYTES);
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&(state_machine_bytes.len() as u64).to_le_bytes());
    file.extend_from_slice(state_machine_bytes);
    file.resize(file.len().div_ceil(PADDING_BYTES) * PADDING_BYTES, 0);
    let digest = sha2::Sha256::digest(&file);
    file.extend_from_slice(&digest);
    file
}

/// Checks a backup file and returns the state machine it holds.
pub fn decode(file: &[u8]) -> Result<StateMachine, BackupError> {
    use sha2::Digest;
    if file.len() < 16 || &file[..8] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let length = u64::from_le_bytes(file[8..16].try_into().expect("8 bytes")) as usize;
    let padded = 16usize
        .saturating_add(length)
        .div_ceil(PADDING_BYTES)
        .saturating_mul(PADDING_BYTES);
    let expected = padded.saturating_add(DIGEST_BYTES);
    if file.len() != expected {
        return Err(BackupError::Truncated {
            actual: file.len(),
            expected,
        });
    }
    let digest = sha2::Sha256::digest(&file[..padded]);
    if digest.as_slice() != &file[padded..] {
        return Err(BackupError::Checksum);
    }
    Ok(StateMachine::decode(&file[16..16 + length])?)
}

/// What `keel snapshot status` reports about a backup.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupStatus {
    /// HashKV of the key space at its revision.
    pub hash: u32,
    /// The key space's revision.
    pub revision: i64,
    /// Keys that exist at that revision.
    pub key_count: usize,
    /// Size of the file in bytes.
    pub file_bytes: usize,
}

/// Summarises a backup file.
pub fn status(file: &[u8]) -> Result<BackupStatus, BackupError> {
    let state_machine = decode(file)?;
    let key_space = state_machine.key_space();
    let hash = key_space
        .hash_kv(0)
        .map(|response| response.hash)
        .unwrap_or_default();
    Ok(BackupStatus {
        hash,
        revision: key_space.current_revision(),
        key_count: key_space.key_count(),
        file_bytes: file.len(),
    })
}

/// Builds the bootstrap snapshot of a NEW cluster whose data is the backup's
/// and whose members are `members` (as etcdutl's restore does: a restored
/// cluster gets a new identity, so it cannot be confused with the old one).
pub fn restore(
    file: &[u8],
    members: Vec<MemberRecord>,
    cluster_id: u64,
) -> Result<Snapshot, BackupError> {
    let state_machine = decode(file)?;
    let restored = state_machine.with_membership(members.clone(), cluster_id, BOOTSTRAP_INDEX);
    let mut snapshot = crate::node::bootstrap_snapshot(members, cluster_id);
    snapshot.data = restored.encode().into();
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_types::etcdserverpb::PutRequest;
    use keel_types::keelpb::log_request;

    fn member(id: u64) -> MemberRecord {
        MemberRecord {
            id,
            name: format!("m{id}"),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_restore_and_damage() {
        let mut state_machine = StateMachine::new(vec![member(1)], 7);
        for index in 2..10u64 {
            state_machine
                .apply_write(
                    index,
                    &log_request::Request::Put(PutRequest {
                        key: format!("k{index}").into_bytes(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    }),
                )
                .unwrap();
        }
        let file = encode(&state_machine.encode());
        let summary = status(&file).unwrap();
        assert_eq!(summary.revision, 9);
        assert_eq!(summary.key_count, 8);

        let snapshot = restore(&file, vec![member(5), member(6)], 99).unwrap();
        assert_eq!(snapshot.get_metadata().index, BOOTSTRAP_INDEX);
        assert_eq!(snapshot.get_metadata().get_conf_state().voters, vec![5, 6]);
        let restored = StateMachine::decode(&snapshot.data).unwrap();
        assert_eq!(restored.cluster_id(), 99);
        assert_eq!(restored.members().len(), 2);
        assert_eq!(restored.key_space().current_revision(), 9);
        assert_eq!(restored.applied_index(), BOOTSTRAP_INDEX);

        let mut damaged = file.clone();
        damaged[20] ^= 1;
        assert!(matches!(decode(&damaged), Err(BackupError::Checksum)));
        assert_eq!(file.len() % 512, 32, "etcdctl's snapshot size convention");
        assert!(matches!(
            decode(&file[..file.len() - 1]),
            Err(BackupError::Truncated { .. })
        ));
        assert!(matches!(
            decode(b"not a backup at all"),
            Err(BackupError::NotABackup)
        ));
    }
}
