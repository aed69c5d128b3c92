//! Domain names shared by every layer: user ids and the three kinds of channel topic.
//!
//! A [`Topic`] is the hub's key. It is parsed from a client's topic string (`user:public`, `user:role`,
//! `user:<id>`) and from the last token of a NATS subject (`public`, `role`, `<id>`), and both parsers
//! accept only the canonical spelling, so one user has exactly one topic.

use std::fmt;

/// A forum user id: the decimal `sub` claim of a token, and the suffix of a `user:<id>` topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(u64);

impl UserId {
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// A user id as clients and services send it in JSON: a number or a string of digits, which name the
    /// same user (`42` and `"42"`; `"042"` too, as the number it spells).
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::Number(n) => n.as_u64().map(Self),
            serde_json::Value::String(s)
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                s.parse().ok().map(Self)
            }
            _ => None,
        }
    }

    /// Parses the canonical decimal form: digits only, no sign, no leading zero (except `0` itself).
    pub fn parse(text: &str) -> Option<Self> {
        let canonical = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        if !canonical {
            return None;
        }
        text.parse().ok().map(Self)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether `text` is one token of a NATS subject or KV key as the gateway writes them (node ids, bucket
/// and stream names): letters, digits, `-` and `_`.
pub fn is_key_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A channel topic that can carry messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `user:public`: everyone.
    Public,
    /// `user:role`: every authenticated socket.
    Role,
    /// `user:<id>`: the sockets of one user.
    User(UserId),
}

/// Prefix shared by every topic the gateway serves.
pub const TOPIC_PREFIX: &str = "user:";

/// How a client's topic string routes, before authorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Public,
    Role,
    /// `user:<suffix>` with the suffix as sent; it names a user only if it is a canonical id.
    User(&'a str),
    /// Anything outside `user:*`.
    Unmatched,
}

impl<'a> Route<'a> {
    pub fn of(topic: &'a str) -> Self {
        match topic.strip_prefix(TOPIC_PREFIX) {
            Some("public") => Self::Public,
            Some("role") => Self::Role,
            Some(suffix) => Self::User(suffix),
            None => Self::Unmatched,
        }
    }
}

impl Topic {
    /// Topic named by the last token of a NATS subject `<prefix>.user.<token>`.
    pub fn from_subject_token(token: &str) -> Option<Self> {
        match token {
            "public" => Some(Self::Public),
            "role" => Some(Self::Role),
            other => UserId::parse(other).map(Self::User),
        }
    }

    /// The last token of the topic's NATS subject: `public`, `role` or the user id.
    pub fn subject_token(self) -> String {
        match self {
            Self::Public => "public".to_owned(),
            Self::Role => "role".to_owned(),
            Self::User(id) => id.to_string(),
        }
    }

    /// Short label for logs and metrics (never a user id: label values must stay few).
    pub const fn kind(self) -> TopicKind {
        match self {
            Self::Public => TopicKind::Public,
            Self::Role => TopicKind::Role,
            Self::User(_) => TopicKind::User,
        }
    }
}

enum_with_all! {
    /// A [`Topic`] without its user id: a label for logs and metrics, whose values must stay few.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum TopicKind {
        Public,
        Role,
        User,
    }
}

impl TopicKind {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Role => "role",
            Self::User => "user",
        }
    }
}

impl Topic {
    /// Whether `name` is this topic's name (`user:public`, `user:role`, `user:<canonical id>`), without
    /// building it.
    pub fn is_named(self, name: &str) -> bool {
        match (self, Route::of(name)) {
            (Self::Public, Route::Public) | (Self::Role, Route::Role) => true,
            (Self::User(user), Route::User(suffix)) => UserId::parse(suffix) == Some(user),
            _ => false,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Public => f.write_str("user:public"),
            Self::Role => f.write_str("user:role"),
            Self::User(id) => write!(f, "user:{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_canonical_decimals() {
        assert_eq!(UserId::parse("42"), Some(UserId::new(42)));
        assert_eq!(UserId::parse("0"), Some(UserId::new(0)));
        for bad in [
            "",
            "042",
            "-1",
            "+1",
            "4 2",
            "abc",
            "1e3",
            "99999999999999999999",
        ] {
            assert_eq!(UserId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn json_user_ids_are_numbers_or_digit_strings() {
        use serde_json::json;
        assert_eq!(UserId::from_json(&json!(5)), Some(UserId::new(5)));
        assert_eq!(UserId::from_json(&json!("5")), Some(UserId::new(5)));
        for bad in [
            json!(-1),
            json!(1.5),
            json!("5a"),
            json!(""),
            json!(null),
            json!([5]),
        ] {
            assert_eq!(UserId::from_json(&bad), None, "{bad}");
        }
    }

    #[test]
    fn routes_client_topics() {
        assert_eq!(Route::of("user:public"), Route::Public);
        assert_eq!(Route::of("user:role"), Route::Role);
        assert_eq!(Route::of("user:7"), Route::User("7"));
        assert_eq!(Route::of("user:"), Route::User(""));
        assert_eq!(Route::of("room:lobby"), Route::Unmatched);
        assert_eq!(Route::of("phoenix"), Route::Unmatched);
    }

    #[test]
    fn a_topic_knows_its_canonical_name() {
        let user = Topic::User(UserId::new(42));
        assert!(user.is_named("user:42"));
        for other in ["user:042", "user:4", "user:public", "user:42 ", "42", ""] {
            assert!(!user.is_named(other), "{other:?}");
        }
        assert!(Topic::Public.is_named("user:public") && !Topic::Public.is_named("user:role"));
        assert!(Topic::Role.is_named("user:role") && !Topic::Role.is_named("role"));
    }

    #[test]
    fn subject_tokens_name_topics() {
        assert_eq!(Topic::from_subject_token("public"), Some(Topic::Public));
        assert_eq!(Topic::from_subject_token("role"), Some(Topic::Role));
        assert_eq!(
            Topic::from_subject_token("12"),
            Some(Topic::User(UserId::new(12)))
        );
        assert_eq!(Topic::from_subject_token("012"), None);
        assert_eq!(Topic::from_subject_token("admins"), None);
        assert_eq!(Topic::User(UserId::new(12)).to_string(), "user:12");
    }
}
