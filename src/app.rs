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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::Client;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{any, get};
use axum::serve::ListenerExt as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::broker::{self, NatsHealth};
use crate::config::Settings;
use crate::hub::{Hub, Kick};
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::presence::service;
use crate::presence::store::{self, BucketSpec, StoreError};
use crate::revocation::{self, Revocations};
use crate::ws;

/// How often a "still waiting for NATS" line is logged while NATS is unreachable.
const NATS_WAIT_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Longest pause between attempts to open the presence bucket.
const MAX_BUCKET_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Bound on draining the NATS connection at exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-socket limits, from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_message_bytes: usize,
    pub outbound_queue: usize,
    /// Close an authenticated socket when its token expires.
    pub close_on_expiry: bool,
    pub max_topics: usize,
    pub max_pushes_per_sec: u32,
    pub push_burst: u32,
    pub first_frame_timeout: Duration,
}

/// What every request handler and session shares.
#[derive(Debug)]
pub struct AppState {
    pub auth: Authenticator,
    pub hub: Arc<Hub>,
    pub presence: Arc<Presence>,
    pub revocations: Arc<Revocations>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub origins: ws::AllowedOrigins,
    /// One permit per open socket, held by its session.
    pub connections: Arc<Semaphore>,
    /// New sockets per second.
    pub new_connections: Mutex<TokenBucket>,
    /// Cancelled when the instance starts shutting down: `/readyz` turns 503, upgrades get 503.
    pub shutdown: CancellationToken,
    /// Cancelled at the end of the drain window: every socket still open closes at once.
    pub close_all: CancellationToken,
    /// Every live session, so shutdown can wait for them (axum does not track upgraded connections).
    pub sessions: TaskTracker,
    bucket_ready: AtomicBool,
    next_conn: AtomicU64,
}

impl AppState {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn ready(&self) -> bool {
        !self.shutdown.is_cancelled()
            && self.bucket_ready.load(Ordering::Relaxed)
            && self.metrics.nats_connected()
    }
}

/// A built, not yet running instance.
#[derive(Debug)]
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    state: Arc<AppState>,
    client: Client,
    health: Arc<NatsHealth>,
    revoked: mpsc::UnboundedReceiver<(String, u64)>,
}

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`). A reconnect
/// storm arrives at once; with the usual 128, the surplus SYNs are dropped and retried a second later.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
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
    /// # Errors
    /// When the listen address cannot be bound or the NATS URLs cannot be parsed.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let auth = Authenticator::new(&settings.auth_secret(), settings.auth_algorithm()?);
        let listener = listen(settings.http.listen)
            .with_context(|| format!("cannot listen on {}", settings.http.listen))?;
        let (client, health) = broker::connect(
            &settings.nats_urls(),
            settings.node_id(),
            Arc::clone(&metrics),
        )
        .await
        .context("invalid NATS configuration")?;
        let (revocations, revoked) = Revocations::new();
        let state = Arc::new(AppState {
            auth,
            revocations,
            hub: Arc::new(Hub::new()),
            presence: Presence::new(settings.node_id()),
            metrics,
            limits: Limits {
                idle_timeout: settings.idle_timeout(),
                max_message_bytes: settings.ws.max_message_bytes,
                outbound_queue: settings.ws.outbound_queue,
                close_on_expiry: settings.auth.close_on_expiry,
                max_topics: settings.ws.max_topics,
                max_pushes_per_sec: settings.ws.max_pushes_per_sec,
                push_burst: settings.ws.push_burst,
                first_frame_timeout: Duration::from_secs(settings.ws.first_frame_timeout_secs),
            },
            connections: Arc::new(Semaphore::new(settings.ws.max_connections)),
            new_connections: Mutex::new(TokenBucket::new(
                settings.ws.max_new_connections_per_sec,
                settings.ws.max_new_connections_per_sec.saturating_mul(2),
            )),
            origins: ws::AllowedOrigins::new(&settings.http.allowed_origins),
            shutdown: CancellationToken::new(),
            close_all: CancellationToken::new(),
            sessions: TaskTracker::new(),
            bucket_ready: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        });
        Ok(Self {
            settings,
            listener,
            state,
            client,
            health,
            revoked,
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
            state,
            client,
            health,
            revoked,
        } = self;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, node = settings.node_id(), "listening on {addr}");

        // Frames are batched and flushed by the session; Nagle's algorithm would hold a small frame back
        // until the previous segment is acknowledged.
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, router(Arc::clone(&state)))
            // The listener stays open through the drain, answering 503 to `/readyz` and to upgrades.
            .with_graceful_shutdown(state.close_all.clone().cancelled_owned());
        let server = tokio::spawn(server.into_future());

        let on_logout = logout_hook(Arc::clone(&state));
        let ingress_stop = CancellationToken::new();
        let ingress = tokio::spawn({
            let (client, hub, metrics) = (
                client.clone(),
                Arc::clone(&state.hub),
                Arc::clone(&state.metrics),
            );
            let prefix = settings.nats.subject_prefix.clone();
            let max = settings.nats.max_message_bytes;
            let stop = ingress_stop.clone();
            async move {
                if let Err(error) =
                    broker::run_ingress(client, prefix, max, hub, metrics, on_logout, stop).await
                {
                    tracing::error!(%error, "NATS ingress subscription failed");
                }
            }
        });

        let fatal: Arc<Mutex<Option<StoreError>>> = Arc::default();
        let presence_stop = CancellationToken::new();
        let presence = tokio::spawn(run_presence(
            client.clone(),
            settings.clone(),
            Arc::clone(&state),
            Arc::clone(&health),
            presence_stop.clone(),
            Arc::clone(&fatal),
        ));

        let revocations = tokio::spawn(run_revocations(
            client.clone(),
            settings.auth.revoked_bucket.clone(),
            Arc::clone(&state.revocations),
            revoked,
            presence_stop.clone(),
        ));

        tokio::select! {
            () = signal => tracing::info!("shutdown signal received"),
            () = state.shutdown.cancelled() => {}
        }
        let grace = settings.shutdown_grace();
        state.shutdown.cancel();
        drain(&state, settings.drain_window()).await;
        state.close_all.cancel();
        let _ = server.await;
        state.sessions.close();
        if tokio::time::timeout(grace, state.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = state.sessions.len(),
                "sockets still open after the grace period"
            );
        }
        presence_stop.cancel();
        if tokio::time::timeout(grace, presence).await.is_err() {
            tracing::warn!("presence records not removed in time; they will expire by TTL");
        }
        let _ = revocations.await;
        ingress_stop.cancel();
        let _ = ingress.await;
        match tokio::time::timeout(DRAIN_TIMEOUT, client.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "NATS drain failed"),
            Err(_) => tracing::warn!("NATS drain timed out"),
        }
        tracing::info!("stopped");
        let fatal = fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
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
async fn drain(state: &AppState, window: Duration) {
    let total = state.hub.socket_count();
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
        state.hub.close_some(batch, Kick::ShuttingDown);
        // Closed sockets leave the registry when their session ends.
        if state.hub.socket_count() == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
}

/// What a `logout {token}` event does after its delivery: close this instance's sockets of that token
/// and refuse the token cluster-wide until it expires.
fn logout_hook(state: Arc<AppState>) -> broker::LogoutHook {
    Arc::new(move |user, token| match state.auth.identify(token) {
        Ok(principal) if principal.user_id == user => {
            let closed = state.hub.close_token(user, &principal.jti, Kick::Revoked);
            state
                .revocations
                .revoke(&principal.jti, principal.expires_at);
            tracing::info!(%user, closed, "logout: token revoked");
        }
        Ok(_) => tracing::warn!(%user, "logout names a token of another user; ignored"),
        Err(error) => tracing::warn!(%user, %error, "logout token not recognised; nothing revoked"),
    })
}

/// Waits for NATS, opens the revocation bucket, then records revocations and follows the bucket.
async fn run_revocations(
    client: Client,
    bucket: String,
    revocations: Arc<Revocations>,
    pending: mpsc::UnboundedReceiver<(String, u64)>,
    stop: CancellationToken,
) {
    let js = async_nats::jetstream::new(client);
    let mut delay = Duration::from_millis(200);
    let store = loop {
        match revocation::open_bucket(&js, &bucket).await {
            Ok(store) => break store,
            Err(error) => {
                tracing::debug!(%error, %bucket, "revocation bucket not available yet; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_BUCKET_RETRY_DELAY);
            }
        }
    };
    let watcher = tokio::spawn(revocation::watch_records(revocations, store, stop.clone()));
    revocation::write_records(js, bucket, pending, stop).await;
    let _ = watcher.await;
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/socket/websocket", any(ws::upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl axum::response::IntoResponse {
    (
        [("content-type", crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

/// Waits for NATS, opens the presence bucket, then runs the record writer until `stop`, with the
/// watcher beside it. A bucket with conflicting settings is recorded in `fatal` and stops the instance.
async fn run_presence(
    client: Client,
    settings: Settings,
    state: Arc<AppState>,
    health: Arc<NatsHealth>,
    stop: CancellationToken,
    fatal: Arc<Mutex<Option<StoreError>>>,
) {
    let urls = settings.nats.url.clone();
    let mut waited = Duration::ZERO;
    while client.connection_state() != async_nats::connection::State::Connected {
        let step = Duration::from_millis(100);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(step) => {}
        }
        waited += step;
        if waited
            .as_millis()
            .is_multiple_of(NATS_WAIT_LOG_INTERVAL.as_millis())
        {
            tracing::warn!(nats = %urls, waited_secs = waited.as_secs(), "NATS not reachable yet; retrying");
        }
    }
    let js = async_nats::jetstream::new(client.clone());
    let spec = BucketSpec {
        bucket: settings.presence.bucket.clone(),
        replicas: settings.presence.replicas,
    };
    let mut delay = Duration::from_millis(200);
    let bucket = loop {
        match store::open_bucket(&js, &spec).await {
            Ok(bucket) => break bucket,
            Err(error @ StoreError::Mismatch { .. }) => {
                tracing::error!(%error, "cannot use the presence bucket");
                *fatal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
                state.shutdown.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, bucket = %spec.bucket, "presence bucket not available yet; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_BUCKET_RETRY_DELAY);
            }
        }
    };
    state.bucket_ready.store(true, Ordering::Relaxed);
    tracing::info!(bucket = %spec.bucket, "presence bucket open");
    let service = tokio::spawn({
        let (prefix, node) = (
            settings.nats.subject_prefix.clone(),
            settings.node_id().to_owned(),
        );
        let (presence, stop) = (Arc::clone(&state.presence), stop.clone());
        async move {
            if let Err(error) = service::serve(client, &prefix, &node, presence, stop).await {
                tracing::error!(%error, "presence service could not start");
            }
        }
    });
    let watcher = tokio::spawn(store::watch_records(
        Arc::clone(&state.presence),
        bucket,
        health.reconnects(),
        stop.clone(),
    ));
    let writer = store::Writer {
        presence: Arc::clone(&state.presence),
        js,
        spec,
        ttl: settings.presence_ttl(),
        metrics: Arc::clone(&state.metrics),
        reconnects: health.reconnects(),
    };
    writer.run(stop).await;
    let _ = tokio::join!(watcher, service);
}
