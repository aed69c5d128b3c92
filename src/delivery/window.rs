//! The recent events of one hot topic (`user:public`, `user:role`), in memory, so that thousands of sockets
//! rejoining with `since` after a restart or a network blip are answered without thousands of stream reads.
//!
//! The ingress pushes every stored event of the topic, in stream order and gap-filled (live republished
//! events checked by [`super::tracker`], gaps read back by [`super::reader`]). The window mirrors the
//! stream's retention: at most `per_topic` entries, none stored longer ago than `history`, plus a byte cap of
//! its own. It knows the range it is complete for: every stored event of the topic with a sequence above
//! [`Window::complete_after`] is in it. Evicting the oldest entry moves that bound up to the evicted
//! sequence, so a position older than the window is refused ([`Window::after`] returns `None`) rather than
//! answered with a partial list; the caller then asks the stream.
//!
//! The entry's payload is generic: whatever a replay needs to build a frame (cheap to clone: `Bytes`, an
//! `Arc`).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// Bytes a window may hold by default, payloads counted as the caller sizes them. A hundred events of a
/// few kilobytes each fit; a burst of large events shortens the window instead of growing memory.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// How much a window keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// Most entries kept; the stream's per-subject limit.
    pub per_topic: usize,
    /// Longest an entry is kept after the stream stored it; the stream's `max_age`.
    pub history: Duration,
    /// Most bytes kept (sum of the entries' sizes).
    pub max_bytes: usize,
}

/// One stored event of the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    /// Its sequence in the stream.
    pub seq: u64,
    /// When the stream stored it.
    pub time: SystemTime,
    /// What the caller counts against [`WindowLimits::max_bytes`].
    pub size: usize,
    pub item: T,
}

/// What [`Window::push`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Appended (it may have been evicted at once if it alone exceeds the byte cap or is already too old).
    Appended,
    /// Its sequence is not above the newest one known: already pushed, or before the window.
    Stale,
}

/// The recent events of one topic; see the module documentation.
#[derive(Debug, Clone)]
pub struct Window<T> {
    limits: WindowLimits,
    entries: VecDeque<Entry<T>>,
    complete_after: u64,
    bytes: usize,
}

impl<T: Clone> Window<T> {
    /// An empty window that is complete after `complete_after`: the topic has no stored event with a higher
    /// sequence yet (for instance the stream's last sequence when the ingress starts following the topic).
    pub fn new(limits: WindowLimits, complete_after: u64) -> Self {
        Self {
            limits,
            entries: VecDeque::new(),
            complete_after,
            bytes: 0,
        }
    }

    /// Every stored event of the topic with a sequence above this is in the window.
    pub fn complete_after(&self) -> u64 {
        self.complete_after
    }

    /// The newest sequence the window accounts for: its last entry, or [`complete_after`](Self::complete_after).
    pub fn head(&self) -> u64 {
        self.entries.back().map_or(self.complete_after, |e| e.seq)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends the topic's next stored event. The caller guarantees that every stored event of the topic
    /// between [`head`](Self::head) and `entry.seq` was pushed before (gap-filled, in stream order); when it
    /// cannot, it calls [`reset`](Self::reset) instead.
    pub fn push(&mut self, entry: Entry<T>, now: SystemTime) -> Pushed {
        if entry.seq <= self.head() {
            return Pushed::Stale;
        }
        self.bytes += entry.size;
        self.entries.push_back(entry);
        while self.entries.len() > self.limits.per_topic || self.bytes > self.limits.max_bytes {
            self.evict_oldest();
        }
        self.expire(now);
        Pushed::Appended
    }

    /// Drops the entries stored longer ago than `history`.
    pub fn expire(&mut self, now: SystemTime) {
        let cutoff = now.checked_sub(self.limits.history);
        while self
            .entries
            .front()
            .is_some_and(|e| cutoff.is_some_and(|cutoff| e.time < cutoff))
        {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self.entries.pop_front() {
            self.bytes -= oldest.size;
            self.complete_after = oldest.seq;
        }
    }

    /// Forgets every entry: continuity is lost (a gap that could not be filled, a recreated stream), and the
    /// window is complete only after `after` from now on.
    pub fn reset(&mut self, after: u64) {
        self.entries.clear();
        self.bytes = 0;
        self.complete_after = after;
    }

    /// The topic's stored events after `since`, oldest first, when the window holds all of them; `None` when
    /// it cannot prove that (`since` is before the window). Entries older than `history` at `now` count as
    /// evicted, as they are in the stream, even if no push has dropped them yet.
    pub fn after(&self, since: u64, now: SystemTime) -> Option<Vec<Entry<T>>> {
        let fresh = match now.checked_sub(self.limits.history) {
            // Stream times never go backwards along the sequence, so the aged entries are a prefix.
            Some(cutoff) => self.entries.partition_point(|e| e.time < cutoff),
            None => 0,
        };
        let complete_after = match fresh {
            0 => self.complete_after,
            n => self.entries[n - 1].seq,
        };
        if since < complete_after {
            return None;
        }
        let start = self.entries.partition_point(|e| e.seq <= since).max(fresh);
        Some(self.entries.range(start..).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const LIMITS: WindowLimits = WindowLimits {
        per_topic: 3,
        history: Duration::from_secs(300),
        max_bytes: 100,
    };

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn entry(seq: u64, secs: u64) -> Entry<&'static str> {
        Entry {
            seq,
            time: at(secs),
            size: 10,
            item: "event",
        }
    }

    fn seqs(entries: Option<Vec<Entry<&'static str>>>) -> Option<Vec<u64>> {
        entries.map(|e| e.iter().map(|e| e.seq).collect())
    }

    #[test]
    fn serves_everything_after_a_position_it_covers() {
        let mut window = Window::new(LIMITS, 10);
        assert_eq!(seqs(window.after(10, at(0))), Some(vec![]));
        assert_eq!(window.push(entry(12, 0), at(0)), Pushed::Appended);
        assert_eq!(window.push(entry(15, 1), at(1)), Pushed::Appended);
        assert_eq!(seqs(window.after(10, at(1))), Some(vec![12, 15]));
        // A position between the topic's events (another topic's sequence) is covered too.
        assert_eq!(seqs(window.after(13, at(1))), Some(vec![15]));
        assert_eq!(seqs(window.after(15, at(1))), Some(vec![]));
        assert_eq!(seqs(window.after(99, at(1))), Some(vec![]));
        assert_eq!(seqs(window.after(9, at(1))), None);
        assert_eq!(window.head(), 15);
    }

    #[test]
    fn stale_pushes_change_nothing() {
        let mut window = Window::new(LIMITS, 10);
        assert_eq!(window.push(entry(10, 0), at(0)), Pushed::Stale);
        window.push(entry(12, 0), at(0));
        assert_eq!(window.push(entry(12, 0), at(0)), Pushed::Stale);
        assert_eq!(window.push(entry(11, 0), at(0)), Pushed::Stale);
        assert_eq!(window.len(), 1);
        assert_eq!(window.bytes(), 10);
    }

    #[test]
    fn the_per_topic_limit_moves_the_complete_bound() {
        let mut window = Window::new(LIMITS, 0);
        for seq in [2, 4, 6, 8] {
            window.push(entry(seq, 0), at(0));
        }
        assert_eq!(window.len(), 3);
        assert_eq!(window.complete_after(), 2);
        assert_eq!(seqs(window.after(1, at(0))), None, "event 2 was evicted");
        assert_eq!(seqs(window.after(2, at(0))), Some(vec![4, 6, 8]));
        assert_eq!(seqs(window.after(3, at(0))), Some(vec![4, 6, 8]));
    }

    #[test]
    fn the_byte_cap_evicts_oldest_first() {
        let mut window = Window::new(LIMITS, 0);
        window.push(entry(1, 0), at(0));
        window.push(
            Entry {
                size: 95,
                ..entry(2, 0)
            },
            at(0),
        );
        assert_eq!(window.bytes(), 95);
        assert_eq!(window.complete_after(), 1);
        window.push(
            Entry {
                size: 101,
                ..entry(3, 0)
            },
            at(0),
        );
        assert!(window.is_empty(), "an entry above the cap is not kept");
        assert_eq!(window.bytes(), 0);
        assert_eq!(window.complete_after(), 3);
        assert_eq!(window.head(), 3);
        assert_eq!(seqs(window.after(3, at(0))), Some(vec![]));
        assert_eq!(seqs(window.after(2, at(0))), None);
    }

    #[test]
    fn aged_entries_count_as_evicted_before_a_push_drops_them() {
        let mut window = Window::new(LIMITS, 0);
        window.push(entry(1, 0), at(0));
        window.push(entry(2, 100), at(100));
        assert_eq!(seqs(window.after(0, at(299))), Some(vec![1, 2]));
        // At 301 s entry 1 is older than the history: the stream has dropped it, and so does the window.
        assert_eq!(seqs(window.after(0, at(301))), None);
        assert_eq!(seqs(window.after(1, at(301))), Some(vec![2]));
        assert_eq!(window.len(), 2, "reading does not evict");
        window.push(entry(3, 301), at(301));
        assert_eq!(window.len(), 2);
        assert_eq!(window.complete_after(), 1);
        window.expire(at(1000));
        assert!(window.is_empty());
        assert_eq!(window.complete_after(), 3);
    }

    #[test]
    fn reset_forgets_and_restarts_the_bound() {
        let mut window = Window::new(LIMITS, 0);
        window.push(entry(1, 0), at(0));
        window.reset(40);
        assert!(window.is_empty());
        assert_eq!(window.bytes(), 0);
        assert_eq!(seqs(window.after(1, at(0))), None);
        assert_eq!(seqs(window.after(40, at(0))), Some(vec![]));
        assert_eq!(window.push(entry(41, 0), at(0)), Pushed::Appended);
    }
}
