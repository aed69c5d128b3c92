//! HTTP: the router of the instance's one listener. `/socket/websocket` is the WebSocket endpoint
//! ([`crate::ws`]); `/healthz` says the process is alive; `/readyz` says it can serve (NATS connected,
//! presence bucket open, event stream open when delivery is on, not shutting down); `/metrics` is the Prometheus exposition.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{any, get};
use tokio::sync::watch;

use crate::broker::Nats;
use crate::delivery::live::Delivery;
use crate::metrics::Metrics;
use crate::ws::{self, Endpoint};

/// What `/readyz` looks at.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub nats: Nats,
    /// True once the presence bucket is open.
    pub presence: watch::Receiver<bool>,
    /// The event stream, when delivery is on: ready once it is open.
    pub delivery: Option<Arc<Delivery>>,
}

#[derive(Debug, Clone)]
struct Probes {
    endpoint: Arc<Endpoint>,
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

impl Probes {
    fn ready(&self) -> bool {
        !self.endpoint.shutdown.is_cancelled()
            && *self.readiness.presence.borrow()
            && self.readiness.nats.is_connected()
            && self
                .readiness
                .delivery
                .as_ref()
                .is_none_or(|delivery| delivery.epoch().is_some())
    }
}

/// Every route of the listener.
pub fn router(endpoint: Arc<Endpoint>, readiness: Readiness) -> Router {
    let probes = Probes {
        metrics: Arc::clone(&endpoint.metrics),
        endpoint: Arc::clone(&endpoint),
        readiness,
    };
    let socket = Router::new()
        .route("/socket/websocket", any(ws::upgrade))
        .with_state(endpoint);
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes);
    socket.merge(probes)
}

async fn readyz(State(probes): State<Probes>) -> (StatusCode, &'static str) {
    if probes.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(probes): State<Probes>) -> impl axum::response::IntoResponse {
    (
        [("content-type", crate::metrics::CONTENT_TYPE)],
        probes.metrics.render(),
    )
}
