//! NATS: the one connection of this instance, its health, and what is shared by everything that talks to
//! NATS.
//!
//! [`connect`] starts the connection and returns at once; async-nats keeps (re)connecting in the
//! background and reports state changes, which [`Nats`] turns into two watches: "connected now" (readiness,
//! start-up loops wait on it) and a reconnect counter (presence re-asserts its records, ingress catches
//! up). [`ingress`] is where a NATS message becomes a frame; [`kv`] holds the KV plumbing that presence and
//! revocation share; [`retry`] is the one backoff loop of the start-up tasks.

pub mod fanin;
pub mod ingress;
pub mod kv;
pub mod retry;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Reconnect delays grow to this and stay there while NATS is away.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// How often a "still waiting for NATS" line is logged while NATS is unreachable.
const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The instance's NATS connection and its health. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Nats {
    client: Client,
    health: Arc<Health>,
}

#[derive(Debug)]
struct Health {
    connected: watch::Sender<bool>,
    /// Bumped after every reconnect (not the first connection).
    reconnects: watch::Sender<u64>,
    ever_connected: AtomicBool,
    urls: String,
}

impl Nats {
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client.clone())
    }

    pub fn is_connected(&self) -> bool {
        *self.health.connected.borrow()
    }

    /// Changes after every reconnect; presence re-asserts its records and rebuilds its view on a change.
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        self.health.reconnects.subscribe()
    }

    /// Resolves once connected; `false` when `stop` came first. Logs every [`WAIT_LOG_INTERVAL`] while
    /// NATS cannot be reached.
    pub async fn wait_connected(&self, stop: &CancellationToken) -> bool {
        let mut connected = self.health.connected.subscribe();
        let started = tokio::time::Instant::now();
        let mut report = tokio::time::interval_at(started + WAIT_LOG_INTERVAL, WAIT_LOG_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return false,
                result = connected.wait_for(|up| *up) => return result.is_ok(),
                _ = report.tick() => tracing::warn!(
                    nats = %self.health.urls,
                    waited_secs = started.elapsed().as_secs(),
                    "NATS not reachable yet; retrying"
                ),
            }
        }
    }

    /// Flushes and closes the connection, bounded by `within`.
    pub async fn drain(&self, within: Duration) {
        match tokio::time::timeout(within, self.client.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "NATS drain failed"),
            Err(_) => tracing::warn!("NATS drain timed out"),
        }
    }
}

/// Starts connecting to NATS and returns at once. async-nats keeps retrying with backoff, the initial
/// connection included, and reports every state change through the event callback.
///
/// # Errors
/// Only when the URL list cannot be parsed.
pub async fn connect(
    urls: &[String],
    node_id: &str,
    metrics: Arc<Metrics>,
) -> Result<Nats, async_nats::ConnectError> {
    let health = Arc::new(Health {
        connected: watch::Sender::new(false),
        reconnects: watch::Sender::new(0),
        ever_connected: AtomicBool::new(false),
        urls: urls.join(","),
    });
    let events = Arc::clone(&health);
    let options = ConnectOptions::new()
        .name(format!("epoch-gateway {node_id}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            let millis = 100u64.saturating_mul(1 << attempts.min(6));
            Duration::from_millis(millis).min(MAX_RECONNECT_DELAY)
        })
        .event_callback(move |event| {
            let health = Arc::clone(&events);
            let metrics = Arc::clone(&metrics);
            async move { on_event(&health, &metrics, event) }
        });
    let client = options.connect(urls).await?;
    Ok(Nats { client, health })
}

fn on_event(health: &Health, metrics: &Metrics, event: Event) {
    match event {
        Event::Connected => {
            health.connected.send_replace(true);
            metrics.nats_connection(true);
            if health.ever_connected.swap(true, Ordering::Relaxed) {
                metrics.nats_reconnected();
                health.reconnects.send_modify(|n| *n += 1);
                tracing::info!("reconnected to NATS");
            } else {
                tracing::info!("connected to NATS");
            }
        }
        Event::Disconnected => {
            health.connected.send_replace(false);
            metrics.nats_connection(false);
            tracing::warn!("disconnected from NATS; reconnecting");
        }
        Event::Closed => {
            health.connected.send_replace(false);
            metrics.nats_connection(false);
            tracing::info!("NATS connection closed");
        }
        other => tracing::warn!(event = %other, "NATS event"),
    }
}
