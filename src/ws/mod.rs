//! The WebSocket endpoint, `GET /socket/websocket?vsn=2.0.0[&token=JWT]`.
//!
//! The upgrade handler is the last place with HTTP in hand, so every refusal happens here, before the
//! upgrade: an unsupported `vsn` or an invalid token is a 403 with an empty body, a draining instance is a
//! 503. An accepted socket is handed to [`session::run`] on the instance's task tracker, so shutdown can
//! wait for it.

pub mod channel;
pub mod session;

use std::sync::Arc;

use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::http::header::ORIGIN;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::app::AppState;
use crate::metrics::Refusal;

/// Phoenix's V2 serializer requirement is `~> 2.0.0`: any 2.0.x.
const SUPPORTED_VSN_PREFIX: &str = "2.0.";
/// Read buffer per socket. Client frames are tiny (joins, heartbeats, `is_online`: well under 1 KiB); the
/// WebSocket library's 128 KiB default would dominate the memory of an idle socket. Larger frames are read
/// in several chunks, up to `ws.max_message_bytes`.
const READ_BUFFER_BYTES: usize = 1024;
/// Outgoing bytes buffered before a write reaches the socket; batches are flushed explicitly.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// The `Origin` allow-list (Phoenix's `check_origin`): exact origins, bare hosts, or anything.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins {
    any: bool,
    exact: Vec<String>,
    hosts: Vec<String>,
}

impl AllowedOrigins {
    /// Builds the list from validated configuration entries; an empty list allows any origin.
    pub fn new(entries: &[String]) -> Self {
        let mut list = Self {
            any: entries.is_empty(),
            ..Self::default()
        };
        for entry in entries.iter().map(|e| e.to_ascii_lowercase()) {
            if entry == "*" {
                list.any = true;
            } else if entry.contains("://") {
                list.exact.push(entry);
            } else {
                list.hosts.push(entry);
            }
        }
        list
    }

    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        let host = origin
            .split_once("://")
            .map(|(_, rest)| rest.rsplit_once(':').map_or(rest, |(host, _)| host));
        self.exact.contains(&origin)
            || host.is_some_and(|host| self.hosts.iter().any(|h| h == host))
    }
}

#[derive(Debug, Deserialize)]
pub struct ConnectParams {
    vsn: Option<String>,
    token: Option<String>,
}

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
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
                Err(crate::auth::AuthError::Revoked)
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

#[cfg(test)]
mod tests {
    use super::AllowedOrigins;

    #[test]
    fn origins_match_exactly_or_by_host() {
        let list =
            AllowedOrigins::new(&["https://forum.example".to_owned(), "localhost".to_owned()]);
        assert!(list.allows("https://forum.example"));
        assert!(list.allows("HTTPS://Forum.Example"));
        assert!(list.allows("http://localhost:8080"));
        assert!(!list.allows("http://forum.example"));
        assert!(!list.allows("https://forum.example.evil"));
        assert!(!list.allows("https://evil.example"));
        assert!(!list.allows("null"));
        assert!(AllowedOrigins::new(&[]).allows("https://anything"));
        assert!(AllowedOrigins::new(&["*".to_owned()]).allows("null"));
    }
}
