//! One WebSocket connection from upgrade to close: a single task that owns the socket.
//!
//! It waits on: shutdown, its [`Closer`] (slow consumer, logout, disconnect), the idle deadline, the token's
//! expiry, the outbound queue (broadcasts from the hub) and the next client frame. Queued frames are
//! written in batches with one flush; replies to client frames are written right away. A socket closed for
//! a logout or a disconnect first gets what was queued for it (the `logout` event itself). Every exit path
//! drops [`Channels`] and the hub registration, which unsubscribes the socket and releases its presence.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use super::channel::{Channels, EVENT_IS_ONLINE};
use crate::app::AppState;
use crate::auth::Principal;
use crate::hub::{Closer, Hub, Kick, Outbound, Queued};
use crate::limits::TokenBucket;
use crate::metrics::{ConnectionKind, Metrics};
use crate::protocol::{self, CloseCode, Frame};

/// Most queued frames written before one flush: large enough to amortise the syscall, small enough to
/// keep a burst from delaying a reply.
const MAX_BATCH: usize = 64;
/// A write that cannot finish within this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close frame may take; the socket is dropped after it either way.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Ends of a session in which the gateway sends no close code.
const CLIENT_SIDE_ENDS: [&str; 5] = [
    "write failed",
    "write timed out",
    "client went away",
    "read failed",
    "client closed",
];

enum Step {
    Write(Queued),
    Inbound(Option<Result<Message, axum::Error>>),
    Close(CloseCode),
    Kicked(Kick),
}

/// Removes a socket (and its authenticated session) from the hub's registries however the session ends.
struct Registration<'a> {
    hub: &'a Hub,
    conn: u64,
    user: Option<crate::topic::UserId>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.hub.unregister_socket(self.conn);
        if let Some(user) = self.user {
            self.hub.unregister_session(user, self.conn);
        }
    }
}

/// Serves one upgraded socket until it closes.
pub async fn run(
    socket: WebSocket,
    state: Arc<AppState>,
    principal: Option<Principal>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let conn = state.next_conn_id();
    let user = principal.as_ref().map(|p| p.user_id.get());
    let span = tracing::info_span!("socket", node = %state.presence.node(), conn, user);
    let kind = if principal.is_some() {
        ConnectionKind::Authenticated
    } else {
        ConnectionKind::Anonymous
    };
    state.metrics.connection_opened(kind);
    serve(socket, &state, principal, conn)
        .instrument(span)
        .await;
    state.metrics.connection_closed(kind);
}

async fn serve(mut socket: WebSocket, state: &AppState, principal: Option<Principal>, conn: u64) {
    tracing::debug!("socket opened");
    let (tx, mut queue) = mpsc::channel(state.limits.outbound_queue);
    let closer = Closer::new();
    state.hub.register_socket(conn, closer.clone());
    if let Some(principal) = &principal {
        state
            .hub
            .register_session(principal.user_id, conn, &principal.jti, closer.clone());
    }
    let _registration = Registration {
        hub: &state.hub,
        conn,
        user: principal.as_ref().map(|p| p.user_id),
    };
    let expires_in = principal
        .as_ref()
        .filter(|_| state.limits.close_on_expiry)
        .map(|p| Duration::from_secs(p.expires_at.saturating_sub(crate::auth::unix_now())));
    let expiry = tokio::time::sleep(expires_in.unwrap_or(Duration::MAX / 4));
    tokio::pin!(expiry);
    let mut channels = Channels::new(
        conn,
        state.limits.max_topics,
        principal,
        Outbound::new(tx, closer.clone()),
        Arc::clone(&state.hub),
        Arc::clone(&state.presence),
        Arc::clone(&state.metrics),
    );
    let idle_timeout = state.limits.idle_timeout;
    let idle = tokio::time::sleep(state.limits.first_frame_timeout.min(idle_timeout));
    tokio::pin!(idle);
    let per_sec = state.limits.max_pushes_per_sec;
    let mut pushes = TokenBucket::new(per_sec, state.limits.push_burst);
    // Frames refused since the budget ran out; a second's worth more closes the socket.
    let mut refused: u32 = 0;

    let reason = loop {
        let step = tokio::select! {
            biased;
            // The drain normally closes sockets in paced batches; this closes whatever it did not reach.
            () = state.close_all.cancelled() => Step::Close(CloseCode::ShuttingDown),
            kick = closer.closed() => Step::Kicked(kick),
            () = &mut idle => Step::Close(CloseCode::IdleTimeout),
            () = &mut expiry, if expires_in.is_some() => Step::Close(CloseCode::TokenExpired),
            // `Channels` holds a sender for as long as this loop runs, so the queue never ends here.
            Some(frame) = queue.recv() => Step::Write(frame),
            message = socket.next() => Step::Inbound(message),
        };
        match step {
            Step::Write(first) => {
                let written = tokio::select! {
                    result = timeout(WRITE_TIMEOUT, write_batch(&mut socket, first, &mut queue, &state.metrics)) => result,
                    _ = closer.closed() => continue,
                };
                match written {
                    Ok(Ok(count)) => {
                        state.metrics.frames_written(count);
                    }
                    Ok(Err(_)) => break "write failed",
                    Err(_) => break "write timed out",
                }
            }
            Step::Inbound(None) => break "client went away",
            Step::Inbound(Some(Err(error))) => {
                let error = error.into_inner();
                let refusal = match error.downcast_ref::<tungstenite::Error>() {
                    Some(tungstenite::Error::Capacity(_)) => Some(CloseCode::MessageTooBig),
                    Some(tungstenite::Error::Utf8(_)) => Some(CloseCode::InvalidUtf8),
                    _ => None,
                };
                if let Some(code) = refusal {
                    state.metrics.invalid_client_frame();
                    close(&mut socket, &state.metrics, code).await;
                    break code.reason();
                }
                tracing::debug!(%error, "socket read failed");
                break "read failed";
            }
            Step::Inbound(Some(Ok(message))) => {
                idle.as_mut().reset(Instant::now() + idle_timeout);
                match message {
                    Message::Text(text) => match protocol::decode(text.as_str()) {
                        Ok(frame) if !pushes.try_take() => {
                            state.metrics.push_rate_limited();
                            refused += 1;
                            if refused > per_sec {
                                let code = CloseCode::TooManyMessages;
                                close(&mut socket, &state.metrics, code).await;
                                break code.reason();
                            }
                            if write_all(&mut socket, vec![Channels::rate_limited(&frame)])
                                .await
                                .is_err()
                            {
                                break "write failed";
                            }
                        }
                        Ok(frame) => {
                            refused = 0;
                            let started = std::time::Instant::now();
                            let is_online = frame.event == EVENT_IS_ONLINE;
                            let replies = channels.handle(frame);
                            let count = replies.len() as u64;
                            if write_all(&mut socket, replies).await.is_err() {
                                break "write failed";
                            }
                            if is_online {
                                state.metrics.is_online_answered(started.elapsed());
                            }
                            state.metrics.frames_written(count);
                        }
                        Err(error) => {
                            state.metrics.invalid_client_frame();
                            tracing::debug!(%error, "invalid client frame");
                            let code = CloseCode::InvalidFrame;
                            close(&mut socket, &state.metrics, code).await;
                            break code.reason();
                        }
                    },
                    Message::Binary(_) => {
                        state.metrics.invalid_client_frame();
                        let code = CloseCode::BinaryFrame;
                        close(&mut socket, &state.metrics, code).await;
                        break code.reason();
                    }
                    // Pings are answered by the WebSocket layer on the next flush.
                    Message::Ping(_) | Message::Pong(_) => {
                        let _ = timeout(WRITE_TIMEOUT, socket.flush()).await;
                    }
                    Message::Close(_) => {
                        // Answer the close handshake promptly: phoenix.js waits for it before rejoining.
                        let _ = timeout(WRITE_TIMEOUT, socket.flush()).await;
                        break "client closed";
                    }
                }
            }
            Step::Close(code) => {
                close(&mut socket, &state.metrics, code).await;
                break code.reason();
            }
            Step::Kicked(Kick::SlowConsumer) => {
                state.metrics.slow_consumer_closed();
                let code = CloseCode::SlowConsumer;
                close(&mut socket, &state.metrics, code).await;
                break code.reason();
            }
            Step::Kicked(kick) => {
                // Deliver what is already queued (the `logout` event itself) before closing.
                while let Ok(frame) = queue.try_recv() {
                    let flushed = timeout(
                        CLOSE_TIMEOUT,
                        write_batch(&mut socket, frame, &mut queue, &state.metrics),
                    )
                    .await;
                    if !matches!(flushed, Ok(Ok(_))) {
                        break;
                    }
                }
                let code = kick_code(kick);
                close(&mut socket, &state.metrics, code).await;
                break code.reason();
            }
        }
    };
    if CLIENT_SIDE_ENDS.contains(&reason) {
        state.metrics.closed_by_client();
    }
    drop(channels);
    tracing::debug!(reason, "socket closed");
}

/// The close code of a socket closed from outside its session.
fn kick_code(kick: Kick) -> CloseCode {
    match kick {
        Kick::SlowConsumer => CloseCode::SlowConsumer,
        Kick::Revoked => CloseCode::TokenRevoked,
        Kick::Disconnected => CloseCode::Disconnected,
        Kick::ShuttingDown => CloseCode::ShuttingDown,
    }
}

async fn write_batch(
    socket: &mut WebSocket,
    first: Queued,
    queue: &mut mpsc::Receiver<Queued>,
    metrics: &Metrics,
) -> Result<u64, axum::Error> {
    let received = first.received();
    socket.feed(Message::Text(first.frame())).await?;
    let mut count = 1;
    while count < MAX_BATCH as u64 {
        let Ok(queued) = queue.try_recv() else { break };
        socket.feed(Message::Text(queued.frame())).await?;
        count += 1;
    }
    socket.flush().await?;
    metrics.fanout_latency(received.elapsed());
    Ok(count)
}

async fn write_all(socket: &mut WebSocket, frames: Vec<Frame>) -> Result<(), axum::Error> {
    let write = async {
        for frame in frames {
            socket.feed(Message::Text(frame)).await?;
        }
        socket.flush().await
    };
    timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(axum::Error::new("write timed out")))
}

/// Sends a close frame and waits (briefly) for the client's: dropping the connection at once could reset
/// it before the client has read the close code. A client that does not answer in time is dropped anyway.
async fn close(socket: &mut WebSocket, metrics: &Metrics, code: CloseCode) {
    metrics.close_sent(code);
    let frame = CloseFrame {
        code: code.code(),
        reason: code.reason().into(),
    };
    let handshake = async {
        socket.send(Message::Close(Some(frame))).await?;
        while let Some(message) = socket.next().await {
            if matches!(message?, Message::Close(_)) {
                break;
            }
        }
        Ok::<_, axum::Error>(())
    };
    let _ = timeout(CLOSE_TIMEOUT, handshake).await;
}
