//! The recovery storm's sockets: anonymous, each joined to `user:public` with `{"positions": true}` on a
//! first instance. When that connection breaks, a socket reconnects like phoenix.js (after 10, 50, 100, …
//! ms, every attempt to the other instance) and rejoins with `{"since": <the last position it saw>}`.
//!
//! Each socket checks the numbers `"s"` of the events it receives against the publisher's, which numbers
//! its events from 0 without a gap: every number once and in order. A number past the next one expected is
//! a gap (the numbers in between are lost), one before it a duplicate. A rejoined socket has caught up
//! when its rejoin was `recovered: true` and it receives, with nothing lost or duplicated, an event
//! published after its rejoin's reply arrived: by then it has every event up to the live head.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use epoch_testkit::{PhxClient, Ws};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::phoenix;
use crate::stats::{Latency, LatencyHistogram, Stats, now_us, number_after, percentiles};

/// The topic every socket joins.
const TOPIC: &str = "user:public";
/// phoenix.js's `reconnectAfterMs`: the wait before each attempt, then 5 s between the later ones.
const RECONNECT_AFTER_MS: [u64; 9] = [10, 50, 100, 150, 200, 250, 500, 1000, 2000];
const RECONNECT_LATER_MS: u64 = 5000;
/// The ref of the rejoin (the first frame on the new socket, as in phoenix.js).
const REJOIN_REF: &str = "1";

/// What the sockets of one storm share: where they reconnect, and what they report while it goes on.
pub(crate) struct Storm {
    /// The instance the sockets reconnect to.
    fallback: SocketAddr,
    /// Reconnect handshakes in flight at most (`--concurrency`); the rejoins themselves are not limited.
    handshakes: Semaphore,
    pub(crate) tally: Tally,
}

/// What the sockets of a storm report.
#[derive(Default)]
pub(crate) struct Tally {
    /// When the first instance was killed ([`now_us`]); the storm's times are counted from it.
    killed_at_us: AtomicU64,
    /// Rejoins answered ok, by `recovered`.
    pub(crate) recovered: AtomicU64,
    pub(crate) not_recovered: AtomicU64,
    /// Reconnect attempts that failed (no connection, handshake or join refused) and were tried again.
    pub(crate) failed_attempts: AtomicU64,
    /// Rejoined sockets that received an event published after their rejoin's reply.
    pub(crate) at_head: AtomicU64,
    /// Sockets closed or broken after their rejoin (they do not reconnect again).
    pub(crate) broken_after_rejoin: AtomicU64,
    /// When the rejoins were answered, and when the sockets caught up (recovered, nothing lost or
    /// duplicated, at the head).
    pub(crate) rejoined: Arrivals,
    pub(crate) caught_up: Arrivals,
}

/// When sockets reached a point of the storm, in µs after the kill.
#[derive(Default)]
pub(crate) struct Arrivals {
    count: AtomicU64,
    us: LatencyHistogram,
    latest_us: AtomicU64,
}

/// [`Arrivals`] in the report.
#[derive(Serialize, Clone, Copy)]
pub(crate) struct Arrived {
    pub(crate) sockets: u64,
    /// From the kill to the last of them (NaN unless every socket arrived).
    pub(crate) all_secs: f64,
    /// The sockets' times from the kill.
    pub(crate) after_kill: Latency,
}

impl Arrivals {
    fn record(&self, us: u64) {
        self.us.record(us);
        self.latest_us.fetch_max(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The arrivals, out of `of` sockets.
    pub(crate) fn of(&self, of: u64) -> Arrived {
        let sockets = self.count.load(Ordering::Relaxed);
        let all_secs = if sockets == of {
            self.latest_us.load(Ordering::Relaxed) as f64 / 1e6
        } else {
            f64::NAN
        };
        Arrived {
            sockets,
            all_secs,
            after_kill: percentiles(&self.us.snapshot()),
        }
    }
}

impl Storm {
    pub(crate) fn new(fallback: SocketAddr, concurrency: usize) -> Self {
        Self {
            fallback,
            handshakes: Semaphore::new(concurrency.max(1)),
            tally: Tally::default(),
        }
    }

    /// The first instance is being killed now.
    pub(crate) fn killed(&self) {
        self.tally.killed_at_us.store(now_us(), Ordering::Relaxed);
    }

    /// Microseconds since the kill.
    fn since_kill(&self) -> u64 {
        now_us().saturating_sub(self.tally.killed_at_us.load(Ordering::Relaxed))
    }

    /// Sockets done with the storm: at the head (recovered or not), or broken for good.
    pub(crate) fn settled(&self) -> u64 {
        let tally = &self.tally;
        tally.at_head.load(Ordering::Relaxed) + tally.broken_after_rejoin.load(Ordering::Relaxed)
    }
}

/// What one socket saw, when the storm is over.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The number after the last one received in order: every event before it was received.
    pub(crate) next: u64,
    /// Events skipped over (gaps) and events received again.
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    /// The rejoin's `recovered`, once answered.
    pub(crate) recovered: Option<bool>,
}

impl Outcome {
    /// Event `n` arrived.
    fn seen(&mut self, n: u64) {
        if n < self.next {
            self.duplicated += 1;
        } else {
            self.lost += n - self.next;
            self.next = n + 1;
        }
    }
}

/// Opens an anonymous socket to `addr` (from the source address of socket `i`).
async fn connect(addr: SocketAddr, i: u64) -> Result<PhxClient> {
    let stream = super::tcp_connect(addr, i).await?;
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    Ok(PhxClient::connect_over(&url, stream, super::ws_config()).await?)
}

/// Opens socket `i` on `addr`, joined to `user:public` with positions; returns it and the join's position.
pub(crate) async fn open(addr: SocketAddr, i: u64) -> Result<(Ws, String)> {
    let mut client = connect(addr, i).await?;
    let r = client.make_ref();
    let join = json!([r, r, TOPIC, "phx_join", {"positions": true}]);
    let reply = client.request(&join, super::OPEN_WAIT).await?;
    ensure!(reply[4]["status"] == "ok", "join refused: {reply}");
    let position = reply[4]["response"]["position"]
        .as_str()
        .context("no position in the join reply")?
        .to_owned();
    Ok((client.into_inner(), position))
}

/// Where a socket is in the storm.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// On the first instance.
    First,
    /// Reconnected, the rejoin sent and not answered yet.
    Rejoining,
    /// Rejoin answered at `reply_us` ([`now_us`]); `at_head` once an event published after it arrived.
    Rejoined { reply_us: u64, at_head: bool },
}

/// One socket of the storm, from its opening to the end of the storm.
struct Socket {
    i: u64,
    storm: Arc<Storm>,
    stats: Arc<Stats>,
    outcome: Outcome,
    /// The position of the last event received (or of the join, before any).
    position: String,
    phase: Phase,
}

/// Holds socket `i`, opened by [`open`] with `position`, until `stop`; reconnects it once its first
/// connection breaks. Returns what it saw.
pub(crate) async fn hold(
    (ws, position): (Ws, String),
    i: u64,
    storm: Arc<Storm>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Outcome {
    let mut socket = Socket {
        i,
        storm,
        stats,
        outcome: Outcome::default(),
        position,
        phase: Phase::First,
    };
    let mut ws = Some(ws);
    while let Some(open) = ws.take() {
        if socket.run(open, &stop).await {
            return socket.outcome;
        }
        if socket.phase != Phase::First && socket.phase != Phase::Rejoining {
            // Broken after the rejoin: the storm is over for this socket.
            socket
                .storm
                .tally
                .broken_after_rejoin
                .fetch_add(1, Ordering::Relaxed);
            break;
        }
        ws = socket.reconnect(&stop).await;
    }
    stop.cancelled().await;
    socket.outcome
}

impl Socket {
    /// Reads `ws` until `stop` (true) or until it breaks (false), sending phoenix.js's heartbeats.
    async fn run(&mut self, mut ws: Ws, stop: &CancellationToken) -> bool {
        let mut session = phoenix::Session::default();
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + super::HEARTBEAT,
            super::HEARTBEAT,
        );
        loop {
            tokio::select! {
                () = stop.cancelled() => return true,
                _ = heartbeat.tick() => {
                    if ws.send(session.heartbeat()).await.is_err() {
                        return false;
                    }
                }
                message = ws.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        if !self.on_frame(&text) {
                            return false;
                        }
                    }
                    Some(Ok(Message::Close(close))) => {
                        self.broken(close.map_or(0, |c| u16::from(c.code)));
                        return false;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        self.broken(0);
                        return false;
                    }
                },
            }
        }
    }

    /// The connection ended (`code` 0: no close frame). The kill ends the first one and a refused rejoin
    /// ends its attempt; any other end is a socket closed by the server, or broken.
    fn broken(&self, code: u16) {
        let killed = self.storm.tally.killed_at_us.load(Ordering::Relaxed) > 0;
        match self.phase {
            Phase::First if killed => {}
            Phase::Rejoining => {
                self.storm
                    .tally
                    .failed_attempts
                    .fetch_add(1, Ordering::Relaxed);
            }
            Phase::First | Phase::Rejoined { .. } => self.stats.closed(code),
        }
    }

    /// A frame from the server; false when it ends this connection (the rejoin was refused).
    fn on_frame(&mut self, text: &str) -> bool {
        let body = text.as_bytes();
        if body.windows(11).any(|w| w == b"\"phx_reply\"") {
            return self.on_reply(text);
        }
        // `[null,"<position>","user:public",…,{"t":…,"s":<n>}]`
        let Some(n) = number_after(body, b"\"s\":") else {
            return true;
        };
        if let Some(position) = text
            .strip_prefix("[null,\"")
            .and_then(|rest| rest.split('"').next())
        {
            position.clone_into(&mut self.position);
        }
        self.stats.on_delivery(self.i, body);
        self.outcome.seen(n);
        if let Phase::Rejoined {
            reply_us,
            at_head: false,
        } = self.phase
            && number_after(body, b"\"t\":").is_some_and(|t| t >= reply_us)
        {
            self.phase = Phase::Rejoined {
                reply_us,
                at_head: true,
            };
            self.storm.tally.at_head.fetch_add(1, Ordering::Relaxed);
            let clean = self.outcome.lost == 0 && self.outcome.duplicated == 0;
            if self.outcome.recovered == Some(true) && clean {
                self.storm.tally.caught_up.record(self.storm.since_kill());
            }
        }
        true
    }

    /// A reply: the rejoin's is recorded (heartbeat replies are not); false when the rejoin was refused.
    fn on_reply(&mut self, text: &str) -> bool {
        if self.phase != Phase::Rejoining {
            return true;
        }
        let Ok(reply) = serde_json::from_str::<Value>(text) else {
            return true;
        };
        if reply[1] != REJOIN_REF || reply[2] != TOPIC {
            return true;
        }
        if reply[4]["status"] != "ok" {
            self.storm
                .tally
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let recovered = reply[4]["response"]["recovered"] == true;
        self.outcome.recovered = Some(recovered);
        let counter = if recovered {
            &self.storm.tally.recovered
        } else {
            &self.storm.tally.not_recovered
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.storm.tally.rejoined.record(self.storm.since_kill());
        self.phase = Phase::Rejoined {
            reply_us: now_us(),
            at_head: false,
        };
        true
    }

    /// Reconnects to the fallback instance on phoenix.js's schedule and sends the rejoin with `since`;
    /// `None` when `stop` comes first.
    async fn reconnect(&mut self, stop: &CancellationToken) -> Option<Ws> {
        for attempt in 0.. {
            let wait = RECONNECT_AFTER_MS
                .get(attempt)
                .copied()
                .unwrap_or(RECONNECT_LATER_MS);
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            if let Some(ws) = self.rejoin().await {
                self.phase = Phase::Rejoining;
                return Some(ws);
            }
            self.storm
                .tally
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// One attempt: a new socket to the fallback instance, and the rejoin written on it.
    async fn rejoin(&self) -> Option<Ws> {
        let connected = {
            let _permit = self.storm.handshakes.acquire().await.ok()?;
            tokio::time::timeout(super::OPEN_WAIT, connect(self.storm.fallback, self.i)).await
        };
        let mut ws = connected.ok()?.ok()?.into_inner();
        let join = json!([REJOIN_REF, REJOIN_REF, TOPIC, "phx_join", {"since": self.position}]);
        ws.send(Message::text(join.to_string())).await.ok()?;
        Some(ws)
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn gaps_are_lost_and_repeats_duplicated() {
        let mut outcome = Outcome::default();
        for n in [0, 1, 2, 5, 6, 6, 3, 7] {
            outcome.seen(n);
        }
        assert_eq!(outcome.next, 8);
        assert_eq!(outcome.lost, 2);
        assert_eq!(outcome.duplicated, 2);
    }
}
