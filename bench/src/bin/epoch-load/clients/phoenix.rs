//! The gateway's sockets: Phoenix V2 like phoenix.js. Each authenticates as its user, joins `user:public`,
//! `user:role` and `user:<id>` (pipelined), sends a heartbeat every 30 s, and, in the is-online scenario,
//! sends `is_online` queries or heartbeats as the control, with its send time in the ref. The bare
//! server's sockets are the same but for the query string: the user instead of a token.

use std::net::SocketAddr;

use anyhow::Result;
use epoch_gateway::auth::Authenticator;
use epoch_gateway::topic::UserId;
use epoch_testkit::{PhxClient, Ws};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::stats::{Stats, leading_number, now_us, number_after};

/// Lifetime of the tokens the sockets connect with: longer than any run, so that no socket is closed for
/// an expired token (4401) while it is measured.
const TOKEN_TTL_SECS: u64 = 24 * 3600;

/// The query string that authenticates `user` to the gateway: a token of its own.
pub(crate) fn token_query(auth: &Authenticator, user: u64) -> String {
    let token = auth.mint(
        UserId::new(user),
        TOKEN_TTL_SECS,
        &uuid::Uuid::new_v4().to_string(),
    );
    format!("token={token}")
}

/// The WebSocket handshake over `stream`, with `query` after `vsn` in the URL; no join yet.
pub(crate) async fn connect(stream: TcpStream, addr: SocketAddr, query: &str) -> Result<PhxClient> {
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&{query}");
    Ok(PhxClient::connect_over(&url, stream, super::ws_config()).await?)
}

/// Opens the socket of `user` over `stream`, with `query` after `vsn` in its URL, and joins its three
/// topics.
pub(crate) async fn open(
    stream: TcpStream,
    addr: SocketAddr,
    query: &str,
    user: u64,
) -> Result<Ws> {
    let mut client = connect(stream, addr, query).await?;
    let own = format!("user:{user}");
    client.join_all(&["user:public", "user:role", &own]).await?;
    Ok(client.into_inner())
}

/// A held gateway socket's protocol state.
#[derive(Default)]
pub(crate) struct Session {
    /// Refs of the periodic heartbeats (the is-online control frames carry their send time instead).
    heartbeat_ref: u64,
}

impl Session {
    /// The phoenix.js heartbeat, every 30 s.
    pub(crate) fn heartbeat(&mut self) -> Message {
        self.heartbeat_ref += 1;
        Message::text(format!(
            "[null,\"{}\",\"phoenix\",\"heartbeat\",{{}}]",
            self.heartbeat_ref
        ))
    }

    /// The is-online scenario's frame: a heartbeat as the control (ref `h<send time>`), or `is_online`
    /// about `user` (ref `q<send time>`).
    pub(crate) fn client_frame(control: bool, user: u64) -> Message {
        if control {
            Message::text(format!(
                "[null,\"h{}\",\"phoenix\",\"heartbeat\",{{}}]",
                now_us()
            ))
        } else {
            Message::text(format!(
                "[\"1\",\"q{}\",\"user:public\",\"is_online\",{{\"user_id\":{user}}}]",
                now_us()
            ))
        }
    }

    /// A frame from the gateway to socket `socket`: a reply to a control frame or a query (timed by its
    /// ref), or a delivery.
    pub(crate) fn on_frame(text: &str, socket: u64, stats: &Stats) {
        let body = text.as_bytes();
        if let Some(sent) = body.strip_prefix(b"[null,\"h").and_then(leading_number) {
            stats.on_reply(sent);
            return;
        }
        if let Some(sent) = number_after(body, b",\"q") {
            stats.on_reply(sent);
            let online = body.windows(13).any(|w| w == b"\"online\":true");
            if !online {
                stats
                    .query_wrong
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        }
        stats.on_delivery(socket, body);
    }
}
