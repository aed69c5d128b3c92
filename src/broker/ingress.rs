//! Ingress: where a NATS message becomes a frame.
//!
//! On the core path ([`run`], `delivery.enabled = false`) ingress holds one subscription, `<prefix>.user.*`;
//! with the event stream, [`crate::delivery::live`] feeds the same [`Router`]. Each message's subject is
//! parsed once into a
//! [`Topic`]; the body is checked once (size, JSON envelope, event name), encoded once as
//! `[null, null, topic, event, payload]`, and handed to the hub, which shares the same bytes with every
//! subscribed socket. A message that fails a check is dropped, counted by reason, and logged at most once
//! per [`DROP_LOG_INTERVAL`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::Message;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::Nats;

use crate::hub::{Hub, Kick};
use crate::metrics::{IngressDrop, Metrics};
use crate::protocol::{self, RESERVED_EVENT_PREFIX};
use crate::topic::{Topic, UserId};

/// At most one log line per interval about dropped ingress messages; the rest are counted.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Longest event name forwarded to clients.
pub const MAX_EVENT_BYTES: usize = 128;

/// `{"event": "...", "payload": {...}}` as published by backend services.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

/// Event on `<prefix>.user.<id>` that closes all of that user's sockets instead of reaching them.
pub const EVENT_DISCONNECT: &str = "disconnect";
/// Event on `<prefix>.user.<id>` that is delivered, then revokes the token in its payload.
pub const EVENT_LOGOUT: &str = "logout";

/// What an ingress message asks of the gateway besides delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close every socket of the user (not delivered).
    Disconnect(UserId),
    /// After delivery, close the sockets of this token and refuse it from now on.
    Logout { user: UserId, token: String },
}

/// Called for a `logout` after its delivery, with the user and the token to revoke.
pub type LogoutHook = Arc<dyn Fn(UserId, &str) + Send + Sync>;

/// A checked ingress message, ready to fan out.
#[derive(Debug)]
pub struct Broadcast {
    pub topic: Topic,
    pub event: String,
    pub frame: protocol::Frame,
    pub control: Option<Control>,
}

/// The topic of an ingress subject, `<prefix>.user.<public|role|id>`; `None` for any other subject.
pub fn subject_topic(prefix: &str, subject: &str) -> Option<Topic> {
    subject
        .strip_prefix(prefix)?
        .strip_prefix(".user.")
        .and_then(Topic::from_subject_token)
}

/// Checks and encodes the body of one ingress message for `topic`.
///
/// # Errors
/// The [`IngressDrop`] reason when the message must not reach clients.
pub fn decode(topic: Topic, body: &[u8], max_bytes: usize) -> Result<Broadcast, IngressDrop> {
    if body.len() > max_bytes {
        return Err(IngressDrop::TooLarge);
    }
    // serde would also read a struct from a JSON array; the envelope must be an object.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(IngressDrop::NotJson);
    }
    let envelope: Envelope<'_> = serde_json::from_slice(body).map_err(|_| IngressDrop::NotJson)?;
    let event = envelope.event.as_ref();
    if event.is_empty() || event.len() > MAX_EVENT_BYTES || event.starts_with(RESERVED_EVENT_PREFIX)
    {
        return Err(IngressDrop::BadEvent);
    }
    let empty = RawValue::from_string("{}".to_owned()).expect("{} is JSON");
    let payload = match envelope.payload {
        None => &*empty,
        Some(raw) if raw.get() == "null" => &*empty,
        Some(raw) if raw.get().starts_with('{') => raw,
        Some(_) => return Err(IngressDrop::BadPayload),
    };
    let control = match (topic, event) {
        (Topic::User(user), EVENT_DISCONNECT) => Some(Control::Disconnect(user)),
        (Topic::User(user), EVENT_LOGOUT) => {
            #[derive(Deserialize)]
            struct Logout {
                token: Option<String>,
            }
            serde_json::from_str::<Logout>(payload.get())
                .ok()
                .and_then(|logout| logout.token)
                .map(|token| Control::Logout { user, token })
        }
        _ => None,
    };
    Ok(Broadcast {
        topic,
        event: event.to_owned(),
        frame: protocol::broadcast(&topic.to_string(), event, payload),
        control,
    })
}

/// Logs dropped messages at most once per [`DROP_LOG_INTERVAL`], with the number suppressed since.
#[derive(Debug)]
struct DropLog {
    last: Option<Instant>,
    suppressed: AtomicU64,
}

impl DropLog {
    fn record(&mut self, subject: &str, reason: IngressDrop) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < DROP_LOG_INTERVAL)
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.last = Some(now);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            subject,
            reason = reason.label(),
            suppressed,
            "dropped invalid NATS message"
        );
    }
}

/// Turns checked NATS messages into frames for the hub and runs their side effects: the one place where a
/// NATS message becomes a frame, for the core path ([`run`]) and the event stream alike.
pub struct Router {
    prefix: String,
    max_bytes: usize,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    on_logout: LogoutHook,
    drops: DropLog,
}

impl Router {
    pub fn new(
        prefix: String,
        max_bytes: usize,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        on_logout: LogoutHook,
    ) -> Self {
        Self {
            prefix,
            max_bytes,
            hub,
            metrics,
            on_logout,
            drops: DropLog {
                last: None,
                suppressed: AtomicU64::new(0),
            },
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Parses the subject and checks the body of one ingress message; a message that must not reach
    /// clients is counted and logged here. With `skip_unheard`, a public or role message that no local
    /// socket listens to is dropped before its body is decoded.
    pub fn check(
        &mut self,
        subject: &str,
        payload: &[u8],
        skip_unheard: bool,
    ) -> Option<Broadcast> {
        self.metrics.nats_message();
        let Some(topic) = subject_topic(&self.prefix, subject) else {
            self.drop_message(subject, IngressDrop::BadSubject);
            return None;
        };
        // Never skipped on user subjects, which carry `disconnect` and `logout`: those act on sessions
        // that joined no topic.
        if skip_unheard && !matches!(topic, Topic::User(_)) && !self.hub.has_subscribers(topic) {
            self.metrics.ingress_dropped(IngressDrop::NoSubscribers);
            return None;
        }
        match decode(topic, payload, self.max_bytes) {
            Ok(broadcast) => Some(broadcast),
            Err(reason) => {
                self.drop_message(subject, reason);
                None
            }
        }
    }

    fn drop_message(&mut self, subject: &str, reason: IngressDrop) {
        self.metrics.ingress_dropped(reason);
        self.drops.record(subject, reason);
    }

    /// Delivers a checked message to the local sockets of its topic (sockets that asked for positions get
    /// `positioned`), then runs its side effect: `disconnect` closes the user's sockets instead of reaching
    /// them, `logout` revokes its token after its delivery.
    pub fn deliver(
        &self,
        broadcast: &Broadcast,
        seq: u64,
        positioned: impl FnOnce() -> protocol::Frame,
        received: Instant,
    ) {
        let span = tracing::Span::current();
        if let Some(Control::Disconnect(user)) = broadcast.control {
            let closed = self.hub.close_user(user, Kick::Disconnected);
            tracing::info!(%user, closed, "disconnect: closing the user's sockets");
            return;
        }
        self.metrics.nats_event(&broadcast.event);
        let delivery = self.hub.publish_stored(crate::hub::Message {
            topic: broadcast.topic,
            frame: &broadcast.frame,
            positioned,
            seq,
            received,
        });
        span.record("event", broadcast.event.as_str());
        span.record("topic", tracing::field::display(broadcast.topic));
        span.record(
            "sockets",
            i64::try_from(delivery.queued).unwrap_or(i64::MAX),
        );
        span.record(
            "dropped",
            i64::try_from(delivery.overflowed).unwrap_or(i64::MAX),
        );
        if delivery.overflowed > 0 {
            tracing::debug!(topic = %broadcast.topic, slow = delivery.overflowed, "slow consumers dropped");
        }
        if let Some(Control::Logout { user, token }) = &broadcast.control {
            (self.on_logout)(*user, token);
        }
    }
}

/// The span of one ingress message, a child of the publisher's span when the message carries a W3C
/// `traceparent`.
pub fn message_span(subject: &str, headers: Option<&async_nats::HeaderMap>) -> tracing::Span {
    let span = tracing::info_span!(
        "nats.message",
        otel.kind = "consumer",
        subject = %subject,
        event = tracing::field::Empty,
        topic = tracing::field::Empty,
        sockets = tracing::field::Empty,
        dropped = tracing::field::Empty,
    );
    continue_trace(&span, headers);
    span
}

/// The core NATS path: one subscription to `<prefix>.user.*`, at most once. Runs until `stop`.
///
/// # Errors
/// When the subscription cannot be created.
pub async fn run(
    nats: Nats,
    mut router: Router,
    stop: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut messages = nats
        .client()
        .subscribe(format!("{}.user.*", router.prefix))
        .await?;
    loop {
        let message: Message = tokio::select! {
            () = stop.cancelled() => break,
            message = messages.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let received = Instant::now();
        let span = message_span(&message.subject, message.headers.as_ref());
        let _entered = span.enter();
        if let Some(broadcast) = router.check(&message.subject, &message.payload, true) {
            let frame = broadcast.frame.clone();
            router.deliver(&broadcast, 0, || frame, received);
        }
    }
    let _ = messages.unsubscribe().await;
    Ok(())
}

/// Makes `span` a child of the publisher's span when the message carries a W3C `traceparent`.
fn continue_trace(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Some(headers) = headers.filter(|h| h.get(TRACEPARENT).is_some()) else {
        return;
    };
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract(&NatsHeaders(headers));
    // Fails only when the span is already closed or not recorded; nothing to continue then.
    let _ = span.set_parent(parent);
}

/// W3C trace context header carried by NATS messages.
const TRACEPARENT: &str = "traceparent";

/// Reads OpenTelemetry propagation fields (`traceparent`, `tracestate`) from NATS headers.
struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl opentelemetry::propagation::Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Subject and body together, as the ingress loop checks them.
#[cfg(test)]
fn decode_at(
    prefix: &str,
    subject: &str,
    body: &[u8],
    max: usize,
) -> Result<Broadcast, IngressDrop> {
    decode(
        subject_topic(prefix, subject).ok_or(IngressDrop::BadSubject)?,
        body,
        max,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::UserId;

    const MAX: usize = 1024;

    #[test]
    fn encodes_valid_envelopes_once() {
        let b = decode_at(
            "epoch",
            "epoch.user.42",
            br#"{"event":"logout","payload":{"token":"t"}}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(b.topic, Topic::User(UserId::new(42)));
        assert_eq!(
            b.frame.as_str(),
            r#"[null,null,"user:42","logout",{"token":"t"}]"#
        );
        let b = decode_at(
            "epoch",
            "epoch.user.public",
            br#"{"event":"announcement"}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(
            b.frame.as_str(),
            r#"[null,null,"user:public","announcement",{}]"#
        );
        let b = decode_at(
            "a.b",
            "a.b.user.role",
            br#"{"event":"permissionsChanged","payload":null}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(
            b.frame.as_str(),
            r#"[null,null,"user:role","permissionsChanged",{}]"#
        );
    }

    #[test]
    fn user_subjects_carry_control_events() {
        let b = decode_at("epoch", "epoch.user.9", br#"{"event":"disconnect"}"#, MAX).unwrap();
        assert_eq!(b.control, Some(Control::Disconnect(UserId::new(9))));
        let b = decode_at(
            "epoch",
            "epoch.user.9",
            br#"{"event":"logout","payload":{"token":"t"}}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(
            b.control,
            Some(Control::Logout {
                user: UserId::new(9),
                token: "t".to_owned()
            })
        );
        let b = decode_at(
            "epoch",
            "epoch.user.public",
            br#"{"event":"disconnect"}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(b.control, None);
        let b = decode_at(
            "epoch",
            "epoch.user.9",
            br#"{"event":"logout","payload":{}}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(b.control, None);
    }

    #[test]
    fn refuses_invalid_messages() {
        let cases: [(&str, &[u8], IngressDrop); 11] = [
            (
                "epoch.user.public",
                br#"["announcement",{}]"#,
                IngressDrop::NotJson,
            ),
            (
                "epoch.user.abc",
                br#"{"event":"x"}"#,
                IngressDrop::BadSubject,
            ),
            (
                "epoch.user.007",
                br#"{"event":"x"}"#,
                IngressDrop::BadSubject,
            ),
            (
                "other.user.public",
                br#"{"event":"x"}"#,
                IngressDrop::BadSubject,
            ),
            ("epoch.user.public", b"not json", IngressDrop::NotJson),
            (
                "epoch.user.public",
                br#"{"payload":{}}"#,
                IngressDrop::NotJson,
            ),
            (
                "epoch.user.public",
                br#"{"event":""}"#,
                IngressDrop::BadEvent,
            ),
            (
                "epoch.user.public",
                br#"{"event":"phx_close"}"#,
                IngressDrop::BadEvent,
            ),
            (
                "epoch.user.public",
                br#"{"event":"x","payload":[1]}"#,
                IngressDrop::BadPayload,
            ),
            (
                "epoch.user.public",
                br#"{"event":"x","payload":"s"}"#,
                IngressDrop::BadPayload,
            ),
            ("epoch.user.public", &[b'x'; MAX + 1], IngressDrop::TooLarge),
        ];
        for (subject, body, expected) in cases {
            assert_eq!(
                decode_at("epoch", subject, body, MAX).unwrap_err(),
                expected,
                "{subject}"
            );
        }
    }
}

/// Property tests (the fuzz target of the NATS envelope parser): `make fuzz` runs them with many more cases.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fuzz_envelope_never_panics_and_only_emits_valid_frames(
            subject in prop_oneof![Just("epoch.user.public".to_owned()), Just("epoch.user.role".to_owned()), "epoch\\.user\\.[0-9a-z]{0,22}"],
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            if let Ok(broadcast) = decode_at("epoch", &subject, &body, 1024) {
                let frame: serde_json::Value = serde_json::from_str(broadcast.frame.as_str()).unwrap();
                prop_assert!(frame[0].is_null() && frame[1].is_null());
                prop_assert!(frame[4].is_object());
            }
        }

        #[test]
        fn fuzz_envelope_accepts_every_valid_event(
            event in "[A-Za-z][A-Za-z0-9_]{0,60}",
            value in ".{0,100}",
        ) {
            prop_assume!(!event.starts_with(RESERVED_EVENT_PREFIX));
            let body = serde_json::json!({"event": event, "payload": {"v": value}}).to_string();
            let broadcast = decode_at("epoch", "epoch.user.public", body.as_bytes(), 1024).unwrap();
            let frame: serde_json::Value = serde_json::from_str(broadcast.frame.as_str()).unwrap();
            prop_assert_eq!(&frame[3], &serde_json::json!(event));
            prop_assert_eq!(&frame[4]["v"], &serde_json::json!(value));
        }
    }
}
