//! Whether a join with `since` can be answered with `"recovered": true`: the decision, without I/O.
//!
//! The caller gathers the facts (the parsed position, the stream's epoch and first and last sequences, the
//! number of the topic's stored events after the position) and gets [`Recover::Replay`] or a
//! [`Recover::Refuse`] with its [`Reason`]. A refusal is not an error: the join succeeds with
//! `"recovered": false`, nothing is replayed, and the client refetches its state.
//!
//! # Why a replay is complete
//!
//! The event stream is a JetStream *limits* stream with `discard: old`, and the gateway never deletes or
//! purges messages, so messages leave it only through its limits, and each limit removes oldest first:
//!
//! - `max_msgs_per_subject` (`per_topic`) removes the oldest message *of the subject* when a new one arrives
//!   and the subject holds `per_topic`;
//! - `max_age` (and any stream-wide count or byte limit) removes the oldest messages *of the stream*; stored
//!   times grow with the sequence, so this raises the stream's `first_seq` past every removed message.
//!
//! Suppose some event `m` of the topic with `m > since` was removed.
//! - By age: every message before `m` is gone too, so `first_seq > m ≥ since + 1`.
//! - By the per-subject limit: at that moment the subject held `per_topic` events, all newer than `m`, hence
//!   after `since`. Later arrivals keep the subject at `per_topic` events after `since`, and only age removes
//!   them, which again raises `first_seq` above `since + 1`. So now `count ≥ per_topic` or `first_seq > since + 1`.
//!
//! Contraposition: `count < per_topic` and `first_seq ≤ since + 1` prove that every event of the topic after
//! `since` is still stored; reading them all (up to the head, never stopping short) replays exactly what the
//! client missed. The epoch check ensures `since` counts sequences of this very stream.
//!
//! Events keep arriving while a replay is read, and each can trim the topic's oldest event. A trim that
//! removed an event after `since` before the read delivered it leaves the topic with `per_topic` events
//! after `since` (or raises `first_seq`), so the facts are taken *after* the replay was read: if they still
//! prove completeness, nothing was removed under the read either.

use super::position::{Epoch, Position, PositionError};
use crate::metrics::RecoveryOutcome;

/// The facts a decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The client's `since`, parsed.
    pub since: Result<&'a Position, &'a PositionError>,
    /// The epoch of the stream as it is now.
    pub epoch: &'a Epoch,
    /// The stream's first sequence still stored (`last_seq + 1` when it is empty, 0 when it never held one).
    pub first_seq: u64,
    /// The stream's last sequence assigned.
    pub last_seq: u64,
    /// How many events of the topic the stream holds after `since` (a filtered consumer's `num_pending`).
    pub count: u64,
    /// The stream's per-subject limit.
    pub per_topic: u64,
    /// Most events a recovery may replay (`__DELIVERY__MAX_RECOVER`).
    pub max_recover: u64,
}

/// The answer to a join with `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recover {
    /// Replay the topic's events after `since` (`count` of them), then go live.
    Replay { since: u64 },
    /// `"recovered": false`: go live without a replay.
    Refuse(Reason),
}

/// Why a recovery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `since` is not a position.
    Malformed,
    /// `since` belongs to another incarnation of the stream (deleted and recreated since).
    OtherStream,
    /// `since` is after the stream's last sequence.
    FromTheFuture,
    /// The stream no longer starts right after `since`: events after it may have aged out.
    Expired,
    /// The topic holds as many events after `since` as the per-topic limit: older ones after `since` may have
    /// been trimmed.
    Trimmed,
    /// More events than a recovery may replay.
    TooMany,
}

impl Reason {
    /// Short label for logs and metrics: the metric's label of the outcome.
    pub const fn as_str(self) -> &'static str {
        self.outcome().label()
    }

    /// The recovery outcome this refusal is counted as.
    pub const fn outcome(self) -> RecoveryOutcome {
        match self {
            Self::Malformed => RecoveryOutcome::Malformed,
            Self::OtherStream => RecoveryOutcome::OtherStream,
            Self::FromTheFuture => RecoveryOutcome::FromTheFuture,
            Self::Expired => RecoveryOutcome::Expired,
            Self::Trimmed => RecoveryOutcome::Trimmed,
            Self::TooMany => RecoveryOutcome::TooMany,
        }
    }
}

/// Decides a join with `since`; see the module documentation for why a replay is complete.
pub fn decide(facts: &Facts<'_>) -> Recover {
    let Ok(since) = facts.since else {
        return Recover::Refuse(Reason::Malformed);
    };
    if since.epoch != *facts.epoch {
        return Recover::Refuse(Reason::OtherStream);
    }
    if since.seq > facts.last_seq {
        return Recover::Refuse(Reason::FromTheFuture);
    }
    // `since.seq ≤ last_seq < u64::MAX` in any real stream; saturating keeps a hostile `u64::MAX` harmless.
    if facts.first_seq > since.seq.saturating_add(1) {
        return Recover::Refuse(Reason::Expired);
    }
    if facts.count >= facts.per_topic {
        return Recover::Refuse(Reason::Trimmed);
    }
    if facts.count > facts.max_recover {
        return Recover::Refuse(Reason::TooMany);
    }
    Recover::Replay { since: since.seq }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch() -> Epoch {
        Epoch::parse("e1lq3kz9x").unwrap()
    }

    fn decide_at(since: u64, first_seq: u64, last_seq: u64, count: u64) -> Recover {
        let epoch = epoch();
        let position = Position::new(epoch.clone(), since);
        decide(&Facts {
            since: Ok(&position),
            epoch: &epoch,
            first_seq,
            last_seq,
            count,
            per_topic: 100,
            max_recover: 50,
        })
    }

    #[test]
    fn replays_when_everything_after_since_is_provably_stored() {
        assert_eq!(decide_at(10, 1, 20, 5), Recover::Replay { since: 10 });
        // The stream starts right after `since`: nothing after it aged out.
        assert_eq!(decide_at(10, 11, 20, 5), Recover::Replay { since: 10 });
        // Up to date: nothing to replay.
        assert_eq!(decide_at(20, 15, 20, 0), Recover::Replay { since: 20 });
        // A stream that has never stored anything reports first_seq 0.
        assert_eq!(decide_at(0, 0, 0, 0), Recover::Replay { since: 0 });
        // Everything aged out, nothing new: first_seq is last_seq + 1.
        assert_eq!(decide_at(20, 21, 20, 0), Recover::Replay { since: 20 });
        assert_eq!(decide_at(10, 1, 20, 50), Recover::Replay { since: 10 });
    }

    #[test]
    fn refuses_a_malformed_position() {
        let epoch = epoch();
        let error = Position::parse("nope").unwrap_err();
        let facts = Facts {
            since: Err(&error),
            epoch: &epoch,
            first_seq: 1,
            last_seq: 1,
            count: 0,
            per_topic: 100,
            max_recover: 50,
        };
        assert_eq!(decide(&facts), Recover::Refuse(Reason::Malformed));
    }

    #[test]
    fn refuses_a_position_of_another_stream() {
        let epoch = epoch();
        let old = Position::new(Epoch::parse("e1lq3kz9w").unwrap(), 5);
        let facts = Facts {
            since: Ok(&old),
            epoch: &epoch,
            first_seq: 1,
            last_seq: 10,
            count: 0,
            per_topic: 100,
            max_recover: 50,
        };
        assert_eq!(decide(&facts), Recover::Refuse(Reason::OtherStream));
    }

    #[test]
    fn refuses_what_it_cannot_prove() {
        assert_eq!(
            decide_at(21, 1, 20, 0),
            Recover::Refuse(Reason::FromTheFuture)
        );
        assert_eq!(
            decide_at(u64::MAX, 1, u64::MAX, 0),
            Recover::Replay { since: u64::MAX }
        );
        assert_eq!(decide_at(10, 12, 20, 3), Recover::Refuse(Reason::Expired));
        assert_eq!(decide_at(0, 2, 20, 3), Recover::Refuse(Reason::Expired));
        assert_eq!(decide_at(10, 1, 500, 100), Recover::Refuse(Reason::Trimmed));
        assert_eq!(decide_at(10, 1, 500, 99), Recover::Refuse(Reason::TooMany));
        assert_eq!(decide_at(10, 1, 500, 51), Recover::Refuse(Reason::TooMany));
    }

    #[test]
    fn reasons_are_checked_in_order() {
        // Expired and trimmed at once: the stream-wide reason comes first.
        assert_eq!(
            decide_at(10, 30, 500, 100),
            Recover::Refuse(Reason::Expired)
        );
        assert_eq!(Reason::TooMany.as_str(), "too_many");
    }
}
