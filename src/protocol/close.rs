//! The close codes the gateway ends a socket with: each with its number, the reason text sent with it, and
//! what the client should do next.
//!
//! | code | variant | reason | range |
//! |---|---|---|---|
//! | 1000 | [`Normal`](CloseCode::Normal) | `normal` | stop |
//! | 1001 | [`ShuttingDown`](CloseCode::ShuttingDown) | `server shutting down` | reconnect |
//! | 1003 | [`BinaryFrame`](CloseCode::BinaryFrame) | `text frames only` | reconnect |
//! | 1007 | [`InvalidFrame`](CloseCode::InvalidFrame) | `invalid frame` | reconnect |
//! | 1007 | [`InvalidUtf8`](CloseCode::InvalidUtf8) | `text frame is not UTF-8` | reconnect |
//! | 1008 | [`TooManyMessages`](CloseCode::TooManyMessages) | `too many messages` | reconnect |
//! | 1009 | [`MessageTooBig`](CloseCode::MessageTooBig) | `message too big` | reconnect |
//! | 4000 | [`IdleTimeout`](CloseCode::IdleTimeout) | `idle timeout` | reconnect |
//! | 4001 | [`SlowConsumer`](CloseCode::SlowConsumer) | `slow consumer` | reconnect |
//! | 4401 | [`TokenExpired`](CloseCode::TokenExpired) | `token expired` | stop |
//! | 4402 | [`TokenRevoked`](CloseCode::TokenRevoked) | `token revoked` | stop |
//! | 4403 | [`Disconnected`](CloseCode::Disconnected) | `disconnected by the server` | stop |
//!
//! The private codes come in two ranges: 4000-4399 mean "come back", 4400-4499 "not with these
//! credentials". phoenix.js itself reconnects after any code but 1000, so a client that gets a "stop" code
//! should fetch a new token before it does.

enum_with_all! {
    /// Why the gateway closed a socket; the close frame carries [`Self::code`] and [`Self::reason`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum CloseCode {
        /// A close the client asked for. The gateway answers a client's close but never starts one with it.
        Normal,
        /// The instance is shutting down; reconnect (to another instance).
        ShuttingDown,
        /// A binary frame: this protocol is JSON text only.
        BinaryFrame,
        /// A text frame that is not a Phoenix V2 message.
        InvalidFrame,
        /// A text frame whose bytes are not UTF-8.
        InvalidUtf8,
        /// The client kept sending over its rate limit after error replies.
        TooManyMessages,
        /// A message over `ws.max_message_bytes`.
        MessageTooBig,
        /// No frame arrived within the idle timeout (phoenix.js heartbeats every 30 s), or no first frame
        /// within the first-frame timeout.
        IdleTimeout,
        /// The socket's outbound queue overflowed: the client does not read fast enough.
        SlowConsumer,
        /// The token the socket authenticated with has expired. Reconnecting with it is refused (403): the
        /// client needs a new token.
        TokenExpired,
        /// The token was revoked (logout). Reconnecting with it is refused (403).
        TokenRevoked,
        /// The backend disconnected the user (a ban, for example).
        Disconnected,
    }
}

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Come back: the close was about this connection, not about the client's credentials.
    Reconnect,
    /// Do not come back as before: the client closed, or its credentials are no longer good.
    Stop,
}

impl CloseCode {
    /// The number in the close frame.
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::ShuttingDown => 1001,
            Self::BinaryFrame => 1003,
            Self::InvalidFrame | Self::InvalidUtf8 => 1007,
            Self::TooManyMessages => 1008,
            Self::MessageTooBig => 1009,
            Self::IdleTimeout => 4000,
            Self::SlowConsumer => 4001,
            Self::TokenExpired => 4401,
            Self::TokenRevoked => 4402,
            Self::Disconnected => 4403,
        }
    }

    /// The reason text in the close frame (also the reason logged when the session ends).
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::ShuttingDown => "server shutting down",
            Self::BinaryFrame => "text frames only",
            Self::InvalidFrame => "invalid frame",
            Self::InvalidUtf8 => "text frame is not UTF-8",
            Self::TooManyMessages => "too many messages",
            Self::MessageTooBig => "message too big",
            Self::IdleTimeout => "idle timeout",
            Self::SlowConsumer => "slow consumer",
            Self::TokenExpired => "token expired",
            Self::TokenRevoked => "token revoked",
            Self::Disconnected => "disconnected by the server",
        }
    }

    pub const fn range(self) -> Range {
        match self {
            Self::ShuttingDown
            | Self::BinaryFrame
            | Self::InvalidFrame
            | Self::InvalidUtf8
            | Self::TooManyMessages
            | Self::MessageTooBig
            | Self::IdleTimeout
            | Self::SlowConsumer => Range::Reconnect,
            Self::Normal | Self::TokenExpired | Self::TokenRevoked | Self::Disconnected => {
                Range::Stop
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_codes_follow_their_ranges() {
        for code in CloseCode::ALL {
            let expected = match code.code() {
                4000..=4399 => Range::Reconnect,
                4400..=4499 => Range::Stop,
                _ => continue,
            };
            assert_eq!(code.range(), expected, "{code:?}");
        }
    }

    #[test]
    fn every_code_is_a_valid_close_code_with_a_short_reason() {
        for code in CloseCode::ALL {
            // 1000-2999 are defined by RFC 6455, 4000-4999 are for private use; a close reason fits in a
            // control frame (125 bytes, 2 of them the code).
            assert!(matches!(code.code(), 1000..=2999 | 4000..=4999), "{code:?}");
            assert!(
                !code.reason().is_empty() && code.reason().len() <= 123,
                "{code:?}"
            );
        }
    }
}
