//! Wiring and lifecycle: builds every component from [`Settings`], serves HTTP, and shuts down in order.
//!
//! Start: bind the listener (port 0 allowed; the real address is logged as `listening on ADDR`), start
//! connecting to NATS in the background, serve at once. `/readyz` stays 503 until NATS is connected and
//! the presence bucket is open. A presence bucket with conflicting settings is fatal.
//!
//! Stop (SIGTERM/SIGINT, or a fatal error): refuse new sockets, close every socket with 1001, wait for
//! the sessions (bounded by `shutdown.grace_secs`), purge this instance's presence records, stop ingress,
//! drain NATS.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::broker::{self, Nats, fanin, ingress};
use crate::config::{FeedMode, Settings};
use crate::delivery::live::{self, Delivery};
use crate::delivery::stream::StreamSpec;
use crate::http::{self, Readiness};
use crate::hub::{Hub, Interest, Kick};
use crate::metrics::Metrics;
use crate::presence::feed::{self, Feed, FeedOptions};
use crate::presence::store::{BucketSpec, StoreError};
use crate::presence::{self, Presence};
use crate::revocation::{self, Revocations};
use crate::telemetry::SpanDrops;
use crate::ws::{Endpoint, Services};

/// Bound on draining the NATS connection at exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A built, not yet running instance.
#[derive(Debug)]
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    nats: Nats,
    revoked: mpsc::UnboundedReceiver<(String, u64)>,
    /// The hub's per-user interest, which the event stream's ingress follows.
    interest: Option<mpsc::UnboundedReceiver<Interest>>,
}

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`). A reconnect
/// storm arrives at once; with the usual 128, the surplus SYNs are dropped and retried a second later.
const LISTEN_BACKLOG: u32 = 4096;

/// The instance's listener on `addr`, with [`LISTEN_BACKLOG`] (the load tool's bare server binds the same
/// way, so that the two compare).
///
/// # Errors
/// When `addr` cannot be bound.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Application {
    /// Builds the instance; `/metrics` renders `span_drops`, the trace export's counts.
    ///
    /// # Errors
    /// When the listen address cannot be bound or the NATS URLs cannot be parsed.
    pub async fn build(settings: Settings, span_drops: SpanDrops) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::with_span_drops(span_drops));
        let auth = Authenticator::new(&settings.auth_secret(), settings.auth_algorithm());
        let listener = listen(settings.http.listen)
            .with_context(|| format!("cannot listen on {}", settings.http.listen))?;
        let nats = broker::connect(
            settings.nats_urls(),
            settings.node_id(),
            Arc::clone(&metrics),
        )
        .await
        .context("invalid NATS configuration")?;
        let (revocations, revoked) = Revocations::new();
        // With the event stream, the hub announces which users have a session here, and ingress follows
        // just those users' events.
        let (hub, interest) = if settings.delivery.enabled {
            let (hub, interest) = Hub::with_interest();
            (Arc::new(hub), Some(interest))
        } else {
            (Arc::new(Hub::new()), None)
        };
        let delivery = settings.delivery.enabled.then(|| {
            let options = live::Options {
                spec: StreamSpec {
                    name: settings.delivery.stream.clone(),
                    subject_prefix: settings.nats.subject_prefix.clone(),
                    replicas: settings.delivery.replicas,
                    history: settings.delivery_history(),
                    // Validated to fit.
                    per_topic: i64::try_from(settings.delivery.history_per_topic)
                        .unwrap_or(i64::MAX),
                },
                max_recover: settings.delivery.max_recover,
                max_bytes: settings.nats.max_message_bytes,
            };
            Delivery::new(options, nats.clone(), Arc::clone(&metrics))
        });
        // With the feed, presence notes whose instances changed, and the feed turns that into diffs.
        let (presence, feed) = match settings.presence.feed {
            FeedMode::Off => (Presence::new(settings.node_id()), None),
            mode => {
                let presence = Presence::with_changes(settings.node_id());
                let options = FeedOptions {
                    mode,
                    interval: settings.presence_feed_interval(),
                    max_users: settings.presence.feed_max_users,
                };
                let feed = Feed::new(options, Arc::clone(&presence), Arc::clone(&metrics));
                (presence, Some(feed))
            }
        };
        let services = Services {
            auth,
            hub,
            presence,
            revocations,
            metrics,
            delivery,
            feed,
        };
        let endpoint = Arc::new(Endpoint::new(
            services,
            settings.limits(),
            settings.allowed_origins().clone(),
            settings.ws.max_connections,
            settings.ws.max_new_connections_per_sec,
        ));
        Ok(Self {
            settings,
            listener,
            endpoint,
            nats,
            revoked,
            interest,
        })
    }

    /// # Errors
    /// When the local address of the listener cannot be read.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal` completes or a fatal error occurs, then shuts down in order.
    ///
    /// # Errors
    /// The fatal error that stopped the instance, if any.
    pub async fn run_until_stopped(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            settings,
            listener,
            endpoint,
            nats,
            revoked,
            interest,
        } = self;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, node = settings.node_id(), "listening on {addr}");

        let (presence_ready, presence_ready_rx) = watch::channel(false);
        let readiness = Readiness {
            nats: nats.clone(),
            presence: presence_ready_rx,
            delivery: endpoint.delivery.clone(),
        };
        // Frames are batched and flushed by the session; Nagle's algorithm would hold a small frame back
        // until the previous segment is acknowledged.
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, http::router(Arc::clone(&endpoint), readiness))
            // The listener stays open through the drain, answering 503 to `/readyz` and to upgrades.
            .with_graceful_shutdown(endpoint.close_all.clone().cancelled_owned());
        let server = tokio::spawn(server.into_future());

        let ingress_stop = CancellationToken::new();
        let router = {
            let logout = Arc::clone(&endpoint);
            let on_logout: ingress::LogoutHook =
                Arc::new(move |user, token| logout.logout(user, token));
            ingress::Router::new(
                settings.nats.subject_prefix.clone(),
                settings.nats.max_message_bytes,
                Arc::clone(&endpoint.hub),
                Arc::clone(&endpoint.metrics),
                on_logout,
            )
        };
        let ingress = match (endpoint.delivery.clone(), interest) {
            (Some(delivery), Some(interest)) => {
                // Users' events arrive on a lean subscriber of their own (a connection whose subscriptions
                // cost a subject each); its URLs parsed already, for the main connection.
                let (fanin, messages) = fanin::start(
                    settings.nats_urls(),
                    format!("epoch-gateway {} users", settings.node_id()),
                    ingress_stop.clone(),
                )
                .context("invalid NATS configuration")?;
                let copies = live::UserCopies { fanin, messages };
                tokio::spawn(live::follow(
                    delivery,
                    router,
                    interest,
                    copies,
                    ingress_stop.clone(),
                ))
            }
            _ => tokio::spawn({
                let (nats, stop) = (nats.clone(), ingress_stop.clone());
                async move {
                    if let Err(error) = ingress::run(nats, router, stop).await {
                        tracing::error!(%error, "NATS ingress subscription failed");
                    }
                }
            }),
        };

        let presence_stop = CancellationToken::new();
        let options = presence::task::Options {
            spec: BucketSpec {
                bucket: settings.presence.bucket.clone(),
                replicas: settings.presence.replicas,
            },
            ttl: settings.presence_ttl(),
            subject_prefix: settings.nats.subject_prefix.clone(),
        };
        let mut presence = tokio::spawn(presence::task::run(
            nats.clone(),
            options,
            Arc::clone(&endpoint.presence),
            Arc::clone(&endpoint.metrics),
            presence_ready,
            presence_stop.clone(),
        ));
        let feed = endpoint
            .feed
            .clone()
            .map(|f| tokio::spawn(feed::run(f, presence_stop.clone())));
        let revocations = tokio::spawn(revocation::run(
            nats.clone(),
            settings.auth.revoked_bucket.clone(),
            settings.presence.replicas,
            Arc::clone(&endpoint.revocations),
            revoked,
            presence_stop.clone(),
        ));

        // A presence task that ends before the stop signal could not open its bucket: fatal.
        let mut fatal: Option<StoreError> = None;
        let mut presence_done = false;
        tokio::select! {
            () = signal => tracing::info!("shutdown signal received"),
            result = &mut presence => {
                presence_done = true;
                if let Ok(Err(error)) = result {
                    fatal = Some(error);
                }
            }
        }
        let grace = settings.shutdown_grace();
        endpoint.shutdown.cancel();
        drain(&endpoint, settings.drain_window()).await;
        endpoint.close_all.cancel();
        let _ = server.await;
        endpoint.sessions.close();
        if tokio::time::timeout(grace, endpoint.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = endpoint.sessions.len(),
                "sockets still open after the grace period"
            );
        }
        presence_stop.cancel();
        if !presence_done && tokio::time::timeout(grace, presence).await.is_err() {
            tracing::warn!("presence records not removed in time; they will expire by TTL");
        }
        let _ = revocations.await;
        if let Some(feed) = feed {
            let _ = feed.await;
        }
        ingress_stop.cancel();
        let _ = ingress.await;
        nats.drain(DRAIN_TIMEOUT).await;
        tracing::info!("stopped");
        match fatal {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }
}

/// Between drain steps. phoenix.js reconnects 10 ms after a close, without jitter: closing every socket
/// at once would move them all to the next instance in the same instant.
const DRAIN_STEP: Duration = Duration::from_millis(100);

/// Closes this instance's sockets (1001) in even batches over `window`.
async fn drain(endpoint: &Endpoint, window: Duration) {
    let total = endpoint.hub.socket_count();
    let steps = (window.as_millis() / DRAIN_STEP.as_millis()).max(1);
    let batch = usize::try_from(steps)
        .map_or(1, |steps| total.div_ceil(steps))
        .max(1);
    tracing::info!(
        sockets = total,
        window_ms = window.as_millis(),
        batch,
        "draining sockets"
    );
    let deadline = tokio::time::Instant::now() + window;
    let mut ticks = tokio::time::interval(DRAIN_STEP);
    loop {
        ticks.tick().await;
        endpoint.hub.close_some(batch, Kick::ShuttingDown);
        // Closed sockets leave the registry when their session ends.
        if endpoint.hub.socket_count() == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
}
