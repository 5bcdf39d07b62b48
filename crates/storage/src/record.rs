//! The write-ahead log's record format: encoding, and decoding that classifies every way a
//! record can be damaged.
//!
//! A record is `[u32 body length][u32 crc32c of body][body]`, little endian, and the body is
//! `[u8 kind][fields…]`:
//! - kind 1, entry: `[u64 index][u64 term][payload…]` (the payload runs to the end of the body);
//! - kind 2, hard state: `[u64 term][u64 vote][u64 commit]`;
//! - kind 3, snapshot marker: `[u64 index][u64 term]`.
//!
//! Kind 0 is never written, so a zero-filled region (what some file systems leave after a
//! crash) can never decode as a record. The checksum covers the body only; a damaged length is
//! caught because it points the checksum at the wrong bytes. Deciding whether a damaged record is
//! a torn tail or corruption needs its position in the segment, so that is the WAL's job; this
//! module only reports what it found.

use crate::wal::{HardState, LogEntry, SnapshotMarker};

/// Bytes of the length and checksum fields in front of every body.
pub(crate) const RECORD_HEADER_BYTES: usize = 8;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT_MARKER: u8 = 3;

const ENTRY_FIXED_BYTES: usize = 1 + 8 + 8;
const HARD_STATE_BODY_BYTES: usize = 1 + 8 + 8 + 8;
const SNAPSHOT_MARKER_BODY_BYTES: usize = 1 + 8 + 8;

/// The smallest `record_bytes_max` that can hold every kind of record with an empty payload.
pub(crate) const RECORD_BYTES_MIN: usize = RECORD_HEADER_BYTES + HARD_STATE_BODY_BYTES;

/// A record to encode, borrowing its payload so that appending copies it only once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordRef<'a> {
    Entry(&'a LogEntry),
    HardState(&'a HardState),
    SnapshotMarker(&'a SnapshotMarker),
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Entry(LogEntry),
    HardState(HardState),
    SnapshotMarker(SnapshotMarker),
}

impl Record {
    pub(crate) fn as_ref(&self) -> RecordRef<'_> {
        match self {
            Record::Entry(entry) => RecordRef::Entry(entry),
            Record::HardState(hard_state) => RecordRef::HardState(hard_state),
            Record::SnapshotMarker(marker) => RecordRef::SnapshotMarker(marker),
        }
    }
}

impl RecordRef<'_> {
    /// Size of the encoded record, header included.
    pub(crate) fn encoded_bytes(&self) -> usize {
        RECORD_HEADER_BYTES
            + match self {
                RecordRef::Entry(entry) => ENTRY_FIXED_BYTES + entry.payload.len(),
                RecordRef::HardState(_) => HARD_STATE_BODY_BYTES,
                RecordRef::SnapshotMarker(_) => SNAPSHOT_MARKER_BODY_BYTES,
            }
    }

    /// Appends the encoded record to `out`. The caller has checked the size against
    /// `record_bytes_max`, which is at most `u32::MAX`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let body_bytes = self.encoded_bytes() - RECORD_HEADER_BYTES;
        let body_length = u32::try_from(body_bytes).expect("record size checked by the caller");
        out.extend_from_slice(&body_length.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // The checksum, filled in below.
        match self {
            RecordRef::Entry(entry) => {
                out.push(KIND_ENTRY);
                out.extend_from_slice(&entry.index.to_le_bytes());
                out.extend_from_slice(&entry.term.to_le_bytes());
                out.extend_from_slice(&entry.payload);
            }
            RecordRef::HardState(hard_state) => {
                out.push(KIND_HARD_STATE);
                out.extend_from_slice(&hard_state.term.to_le_bytes());
                out.extend_from_slice(&hard_state.vote.to_le_bytes());
                out.extend_from_slice(&hard_state.commit.to_le_bytes());
            }
            RecordRef::SnapshotMarker(marker) => {
                out.push(KIND_SNAPSHOT_MARKER);
                out.extend_from_slice(&marker.index.to_le_bytes());
                out.extend_from_slice(&marker.term.to_le_bytes());
            }
        }
        let body_start = start + RECORD_HEADER_BYTES;
        assert_eq!(out.len() - body_start, body_bytes, "encoded body size");
        let checksum = crc32c::crc32c(&out[body_start..]);
        out[start + 4..body_start].copy_from_slice(&checksum.to_le_bytes());

        // Pair-assert: what we write must read back as exactly what we meant.
        if cfg!(debug_assertions) {
            let (decoded, end) =
                decode(&out[start..], 0, usize::MAX).expect("a freshly encoded record decodes");
            assert_eq!(end, out.len() - start, "decoded record length");
            assert_eq!(decoded.as_ref(), *self, "record round trip");
        }
    }
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Fewer than [`RECORD_HEADER_BYTES`] bytes remain.
    HeaderIncomplete { bytes_remaining: usize },
    /// The length field is zero, which no record has.
    LengthZero,
    /// The record would end past the end of the data.
    RunsPastEnd { end: u64 },
    /// The record is larger than `record_bytes_max`.
    TooLarge { record_bytes: u64 },
    /// The body does not match its checksum; `end` is where the record would end.
    ChecksumMismatch { end: usize },
    /// The checksum matches but the body does not follow the format.
    Malformed { reason: String },
}

impl DecodeError {
    /// A sentence for error messages and logs.
    pub(crate) fn describe(&self, record_bytes_max: usize) -> String {
        match self {
            DecodeError::HeaderIncomplete { bytes_remaining } => {
                format!(
                    "record header incomplete: {bytes_remaining} of {RECORD_HEADER_BYTES} bytes"
                )
            }
            DecodeError::LengthZero => "record length is zero".to_owned(),
            DecodeError::RunsPastEnd { end } => {
                format!("record claims to end at byte {end}, past the end of the file")
            }
            DecodeError::TooLarge { record_bytes } => format!(
                "record of {record_bytes} bytes exceeds record_bytes_max of {record_bytes_max}"
            ),
            DecodeError::ChecksumMismatch { end } => {
                format!("record checksum mismatch (the record would end at byte {end})")
            }
            DecodeError::Malformed { reason } => format!("malformed record: {reason}"),
        }
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the record starting at `offset` of `bytes`; on success returns it and the offset
/// just past it.
pub(crate) fn decode(
    bytes: &[u8],
    offset: usize,
    record_bytes_max: usize,
) -> Result<(Record, usize), DecodeError> {
    let bytes_remaining = bytes.len() - offset;
    if bytes_remaining < RECORD_HEADER_BYTES {
        return Err(DecodeError::HeaderIncomplete { bytes_remaining });
    }
    let body_bytes = read_u32(bytes, offset) as usize;
    let checksum = read_u32(bytes, offset + 4);
    if body_bytes == 0 {
        return Err(DecodeError::LengthZero);
    }
    let body_start = offset + RECORD_HEADER_BYTES;
    let end = body_start + body_bytes;
    if end > bytes.len() {
        return Err(DecodeError::RunsPastEnd { end: end as u64 });
    }
    if RECORD_HEADER_BYTES + body_bytes > record_bytes_max {
        return Err(DecodeError::TooLarge {
            record_bytes: (RECORD_HEADER_BYTES + body_bytes) as u64,
        });
    }
    let body = &bytes[body_start..end];
    if crc32c::crc32c(body) != checksum {
        return Err(DecodeError::ChecksumMismatch { end });
    }
    let record = decode_body(body)?;
    Ok((record, end))
}

fn decode_body(body: &[u8]) -> Result<Record, DecodeError> {
    let expect_bytes = |kind: &str, expected: usize| {
        if body.len() == expected {
            Ok(())
        } else {
            Err(DecodeError::Malformed {
                reason: format!("{kind} body is {} bytes, expected {expected}", body.len()),
            })
        }
    };
    match body[0] {
        KIND_ENTRY => {
            if body.len() < ENTRY_FIXED_BYTES {
                return Err(DecodeError::Malformed {
                    reason: format!("entry body is only {} bytes", body.len()),
                });
            }
            Ok(Record::Entry(LogEntry {
                index: read_u64(body, 1),
                term: read_u64(body, 9),
                payload: body[ENTRY_FIXED_BYTES..].to_vec(),
            }))
        }
        KIND_HARD_STATE => {
            expect_bytes("hard state", HARD_STATE_BODY_BYTES)?;
            Ok(Record::HardState(HardState {
                term: read_u64(body, 1),
                vote: read_u64(body, 9),
                commit: read_u64(body, 17),
            }))
        }
        KIND_SNAPSHOT_MARKER => {
            expect_bytes("snapshot marker", SNAPSHOT_MARKER_BODY_BYTES)?;
            Ok(Record::SnapshotMarker(SnapshotMarker {
                index: read_u64(body, 1),
                term: read_u64(body, 9),
            }))
        }
        kind => Err(DecodeError::Malformed {
            reason: format!("unknown record kind {kind}"),
        }),
    }
}

/// Whether a valid record starts anywhere in `bytes[from..]`. Used to tell a torn tail from a
/// damaged length field in the middle of a segment: only the former has nothing valid after it.
///
/// A payload could be crafted so that almost every offset looks like the start of a large
/// record, which would make a naive scan quadratic. Candidates are therefore filtered on their
/// kind byte and fixed sizes before their checksum is computed, and the bytes checksummed are
/// capped at `SCAN_CHECKSUM_BYTES_PER_BYTE` times the region scanned (at least
/// `SCAN_CHECKSUM_BYTES_MIN`). When the cap is hit the scan answers `false` (no record found):
/// the tail is then treated as torn, which is what it nearly always is.
pub(crate) fn any_record_after(bytes: &[u8], from: usize, record_bytes_max: usize) -> bool {
    let region_bytes = bytes.len().saturating_sub(from);
    let mut checksum_budget_bytes = region_bytes
        .saturating_mul(SCAN_CHECKSUM_BYTES_PER_BYTE)
        .max(SCAN_CHECKSUM_BYTES_MIN);
    for offset in from..bytes.len().saturating_sub(RECORD_HEADER_BYTES) {
        let body_bytes = read_u32(bytes, offset) as usize;
        let body_start = offset + RECORD_HEADER_BYTES;
        let plausible = body_bytes > 0
            && body_bytes <= bytes.len() - body_start
            && RECORD_HEADER_BYTES + body_bytes <= record_bytes_max
            && match bytes[body_start] {
                KIND_ENTRY => body_bytes >= ENTRY_FIXED_BYTES,
                KIND_HARD_STATE => body_bytes == HARD_STATE_BODY_BYTES,
                KIND_SNAPSHOT_MARKER => body_bytes == SNAPSHOT_MARKER_BODY_BYTES,
                _ => false,
            };
        if !plausible {
            continue;
        }
        if checksum_budget_bytes < body_bytes {
            tracing::warn!(
                offset,
                "gave up looking for records after a damaged one: scan budget spent"
            );
            return false;
        }
        checksum_budget_bytes -= body_bytes;
        if decode(bytes, offset, record_bytes_max).is_ok() {
            return true;
        }
    }
    false
}

/// Checksum work allowed per byte scanned by [`any_record_after`].
const SCAN_CHECKSUM_BYTES_PER_BYTE: usize = 16;
/// Checksum work always allowed to [`any_record_after`], so short tails are scanned fully.
const SCAN_CHECKSUM_BYTES_MIN: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(record: RecordRef<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        record.encode_into(&mut out);
        out
    }

    #[test]
    fn every_kind_round_trips() {
        let entry = LogEntry {
            index: 7,
            term: 3,
            payload: b"payload".to_vec(),
        };
        let hard_state = HardState {
            term: 3,
            vote: 2,
            commit: 6,
        };
        let marker = SnapshotMarker { index: 5, term: 2 };
        for record in [
            RecordRef::Entry(&entry),
            RecordRef::HardState(&hard_state),
            RecordRef::SnapshotMarker(&marker),
        ] {
            let bytes = encode(record);
            assert_eq!(bytes.len(), record.encoded_bytes());
            let (decoded, end) = decode(&bytes, 0, usize::MAX).unwrap();
            assert_eq!(decoded.as_ref(), record);
            assert_eq!(end, bytes.len());
        }
    }

    #[test]
    fn layout_is_little_endian_length_checksum_body() {
        let marker = SnapshotMarker { index: 1, term: 2 };
        let bytes = encode(RecordRef::SnapshotMarker(&marker));
        assert_eq!(&bytes[0..4], &17u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &crc32c::crc32c(&bytes[8..]).to_le_bytes());
        assert_eq!(bytes[8], KIND_SNAPSHOT_MARKER);
        assert_eq!(&bytes[9..17], &1u64.to_le_bytes());
    }

    #[test]
    fn damage_is_classified() {
        let hard_state = HardState {
            term: 1,
            vote: 1,
            commit: 1,
        };
        let bytes = encode(RecordRef::HardState(&hard_state));
        assert_eq!(
            decode(&bytes[..5], 0, usize::MAX),
            Err(DecodeError::HeaderIncomplete { bytes_remaining: 5 })
        );
        assert_eq!(
            decode(&bytes[..20], 0, usize::MAX),
            Err(DecodeError::RunsPastEnd { end: 33 })
        );
        assert_eq!(
            decode(&[0; 16], 0, usize::MAX),
            Err(DecodeError::LengthZero)
        );
        assert!(matches!(
            decode(&bytes, 0, 20),
            Err(DecodeError::TooLarge { record_bytes: 33 })
        ));
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert_eq!(
            decode(&flipped, 0, usize::MAX),
            Err(DecodeError::ChecksumMismatch { end: 33 })
        );
        // A valid checksum over an unknown kind is a format error, not damage.
        let mut unknown = bytes.clone();
        unknown[8] = 9;
        let checksum = crc32c::crc32c(&unknown[8..]);
        unknown[4..8].copy_from_slice(&checksum.to_le_bytes());
        assert!(matches!(
            decode(&unknown, 0, usize::MAX),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn finds_a_record_after_garbage() {
        let marker = SnapshotMarker { index: 1, term: 1 };
        let mut bytes = vec![0xAB; 13];
        bytes.extend(encode(RecordRef::SnapshotMarker(&marker)));
        assert!(any_record_after(&bytes, 0, usize::MAX));
        assert!(!any_record_after(&bytes, 14, usize::MAX));
    }
}
