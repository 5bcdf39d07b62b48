//! The simulated clock and its agenda: a priority queue of future events keyed by
//! (time, sequence number).
//!
//! The sequence number breaks ties between events due at the same nanosecond in the order
//! they were scheduled, so the order of a run never depends on how the heap happens to
//! arrange equal keys: that is what makes a seed replay exactly.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// The most events the agenda may hold at once. Every member, client and message adds a
/// bounded number, so reaching this is a simulator bug (a runaway reschedule loop).
pub const AGENDA_EVENTS_MAX: usize = 1_000_000;

/// One scheduled entry; ordered by time, then by scheduling order.
#[derive(Debug)]
struct Entry<E> {
    time_ns: u64,
    sequence: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.time_ns, self.sequence) == (other.time_ns, other.sequence)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time_ns, self.sequence).cmp(&(other.time_ns, other.sequence))
    }
}

/// The simulated clock and the events due in its future.
#[derive(Debug)]
pub struct Agenda<E> {
    now_ns: u64,
    next_sequence: u64,
    heap: BinaryHeap<Reverse<Entry<E>>>,
}

impl<E> Default for Agenda<E> {
    fn default() -> Self {
        Agenda {
            now_ns: 0,
            next_sequence: 0,
            heap: BinaryHeap::new(),
        }
    }
}

impl<E> Agenda<E> {
    /// The current simulated time.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Schedules `event` at `time_ns`; a time in the past means now.
    pub fn schedule_at(&mut self, time_ns: u64, event: E) {
        assert!(
            self.heap.len() < AGENDA_EVENTS_MAX,
            "the agenda holds {AGENDA_EVENTS_MAX} events: a simulator event loop runs away"
        );
        let entry = Entry {
            time_ns: time_ns.max(self.now_ns),
            sequence: self.next_sequence,
            event,
        };
        self.next_sequence += 1;
        self.heap.push(Reverse(entry));
    }

    /// Schedules `event` after `delay_ns`.
    pub fn schedule_after(&mut self, delay_ns: u64, event: E) {
        self.schedule_at(self.now_ns.saturating_add(delay_ns), event);
    }

    /// Takes the earliest event and moves the clock to its time.
    pub fn pop(&mut self) -> Option<E> {
        let Reverse(entry) = self.heap.pop()?;
        assert!(entry.time_ns >= self.now_ns, "time never moves backwards");
        self.now_ns = entry.time_ns;
        Some(entry.event)
    }

    /// How many events are scheduled.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_by_time_then_by_scheduling_order() {
        let mut agenda = Agenda::default();
        agenda.schedule_at(20, "late");
        agenda.schedule_at(10, "first at 10");
        agenda.schedule_at(10, "second at 10");
        assert_eq!(agenda.pop(), Some("first at 10"));
        assert_eq!(agenda.now_ns(), 10);
        agenda.schedule_after(0, "now");
        assert_eq!(agenda.pop(), Some("second at 10"));
        assert_eq!(agenda.pop(), Some("now"));
        assert_eq!(agenda.pop(), Some("late"));
        assert_eq!(agenda.now_ns(), 20);
        assert!(agenda.pop().is_none());
    }
}
