//! No acknowledged write is lost: after the liveness phase, a final linearizable read of
//! every key must show each acknowledged write or something written after it.
//!
//! The linearizability check already implies this (the final reads are in the history),
//! but a direct check gives a far clearer report when durability is what broke. It is
//! sound because only writes acknowledged before the final reads were sent are held to
//! it, and those precede the reads in real time:
//! - the final reads' store revision is at least every acknowledged revision (the store
//!   cannot forget revisions);
//! - for a key the final read finds, its `mod_revision` is at least the revision of every
//!   acknowledged put or successful compare-and-swap of that key (a later write may have
//!   replaced it; an earlier state may not come back). A key found absent is left to the
//!   linearizability check, since a delete whose answer never came, or the key's lease
//!   ending, may explain it.

use keel_check::{Bytes, Input, Operation, Output};

use crate::violation::Violation;

/// Checks `history` against the final read of each key, `(key, answer)`, which were all
/// sent at or after `final_reads_sent_ns`.
pub fn check(
    history: &[Operation],
    final_reads: &[(Bytes, Output)],
    final_reads_sent_ns: u64,
) -> Result<(), Violation> {
    let final_revision = final_reads
        .iter()
        .filter_map(|(_, output)| output.revision())
        .min();
    for operation in history {
        let Some(revision) = operation.write_revision() else {
            continue;
        };
        // Only writes acknowledged before the final reads were sent precede them.
        if operation
            .return_time
            .is_none_or(|return_time| return_time >= final_reads_sent_ns)
        {
            continue;
        }
        if let Some(final_revision) = final_revision {
            if revision > final_revision {
                return Err(Violation::LostAcknowledgedWrite(format!(
                    "client {} was told its {} created revision {revision}, but the final \
                     reads see the store at revision {final_revision}",
                    operation.client_id,
                    operation.input.kind()
                )));
            }
        }
        let written_key = match &operation.input {
            Input::Put { key, .. }
            | Input::CompareAndSwap { key, .. }
            | Input::PutWithLease { key, .. } => key,
            _ => continue,
        };
        for (key, output) in final_reads {
            if key != written_key {
                continue;
            }
            if let Output::Get {
                value: Some(_),
                mod_revision,
                ..
            } = output
            {
                if *mod_revision < revision {
                    return Err(Violation::LostAcknowledgedWrite(format!(
                        "client {} wrote key {key} at revision {revision} and was told so, but \
                         the final read finds it last written at revision {mod_revision}",
                        operation.client_id
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, revision: u64) -> Operation {
        Operation {
            client_id: 1,
            call_time: 1,
            return_time: Some(2),
            input: Input::Put {
                key: key.into(),
                value: "v".into(),
            },
            output: Output::Put { revision },
        }
    }

    fn final_read(key: &str, mod_revision: u64, revision: u64) -> (Bytes, Output) {
        (
            key.into(),
            Output::Get {
                value: Some("v".into()),
                mod_revision,
                revision,
            },
        )
    }

    #[test]
    fn a_final_read_older_than_an_acknowledged_write_is_a_loss() {
        let history = vec![put("a", 2), put("b", 3)];
        // A write acknowledged after the final reads were sent need not be seen.
        check(&history, &[final_read("a", 1, 1)], 2).unwrap();
        check(
            &history,
            &[final_read("a", 2, 3), final_read("b", 3, 3)],
            10,
        )
        .unwrap();
        assert!(matches!(
            check(&history, &[final_read("a", 2, 2)], 10),
            Err(Violation::LostAcknowledgedWrite(_))
        ));
        assert!(matches!(
            check(
                &history,
                &[final_read("a", 2, 3), final_read("b", 2, 3)],
                10
            ),
            Err(Violation::LostAcknowledgedWrite(_))
        ));
    }
}
