//! Publishing one event so that it is not lost: the `publish` command.
//!
//! The event is published with JetStream to `<prefix>.user.<public|role|id>` with a `Nats-Msg-Id` header,
//! and the stream's acknowledgement is awaited. An attempt that gets no ack is sent again with the same
//! id until one arrives or the deadline passes; the stream drops a copy it already stored (within its
//! duplicate window), so retries never store an event twice.
//!
//! The envelope is checked with the rules ingress applies, so what is stored is also delivered.

use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError as AckError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{ConnectErrorKind, ConnectOptions, HeaderValue};
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::broker::ingress::MAX_EVENT_BYTES;
use crate::protocol::RESERVED_EVENT_PREFIX;
use crate::topic::Topic;

/// How long one attempt waits for the stream's ack before the event is sent again.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after the first failed attempt; it doubles after each further failure, up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest pause between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest time one attempt to connect to NATS may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// JetStream's status code for "temporarily unavailable"; a publish refused with it is tried again.
const UNAVAILABLE: usize = 503;

/// An envelope that ingress would drop.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the event name is empty")]
    EmptyEvent,
    #[error("the event name is {0} bytes long; at most {MAX_EVENT_BYTES} are allowed")]
    EventTooLong(usize),
    #[error(
        "event names starting with `{RESERVED_EVENT_PREFIX}` are reserved for the Phoenix protocol"
    )]
    ReservedEvent,
    #[error("the payload is not valid JSON")]
    PayloadNotJson(#[source] serde_json::Error),
    #[error("the payload must be a JSON object, like {{\"id\": 1}}")]
    PayloadNotObject,
    #[error(
        "the message is {bytes} bytes; the gateway drops messages over {max} bytes (nats.max_message_bytes)"
    )]
    TooLarge { bytes: usize, max: usize },
}

/// A `Nats-Msg-Id` that is not a usable header value.
#[derive(Debug, thiserror::Error)]
#[error("a message id must be non-empty, with no control characters and no surrounding spaces")]
pub struct InvalidMessageId;

/// Why an event was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to NATS at {urls}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(
        "no JetStream stream stores {subject}: the gateway creates it at start-up (delivery.stream, \
         default epoch_events, unless delivery.enabled is false); start the gateway once, or create the stream"
    )]
    NoStream { subject: String },
    #[error(
        "JetStream is not enabled on the NATS server (nats-server -js); the event stream needs it"
    )]
    NoJetStream,
    #[error("the stream refused the event on {subject}")]
    Refused {
        subject: String,
        #[source]
        source: AckError,
    },
    #[error(
        "no ack for the event on {subject} within {} s (attempts: {attempts}, Nats-Msg-Id {msg_id}); \
         publishing it again with the same id stores it at most once",
        timeout.as_secs_f32()
    )]
    TimedOut {
        subject: String,
        timeout: Duration,
        attempts: u32,
        msg_id: String,
        /// The last attempt's failure.
        #[source]
        last: AckError,
    },
}

/// `{"event": "...", "payload": {...}}`, checked as ingress checks it; the payload keeps its text.
#[derive(Debug, Clone)]
pub struct Envelope {
    body: Bytes,
}

impl Envelope {
    /// Builds the envelope of `event` with `payload` (JSON text of an object).
    ///
    /// # Errors
    /// When ingress would drop the message: a bad event name, a payload that is not a JSON object, or a
    /// message over `max_bytes`.
    pub fn new(event: &str, payload: &str, max_bytes: usize) -> Result<Self, EnvelopeError> {
        if event.is_empty() {
            return Err(EnvelopeError::EmptyEvent);
        }
        if event.len() > MAX_EVENT_BYTES {
            return Err(EnvelopeError::EventTooLong(event.len()));
        }
        if event.starts_with(RESERVED_EVENT_PREFIX) {
            return Err(EnvelopeError::ReservedEvent);
        }
        let payload: &RawValue =
            serde_json::from_str(payload).map_err(EnvelopeError::PayloadNotJson)?;
        if !payload.get().starts_with('{') {
            return Err(EnvelopeError::PayloadNotObject);
        }
        #[derive(Serialize)]
        struct Body<'a> {
            event: &'a str,
            payload: &'a RawValue,
        }
        // A struct of a string and a JSON value always serialises.
        let body = serde_json::to_vec(&Body { event, payload }).expect("envelope serialises");
        if body.len() > max_bytes {
            return Err(EnvelopeError::TooLarge {
                bytes: body.len(),
                max: max_bytes,
            });
        }
        Ok(Self { body: body.into() })
    }

    /// The message body as published.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// The `Nats-Msg-Id` of one event: every attempt to publish it carries the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageId(String);

impl MessageId {
    /// A fresh random id (a UUID).
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MessageId {
    type Err = InvalidMessageId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() || text.trim() != text || text.chars().any(char::is_control) {
            return Err(InvalidMessageId);
        }
        Ok(Self(text.to_owned()))
    }
}

/// The NATS subject of a topic: `<prefix>.user.<public|role|id>`.
pub fn subject(prefix: &str, topic: Topic) -> String {
    match topic {
        Topic::Public => format!("{prefix}.user.public"),
        Topic::Role => format!("{prefix}.user.role"),
        Topic::User(id) => format!("{prefix}.user.{id}"),
    }
}

/// The stream's acknowledgement of a stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub stream: String,
    pub sequence: u64,
    /// The stream already held an event with this `Nats-Msg-Id`; `sequence` is that event's.
    pub duplicate: bool,
    pub attempts: u32,
}

/// Publishes `envelope` on `subject` with JetStream and waits for the ack, retrying with the same
/// `msg_id` until the stream acknowledges it or `timeout` has passed.
///
/// # Errors
/// NATS unreachable, no stream storing `subject`, the stream refusing the event, or no ack in time.
pub async fn publish(
    urls: &[String],
    subject: &str,
    envelope: &Envelope,
    msg_id: &MessageId,
    timeout: Duration,
) -> Result<Stored, PublishError> {
    let deadline = Instant::now() + timeout;
    let client = connect(urls, deadline).await?;
    let jetstream = async_nats::jetstream::ContextBuilder::new()
        .timeout(ATTEMPT_TIMEOUT)
        .build(client);
    // Checked by `MessageId::from_str`, or a UUID: never a line break.
    let id = HeaderValue::from_str(msg_id.as_str()).expect("message ids are header values");
    let mut attempts = 0;
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        attempts += 1;
        let message = PublishMessage::build()
            .payload(envelope.body().clone())
            .header(async_nats::header::NATS_MESSAGE_ID, id.clone());
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(remaining.min(ATTEMPT_TIMEOUT), async {
            jetstream
                .send_publish(subject.to_owned(), message)
                .await?
                .await
        })
        .await;
        let error = match attempt {
            Ok(Ok(ack)) => {
                return Ok(Stored {
                    stream: ack.stream,
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                    attempts,
                });
            }
            Ok(Err(error)) => error,
            Err(_elapsed) => AckError::new(PublishErrorKind::TimedOut),
        };
        match error.kind() {
            // No responder: no stream at all, or one that has no leader at the moment (tried again).
            PublishErrorKind::StreamNotFound => match no_responder(&jetstream, subject).await {
                NoResponder::NoStream => {
                    return Err(PublishError::NoStream {
                        subject: subject.to_owned(),
                    });
                }
                NoResponder::NoJetStream => return Err(PublishError::NoJetStream),
                NoResponder::Unknown => {}
            },
            PublishErrorKind::MaxPayloadExceeded
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::WrongLastSequence => {
                return Err(refused(subject, error));
            }
            PublishErrorKind::Other if refused_for_good(&error) => {
                return Err(refused(subject, error));
            }
            _ => {}
        }
        if Instant::now() + delay >= deadline {
            return Err(PublishError::TimedOut {
                subject: subject.to_owned(),
                timeout,
                attempts,
                msg_id: msg_id.as_str().to_owned(),
                last: error,
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Connects, trying again while the servers cannot be reached and the deadline allows.
async fn connect(urls: &[String], deadline: Instant) -> Result<async_nats::Client, PublishError> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = ConnectOptions::new()
            .name("epoch-gateway publish")
            .connection_timeout(
                remaining
                    .min(CONNECT_TIMEOUT)
                    .max(Duration::from_millis(100)),
            )
            .connect(urls)
            .await;
        match result {
            Ok(client) => return Ok(client),
            Err(error)
                if matches!(
                    error.kind(),
                    ConnectErrorKind::Io | ConnectErrorKind::TimedOut | ConnectErrorKind::Dns
                ) && Instant::now() + FIRST_RETRY_DELAY < deadline =>
            {
                tokio::time::sleep(FIRST_RETRY_DELAY).await;
            }
            Err(source) => {
                return Err(PublishError::Connect {
                    urls: urls.join(","),
                    source,
                });
            }
        }
    }
}

/// Why a publish found no responder.
enum NoResponder {
    /// JetStream answers that no stream's subjects cover the subject.
    NoStream,
    /// Nobody serves the JetStream API: the server runs without JetStream.
    NoJetStream,
    /// A stream covers the subject but did not answer (no leader for the moment), or JetStream could not
    /// say: worth another attempt.
    Unknown,
}

async fn no_responder(jetstream: &async_nats::jetstream::Context, subject: &str) -> NoResponder {
    use async_nats::jetstream::context::{AccountErrorKind, GetStreamByNameErrorKind};
    match jetstream.stream_by_subject(subject).await {
        Err(error) if error.kind() == GetStreamByNameErrorKind::NotFound => NoResponder::NoStream,
        Err(_) => match jetstream.query_account().await {
            Err(error) if matches!(error.kind(), AccountErrorKind::JetStreamUnavailable) => {
                NoResponder::NoJetStream
            }
            _ => NoResponder::Unknown,
        },
        Ok(_) => NoResponder::Unknown,
    }
}

/// The server answered with a JetStream error other than "temporarily unavailable".
fn refused_for_good(error: &AckError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|answer| answer.code() != UNAVAILABLE)
}

fn refused(subject: &str, source: AckError) -> PublishError {
    PublishError::Refused {
        subject: subject.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::UserId;

    const MAX: usize = 65_536;

    #[test]
    fn an_envelope_keeps_the_payload_text_and_passes_ingress() {
        let envelope = Envelope::new("newMessage", r#" {"z": 1, "a": [1.50]} "#, MAX).unwrap();
        assert_eq!(
            envelope.body().as_ref(),
            br#"{"event":"newMessage","payload":{"z": 1, "a": [1.50]}}"#
        );
        let broadcast =
            crate::broker::ingress::decode(Topic::User(UserId::new(42)), envelope.body(), MAX)
                .unwrap();
        assert_eq!(broadcast.event, "newMessage");
    }

    #[test]
    fn envelopes_ingress_would_drop_are_refused() {
        let long = "e".repeat(MAX_EVENT_BYTES + 1);
        let cases: [(&str, &str, &str); 7] = [
            ("", "{}", "empty"),
            (&long, "{}", "129 bytes"),
            ("phx_reply", "{}", "reserved"),
            ("newMessage", "{\"id\":", "not valid JSON"),
            ("newMessage", "[1]", "JSON object"),
            ("newMessage", "null", "JSON object"),
            ("newMessage", "\"text\"", "JSON object"),
        ];
        for (event, payload, expected) in cases {
            let error = Envelope::new(event, payload, MAX).unwrap_err().to_string();
            assert!(error.contains(expected), "{event:?} {payload:?}: {error}");
        }
        assert!(Envelope::new(&"e".repeat(MAX_EVENT_BYTES), "{}", MAX).is_ok());
        let error = Envelope::new("big", &format!("{{\"x\":\"{}\"}}", "a".repeat(100)), 64)
            .unwrap_err()
            .to_string();
        assert!(error.contains("nats.max_message_bytes"), "{error}");
    }

    #[test]
    fn message_ids_are_header_values() {
        assert_eq!(
            "order-17".parse::<MessageId>().unwrap().as_str(),
            "order-17"
        );
        for bad in ["", " x", "x ", "a\r\nb", "a\tb"] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
        }
        assert_ne!(MessageId::random(), MessageId::random());
        assert!(MessageId::random().as_str().parse::<MessageId>().is_ok());
    }

    #[test]
    fn subjects_of_topics() {
        assert_eq!(subject("epoch", Topic::Public), "epoch.user.public");
        assert_eq!(subject("epoch", Topic::Role), "epoch.user.role");
        assert_eq!(
            subject("forum.prod", Topic::User(UserId::new(42))),
            "forum.prod.user.42"
        );
        for topic in [Topic::Public, Topic::Role, Topic::User(UserId::new(7))] {
            let parsed = crate::broker::ingress::subject_topic("epoch", &subject("epoch", topic));
            assert_eq!(parsed, Some(topic), "ingress reads the subject of {topic}");
        }
    }
}
