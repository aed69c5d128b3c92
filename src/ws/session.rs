//! One WebSocket connection from upgrade to close: a single task that owns the socket.
//!
//! It waits on: shutdown, its [`Mailbox`] (a kick: slow consumer, logout, disconnect; else broadcasts from
//! the hub), the idle deadline, the token's expiry and the next client frame. Queued frames are
//! written in batches with one flush; replies to client frames are written right away. A socket closed for
//! a logout or a disconnect first gets what was queued for it (the `logout` event itself). Every exit path
//! drops [`Channels`] and the hub registration, which unsubscribes the socket and releases its presence.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use super::Endpoint;
use super::channel::Channels;
use crate::auth::Principal;
use crate::hub::{Hub, Kick, Mailbox, Next, Queued};
use crate::limits::TokenBucket;
use crate::metrics::{ConnectionKind, Metrics};
use crate::presence::EVENT_IS_ONLINE;
use crate::protocol::{self, ClientFrame, CloseCode, Frame};

/// Most queued frames written before one flush: large enough to amortise the syscall, small enough to
/// keep a burst from delaying a reply.
const MAX_BATCH: usize = 64;
/// A write that cannot finish within this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close frame may take; the socket is dropped after it either way.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a session ended: the close code the gateway sent, or why it ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The gateway closed the socket with this code.
    Closed(CloseCode),
    /// A write to the socket failed.
    WriteFailed,
    /// A write did not finish within [`WRITE_TIMEOUT`]: the client stopped reading.
    WriteTimedOut,
    /// The connection ended without a close frame.
    ClientWentAway,
    /// Reading from the socket failed.
    ReadFailed,
    /// The client sent a close frame.
    ClientClosed,
}

impl End {
    /// Whether the gateway sent no close code: the client closed, or the connection failed.
    const fn is_client_side(self) -> bool {
        !matches!(self, Self::Closed(_))
    }

    /// The reason logged when the session ends.
    const fn reason(self) -> &'static str {
        match self {
            Self::Closed(code) => code.reason(),
            Self::WriteFailed => "write failed",
            Self::WriteTimedOut => "write timed out",
            Self::ClientWentAway => "client went away",
            Self::ReadFailed => "read failed",
            Self::ClientClosed => "client closed",
        }
    }
}

/// What one turn of the session loop woke up for.
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
    state: Arc<Endpoint>,
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

async fn serve(socket: WebSocket, state: &Endpoint, principal: Option<Principal>, conn: u64) {
    tracing::debug!("socket opened");
    let mailbox = Mailbox::new(state.limits.outbound_queue);
    state.hub.register_socket(conn, mailbox.clone());
    if let Some(principal) = &principal {
        state
            .hub
            .register_session(principal.user_id, conn, &principal.jti, mailbox.clone());
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
    let idle_timeout = state.limits.idle_timeout;
    let idle = tokio::time::sleep(state.limits.first_frame_timeout.min(idle_timeout));
    tokio::pin!(idle);
    let channels = Channels::new(
        conn,
        state.limits.max_topics,
        principal,
        mailbox.clone(),
        Arc::clone(&state.hub),
        Arc::clone(&state.presence),
        Arc::clone(&state.metrics),
    )
    .with_delivery(state.delivery.clone())
    .with_feed(state.feed.clone());
    let mut session = Session {
        socket,
        mailbox,
        pending: None,
        channels,
        pushes: TokenBucket::new(state.limits.max_pushes_per_sec, state.limits.push_burst),
        max_refused: state.limits.max_pushes_per_sec,
        refused: 0,
        metrics: &state.metrics,
    };

    let end = loop {
        let step = tokio::select! {
            biased;
            // The drain normally closes sockets in paced batches; this closes whatever it did not reach.
            () = state.close_all.cancelled() => Step::Close(CloseCode::ShuttingDown),
            next = session.mailbox.next() => match next {
                Next::Kicked(kick) => Step::Kicked(kick),
                Next::Frame(frame) => Step::Write(frame),
            },
            () = &mut idle => Step::Close(CloseCode::IdleTimeout),
            () = &mut expiry, if expires_in.is_some() => Step::Close(CloseCode::TokenExpired),
            message = session.socket.next() => Step::Inbound(message),
        };
        // Only the write of queued frames, the hot path, runs inline. Every other step is boxed: what a
        // step awaits is part of the task's size for the socket's whole life, and most sockets are idle.
        let flow = match step {
            Step::Write(first) => session.write_queued(first).await,
            Step::Inbound(None) => ControlFlow::Break(End::ClientWentAway),
            Step::Inbound(Some(Err(error))) => {
                ControlFlow::Break(Box::pin(session.read_failed(error)).await)
            }
            Step::Inbound(Some(Ok(message))) => {
                idle.as_mut().reset(Instant::now() + idle_timeout);
                Box::pin(session.inbound(message)).await
            }
            Step::Close(code) => ControlFlow::Break(Box::pin(session.close(code)).await),
            Step::Kicked(kick) => ControlFlow::Break(Box::pin(session.kicked(kick)).await),
        };
        if let ControlFlow::Break(end) = flow {
            break end;
        }
    };
    if end.is_client_side() {
        state.metrics.closed_by_client();
    }
    drop(session);
    tracing::debug!(reason = end.reason(), "socket closed");
}

/// The socket and everything its session reads and writes.
struct Session<'a> {
    socket: WebSocket,
    mailbox: Mailbox,
    /// The next queued frame to write, taken off the queue but not yet handed to the socket.
    pending: Option<Queued>,
    channels: Channels,
    pushes: TokenBucket,
    /// Frames refused in a row (a second's worth of the rate) after which the socket is closed.
    max_refused: u32,
    /// Frames refused since the budget ran out.
    refused: u32,
    metrics: &'a Metrics,
}

impl Session<'_> {
    /// Writes a batch of queued frames, `first` first. A kick interrupts the batch and is handled on the
    /// next turn of the loop.
    async fn write_queued(&mut self, first: Queued) -> ControlFlow<End> {
        self.pending = Some(first);
        let mailbox = self.mailbox.clone();
        // Cancelling `write_batch` loses no frame (see there).
        tokio::select! {
            written = timeout(WRITE_TIMEOUT, self.write_batch()) => match written {
                Ok(Ok(_)) => ControlFlow::Continue(()),
                Ok(Err(_)) => ControlFlow::Break(End::WriteFailed),
                Err(_) => ControlFlow::Break(End::WriteTimedOut),
            },
            _ = mailbox.kicked() => ControlFlow::Continue(()),
        }
    }

    /// Writes the pending frame and up to [`MAX_BATCH`] frames in all from the queue, with one flush.
    /// Returns how many it wrote.
    ///
    /// Cancel-safe: it awaits only the socket's readiness and its flush, and holds no frame while it does.
    /// A frame leaves `pending` only once the socket has room for it, and then in the same poll; the
    /// socket keeps what it was given, and the next write (a close frame too) flushes it. Cancelled, the
    /// batch loses no frame, only its latency sample.
    async fn write_batch(&mut self) -> Result<usize, axum::Error> {
        let mut written = 0;
        let mut first_received = None;
        while written < MAX_BATCH {
            if self.pending.is_none() {
                let Some(queued) = self.mailbox.try_recv() else {
                    break;
                };
                self.pending = Some(queued);
            }
            std::future::poll_fn(|cx| self.socket.poll_ready_unpin(cx)).await?;
            // Taken only now that the socket has room: a wait cancelled above leaves it pending.
            let Some(queued) = self.pending.take() else {
                break;
            };
            if self.channels.replayed(&queued) {
                // Already written as part of a recovery replay.
                continue;
            }
            first_received.get_or_insert(queued.received());
            self.socket
                .start_send_unpin(Message::Text(queued.frame()))?;
            written += 1;
        }
        // Counted once per batch: a shared counter bumped per frame costs the hot path. A batch cut short
        // by a kick goes uncounted; the socket closes then anyway.
        self.metrics.frames_written(written as u64);
        self.socket.flush().await?;
        if let Some(received) = first_received {
            self.metrics.fanout_latency(received.elapsed());
        }
        Ok(written)
    }

    /// Writes the replies to one client frame right away.
    async fn reply(&mut self, frames: Vec<Frame>) -> ControlFlow<End> {
        let write = async {
            for frame in frames {
                self.socket.feed(Message::Text(frame)).await?;
            }
            self.socket.flush().await
        };
        match timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => ControlFlow::Continue(()),
            Ok(Err(_)) | Err(_) => ControlFlow::Break(End::WriteFailed),
        }
    }

    async fn inbound(&mut self, message: Message) -> ControlFlow<End> {
        match message {
            Message::Text(text) => match protocol::decode(text.as_str()) {
                Ok(frame) => self.push(frame).await,
                Err(error) => {
                    self.metrics.invalid_client_frame();
                    tracing::debug!(%error, "invalid client frame");
                    ControlFlow::Break(self.close(CloseCode::InvalidFrame).await)
                }
            },
            Message::Binary(_) => {
                self.metrics.invalid_client_frame();
                ControlFlow::Break(self.close(CloseCode::BinaryFrame).await)
            }
            // Pings are answered by the WebSocket layer on the next flush.
            Message::Ping(_) | Message::Pong(_) => {
                let _ = timeout(WRITE_TIMEOUT, self.socket.flush()).await;
                ControlFlow::Continue(())
            }
            Message::Close(_) => {
                // Answer the close handshake promptly: phoenix.js waits for it before rejoining.
                let _ = timeout(WRITE_TIMEOUT, self.socket.flush()).await;
                ControlFlow::Break(End::ClientClosed)
            }
        }
    }

    /// One decoded client frame: answered, or refused by the rate limit.
    async fn push(&mut self, frame: ClientFrame) -> ControlFlow<End> {
        if !self.pushes.try_take() {
            self.metrics.push_rate_limited();
            self.refused += 1;
            if self.refused > self.max_refused {
                return ControlFlow::Break(self.close(CloseCode::TooManyMessages).await);
            }
            return self.reply(vec![Channels::rate_limited(&frame)]).await;
        }
        self.refused = 0;
        let started = std::time::Instant::now();
        let is_online = frame.event == EVENT_IS_ONLINE;
        let replies = self.channels.handle(frame);
        // A join waiting for the event stream is answered here, before the next frame is read.
        let replies = match self.channels.take_pending() {
            // Boxed: the recovery's future (stream reads) is large, and every socket's task would carry
            // its size for its whole life, joined with `since` or not.
            Some(pending) => Box::pin(self.channels.complete(pending)).await,
            None => replies,
        };
        let count = replies.len() as u64;
        self.reply(replies).await?;
        if is_online {
            self.metrics.is_online_answered(started.elapsed());
        }
        self.metrics.frames_written(count);
        ControlFlow::Continue(())
    }

    /// A read error: a message the WebSocket layer refused gets its close code, anything else ends the
    /// session.
    async fn read_failed(&mut self, error: axum::Error) -> End {
        let error = error.into_inner();
        let code = match error.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => CloseCode::MessageTooBig,
            Some(tungstenite::Error::Utf8(_)) => CloseCode::InvalidUtf8,
            _ => {
                tracing::debug!(%error, "socket read failed");
                return End::ReadFailed;
            }
        };
        self.metrics.invalid_client_frame();
        self.close(code).await
    }

    /// Closes a socket closed from outside its session. A slow consumer is closed at once; any other kick
    /// first delivers what is already queued (the `logout` event itself).
    async fn kicked(&mut self, kick: Kick) -> End {
        let code = match kick {
            Kick::SlowConsumer => {
                self.metrics.slow_consumer_closed();
                CloseCode::SlowConsumer
            }
            Kick::Revoked => CloseCode::TokenRevoked,
            Kick::Disconnected => CloseCode::Disconnected,
            Kick::ShuttingDown => CloseCode::ShuttingDown,
        };
        if kick != Kick::SlowConsumer {
            while let Ok(Ok(1..)) = timeout(CLOSE_TIMEOUT, self.write_batch()).await {}
        }
        self.close(code).await
    }

    /// Sends a close frame and waits (briefly) for the client's: dropping the connection at once could
    /// reset it before the client has read the close code. A client that does not answer in time is
    /// dropped anyway.
    async fn close(&mut self, code: CloseCode) -> End {
        self.metrics.close_sent(code);
        let frame = CloseFrame {
            code: code.code(),
            reason: code.reason().into(),
        };
        let handshake = async {
            self.socket.send(Message::Close(Some(frame))).await?;
            while let Some(message) = self.socket.next().await {
                if matches!(message?, Message::Close(_)) {
                    break;
                }
            }
            Ok::<_, axum::Error>(())
        };
        let _ = timeout(CLOSE_TIMEOUT, handshake).await;
        End::Closed(code)
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future an `async fn` of four arguments returns, without calling it.
    fn size_of_future<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every socket's task holds its session's future for the socket's whole life: whatever a rare path
    /// awaits inline (a recovery's stream reads) is paid by every idle socket. Such paths are boxed.
    #[test]
    fn a_sessions_future_stays_small() {
        let size = size_of_future(super::serve);
        assert!(size < 2048, "the session future is {size} bytes");
    }
}
