//! The event stream: one JetStream stream that stores every event published on `<prefix>.user.>` and
//! republishes each stored event, with its stream metadata, on `<prefix>.delivery.user.>`.
//!
//! This module owns the stream's configuration ([`StreamSpec`], [`ensure`]), its [`Epoch`] (which incarnation
//! of the stream a sequence belongs to), the two subject spaces ([`stored_subject`], [`republish_subject`]),
//! and reading the headers of a republished message into [`Stored`].
//!
//! Publishers write to `<prefix>.user.<token>` (core or acked publish; `Nats-Msg-Id` retries within the
//! duplicate window are stored once). The stream leader, after storing, publishes the event again to
//! `<prefix>.delivery.user.<token>` with `Nats-Stream`, `Nats-Subject`, `Nats-Sequence`, `Nats-Time-Stamp`,
//! `Nats-Last-Sequence` and the publisher's own headers (`traceparent` included). Gateways core-subscribe the
//! republished subjects of the topics they serve, so they see what the stream stored, once, never a
//! publisher's retry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::header::{
    HeaderName, NATS_LAST_SEQUENCE, NATS_SEQUENCE, NATS_STREAM, NATS_SUBJECT, NATS_TIME_STAMP,
};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::stream::{
    self, Config, DiscardPolicy, Republish, RetentionPolicy, StorageType,
};
use async_nats::jetstream::{self, context};

use super::position::Epoch;

/// Default name of the event stream.
pub const DEFAULT_STREAM_NAME: &str = "epoch_events";
/// Default history kept per topic, in time (`__DELIVERY__HISTORY_SECS`).
pub const DEFAULT_HISTORY: Duration = Duration::from_secs(300);
/// Default history kept per topic, in events (`__DELIVERY__HISTORY_PER_TOPIC`).
pub const DEFAULT_PER_TOPIC: i64 = 100;
/// Longest window in which a publisher's retry with the same `Nats-Msg-Id` is dropped as a duplicate.
/// Two minutes is the server's default; a shorter history shortens it (the server refuses a window longer
/// than `max_age`).
pub const MAX_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Most replicas JetStream allows for a stream.
pub const MAX_REPLICAS: usize = 5;
/// Token between the prefix and the user subjects of the republished space.
const DELIVERY_TOKEN: &str = "delivery";
/// How often [`ensure`] looks again after losing a creation race to another instance.
const ENSURE_ATTEMPTS: usize = 3;

/// What the event stream must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name (`__DELIVERY__STREAM`).
    pub name: String,
    /// The gateway's subject prefix (`__NATS__SUBJECT_PREFIX`).
    pub subject_prefix: String,
    /// 1 on a single server, 3 on a 3-node cluster.
    pub replicas: usize,
    /// How long an event is kept (`max_age`).
    pub history: Duration,
    /// How many events are kept per subject, i.e. per topic (`max_msgs_per_subject`).
    pub per_topic: i64,
}

impl StreamSpec {
    /// A spec with the default name and limits.
    pub fn new(subject_prefix: &str) -> Self {
        Self {
            name: DEFAULT_STREAM_NAME.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
            replicas: 1,
            history: DEFAULT_HISTORY,
            per_topic: DEFAULT_PER_TOPIC,
        }
    }

    /// The subjects the stream stores: `<prefix>.user.>`.
    pub fn subjects(&self) -> String {
        format!("{}.user.>", self.subject_prefix)
    }

    /// Where the stream republishes: `<prefix>.delivery.user.>`.
    pub fn republish_subjects(&self) -> String {
        format!("{}.{DELIVERY_TOKEN}.user.>", self.subject_prefix)
    }

    /// The configuration of a new stream.
    pub fn config(&self) -> Config {
        let mut config = Config {
            storage: StorageType::File,
            ..Config::default()
        };
        self.apply(&mut config);
        config
    }

    /// Sets the fields this spec owns on a stream's configuration, leaving the others as they are (the
    /// storage type cannot change once a stream exists; fields the server fills in stay as it filled them).
    pub fn apply(&self, config: &mut Config) {
        config.name.clone_from(&self.name);
        config.subjects = vec![self.subjects()];
        config.retention = RetentionPolicy::Limits;
        config.discard = DiscardPolicy::Old;
        config.discard_new_per_subject = false;
        config.max_age = self.history;
        config.max_messages_per_subject = self.per_topic;
        config.duplicate_window = self.history.min(MAX_DUPLICATE_WINDOW);
        config.num_replicas = self.replicas;
        config.allow_direct = true;
        config.republish = Some(Republish {
            source: self.subjects(),
            destination: self.republish_subjects(),
            headers_only: false,
        });
    }

    fn validate(&self) -> Result<(), DeliveryError> {
        let invalid = |reason| Err(DeliveryError::InvalidSpec { reason });
        let name_ok = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return invalid("the stream name must be letters, digits, `_` or `-`");
        }
        if !is_plain_subject(&self.subject_prefix) {
            return invalid("the subject prefix must be a subject without wildcards");
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return invalid("replicas must be 1 to 5");
        }
        if self.history.is_zero() {
            return invalid("history must be longer than zero");
        }
        if self.per_topic < 1 {
            return invalid("history per topic must be at least 1");
        }
        Ok(())
    }
}

/// A subject of one or more non-empty tokens, none of them a wildcard.
fn is_plain_subject(subject: &str) -> bool {
    subject.split('.').all(|token| {
        !token.is_empty()
            && token != "*"
            && token != ">"
            && !token.bytes().any(|b| b.is_ascii_whitespace())
    })
}

/// Why the event stream could not be made to match its spec.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("invalid event stream settings: {reason}")]
    InvalidSpec { reason: &'static str },
    #[error("cannot read the settings of stream {name}")]
    Lookup {
        name: String,
        #[source]
        source: context::GetStreamError,
    },
    #[error("cannot create stream {name}")]
    Create {
        name: String,
        #[source]
        source: context::CreateStreamError,
    },
    #[error("cannot update stream {name}")]
    Update {
        name: String,
        #[source]
        source: context::UpdateStreamError,
    },
    #[error("stream {name} kept changing while it was being set up")]
    Contended { name: String },
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// The event stream as [`ensure`] left it.
#[derive(Debug, Clone)]
pub struct Ensured {
    pub outcome: Outcome,
    pub epoch: Epoch,
    pub info: stream::Info,
}

/// Creates the event stream, or updates it when its settings differ from `spec`.
///
/// Safe to run on every instance at once: a lost creation race is followed by a fresh look.
pub async fn ensure(js: &jetstream::Context, spec: &StreamSpec) -> Result<Ensured, DeliveryError> {
    spec.validate()?;
    for _ in 0..ENSURE_ATTEMPTS {
        match js.get_stream(&spec.name).await {
            Ok(existing) => {
                let current = existing.cached_info();
                let mut wanted = current.config.clone();
                spec.apply(&mut wanted);
                if wanted == current.config {
                    return Ok(ensured(Outcome::Unchanged, current.clone()));
                }
                let info =
                    js.update_stream(&wanted)
                        .await
                        .map_err(|source| DeliveryError::Update {
                            name: spec.name.clone(),
                            source,
                        })?;
                return Ok(ensured(Outcome::Updated, info));
            }
            Err(err) if is_stream_not_found(&err) => match js.create_stream(spec.config()).await {
                Ok(created) => return Ok(ensured(Outcome::Created, created.cached_info().clone())),
                Err(err) if is_name_taken(&err) => continue,
                Err(source) => {
                    return Err(DeliveryError::Create {
                        name: spec.name.clone(),
                        source,
                    });
                }
            },
            Err(source) => {
                return Err(DeliveryError::Lookup {
                    name: spec.name.clone(),
                    source,
                });
            }
        }
    }
    Err(DeliveryError::Contended {
        name: spec.name.clone(),
    })
}

fn ensured(outcome: Outcome, info: stream::Info) -> Ensured {
    Ensured {
        outcome,
        epoch: epoch_of(&info),
        info,
    }
}

pub(crate) fn is_stream_not_found(err: &context::GetStreamError) -> bool {
    matches!(err.kind(), context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn is_name_taken(err: &context::CreateStreamError) -> bool {
    matches!(err.kind(), context::CreateStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NAME_EXIST)
}

/// The incarnation of a stream: its creation time, which the meta leader assigns once and every replica
/// reports; a stream deleted and created again under the same name has a new one.
pub fn epoch_of(info: &stream::Info) -> Epoch {
    Epoch::from_unix_nanos(info.created.unix_timestamp_nanos())
}

/// The subject a publisher uses for a topic: `<prefix>.user.<token>` (`public`, `role` or a user id).
pub fn stored_subject(prefix: &str, token: &str) -> String {
    format!("{prefix}.user.{token}")
}

/// The subject the stream republishes a topic's events on: `<prefix>.delivery.user.<token>`.
pub fn republish_subject(prefix: &str, token: &str) -> String {
    format!("{prefix}.{DELIVERY_TOKEN}.user.{token}")
}

/// The topic token of a stored subject (`<prefix>.user.<token>`), when it is one.
pub fn token_of<'a>(prefix: &str, stored_subject: &'a str) -> Option<&'a str> {
    let token = stored_subject
        .strip_prefix(prefix)?
        .strip_prefix(".user.")?;
    (!token.is_empty() && !token.contains('.')).then_some(token)
}

/// A stored event as its republished copy describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The event's sequence in the stream.
    pub seq: u64,
    /// The sequence of the previous event on the same subject; `None` when it is the subject's first.
    pub last_on_subject: Option<u64>,
    /// The subject it was published on, `<prefix>.user.<token>`.
    pub subject: String,
    /// When the stream stored it.
    pub time: SystemTime,
}

/// Why the headers of a republished message do not describe a stored event.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("republished message has no headers")]
    NoHeaders,
    #[error("republished message has no {0} header")]
    Missing(HeaderName),
    #[error("republished message has {name}: {value:?}, not a sequence")]
    BadSequence { name: HeaderName, value: String },
    #[error("republished message has {NATS_TIME_STAMP}: {value:?}, not an RFC 3339 time")]
    BadTime {
        value: String,
        #[source]
        source: async_nats::Error,
    },
}

impl Stored {
    /// Reads `Nats-Sequence`, `Nats-Last-Sequence` (absent or `0` for a subject's first event),
    /// `Nats-Subject` and `Nats-Time-Stamp`.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Result<Self, HeaderError> {
        let headers = headers.ok_or(HeaderError::NoHeaders)?;
        let text = |name: HeaderName| headers.get(name).map(|v| v.as_str());
        let sequence = |name: HeaderName, value: &str| {
            value.parse::<u64>().map_err(|_| HeaderError::BadSequence {
                name,
                value: value.to_owned(),
            })
        };
        let seq = text(NATS_SEQUENCE).ok_or(HeaderError::Missing(NATS_SEQUENCE))?;
        let seq = sequence(NATS_SEQUENCE, seq)?;
        let last_on_subject = match text(NATS_LAST_SEQUENCE) {
            None => None,
            Some(last) => Some(sequence(NATS_LAST_SEQUENCE, last)?).filter(|&last| last != 0),
        };
        let subject = text(NATS_SUBJECT).ok_or(HeaderError::Missing(NATS_SUBJECT))?;
        let time = text(NATS_TIME_STAMP).ok_or(HeaderError::Missing(NATS_TIME_STAMP))?;
        let time = parse_time(time).map_err(|source| HeaderError::BadTime {
            value: time.to_owned(),
            source,
        })?;
        Ok(Self {
            seq,
            last_on_subject,
            subject: subject.to_owned(),
            time,
        })
    }
}

/// The stream a republished message came from (`Nats-Stream`).
pub fn stream_of(headers: Option<&HeaderMap>) -> Option<&str> {
    headers?.get(NATS_STREAM).map(|v| v.as_str())
}

fn parse_time(text: &str) -> Result<SystemTime, async_nats::Error> {
    let time = async_nats::datetime::parse_rfc3339(text)?;
    Ok(system_time(time.unix_timestamp_nanos()))
}

/// A Unix time in nanoseconds as a [`SystemTime`]; times before 1970 (which no server reports) count as 1970.
pub(crate) fn system_time(nanos: i128) -> SystemTime {
    let nanos = u64::try_from(nanos).unwrap_or(0);
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> StreamSpec {
        StreamSpec::new("epoch")
    }

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(name.clone(), *value);
        }
        map
    }

    #[test]
    fn config_stores_user_subjects_and_republishes_them_elsewhere() {
        let config = spec().config();
        assert_eq!(config.name, "epoch_events");
        assert_eq!(config.subjects, ["epoch.user.>"]);
        assert_eq!(config.storage, StorageType::File);
        assert_eq!(config.discard, DiscardPolicy::Old);
        assert_eq!(config.max_age, Duration::from_secs(300));
        assert_eq!(config.max_messages_per_subject, 100);
        assert_eq!(config.duplicate_window, MAX_DUPLICATE_WINDOW);
        assert!(config.allow_direct);
        assert_eq!(
            config.republish,
            Some(Republish {
                source: "epoch.user.>".into(),
                destination: "epoch.delivery.user.>".into(),
                headers_only: false,
            })
        );
    }

    #[test]
    fn duplicate_window_never_exceeds_history() {
        let short = StreamSpec {
            history: Duration::from_secs(1),
            ..spec()
        };
        assert_eq!(short.config().duplicate_window, Duration::from_secs(1));
    }

    #[test]
    fn apply_keeps_storage_and_server_filled_fields() {
        let mut current = spec().config();
        current.storage = StorageType::Memory;
        current.max_bytes = -1;
        let mut wanted = current.clone();
        spec().apply(&mut wanted);
        assert_eq!(wanted, current, "nothing owned by the spec differs");
        let changed = StreamSpec {
            per_topic: 7,
            ..spec()
        };
        changed.apply(&mut wanted);
        assert_eq!(wanted.max_messages_per_subject, 7);
        assert_eq!(wanted.storage, StorageType::Memory);
        assert_eq!(wanted.max_bytes, -1);
    }

    #[test]
    fn validation_refuses_unusable_specs() {
        let bad = [
            StreamSpec {
                name: "a.b".into(),
                ..spec()
            },
            StreamSpec {
                name: String::new(),
                ..spec()
            },
            StreamSpec {
                subject_prefix: "a.>".into(),
                ..spec()
            },
            StreamSpec {
                subject_prefix: "a..b".into(),
                ..spec()
            },
            StreamSpec {
                replicas: 0,
                ..spec()
            },
            StreamSpec {
                replicas: 6,
                ..spec()
            },
            StreamSpec {
                history: Duration::ZERO,
                ..spec()
            },
            StreamSpec {
                per_topic: 0,
                ..spec()
            },
        ];
        for spec in bad {
            assert!(
                matches!(spec.validate(), Err(DeliveryError::InvalidSpec { .. })),
                "{spec:?}"
            );
        }
        assert!(spec().validate().is_ok());
    }

    #[test]
    fn subjects_of_a_topic() {
        assert_eq!(stored_subject("t1", "42"), "t1.user.42");
        assert_eq!(republish_subject("t1", "public"), "t1.delivery.user.public");
        assert_eq!(token_of("t1", "t1.user.42"), Some("42"));
        assert_eq!(token_of("t1", "t1.user.role"), Some("role"));
        assert_eq!(token_of("t1", "t1.user."), None);
        assert_eq!(token_of("t1", "t1.user.a.b"), None);
        assert_eq!(token_of("t1", "t2.user.42"), None);
        assert_eq!(token_of("t1", "t1.delivery.user.42"), None);
    }

    #[test]
    fn reads_republish_headers() {
        let map = headers(&[
            (NATS_STREAM, "epoch_events"),
            (NATS_SUBJECT, "epoch.user.42"),
            (NATS_SEQUENCE, "17"),
            (NATS_TIME_STAMP, "2026-12-04T10:00:00.123456789Z"),
            (NATS_LAST_SEQUENCE, "9"),
        ]);
        let stored = Stored::from_headers(Some(&map)).unwrap();
        assert_eq!(stored.seq, 17);
        assert_eq!(stored.last_on_subject, Some(9));
        assert_eq!(stored.subject, "epoch.user.42");
        let since_epoch = stored.time.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since_epoch.as_nanos(), 1_796_378_400_123_456_789);
        assert_eq!(stream_of(Some(&map)), Some("epoch_events"));
    }

    #[test]
    fn a_subjects_first_event_has_no_previous() {
        let base = [
            (NATS_SUBJECT, "epoch.user.42"),
            (NATS_SEQUENCE, "1"),
            (NATS_TIME_STAMP, "2026-12-04T10:00:00Z"),
        ];
        let absent = Stored::from_headers(Some(&headers(&base))).unwrap();
        assert_eq!(absent.last_on_subject, None);
        let mut zero = base.to_vec();
        zero.push((NATS_LAST_SEQUENCE, "0"));
        let zero = Stored::from_headers(Some(&headers(&zero))).unwrap();
        assert_eq!(zero.last_on_subject, None);
    }

    #[test]
    fn refuses_incomplete_headers() {
        let full = [
            (NATS_SUBJECT, "epoch.user.42"),
            (NATS_SEQUENCE, "3"),
            (NATS_TIME_STAMP, "2026-12-04T10:00:00Z"),
            (NATS_LAST_SEQUENCE, "2"),
        ];
        assert!(matches!(
            Stored::from_headers(None),
            Err(HeaderError::NoHeaders)
        ));
        for missing in [NATS_SUBJECT, NATS_SEQUENCE, NATS_TIME_STAMP] {
            let pairs: Vec<_> = full
                .iter()
                .filter(|(n, _)| *n != missing)
                .cloned()
                .collect();
            let err = Stored::from_headers(Some(&headers(&pairs))).unwrap_err();
            assert!(
                matches!(err, HeaderError::Missing(ref name) if *name == missing),
                "{err}"
            );
        }
        for (name, value) in [
            (NATS_SEQUENCE, "x"),
            (NATS_SEQUENCE, "-3"),
            (NATS_LAST_SEQUENCE, ""),
        ] {
            let mut pairs = full.to_vec();
            pairs.retain(|(n, _)| *n != name);
            pairs.push((name, value));
            let err = Stored::from_headers(Some(&headers(&pairs))).unwrap_err();
            assert!(matches!(err, HeaderError::BadSequence { .. }), "{err}");
        }
        let mut pairs = full.to_vec();
        pairs.retain(|(n, _)| *n != NATS_TIME_STAMP);
        pairs.push((NATS_TIME_STAMP, "yesterday"));
        let err = Stored::from_headers(Some(&headers(&pairs))).unwrap_err();
        assert!(matches!(err, HeaderError::BadTime { .. }), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }
}
