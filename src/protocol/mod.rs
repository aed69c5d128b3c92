//! Phoenix Channels V2 JSON: client text frames in, server text frames out.
//!
//! Every frame is a JSON array `[join_ref, ref, topic, event, payload]`. This module turns socket text into
//! [`ClientFrame`] and builds the server frames (replies, `phx_close`, broadcasts) as [`Frame`], the shared,
//! cheaply cloned text that the hub hands to every subscriber. [`mod@close`] is the catalogue of the close codes
//! the gateway ends a socket with. It knows nothing of NATS, the hub or sockets.

pub mod close;

pub use close::CloseCode;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Text of one server frame. Cloning it bumps a reference count, so a broadcast encoded once is shared by
/// every socket it goes to.
pub type Frame = axum::extract::ws::Utf8Bytes;

/// Topic of the socket-level control messages (heartbeats).
pub const PHOENIX_TOPIC: &str = "phoenix";
pub const EVENT_HEARTBEAT: &str = "heartbeat";
pub const EVENT_JOIN: &str = "phx_join";
pub const EVENT_LEAVE: &str = "phx_leave";
pub const EVENT_REPLY: &str = "phx_reply";
pub const EVENT_CLOSE: &str = "phx_close";
/// Prefix of the events Phoenix reserves for itself; never forwarded from NATS.
pub const RESERVED_EVENT_PREFIX: &str = "phx_";

/// Longest topic or event name accepted from a client. Real topics are `user:<id>` (under 30 bytes); the
/// bound keeps an echoed error reason small.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest `join_ref` or `ref`. phoenix.js sends decimal counters.
pub const MAX_REF_BYTES: usize = 64;

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

/// Why a client text frame is not a Phoenix V2 message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame is not valid JSON")]
    NotJson,
    #[error("frame is not an array of at least 5 elements")]
    NotFrame,
    #[error("{0} must be a string or null")]
    BadRef(&'static str),
    #[error("{0} must be a non-empty string")]
    BadName(&'static str),
    #[error("{0} is too long")]
    TooLong(&'static str),
}

/// Decodes one text frame. Elements after the fifth are ignored, as Phoenix does.
///
/// # Errors
/// [`DecodeError`] when the text is not a Phoenix V2 frame.
pub fn decode(text: &str) -> Result<ClientFrame, DecodeError> {
    let value: Value = serde_json::from_str(text).map_err(|_| DecodeError::NotJson)?;
    let Value::Array(items) = value else {
        return Err(DecodeError::NotFrame);
    };
    if items.len() < 5 {
        return Err(DecodeError::NotFrame);
    }
    let mut items = items.into_iter();
    // The length check above guarantees five elements.
    let mut next = || items.next().expect("frame has five elements");
    let join_ref = decode_ref(next(), "join_ref")?;
    let msg_ref = decode_ref(next(), "ref")?;
    let topic = decode_name(next(), "topic")?;
    let event = decode_name(next(), "event")?;
    let payload = next();
    Ok(ClientFrame {
        join_ref,
        msg_ref,
        topic,
        event,
        payload,
    })
}

fn decode_ref(value: Value, what: &'static str) -> Result<Option<String>, DecodeError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.len() <= MAX_REF_BYTES => Ok(Some(s)),
        Value::String(_) => Err(DecodeError::TooLong(what)),
        _ => Err(DecodeError::BadRef(what)),
    }
}

fn decode_name(value: Value, what: &'static str) -> Result<String, DecodeError> {
    match value {
        Value::String(s) if s.is_empty() => Err(DecodeError::BadName(what)),
        Value::String(s) if s.len() <= MAX_NAME_BYTES => Ok(s),
        Value::String(_) => Err(DecodeError::TooLong(what)),
        _ => Err(DecodeError::BadName(what)),
    }
}

/// Outcome carried by a `phx_reply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

#[derive(Serialize)]
struct ReplyPayload<'a, R: Serialize> {
    status: Status,
    response: &'a R,
}

/// `{}`: the response of a plain ok reply and the payload of `phx_close`.
#[derive(Serialize)]
pub struct Empty {}

/// `{"reason": "..."}`: the response of every error reply.
#[derive(Serialize)]
pub struct Reason<'a> {
    pub reason: &'a str,
}

/// Serialising these shapes cannot fail: keys are strings and values are plain JSON.
fn to_frame<T: Serialize>(value: &T) -> Frame {
    serde_json::to_string(value)
        .expect("frame shapes always serialise")
        .into()
}

/// `[join_ref, ref, topic, "phx_reply", {"status": …, "response": …}]`
pub fn reply<R: Serialize>(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    status: Status,
    response: &R,
) -> Frame {
    to_frame(&(
        join_ref,
        msg_ref,
        topic,
        EVENT_REPLY,
        ReplyPayload { status, response },
    ))
}

/// `[join_ref, join_ref, topic, "phx_close", {}]`: the channel behind `join_ref` is gone.
pub fn close(join_ref: Option<&str>, topic: &str) -> Frame {
    to_frame(&(join_ref, join_ref, topic, EVENT_CLOSE, Empty {}))
}

/// `[null, null, topic, event, payload]`, with `payload` copied verbatim from already validated JSON.
pub fn broadcast(topic: &str, event: &str, payload: &RawValue) -> Frame {
    let mut text = String::with_capacity(topic.len() + event.len() + payload.get().len() + 24);
    text.push_str(BROADCAST_HEAD);
    // Writing JSON strings into a String cannot fail.
    text.push_str(&serde_json::to_string(topic).expect("string serialises"));
    text.push(',');
    text.push_str(&serde_json::to_string(event).expect("string serialises"));
    text.push(',');
    text.push_str(payload.get());
    text.push(']');
    text.into()
}

/// What every frame of [`broadcast`] starts with: no join ref, no ref.
const BROADCAST_HEAD: &str = "[null,null,";

/// A [`broadcast`] frame with `msg_ref` in its ref slot: `[null, "<msg_ref>", topic, event, payload]`.
pub fn with_ref(frame: &Frame, msg_ref: &str) -> Frame {
    let body = frame
        .as_str()
        .strip_prefix(BROADCAST_HEAD)
        .unwrap_or_else(|| {
            debug_assert!(false, "not a broadcast frame");
            frame.as_str()
        });
    let mut text = String::with_capacity(frame.len() + msg_ref.len() + 4);
    text.push_str("[null,");
    // Writing a JSON string into a String cannot fail.
    text.push_str(&serde_json::to_string(msg_ref).expect("string serialises"));
    text.push(',');
    text.push_str(body);
    text.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_a_phoenix_js_push() {
        let frame = decode(r#"["3","7","user:public","is_online",{"user_id":5}]"#).unwrap();
        assert_eq!(frame.join_ref.as_deref(), Some("3"));
        assert_eq!(frame.msg_ref.as_deref(), Some("7"));
        assert_eq!(frame.topic, "user:public");
        assert_eq!(frame.event, "is_online");
        assert_eq!(frame.payload, json!({"user_id": 5}));
    }

    #[test]
    fn ignores_elements_after_the_fifth() {
        let frame = decode(r#"[null,"1","phoenix","heartbeat",{},"extra"]"#).unwrap();
        assert_eq!(frame.join_ref, None);
        assert_eq!(frame.event, "heartbeat");
    }

    #[test]
    fn refuses_what_is_not_a_frame() {
        let cases = [
            ("not json", DecodeError::NotJson),
            (r#"{"topic":"x"}"#, DecodeError::NotFrame),
            (r#"[null,"1","phoenix","heartbeat"]"#, DecodeError::NotFrame),
            (
                r#"[1,"1","phoenix","heartbeat",{}]"#,
                DecodeError::BadRef("join_ref"),
            ),
            (
                r#"[null,2,"phoenix","heartbeat",{}]"#,
                DecodeError::BadRef("ref"),
            ),
            (
                r#"[null,"1",null,"heartbeat",{}]"#,
                DecodeError::BadName("topic"),
            ),
            (
                r#"[null,"1","","heartbeat",{}]"#,
                DecodeError::BadName("topic"),
            ),
            (
                r#"[null,"1","phoenix",7,{}]"#,
                DecodeError::BadName("event"),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(decode(text), Err(expected), "{text}");
        }
        let long_topic = format!(r#"[null,"1","{}","phx_join",{{}}]"#, "x".repeat(300));
        assert_eq!(decode(&long_topic), Err(DecodeError::TooLong("topic")));
    }

    #[test]
    fn encodes_replies_closes_and_broadcasts() {
        let ok = reply(Some("3"), Some("3"), "user:public", Status::Ok, &Empty {});
        assert_eq!(
            ok.as_str(),
            r#"["3","3","user:public","phx_reply",{"status":"ok","response":{}}]"#
        );
        let err = reply(
            None,
            Some("4"),
            "foo",
            Status::Error,
            &Reason {
                reason: "unmatched topic",
            },
        );
        assert_eq!(
            err.as_str(),
            r#"[null,"4","foo","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
        );
        assert_eq!(
            close(Some("3"), "user:role").as_str(),
            r#"["3","3","user:role","phx_close",{}]"#
        );
        let payload = RawValue::from_string(r#"{"motd": "hi \"there\""}"#.to_owned()).unwrap();
        assert_eq!(
            broadcast("user:public", "announcement", &payload).as_str(),
            r#"[null,null,"user:public","announcement",{"motd": "hi \"there\""}]"#
        );
    }
}

/// Property tests (the fuzz target of the frame decoder): `make fuzz` runs them with many more cases.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fuzz_decode_never_panics(text in ".{0,512}") {
            let _ = decode(&text);
        }

        #[test]
        fn fuzz_decode_never_panics_on_json_shapes(
            items in proptest::collection::vec(
                prop_oneof![
                    Just(Value::Null),
                    any::<bool>().prop_map(Value::Bool),
                    any::<i64>().prop_map(Value::from),
                    ".{0,300}".prop_map(Value::String),
                    Just(serde_json::json!({})),
                    Just(serde_json::json!([])),
                ],
                0..8,
            )
        ) {
            let text = Value::Array(items).to_string();
            let _ = decode(&text);
        }

        #[test]
        fn fuzz_valid_frames_round_trip(
            join_ref in proptest::option::of("[0-9]{1,10}"),
            msg_ref in proptest::option::of("[0-9]{1,10}"),
            topic in "[a-z:0-9]{1,40}",
            event in "[a-z_]{1,40}",
        ) {
            let text = serde_json::json!([join_ref, msg_ref, topic, event, {"k": 1}]).to_string();
            let frame = decode(&text).unwrap();
            prop_assert_eq!(frame.join_ref, join_ref);
            prop_assert_eq!(frame.msg_ref, msg_ref);
            prop_assert_eq!(frame.topic, topic);
            prop_assert_eq!(frame.event, event);
        }
    }
}
