//! The WebSocket endpoint, `GET /socket/websocket?vsn=2.0.0[&token=JWT]`.
//!
//! The upgrade handler is the last place with HTTP in hand, so every refusal happens here, before the
//! upgrade: an unsupported `vsn` or an invalid token is a 403 with an empty body, a draining instance is a
//! 503. An accepted socket is handed to [`session::run`] on the instance's task tracker, so shutdown can
//! wait for it.

pub mod channel;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::app::AppState;

/// Phoenix's V2 serializer requirement is `~> 2.0.0`: any 2.0.x.
const SUPPORTED_VSN_PREFIX: &str = "2.0.";
/// Read buffer per socket. Client frames are tiny (joins, heartbeats, `is_online`); the WebSocket
/// library's 128 KiB default would dominate the memory of an idle socket.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Outgoing bytes buffered before a write reaches the socket; batches are flushed explicitly.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

#[derive(Debug, Deserialize)]
pub struct ConnectParams {
    vsn: Option<String>,
    token: Option<String>,
}

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(params): Query<ConnectParams>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if state.shutdown.is_cancelled() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let vsn_ok = params
        .vsn
        .as_deref()
        .is_some_and(|vsn| vsn.starts_with(SUPPORTED_VSN_PREFIX));
    if !vsn_ok {
        state
            .metrics
            .upgrades_refused_vsn
            .fetch_add(1, Ordering::Relaxed);
        return StatusCode::FORBIDDEN.into_response();
    }
    let principal = match params.token.as_deref() {
        None => None,
        Some(token) => match state.auth.verify(token) {
            Ok(principal) => Some(principal),
            Err(error) => {
                state.metrics.auth_failure(error.label());
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
            sessions.track_future(session::run(socket, state, principal))
        })
}
