//! The WebSocket endpoint, `GET /socket/websocket?vsn=2.0.0[&token=JWT]`.
//!
//! The upgrade handler is the last place with HTTP in hand, so every refusal happens here, before the
//! upgrade: an unsupported `vsn` or an invalid token is a 403 with an empty body, a draining instance is a
//! 503. An accepted socket is handed to [`session::run`] on the instance's task tracker, so shutdown can
//! wait for it. [`Endpoint`] is the state every session shares; this module owns it and imports nothing
//! from the application that builds it.

pub mod channel;
pub mod session;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::http::header::ORIGIN;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::config::AllowedOrigins;
use crate::delivery::live::Delivery;
use crate::hub::{Hub, Kick};
use crate::limits::{Limits, TokenBucket};
use crate::metrics::{Metrics, Refusal};
use crate::presence::Presence;
use crate::presence::feed::Feed;
use crate::revocation::Revocations;
use crate::topic::UserId;

/// Phoenix's V2 serializer requirement is `~> 2.0.0`: any 2.0.x.
const SUPPORTED_VSN_PREFIX: &str = "2.0.";
/// Read buffer per socket. Client frames are tiny (joins, heartbeats, `is_online`: under 200 bytes, a
/// `since` join under 300); the WebSocket library's 128 KiB default would dominate the memory of an idle
/// socket, and every socket holds its buffer for its whole life. A larger frame grows the buffer to its
/// size (up to `ws.max_message_bytes`) once its header is read.
pub const READ_BUFFER_BYTES: usize = 512;
/// Outgoing bytes buffered before a write reaches the socket; batches are flushed explicitly.
pub const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// What the endpoint and every session share: the instance's sockets, their limits, and the services a
/// session calls. Built by the application, which holds nothing else the sessions need.
#[derive(Debug)]
pub struct Endpoint {
    pub auth: Authenticator,
    pub hub: Arc<Hub>,
    pub presence: Arc<Presence>,
    pub revocations: Arc<Revocations>,
    pub metrics: Arc<Metrics>,
    /// The event stream, when delivery is on.
    pub delivery: Option<Arc<Delivery>>,
    /// The presence feed, when `presence.feed` is not `off`.
    pub feed: Option<Arc<Feed>>,
    pub limits: Limits,
    pub origins: AllowedOrigins,
    /// One permit per open socket, held by its session.
    pub connections: Arc<Semaphore>,
    /// New sockets per second.
    pub new_connections: Mutex<TokenBucket>,
    /// Cancelled when the instance starts shutting down: upgrades get 503.
    pub shutdown: CancellationToken,
    /// Cancelled at the end of the drain window: every socket still open closes at once.
    pub close_all: CancellationToken,
    /// Every live session, so shutdown can wait for them (axum does not track upgraded connections).
    pub sessions: TaskTracker,
    next_conn: AtomicU64,
}

/// The services a session calls, shared with the rest of the instance.
#[derive(Debug)]
pub struct Services {
    pub auth: Authenticator,
    pub hub: Arc<Hub>,
    pub presence: Arc<Presence>,
    pub revocations: Arc<Revocations>,
    pub metrics: Arc<Metrics>,
    pub delivery: Option<Arc<Delivery>>,
    pub feed: Option<Arc<Feed>>,
}

impl Endpoint {
    /// An endpoint with no sockets yet, accepting `max_connections` at once and `new_per_sec` new ones per
    /// second (bursts of twice that).
    pub fn new(
        services: Services,
        limits: Limits,
        origins: AllowedOrigins,
        max_connections: usize,
        new_per_sec: u32,
    ) -> Self {
        let Services {
            auth,
            hub,
            presence,
            revocations,
            metrics,
            delivery,
            feed,
        } = services;
        Self {
            auth,
            hub,
            presence,
            revocations,
            metrics,
            delivery,
            feed,
            limits,
            origins,
            connections: Arc::new(Semaphore::new(max_connections)),
            new_connections: Mutex::new(TokenBucket::new(
                new_per_sec,
                new_per_sec.saturating_mul(2),
            )),
            shutdown: CancellationToken::new(),
            close_all: CancellationToken::new(),
            sessions: TaskTracker::new(),
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// What a `logout {token}` event does after its delivery: close this instance's sockets of that token
    /// and refuse the token cluster-wide until it expires.
    pub fn logout(&self, user: UserId, token: &str) {
        match self.auth.identify(token) {
            Ok(principal) if principal.user_id == user => {
                let closed = self.hub.close_token(user, &principal.jti, Kick::Revoked);
                self.revocations
                    .revoke(&principal.jti, principal.expires_at);
                tracing::info!(%user, closed, "logout: token revoked");
            }
            Ok(_) => tracing::warn!(%user, "logout names a token of another user; ignored"),
            Err(error) => {
                tracing::warn!(%user, %error, "logout token not recognised; nothing revoked");
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ConnectParams {
    vsn: Option<String>,
    token: Option<String>,
}

pub async fn upgrade(
    State(state): State<Arc<Endpoint>>,
    Query(params): Query<ConnectParams>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let span = tracing::info_span!(
        "ws.connect",
        node = %state.presence.node(),
        auth = tracing::field::Empty,
        user = tracing::field::Empty,
    );
    let _entered = span.enter();
    if state.shutdown.is_cancelled() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    // Cheap limits first: they protect the token check too.
    let within_rate = state
        .new_connections
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .try_take();
    if !within_rate {
        state.metrics.upgrade_refused(Refusal::Limit);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let Ok(permit) = Arc::clone(&state.connections).try_acquire_owned() else {
        state.metrics.upgrade_refused(Refusal::Limit);
        tracing::warn!("socket refused: connection limit reached");
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    if let Some(origin) = headers.get(ORIGIN) {
        let allowed = origin
            .to_str()
            .is_ok_and(|origin| state.origins.allows(origin));
        if !allowed {
            state.metrics.upgrade_refused(Refusal::Origin);
            tracing::info!(origin = ?origin, "socket refused: origin not allowed");
            return StatusCode::FORBIDDEN.into_response();
        }
    }
    let vsn_ok = params
        .vsn
        .as_deref()
        .is_some_and(|vsn| vsn.starts_with(SUPPORTED_VSN_PREFIX));
    if !vsn_ok {
        state.metrics.upgrade_refused(Refusal::Vsn);
        return StatusCode::FORBIDDEN.into_response();
    }
    let principal = match params.token.as_deref() {
        None => {
            span.record("auth", "anonymous");
            None
        }
        Some(token) => match state.auth.verify(token).and_then(|principal| {
            if state.revocations.is_revoked(&principal.jti) {
                Err(AuthError::Revoked)
            } else {
                Ok(principal)
            }
        }) {
            Ok(principal) => {
                span.record("auth", "authenticated");
                span.record("user", principal.user_id.get());
                Some(principal)
            }
            Err(error) => {
                span.record("auth", error.label());
                state.metrics.auth_failed(error.failure());
                tracing::info!(reason = %error, "socket refused: invalid token");
                return StatusCode::FORBIDDEN.into_response();
            }
        },
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let max = state.limits.max_message_bytes;
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let sessions = state.sessions.clone();
            // The permit is released when the session ends.
            sessions.track_future(session::run(socket, state, principal, permit))
        })
}
