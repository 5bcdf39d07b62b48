//! The replicated state machine: what applying a committed log entry does.
//!
//! Every member applies the same entries in the same order (§5.3, State Machine
//! Safety), so everything here must be deterministic: the same entry on the same
//! state gives the same result and the same new state on every member, including
//! the same errors. Errors from applying (a compacted revision, a missing key for
//! `ignore_value`) are results, not failures: they are answered to the client
//! and the revision does not move.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use keel_types::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmResponse, AlarmType, CompactionResponse,
    DeleteRangeResponse, LeaseCheckpointResponse, LeaseGrantResponse, LeaseRevokeResponse,
    PutResponse, RangeRequest, RangeResponse, TxnResponse,
};
use keel_types::keelpb::{log_request, AppliedRequests, MemberRecord, StateMachineSnapshot};
use prost::Message as _;

use crate::lease::LeaseTable;
use crate::mvcc::{KeySpace, KeySpaceError};

/// The result of applying one client write.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResponse {
    /// The result of a Put.
    Put(PutResponse),
    /// The result of a DeleteRange.
    DeleteRange(DeleteRangeResponse),
    /// The result of a Txn.
    Txn(TxnResponse),
    /// The result of a Compact.
    Compaction(CompactionResponse),
    /// A member's attributes were recorded.
    MemberAttributes,
    /// A lease was granted.
    LeaseGrant(LeaseGrantResponse),
    /// A lease was revoked and its keys deleted.
    LeaseRevoke(LeaseRevokeResponse),
    /// Remaining TTLs were recorded.
    LeaseCheckpoint(LeaseCheckpointResponse),
    /// An alarm was raised or cleared.
    Alarm(AlarmResponse),
}

/// Why applying a write failed; the same on every member.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The key space refused the request.
    #[error(transparent)]
    KeySpace(#[from] KeySpaceError),
    /// A lease with this id exists already.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// The NOSPACE alarm is raised: writes that add data are refused until
    /// an operator frees space and disarms it.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
}

/// Why a state machine snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotDecodeError {
    /// The bytes are not a `StateMachineSnapshot` message.
    #[error("state machine snapshot does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The message decodes but its key space is inconsistent.
    #[error("state machine snapshot is inconsistent: {0}")]
    KeySpace(#[from] KeySpaceError),
}

/// The key space plus the cluster membership, as of `applied_index`.
#[derive(Debug)]
pub struct StateMachine {
    key_space: KeySpace,
    members: Vec<MemberRecord>,
    cluster_id: u64,
    applied_index: u64,
    leases: LeaseTable,
    /// Raised alarms, sorted by member then type.
    alarms: Vec<AlarmMember>,
    /// Per proposing member, the request ids applied most recently.
    recent_requests: BTreeMap<u64, RecentRequests>,
}

/// Applied proposals remembered per member, to apply each at most once: Raft
/// may append a proposal twice when a forwarded `MsgPropose` is delivered
/// twice, and the state machine must filter duplicates (§6.3 of Ongaro's
/// thesis). Found by the simulator with duplicated messages.
#[derive(Debug, Default, Clone)]
struct RecentRequests {
    order: VecDeque<u64>,
    ids: BTreeSet<u64>,
}

/// Request ids remembered per member. A duplicate arrives within a few
/// entries of the original, so a window this size is ample; it bounds memory
/// and the snapshot.
const RECENT_REQUESTS_PER_MEMBER_MAX: usize = 4_096;

/// The field number of `versions` in `keelpb.StateMachineSnapshot` (keel.proto), which
/// [`StateMachine::encode`] writes by hand to stream the versions.
const SNAPSHOT_VERSIONS_FIELD: u32 = 4;

impl StateMachine {
    /// An empty state machine for a new cluster with these members.
    pub fn new(members: Vec<MemberRecord>, cluster_id: u64) -> Self {
        StateMachine {
            key_space: KeySpace::new(),
            members,
            cluster_id,
            applied_index: 0,
            leases: LeaseTable::default(),
            alarms: Vec::new(),
            recent_requests: BTreeMap::new(),
        }
    }

    /// Restores a state machine from snapshot bytes written by [`StateMachine::encode`].
    ///
    /// The versions, nearly all of the bytes, are restored from where they lie
    /// ([`KeySpace::from_encoded_versions`]); prost decodes the other fields.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotDecodeError> {
        let (header, versions) = split_snapshot(bytes, VersionsWanted::Collected)?;
        let snapshot = StateMachineSnapshot::decode(header.as_slice())?;
        let key_space = KeySpace::from_encoded_versions(
            snapshot.current_revision,
            snapshot.compact_revision,
            &versions,
        )?;
        // Which keys are attached to which lease is not stored: every live key
        // version carries its lease, so the index is rebuilt from them.
        let leases = LeaseTable::from_records(&snapshot.leases, key_space.live_leases());
        Ok(StateMachine {
            key_space,
            members: snapshot.members,
            cluster_id: snapshot.cluster_id,
            applied_index: snapshot.applied_index,
            leases,
            alarms: snapshot.alarms,
            recent_requests: snapshot
                .recent_requests
                .into_iter()
                .map(|applied| {
                    let order: VecDeque<u64> = applied.request_ids.into_iter().collect();
                    let ids = order.iter().copied().collect();
                    (applied.origin_member_id, RecentRequests { order, ids })
                })
                .collect(),
        })
    }

    /// Only the membership recorded in snapshot bytes written by
    /// [`StateMachine::encode`], without restoring the key space: a restart needs its
    /// own member id before it restores anything, and decoding a million keys twice
    /// cost it most of a second.
    pub fn decode_members(bytes: &[u8]) -> Result<Vec<MemberRecord>, SnapshotDecodeError> {
        let (header, _) = split_snapshot(bytes, VersionsWanted::Skipped)?;
        Ok(StateMachineSnapshot::decode(header.as_slice())?.members)
    }

    /// The same data under a new membership and cluster identity, as of
    /// `applied_index` (restoring a backup into a new cluster).
    pub fn with_membership(
        mut self,
        members: Vec<MemberRecord>,
        cluster_id: u64,
        applied_index: u64,
    ) -> Self {
        self.members = members;
        self.cluster_id = cluster_id;
        self.applied_index = applied_index;
        self
    }

    /// The state machine as snapshot bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.capture().encode()
    }

    /// A consistent capture of the state machine as of its applied index, cheap
    /// to take: the key space is a persistent structure whose clone is O(1), and
    /// the rest is small (members, alarms, lease records, the bounded window of
    /// recent request ids). Encoding it, the O(key space) part, can then run on
    /// another thread while this state machine goes on applying entries.
    pub fn capture(&self) -> StateMachineCapture {
        let header = StateMachineSnapshot {
            applied_index: self.applied_index,
            current_revision: self.key_space.current_revision(),
            compact_revision: self.key_space.compact_revision(),
            members: self.members.clone(),
            cluster_id: self.cluster_id,
            leases: self.leases.records(),
            alarms: self.alarms.clone(),
            recent_requests: self
                .recent_requests
                .iter()
                .map(|(&origin_member_id, recent)| AppliedRequests {
                    origin_member_id,
                    request_ids: recent.order.iter().copied().collect(),
                })
                .collect(),
            versions: Vec::new(),
        };
        StateMachineCapture {
            header,
            key_space: self.key_space.clone(),
        }
    }

    /// The key space, for reads.
    pub fn key_space(&self) -> &KeySpace {
        &self.key_space
    }

    /// The lease table.
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Raised alarms.
    pub fn alarms(&self) -> &[AlarmMember] {
        &self.alarms
    }

    /// True when some member raised the NOSPACE alarm.
    pub fn has_no_space_alarm(&self) -> bool {
        self.alarms
            .iter()
            .any(|alarm| alarm.alarm == AlarmType::Nospace as i32)
    }

    /// The members as of the last applied entry.
    pub fn members(&self) -> &[MemberRecord] {
        &self.members
    }

    /// The cluster's identity.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Index of the last applied log entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Records that every entry up to `index` has been applied (entries that carry
    /// no write, like a new leader's empty entry, only move this).
    pub fn set_applied_index(&mut self, index: u64) {
        assert!(
            index >= self.applied_index,
            "applied index moves backwards from {} to {}",
            self.applied_index,
            index
        );
        self.applied_index = index;
    }

    /// Answers a range read from the current state.
    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse, KeySpaceError> {
        self.key_space.range(request)
    }

    /// Records that the proposal `(origin, request_id)` is being applied;
    /// false if it was applied already (a duplicate that must be skipped).
    /// Request id 0 marks internal proposals, which are idempotent.
    pub fn first_application(&mut self, origin_member_id: u64, request_id: u64) -> bool {
        if request_id == 0 {
            return true;
        }
        let recent = self.recent_requests.entry(origin_member_id).or_default();
        if !recent.ids.insert(request_id) {
            return false;
        }
        recent.order.push_back(request_id);
        if recent.order.len() > RECENT_REQUESTS_PER_MEMBER_MAX {
            let oldest = recent.order.pop_front().expect("not empty");
            recent.ids.remove(&oldest);
        }
        true
    }

    /// Applies one client write at log index `index`.
    pub fn apply_write(
        &mut self,
        index: u64,
        request: &log_request::Request,
    ) -> Result<WriteResponse, ApplyError> {
        self.set_applied_index(index);
        // While NOSPACE is raised, writes that add data fail on every member
        // alike (etcd's capped applier); deletes and compaction still work.
        if self.has_no_space_alarm() && adds_data(request) {
            return Err(ApplyError::NoSpace);
        }
        let revision_before = self.key_space.current_revision();
        let response = match request {
            log_request::Request::Put(put) => {
                // etcd's applier checks the lease before the key space sees the put.
                if put.lease != 0 && !put.ignore_lease && !self.leases.contains(put.lease) {
                    return Err(KeySpaceError::LeaseNotFound.into());
                }
                WriteResponse::Put(self.key_space.put(put)?)
            }
            log_request::Request::DeleteRange(delete) => {
                WriteResponse::DeleteRange(self.key_space.delete_range(delete)?)
            }
            log_request::Request::Txn(txn) => {
                let leases = &self.leases;
                WriteResponse::Txn(
                    self.key_space
                        .txn_with_lease_check(txn, |lease| leases.contains(lease))?,
                )
            }
            log_request::Request::Compaction(compaction) => {
                WriteResponse::Compaction(self.key_space.compact(compaction)?)
            }
            log_request::Request::MemberAttributes(attributes) => {
                // Only name and client URLs are the member's to announce; peer
                // URLs and learner status change through configuration changes.
                if let Some(member) = self
                    .members
                    .iter_mut()
                    .find(|member| member.id == attributes.id)
                {
                    member.name = attributes.name.clone();
                    member.client_urls = attributes.client_urls.clone();
                }
                WriteResponse::MemberAttributes
            }
            log_request::Request::MemberPeerUrls(update) => {
                if let Some(member) = self
                    .members
                    .iter_mut()
                    .find(|member| member.id == update.id)
                {
                    member.peer_urls = update.peer_urls.clone();
                }
                WriteResponse::MemberAttributes
            }
            log_request::Request::Alarm(alarm) => {
                let member = AlarmMember {
                    member_id: alarm.member_id,
                    alarm: alarm.alarm,
                };
                let changed = match alarm.action() {
                    AlarmAction::Activate if alarm.alarm != AlarmType::None as i32 => {
                        if !self.alarms.contains(&member) {
                            self.alarms.push(member);
                            self.alarms
                                .sort_by_key(|alarm| (alarm.member_id, alarm.alarm));
                        }
                        vec![member]
                    }
                    AlarmAction::Deactivate => {
                        let before = self.alarms.len();
                        self.alarms.retain(|known| known != &member);
                        if self.alarms.len() < before {
                            vec![member]
                        } else {
                            Vec::new()
                        }
                    }
                    _ => Vec::new(),
                };
                WriteResponse::Alarm(AlarmResponse {
                    header: None,
                    alarms: changed,
                })
            }
            log_request::Request::LeaseGrant(grant) => {
                if !self.leases.grant(grant.id, grant.ttl) {
                    return Err(ApplyError::LeaseExists);
                }
                WriteResponse::LeaseGrant(LeaseGrantResponse {
                    header: None,
                    id: grant.id,
                    ttl: grant.ttl,
                    error: String::new(),
                })
            }
            log_request::Request::LeaseRevoke(revoke) => {
                let Some(lease) = self.leases.revoke(revoke.id) else {
                    return Err(KeySpaceError::LeaseNotFound.into());
                };
                // All of the lease's keys go at one revision, as in etcd.
                let keys: Vec<Vec<u8>> = lease.keys.into_iter().collect();
                if !keys.is_empty() {
                    self.key_space.delete_keys(&keys);
                }
                WriteResponse::LeaseRevoke(LeaseRevokeResponse { header: None })
            }
            log_request::Request::LeaseCheckpoint(checkpoint) => {
                for entry in &checkpoint.checkpoints {
                    self.leases.checkpoint(entry.id, entry.remaining_ttl);
                }
                WriteResponse::LeaseCheckpoint(LeaseCheckpointResponse { header: None })
            }
        };
        let revision_after = self.key_space.current_revision();
        // Keep the lease → keys index in step with what this write changed.
        // Without leases no key can be attached to one, and building the
        // write's events (copies of every key and value it touched) would cost
        // as much as the write itself.
        if revision_after != revision_before && !self.leases.is_empty() {
            let batch = self
                .key_space
                .events(revision_after, usize::MAX)
                .expect("the revision just written is not compacted");
            self.leases.apply_events(&batch.events);
        }
        Ok(response)
    }

    /// Bytes the key space holds: what the space quota is measured against.
    pub fn approximate_bytes(&self) -> u64 {
        self.key_space.approximate_bytes()
    }

    /// Adds or replaces a member (by id).
    pub fn upsert_member(&mut self, member: MemberRecord) {
        match self.members.iter_mut().find(|known| known.id == member.id) {
            Some(known) => *known = member,
            None => self.members.push(member),
        }
        self.members.sort_by_key(|member| member.id);
    }

    /// Removes a member (by id).
    pub fn remove_member(&mut self, member_id: u64) {
        self.members.retain(|member| member.id != member_id);
    }
}

/// A state machine captured at one applied index by [`StateMachine::capture`],
/// to be encoded (or hashed) away from the member loop. It shares the key
/// space's nodes with the live state machine until writes copy them.
#[derive(Debug, Clone)]
pub struct StateMachineCapture {
    /// Every field of the snapshot except the key space's versions.
    header: StateMachineSnapshot,
    /// The key space as of the capture.
    key_space: KeySpace,
}

impl StateMachineCapture {
    /// The index of the last entry the capture reflects.
    pub fn applied_index(&self) -> u64 {
        self.header.applied_index
    }

    /// The key space as of the capture.
    pub fn key_space(&self) -> &KeySpace {
        &self.key_space
    }

    /// The capture as snapshot bytes, as [`StateMachine::decode`] reads them.
    pub fn encode(&self) -> Vec<u8> {
        // The versions are appended one at a time after the other fields (protobuf
        // decodes fields in any order and concatenates repeated ones), so encoding
        // costs one image plus one value, not a copy of the key space and an image.
        let mut image = Vec::with_capacity(
            self.header.encoded_len() + self.key_space.approximate_bytes() as usize,
        );
        self.header
            .encode(&mut image)
            .expect("a Vec grows to fit the snapshot");
        self.key_space
            .encode_snapshot_versions(SNAPSHOT_VERSIONS_FIELD, &mut image);
        image
    }
}

/// Whether [`split_snapshot`] collects the versions or only steps over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VersionsWanted {
    Collected,
    Skipped,
}

/// Splits an encoded `StateMachineSnapshot` into its fields other than the
/// versions (re-encoded together, for prost to decode) and each version's
/// encoded `KeyVersion`, in order (none when they are `Skipped`). Protobuf allows
/// the fields in any order.
fn split_snapshot(
    mut bytes: &[u8],
    wanted: VersionsWanted,
) -> Result<(Vec<u8>, Vec<&[u8]>), SnapshotDecodeError> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut header = Vec::new();
    let mut versions = Vec::new();
    let mut version_count = 0_usize;
    while !bytes.is_empty() {
        let field_start = bytes;
        let (tag, wire_type) = decode_key(&mut bytes)?;
        if tag == SNAPSHOT_VERSIONS_FIELD && wire_type == WireType::LengthDelimited {
            let length = decode_varint(&mut bytes)?;
            let length = usize::try_from(length)
                .ok()
                .filter(|length| *length <= bytes.len())
                .ok_or_else(|| {
                    KeySpaceError::CorruptSnapshot(format!(
                        "version {version_count} runs past the end of the snapshot \
                         ({length} bytes)"
                    ))
                })?;
            let (version, rest) = bytes.split_at(length);
            if wanted == VersionsWanted::Collected {
                versions.push(version);
            }
            version_count += 1;
            bytes = rest;
        } else {
            skip_field(wire_type, tag, &mut bytes, DecodeContext::default())?;
            header.extend_from_slice(&field_start[..field_start.len() - bytes.len()]);
        }
    }
    Ok((header, versions))
}

/// True for requests that can grow the key space: refused while NOSPACE is raised.
pub fn adds_data(request: &log_request::Request) -> bool {
    match request {
        log_request::Request::Put(_) | log_request::Request::LeaseGrant(_) => true,
        log_request::Request::Txn(txn) => txn_has_puts(txn),
        _ => false,
    }
}

fn txn_has_puts(txn: &keel_types::etcdserverpb::TxnRequest) -> bool {
    use keel_types::etcdserverpb::request_op::Request;
    txn.success
        .iter()
        .chain(txn.failure.iter())
        .any(|operation| match &operation.request {
            Some(Request::RequestPut(_)) => true,
            Some(Request::RequestTxn(nested)) => txn_has_puts(nested),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use keel_types::etcdserverpb::PutRequest;

    use super::*;

    /// A key space large enough to be restored on two threads comes back the
    /// same as it was.
    #[test]
    fn a_large_key_space_round_trips() {
        let mut state_machine = StateMachine::new(Vec::new(), 1);
        for index in 0..60_000u64 {
            let put = PutRequest {
                key: format!("key/{:06}", index % 40_000).into_bytes(),
                value: index.to_be_bytes().to_vec(),
                ..Default::default()
            };
            state_machine
                .apply_write(index + 2, &log_request::Request::Put(put))
                .unwrap();
        }
        let image = state_machine.encode();
        let restored = StateMachine::decode(&image).unwrap();
        assert_eq!(restored.key_space(), state_machine.key_space());
        assert_eq!(restored.encode(), image);
    }

    /// The hand-streamed encoding must decode to exactly what encoding the whole
    /// message at once would have described.
    #[test]
    fn streamed_encoding_decodes_to_the_same_state() {
        let member = MemberRecord {
            id: 7,
            name: "seven".into(),
            ..Default::default()
        };
        let mut state_machine = StateMachine::new(vec![member], 42);
        for (index, (key, value)) in [("a", "1"), ("b", "2"), ("a", "3")].into_iter().enumerate() {
            let put = PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            };
            state_machine
                .apply_write(index as u64 + 2, &log_request::Request::Put(put))
                .unwrap();
        }
        // A tombstone (its value, version and lease unset) and a txn's second
        // change (sub-revision 1) are encoded by hand as well.
        let delete = keel_types::etcdserverpb::DeleteRangeRequest {
            key: b"b".to_vec(),
            ..Default::default()
        };
        let put = |key: &str| keel_types::etcdserverpb::RequestOp {
            request: Some(keel_types::etcdserverpb::request_op::Request::RequestPut(
                PutRequest {
                    key: key.into(),
                    value: b"v".to_vec(),
                    ..Default::default()
                },
            )),
        };
        let txn = keel_types::etcdserverpb::TxnRequest {
            success: vec![put("c"), put("d")],
            ..Default::default()
        };
        state_machine
            .apply_write(5, &log_request::Request::DeleteRange(delete))
            .unwrap();
        state_machine
            .apply_write(6, &log_request::Request::Txn(txn))
            .unwrap();
        let image = state_machine.encode();
        let decoded = StateMachineSnapshot::decode(image.as_slice()).unwrap();
        assert_eq!(decoded.applied_index, 6);
        assert_eq!(decoded.cluster_id, 42);
        assert_eq!(decoded.members.len(), 1);
        assert_eq!(decoded.current_revision, 6);
        assert_eq!(
            decoded.versions,
            state_machine.key_space().snapshot_versions()
        );
        assert_eq!(decoded.versions.len(), 6);
        assert!(decoded.versions.iter().any(|version| version.deleted));
        assert!(decoded
            .versions
            .iter()
            .any(|version| version.sub_revision == 1));

        let restored = StateMachine::decode(&image).unwrap();
        assert_eq!(restored.encode(), image);
        assert_eq!(
            StateMachine::decode_members(&image).unwrap(),
            state_machine.members()
        );
        // Both decodes refuse a version that runs past the end of the image.
        let truncated = &image[..image.len() - 1];
        assert!(StateMachine::decode(truncated).is_err());
        assert!(StateMachine::decode_members(truncated).is_err());
        // Byte for byte what prost writes for the header and then each version.
        let mut expected = StateMachineSnapshot {
            versions: Vec::new(),
            ..decoded.clone()
        }
        .encode_to_vec();
        for version in &decoded.versions {
            prost::encoding::message::encode(SNAPSHOT_VERSIONS_FIELD, version, &mut expected);
        }
        assert_eq!(image, expected);
    }
}
