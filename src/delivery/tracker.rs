//! Continuity of one topic's live events: is a republished event the next one to deliver, one already
//! delivered, or are events missing before it?
//!
//! The ingress keeps one [`Tracker`] per followed topic. Each republished event carries its own sequence and
//! the sequence of the previous event on the same subject (`Nats-Last-Sequence`, read into
//! [`Stored::last_on_subject`]); comparing the latter with the last sequence delivered detects a gap: core
//! NATS drops what is published while a connection is down, and a node's failure can lose republished copies
//! that the stream did store. A gap is filled from the stream ([`super::reader`]) before the live event is
//! delivered. Pure logic, no I/O.

use super::stream::Stored;

/// What to do with a live event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next event of the topic: deliver it, then [`Tracker::advance`].
    Deliver,
    /// Already delivered (or covered by a replay): drop it.
    Duplicate,
    /// Events of the topic with sequences in `after + 1 ..= through` were not delivered; `through` is the
    /// live event's `Nats-Last-Sequence`, itself an event of the topic, so reading the subject after `after`
    /// up to `through` fills the gap exactly. Then the live event (`before`) is delivered.
    Gap {
        after: u64,
        through: u64,
        before: u64,
    },
}

/// The delivery state of one topic: every stored event of it up to [`last`](Self::last) has been delivered,
/// and none after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    last: u64,
}

impl Tracker {
    /// A topic whose last delivered event has sequence `seq`.
    pub fn delivered(seq: u64) -> Self {
        Self { last: seq }
    }

    /// A topic of which every event up to `watermark` was delivered (or need not be) and nothing after: for
    /// example the stream's last sequence read when the topic was first subscribed. It need not be an event
    /// of the topic.
    pub fn lower_bound(watermark: u64) -> Self {
        Self { last: watermark }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// Classifies a live event.
    pub fn check(&self, stored: &Stored) -> Verdict {
        if stored.seq <= self.last {
            return Verdict::Duplicate;
        }
        match stored.last_on_subject {
            Some(previous) if previous > self.last => Verdict::Gap {
                after: self.last,
                through: previous,
                before: stored.seq,
            },
            // The previous event of the subject is at or before what was delivered: nothing is missing.
            _ => Verdict::Deliver,
        }
    }

    /// Records that every event up to `seq` is delivered (a live event, or the end of a gap fill or replay).
    /// Never moves back.
    pub fn advance(&mut self, seq: u64) {
        self.last = self.last.max(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn live(seq: u64, last_on_subject: Option<u64>) -> Stored {
        Stored {
            seq,
            last_on_subject,
            subject: "epoch.user.42".into(),
            time: UNIX_EPOCH,
        }
    }

    #[test]
    fn the_next_event_is_delivered() {
        let tracker = Tracker::delivered(7);
        assert_eq!(tracker.check(&live(9, Some(7))), Verdict::Deliver);
    }

    #[test]
    fn a_subjects_first_event_is_delivered() {
        assert_eq!(
            Tracker::lower_bound(0).check(&live(1, None)),
            Verdict::Deliver
        );
        assert_eq!(
            Tracker::lower_bound(30).check(&live(31, None)),
            Verdict::Deliver
        );
    }

    #[test]
    fn first_event_after_subscribing_at_a_lower_bound() {
        // Subscribed when the stream's last sequence was 50; the topic's previous event is 44, before it.
        let tracker = Tracker::lower_bound(50);
        assert_eq!(tracker.check(&live(53, Some(44))), Verdict::Deliver);
        assert_eq!(tracker.check(&live(53, Some(50))), Verdict::Deliver);
        // Its previous event is 52: stored after the bound and never delivered.
        assert_eq!(
            tracker.check(&live(53, Some(52))),
            Verdict::Gap {
                after: 50,
                through: 52,
                before: 53
            }
        );
    }

    #[test]
    fn events_at_or_before_the_last_are_duplicates() {
        let tracker = Tracker::delivered(7);
        assert_eq!(tracker.check(&live(7, Some(3))), Verdict::Duplicate);
        assert_eq!(tracker.check(&live(5, None)), Verdict::Duplicate);
        // A republished copy that arrives after its gap was filled from the stream.
        assert_eq!(tracker.check(&live(6, Some(99))), Verdict::Duplicate);
    }

    #[test]
    fn a_missing_previous_event_is_a_gap() {
        let tracker = Tracker::delivered(7);
        assert_eq!(
            tracker.check(&live(12, Some(10))),
            Verdict::Gap {
                after: 7,
                through: 10,
                before: 12
            }
        );
    }

    #[test]
    fn advance_never_moves_back() {
        let mut tracker = Tracker::delivered(7);
        tracker.advance(12);
        assert_eq!(tracker.last(), 12);
        tracker.advance(9);
        assert_eq!(tracker.last(), 12);
        assert_eq!(tracker.check(&live(12, Some(10))), Verdict::Duplicate);
        assert_eq!(tracker.check(&live(13, Some(12))), Verdict::Deliver);
    }
}
