//! Positions: the opaque strings a client gets with each broadcast and sends back as `since` on a rejoin.
//!
//! A [`Position`] is an event's sequence in the event stream plus the stream's [`Epoch`] (its incarnation,
//! derived from its creation time by [`super::stream`]), so a position from a deleted and recreated stream is
//! recognisably foreign. Encoded as `<epoch>.<seq>`, e.g. `e1lq3kz9x.1234`.
//!
//! The encoding is never a plain decimal number: phoenix.js refs are decimal strings, and it takes a message
//! whose `ref` equals its pending heartbeat ref for the heartbeat's reply. An epoch always starts with a
//! letter, so no position is a decimal, a float, or a JSON number.
//!
//! [`Position::parse`] reads what a client sent: strict, bounded, and it never panics; a position is
//! untrusted input.

use std::fmt;
use std::str::FromStr;

/// Longest encoded position accepted; longer input is refused before it is looked at.
pub const MAX_POSITION_LEN: usize = 64;
/// Longest epoch accepted (an epoch made by [`Epoch::from_unix_nanos`] is 13 characters until the year 2120).
pub const MAX_EPOCH_LEN: usize = 40;
/// Letter that starts every epoch this gateway makes ("e" for epoch); parsing accepts any lowercase letter.
const EPOCH_LEAD: char = 'e';
/// Digits of the epoch's base-36 body.
const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Why a position or an epoch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("position is empty")]
    Empty,
    #[error("position is not a string")]
    NotAString,
    #[error("position is {len} bytes long, more than {MAX_POSITION_LEN}")]
    TooLong { len: usize },
    #[error("position has no `.` between epoch and sequence")]
    NoSeparator,
    #[error("epoch must be 2 to {MAX_EPOCH_LEN} characters of a-z0-9 starting with a letter")]
    BadEpoch,
    #[error("sequence must be a canonical decimal that fits 64 bits")]
    BadSequence,
}

/// The incarnation of the event stream: lowercase letters and digits, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(String);

impl Epoch {
    /// The epoch of a stream created at `nanos` nanoseconds after the Unix epoch: `e` and the time in base 36.
    /// A time before 1970 (which no server reports) counts as 0.
    pub fn from_unix_nanos(nanos: i128) -> Self {
        let mut value = u128::try_from(nanos).unwrap_or(0);
        let mut digits = Vec::new();
        loop {
            // `value % 36` is below 36, so the index is in bounds and the cast cannot truncate.
            digits.push(BASE36[(value % 36) as usize]);
            value /= 36;
            if value == 0 {
                break;
            }
        }
        let mut text = String::with_capacity(digits.len() + 1);
        text.push(EPOCH_LEAD);
        text.extend(digits.iter().rev().map(|&b| char::from(b)));
        Self(text)
    }

    /// Checks an epoch as sent by a client.
    pub fn parse(text: &str) -> Result<Self, PositionError> {
        let bytes = text.as_bytes();
        let valid = (2..=MAX_EPOCH_LEN).contains(&bytes.len())
            && bytes[0].is_ascii_lowercase()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(PositionError::BadEpoch)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A place in the event stream: the sequence of an event (or a lower bound of a topic's events) in one
/// incarnation of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: Epoch,
    pub seq: u64,
}

impl Position {
    pub fn new(epoch: Epoch, seq: u64) -> Self {
        Self { epoch, seq }
    }

    /// The opaque string sent to clients: `<epoch>.<seq>`.
    pub fn encode(&self) -> String {
        self.to_string()
    }

    /// Reads a position sent by a client; refuses anything [`encode`](Self::encode) would not produce.
    pub fn parse(text: &str) -> Result<Self, PositionError> {
        if text.is_empty() {
            return Err(PositionError::Empty);
        }
        if text.len() > MAX_POSITION_LEN {
            return Err(PositionError::TooLong { len: text.len() });
        }
        let (epoch, seq) = text.split_once('.').ok_or(PositionError::NoSeparator)?;
        let epoch = Epoch::parse(epoch)?;
        let canonical = !seq.is_empty()
            && seq.bytes().all(|b| b.is_ascii_digit())
            && (seq == "0" || !seq.starts_with('0'));
        if !canonical {
            return Err(PositionError::BadSequence);
        }
        let seq = seq.parse().map_err(|_| PositionError::BadSequence)?;
        Ok(Self { epoch, seq })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.seq)
    }
}

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn epoch(text: &str) -> Epoch {
        Epoch::parse(text).unwrap()
    }

    #[test]
    fn epochs_are_base36_creation_times_after_a_letter() {
        assert_eq!(Epoch::from_unix_nanos(0).as_str(), "e0");
        assert_eq!(Epoch::from_unix_nanos(35).as_str(), "ez");
        assert_eq!(Epoch::from_unix_nanos(36).as_str(), "e10");
        assert_eq!(Epoch::from_unix_nanos(-5).as_str(), "e0");
        // 2026-12-04T00:00:00.123456789Z
        let created = Epoch::from_unix_nanos(1_796_342_400_123_456_789);
        assert_eq!(created.as_str().len(), 13);
        assert_ne!(created, Epoch::from_unix_nanos(1_796_342_400_123_456_790));
        assert_eq!(Epoch::parse(created.as_str()), Ok(created));
    }

    #[test]
    fn encodes_epoch_dot_sequence() {
        let position = Position::new(epoch("e1lq3kz9x"), 1234);
        assert_eq!(position.encode(), "e1lq3kz9x.1234");
        assert_eq!(Position::parse("e1lq3kz9x.1234"), Ok(position));
        assert_eq!(
            Position::parse("e1.18446744073709551615").map(|p| p.seq),
            Ok(u64::MAX)
        );
        assert_eq!("ab.0".parse::<Position>().map(|p| p.seq), Ok(0));
    }

    #[test]
    fn refuses_malformed_positions() {
        use PositionError::*;
        let long = format!("e{}.1", "a".repeat(MAX_POSITION_LEN));
        let cases: &[(&str, PositionError)] = &[
            ("", Empty),
            (&long, TooLong { len: long.len() }),
            ("1234", NoSeparator),
            ("e1lq3kz9x", NoSeparator),
            (".5", BadEpoch),
            ("e.5", BadEpoch),
            ("1e5.5", BadEpoch),
            ("E1.5", BadEpoch),
            ("e-1.5", BadEpoch),
            (" e1.5", BadEpoch),
            ("e1.e1.5", BadSequence),
            ("e1.", BadSequence),
            ("e1.05", BadSequence),
            ("e1.+5", BadSequence),
            ("e1.-5", BadSequence),
            ("e1.5 ", BadSequence),
            ("e1.5\n", BadSequence),
            ("e1.1.5", BadSequence),
            ("e1.18446744073709551616", BadSequence),
            ("e1.99999999999999999999999", BadSequence),
            ("e1.٣", BadSequence),
        ];
        for (text, error) in cases {
            assert_eq!(Position::parse(text).as_ref(), Err(error), "{text:?}");
        }
        let long_epoch = format!("e{}", "0".repeat(MAX_EPOCH_LEN));
        assert_eq!(Epoch::parse(&long_epoch), Err(BadEpoch));
    }

    proptest! {
        #[test]
        fn made_epochs_round_trip(nanos in any::<i64>(), seq in any::<u64>()) {
            let position = Position::new(Epoch::from_unix_nanos(i128::from(nanos)), seq);
            prop_assert_eq!(Position::parse(&position.encode()), Ok(position));
        }

        #[test]
        fn encodings_round_trip_and_are_never_numbers(
            epoch in "[a-z][a-z0-9]{1,39}",
            seq in any::<u64>(),
        ) {
            let position = Position::new(Epoch::parse(&epoch).unwrap(), seq);
            let text = position.encode();
            prop_assert!(text.len() <= MAX_POSITION_LEN);
            prop_assert_eq!(Position::parse(&text), Ok(position));
            prop_assert!(text.parse::<f64>().is_err(), "{} parses as a float", text);
            prop_assert!(text.parse::<u64>().is_err());
            prop_assert!(text.parse::<i128>().is_err());
            prop_assert!(serde_json::from_str::<serde_json::Number>(&text).is_err());
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,80}") {
            let _ = Position::parse(&text);
        }
    }
}
