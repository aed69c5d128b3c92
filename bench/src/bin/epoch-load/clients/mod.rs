//! The sockets of the load, opened from this process: from several `127.0.0.x` source addresses (so that
//! ephemeral ports never run out), with a bounded number of handshakes in flight, each then held by a task
//! of its own that times what arrives and reports into [`Stats`] until the scenario drops it.
//!
//! - [`phoenix`]: the gateway's sockets, Phoenix V2 like phoenix.js; the bare server's too (the user in the
//!   URL instead of a token).
//! - [`nats_ws`]: the baseline's sockets, the NATS protocol over nats-server's WebSocket listener.
//! - [`recovering`]: the recovery storm's sockets, which reconnect to another instance and rejoin with
//!   `since` when theirs dies, and check that no event is lost or duplicated.
//! - [`feed`]: the presence feed's watchers, which hold who is online as phoenix.js's `Presence` does, and
//!   the churn pool's sockets, whose users come and go.

pub(crate) mod feed;
pub(crate) mod nats_ws;
pub(crate) mod phoenix;
pub(crate) mod recovering;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use epoch_bench::rng::Rng;
use epoch_gateway::auth::Authenticator;
use epoch_testkit::Ws;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// Source addresses `127.0.0.2 ..`: each has its own ephemeral port range (about 28,000 ports).
const SOURCE_ADDRESSES: u8 = 8;
/// Bound on opening one socket (the handshake and the join replies).
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// phoenix.js sends a heartbeat every 30 s; the gateway closes a socket silent for 60 s.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Seeds of the sockets' generators: this, mixed with the socket's index.
const SOCKET_SEED: u64 = 0x9E37_79B9;

/// The server a socket talks to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    Gateway,
    /// A second gateway, of another build or with other settings (an A/B test).
    GatewayB,
    Nats,
    /// `bare_server`, the lower bound.
    Bare,
}

impl Kind {
    /// Every kind, in the order of the report's columns.
    pub(crate) const ALL: [Self; 4] = [Self::Gateway, Self::GatewayB, Self::Nats, Self::Bare];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::GatewayB => "gateway-b",
            Self::Nats => "nats-ws",
            Self::Bare => "bare",
        }
    }

    /// Whether it is an epoch-gateway (either of the two).
    pub(crate) fn is_gateway(self) -> bool {
        matches!(self, Self::Gateway | Self::GatewayB)
    }

    /// Whether its sockets speak Phoenix V2 (joins, heartbeats); nats-server's speak NATS.
    pub(crate) fn speaks_phoenix(self) -> bool {
        self != Self::Nats
    }
}

/// Where sockets connect, and how they authenticate (gateway), say who they are (bare) or what they
/// subscribe to (nats).
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    pub(crate) auth: Arc<Authenticator>,
    /// The subject prefix the baseline's sockets subscribe under.
    pub(crate) prefix: &'static str,
}

/// A TCP connection from source address `127.0.0.(2 + i % SOURCE_ADDRESSES)`.
async fn tcp_connect(addr: SocketAddr, i: u64) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    let source = Ipv4Addr::new(127, 0, 0, 2 + (i % u64::from(SOURCE_ADDRESSES)) as u8);
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn ws_config() -> WebSocketConfig {
    // The tool holds tens of thousands of sockets: small buffers, writes sent at once.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens socket `i` for user `i + 1`, joined to (or subscribed to) its three topics.
async fn open_one(endpoint: &Endpoint, i: u64) -> Result<Ws> {
    let user = i + 1;
    let stream = tcp_connect(endpoint.addr, i).await?;
    match endpoint.kind {
        Kind::Gateway | Kind::GatewayB => {
            let query = phoenix::token_query(&endpoint.auth, user);
            phoenix::open(stream, endpoint.addr, &query, user).await
        }
        Kind::Bare => phoenix::open(stream, endpoint.addr, &format!("user={user}"), user).await,
        Kind::Nats => nats_ws::open(stream, endpoint.addr, endpoint.prefix, user).await,
    }
}

/// A held socket's protocol.
enum Session {
    /// Phoenix V2; `is_online` only where the server has it (the gateway).
    Phoenix {
        session: phoenix::Session,
        is_online: bool,
    },
    Nats(nats_ws::Session),
}

impl Session {
    fn of(kind: Kind) -> Self {
        match kind {
            Kind::Gateway | Kind::GatewayB | Kind::Bare => Self::Phoenix {
                session: phoenix::Session::default(),
                is_online: kind.is_gateway(),
            },
            Kind::Nats => Self::Nats(nats_ws::Session::default()),
        }
    }

    /// The is-online scenario's frame: an `is_online` query about `user`, or the control frame.
    fn client_frame(&mut self, control: bool, user: u64) -> Message {
        match self {
            // A server without is_online gets the control frame only.
            Self::Phoenix { is_online, .. } => {
                phoenix::Session::client_frame(control || !*is_online, user)
            }
            Self::Nats(session) => session.ping(),
        }
    }

    /// The protocol's own heartbeat, when it has one (phoenix.js's; NATS answers server `PING`s instead).
    fn heartbeat(&mut self) -> Option<Message> {
        match self {
            Self::Phoenix { session, .. } => Some(session.heartbeat()),
            Self::Nats(_) => None,
        }
    }

    /// A message from the server to socket `i`; `Ok(Some(reply))` when it needs one, an error when it
    /// breaks the protocol.
    fn on_message(&mut self, message: Message, i: u64, stats: &Stats) -> Result<Option<Message>> {
        match (self, message) {
            (Self::Phoenix { .. }, Message::Text(text)) => {
                phoenix::Session::on_frame(&text, i, stats);
                Ok(None)
            }
            (Self::Nats(session), Message::Binary(data)) => session.on_data(&data, i, stats),
            _ => Ok(None),
        }
    }
}

/// phoenix.js's heartbeat timer: every `HEARTBEAT`, the first after a random half to whole period, so that
/// the sockets' heartbeats spread over the period.
fn heartbeat_timer(rng: &mut Rng) -> tokio::time::Interval {
    tokio::time::interval_at(
        tokio::time::Instant::now() + HEARTBEAT.mul_f64(0.5 + rng.unit() * 0.5),
        HEARTBEAT,
    )
}

/// Holds an open socket until `stop`: times deliveries and replies, sends heartbeats and, while the
/// is-online scenario asks for them, a client frame every `query_period_us`; records a close by the server.
async fn hold(mut ws: Ws, kind: Kind, i: u64, stats: Arc<Stats>, stop: CancellationToken) {
    let mut session = Session::of(kind);
    let mut rng = Rng::seeded(SOCKET_SEED ^ i);
    let mut heartbeat = heartbeat_timer(&mut rng);
    let heartbeats = kind.speaks_phoenix();
    let mut period_rx = stats.query_period_us.subscribe();
    let mut period = 0;
    let next_frame = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(next_frame);
    loop {
        let sent = tokio::select! {
            () = stop.cancelled() => return,
            Ok(()) = period_rx.changed() => {
                period = *period_rx.borrow_and_update();
                // A random phase, so that the sockets' frames spread over the period.
                let phase = Duration::from_micros(period).mul_f64(rng.unit());
                next_frame.as_mut().reset(tokio::time::Instant::now() + phase);
                continue;
            }
            () = &mut next_frame, if period > 0 => {
                // On schedule from the last deadline, so the sockets together send the offered rate; a socket
                // that fell behind skips ahead instead of sending a burst.
                let due = next_frame.deadline() + Duration::from_micros(period);
                next_frame.as_mut().reset(due.max(tokio::time::Instant::now()));
                let user = rng.below(stats.query_users.load(Ordering::Relaxed).max(1)) + 1;
                let control = stats.query_heartbeats.load(Ordering::Relaxed);
                let frame = session.client_frame(control, user);
                stats.queries.fetch_add(1, Ordering::Relaxed);
                ws.send(frame).await
            }
            _ = heartbeat.tick(), if heartbeats => match session.heartbeat() {
                Some(frame) => {
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    ws.send(frame).await
                }
                None => continue,
            },
            message = ws.next() => match message_or_end(message) {
                Ok(message) => match session.on_message(message, i, &stats) {
                    Ok(Some(reply)) => ws.send(reply).await,
                    Ok(None) => continue,
                    Err(_) => {
                        stats.closed(0);
                        return;
                    }
                },
                Err(code) => {
                    stats.closed(code);
                    return;
                }
            }
        };
        if sent.is_err() {
            stats.closed(0);
            return;
        }
    }
}

/// What a held socket read: a message, or its end, as the close code the server sent (0: none, or the
/// connection broke).
fn message_or_end(
    read: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Message, u16> {
    match read {
        Some(Ok(Message::Close(close))) => Err(close.map_or(0, |c| u16::from(c.code))),
        Some(Ok(message)) => Ok(message),
        Some(Err(_)) | None => Err(0),
    }
}

/// Sockets held open, and how opening them went; each socket's task ends with a `T`.
pub(crate) struct Held<T = ()> {
    tasks: JoinSet<T>,
    stop: CancellationToken,
    pub(crate) opened: u64,
    /// The indices of the sockets that opened.
    pub(crate) indices: Vec<u64>,
    pub(crate) failed: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) secs: f64,
}

impl<T: 'static> Held<T> {
    pub(crate) fn connect_rate(&self) -> f64 {
        self.opened as f64 / self.secs
    }

    /// Drops every socket at once (the tasks end, their streams close).
    pub(crate) async fn drop_all(self) {
        self.stop_all().await;
    }

    /// Stops every socket's task at once and returns what each ended with.
    pub(crate) async fn stop_all(mut self) -> Vec<T> {
        self.stop.cancel();
        let mut ended = Vec::with_capacity(self.tasks.len());
        while let Some(result) = self.tasks.join_next().await {
            if let Ok(value) = result {
                ended.push(value);
            }
        }
        ended
    }
}

/// Opens `n` sockets, socket `i` on `endpoints[i % endpoints.len()]` (round-robin), with `concurrency`
/// handshakes in flight; each is then held by its own task.
pub(crate) async fn open_all(
    endpoints: &[Endpoint],
    n: u64,
    concurrency: usize,
    stats: &Arc<Stats>,
) -> Held {
    let endpoint = |i: u64| &endpoints[(i % endpoints.len() as u64) as usize];
    open_each(
        n,
        concurrency,
        |i| {
            let endpoint = endpoint(i).clone();
            async move { open_one(&endpoint, i).await }
        },
        |i, ws, stop| hold(ws, endpoint(i).kind, i, stats.clone(), stop),
    )
    .await
}

/// Opens `n` sockets with `open(i)`, `concurrency` of them in flight, each bounded by `OPEN_WAIT`; each
/// socket opened is then held by the task `hold(i, socket, stop)`, which ends when `stop` is cancelled.
pub(crate) async fn open_each<S, T, Opening, Holding>(
    n: u64,
    concurrency: usize,
    open: impl Fn(u64) -> Opening,
    hold: impl Fn(u64, S, CancellationToken) -> Holding,
) -> Held<T>
where
    Opening: Future<Output = Result<S>>,
    Holding: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let started = Instant::now();
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (mut opened, mut failed, mut first_error) = (0, 0, None);
    let mut indices = Vec::new();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let opening = open(i);
            async move { (i, tokio::time::timeout(OPEN_WAIT, opening).await) }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((i, result)) = results.next().await {
        match result {
            Ok(Ok(socket)) => {
                opened += 1;
                indices.push(i);
                tasks.spawn(hold(i, socket, stop.clone()));
            }
            Ok(Err(error)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{error:#}"));
            }
            Err(_) => {
                failed += 1;
                first_error.get_or_insert_with(|| "handshake timed out".to_owned());
            }
        }
    }
    Held {
        tasks,
        stop,
        opened,
        indices,
        failed,
        first_error,
        secs: started.elapsed().as_secs_f64(),
    }
}
