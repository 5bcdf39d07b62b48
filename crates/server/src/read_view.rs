//! Serializable single-key reads answered on the gRPC task, without a hop to
//! the member thread.
//!
//! A serializable read of one key costs O(log n) and was answered by the
//! member thread: a channel send, a wake-up of that thread and a wake-up of
//! the gRPC task again, which is most of the read's latency (ZooKeeper
//! answers getData on the connection's own thread). Here the member loop
//! publishes a read view: an O(1) capture of the key space (a persistent
//! structure) with the response header, taken after entries were applied and
//! before the replies of that batch go out. A read is answered from the view
//! only when the view is of the member's newest applied index; otherwise it
//! takes the old path through the member thread and asks for a view. So a
//! client that was answered a write by this member reads it back, as from the
//! member thread, and a read is never older than one answered before it.
//!
//! A view keeps its version of the key space alive, and a capture makes the
//! next writes copy the tree nodes they change. So the loop publishes a view
//! only while reads ask for one, and drops a stale view at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use keel_core::mvcc::{KeySpace, KeySpaceError};
use keel_core::Node;
use keel_types::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};

/// A capture of the key space at one applied index.
struct Capture {
    applied_index: u64,
    key_space: KeySpace,
    header: ResponseHeader,
}

/// What the member loop shares with the client services for serializable
/// single-key reads.
#[derive(Default)]
pub struct ReadView {
    /// The member's newest applied index, stored after the view (if any) of
    /// that index.
    applied_index: AtomicU64,
    capture: RwLock<Option<Arc<Capture>>>,
    /// A read found no view of the newest applied index.
    wanted: AtomicBool,
}

impl ReadView {
    /// Called by the member loop after the node applied entries and before
    /// the replies of the same output are delivered, and at the end of every
    /// batch, so that reads of a member that applies nothing new get a view
    /// too.
    pub(crate) fn publish(&self, node: &Node) {
        let applied_index = node.state_machine().applied_index();
        let changed = applied_index != self.applied_index.load(Ordering::Relaxed);
        if !changed && !self.wanted.load(Ordering::Relaxed) {
            return;
        }
        let capture = self.wanted.swap(false, Ordering::AcqRel).then(|| {
            Arc::new(Capture {
                applied_index,
                key_space: node.state_machine().key_space().clone(),
                header: node.header(0),
            })
        });
        *self.capture.write().expect("not poisoned") = capture;
        self.applied_index.store(applied_index, Ordering::Release);
    }

    /// Answers a serializable read of a single key from the view, or `None`
    /// when there is no view of the newest applied index (the read then goes
    /// to the member thread, and the next batch publishes one).
    pub(crate) fn range(
        &self,
        request: &RangeRequest,
    ) -> Option<Result<RangeResponse, KeySpaceError>> {
        if !request.range_end.is_empty() {
            return None;
        }
        let applied_index = self.applied_index.load(Ordering::Acquire);
        let capture = self.capture.read().expect("not poisoned").clone();
        let capture = match capture {
            Some(capture) if capture.applied_index == applied_index => capture,
            _ => {
                self.wanted.store(true, Ordering::Release);
                return None;
            }
        };
        Some(range_with_header(
            &capture.key_space,
            request,
            capture.header,
        ))
    }
}

/// Reads from a capture of the key space, with the member's response header
/// as of the capture and the revision the read reports (what
/// `Node::range_local` answers on the member thread).
pub(crate) fn range_with_header(
    key_space: &KeySpace,
    request: &RangeRequest,
    header: ResponseHeader,
) -> Result<RangeResponse, KeySpaceError> {
    key_space.range(request).map(|mut response| {
        let revision = response.header.as_ref().map_or(0, |header| header.revision);
        response.header = Some(ResponseHeader { revision, ..header });
        response
    })
}
