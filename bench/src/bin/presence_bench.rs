//! Presence benchmark: what cluster-wide presence costs in KV writes and memory, and how fast it answers.
//!
//! Starts its own `nats-server` (JetStream, temporary store) and two gateways, A and B, from the release
//! build next to this program, `target/release/epoch-gateway` (same bucket and subject prefix, different
//! node ids), then measures:
//!
//! 1. **KV writes** caused by N online users: N authenticated sockets on A, one per user, each joined to
//!    `user:public`. The KV stream's last sequence is read at both ends of a window of whole refresh
//!    periods (TTL/3). Then a second socket is opened for a subset of the users and the window is
//!    repeated: writes are per user, never per socket.
//! 2. **`is_online` latency** on B for random online users, so every answer comes from B's KV-watch view:
//!    Q queries from many anonymous sockets at a paced (open-loop) rate, each timed from send to the reply
//!    with the same ref. Any answer other than `online: true` is counted as an error.
//! 3. **Last-leave propagation**: a user joins on A, B is polled until it says online, A's socket closes,
//!    and B is polled back to back until it says offline (close → false on B).
//! 4. **Memory of B's presence view**: B's VmRSS before and after R records of a fake node are written
//!    into the bucket directly (once B answers online for the last of them). A's VmRSS per held socket is
//!    reported on the side.
//!
//! The gateways run with their defaults except the TTL and the per-socket push limit
//! (`ws.max_pushes_per_sec`, `ws.push_burst`), which is lifted: it is an abuse control, not presence, and
//! 50 sockets carrying 5,000 queries/s or a back-to-back poll would trip it.
//!
//! Run `cargo build --release && cargo run --release -p epoch-bench --bin presence_bench -- --json out.json`,
//! or `scripts/bench-presence.sh`. Every child process is killed and every temporary directory removed on
//! exit, on error, on panic, on Ctrl-C and on SIGTERM.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::IntoFuture;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream;
use bytes::Bytes;
use clap::Parser;
use epoch_bench::rng::Rng;
use epoch_testkit::{Gateway, GatewayOptions, Nats, PhxClient, Serves, Ws, free_port, vm_rss};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

/// Subject prefix and presence bucket of both gateways.
const PREFIX: &str = "bench";
const BUCKET: &str = "bench_presence";
/// `ws.max_pushes_per_sec` and `ws.push_burst` of both gateways (see [`start_gateway`]).
const PUSH_LIMIT: &str = "1000000";
const FAKE_NODE: &str = "bench-fake";
/// Online users are `1..=N`; trial users and the fake node's users live far above them.
const TRIAL_BASE: u64 = 5_000_000;
const FAKE_BASE: u64 = 10_000_000;
/// Bound on any single expected event (a reply, a state change on B).
const WAIT: Duration = Duration::from_secs(30);
/// Bound on each step of a leave trial; a trial over it counts as failed.
const TRIAL_WAIT: Duration = Duration::from_secs(5);
/// Leave trials stop after this many failures in a row (the rest count as failed).
const TRIAL_GIVE_UP: u32 = 3;
/// Held sockets the server closed while the benchmark still needed them (should stay 0).
static UNEXPECTED_CLOSES: AtomicU64 = AtomicU64::new(0);

#[derive(Parser, Debug, Serialize)]
#[command(
    about = "Presence benchmark: KV writes, is_online latency, leave propagation, view memory"
)]
struct Args {
    /// Online users on gateway A, one authenticated socket each.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Users of the N that get a second socket in the "2 sockets per user" window (default N/5).
    #[arg(long)]
    dup_users: Option<u64>,
    /// is_online queries sent to gateway B.
    #[arg(long, default_value_t = 20_000)]
    queries: u64,
    /// Query rate over all query sockets, per second.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Sockets on B that send the queries.
    #[arg(long, default_value_t = 50)]
    query_sockets: u64,
    /// Last-leave propagation trials.
    #[arg(long, default_value_t = 200)]
    trials: u32,
    /// Records of a fake node written into the bucket for the memory figure.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Presence TTL of both gateways in seconds (records are refreshed every TTL/3).
    #[arg(long, default_value_t = 30)]
    ttl_secs: u64,
    /// Length of each write-count window, in refresh periods (at least 2).
    #[arg(long, default_value_t = 3)]
    periods: u32,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The gateway binary (by default the release build next to this program: `cargo build --release`).
    #[arg(long, default_value_os_t = epoch_testkit::gateway_bin())]
    gateway_bin: PathBuf,
    /// The nats-server binary (by default NATS_SERVER_BIN, else the one `scripts/setup.sh` installs).
    #[arg(long, default_value_os_t = epoch_testkit::nats_server_bin())]
    nats_server: PathBuf,
}

/// Gateways A and B: the same bucket and subject prefix, different node ids, default settings except the
/// TTL and the per-socket push limit (`ws.max_pushes_per_sec`, `ws.push_burst`): an abuse control, not
/// presence, lifted so that 50 sockets can carry 5,000 queries/s and leave trials can poll back to back.
async fn start_gateway(args: &Args, nats: &Nats) -> Result<Gateway> {
    let options = GatewayOptions::benchmark(args.gateway_bin.clone())
        .shared(PREFIX, BUCKET)
        .env(
            "EPOCH_GATEWAY__PRESENCE__TTL_SECS",
            &args.ttl_secs.to_string(),
        )
        .env("EPOCH_GATEWAY__WS__MAX_PUSHES_PER_SEC", PUSH_LIMIT)
        .env("EPOCH_GATEWAY__WS__PUSH_BURST", PUSH_LIMIT);
    Gateway::try_start(&nats.url, options).await
}

/// Opens a socket on `gateway` (authenticated as `user`, or anonymous) and joins `user:public`.
async fn open_joined(gateway: &Gateway, user: Option<u64>) -> Result<PhxClient> {
    let url = match user {
        Some(user) => gateway.socket_url(&format!("vsn=2.0.0&token={}", gateway.token(user))),
        None => gateway.socket_url("vsn=2.0.0"),
    };
    // Small read buffers: the benchmark holds thousands of sockets. No Nagle: latencies are measured.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let mut client = PhxClient::connect_with(&url, config).await?;
    tokio::time::timeout(WAIT, client.join_all(&["user:public"]))
        .await
        .context("no join reply in time")??;
    Ok(client)
}

/// One anonymous socket on a gateway that asks `is_online`, one round trip at a time.
struct Poller {
    client: PhxClient,
}

impl Poller {
    async fn open(gateway: &Gateway) -> Result<Self> {
        Ok(Self {
            client: open_joined(gateway, None).await?,
        })
    }

    async fn is_online(&mut self, user: u64) -> Result<bool> {
        let r = self.client.make_ref();
        let frame = json!(["1", r, "user:public", "is_online", {"user_id": user}]);
        let reply = self.client.request(&frame, WAIT).await?;
        reply[4]["response"]["online"]
            .as_bool()
            .with_context(|| format!("bad is_online reply {reply}"))
    }

    /// Polls back to back until `user`'s state is `online`; returns the time elapsed since `since`.
    async fn wait_for(
        &mut self,
        user: u64,
        online: bool,
        since: Instant,
        within: Duration,
    ) -> Result<Duration> {
        while self.is_online(user).await? != online {
            ensure!(
                since.elapsed() < within,
                "user {user} not online={online} on B in {within:?}"
            );
        }
        Ok(since.elapsed())
    }
}

/// Opens one authenticated socket per user, each joined to `user:public` and then held by its own task
/// (with a phoenix.js-style heartbeat every 30 s) until `stop` is cancelled. Sockets are opened in batches
/// of 500 every 250 ms, under the gateway's default `ws.max_new_connections_per_sec` (5,000).
async fn hold_sockets(
    gateway: &Gateway,
    users: RangeInclusive<u64>,
    stop: &CancellationToken,
) -> Result<()> {
    let users: Vec<u64> = users.collect();
    for batch in users.chunks(500) {
        let next_batch = tokio::time::Instant::now() + Duration::from_millis(250);
        let opened: Vec<Result<()>> = futures::stream::iter(batch)
            .map(|&user| async move {
                let client = open_joined(gateway, Some(user))
                    .await
                    .with_context(|| format!("socket of user {user}"))?;
                tokio::spawn(hold(client.into_inner(), stop.clone()));
                Ok(())
            })
            .buffer_unordered(64)
            .collect()
            .await;
        opened.into_iter().collect::<Result<()>>()?;
        tokio::time::sleep_until(next_batch).await;
    }
    Ok(())
}

async fn hold(mut ws: Ws, stop: CancellationToken) {
    let every = Duration::from_secs(30);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    for r in 1u64.. {
        tokio::select! {
            () = stop.cancelled() => {
                let _ = ws.close(None).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.count()).await;
                return;
            }
            _ = heartbeat.tick() => {
                let frame = json!([null, format!("hb{r}"), "phoenix", "heartbeat", {}]).to_string();
                if ws.send(Message::text(frame)).await.is_err() {
                    UNEXPECTED_CLOSES.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            message = ws.next() => if matches!(message, None | Some(Err(_) | Ok(Message::Close(_)))) {
                UNEXPECTED_CLOSES.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// `(last sequence, live messages)` of the bucket's stream.
async fn kv_state(js: &jetstream::Context) -> Result<(u64, u64)> {
    let mut stream = js.get_stream(format!("KV_{BUCKET}")).await?;
    let state = &stream.info().await?.state;
    Ok((state.last_sequence, state.messages))
}

/// Writes per second, and per user per refresh period, over a window of `periods` refresh periods.
async fn write_window(
    js: &jetstream::Context,
    users: u64,
    period: Duration,
    periods: u32,
) -> Result<(f64, f64)> {
    let (first, _) = kv_state(js).await?;
    let start = Instant::now();
    tokio::time::sleep(period * periods).await;
    let (last, _) = kv_state(js).await?;
    let writes = (last - first) as f64;
    Ok((
        writes / start.elapsed().as_secs_f64(),
        writes / (users * u64::from(periods)) as f64,
    ))
}

/// Sends `count` is_online queries for random users in `1..=users`, one every `every` from `start`,
/// telling the reader (through `sent`) each query's ref, user and send time before it goes out.
async fn send_queries(
    mut sink: SplitSink<Ws, Message>,
    sent: UnboundedSender<(String, u64, Instant)>,
    count: u64,
    start: tokio::time::Instant,
    every: Duration,
    users: u64,
    mut rng: Rng,
) -> Result<SplitSink<Ws, Message>> {
    let mut ticks = tokio::time::interval_at(start, every);
    for i in 0..count {
        ticks.tick().await;
        let user = 1 + rng.below(users);
        let r = (i + 2).to_string();
        let frame = json!(["1", r, "user:public", "is_online", {"user_id": user}]).to_string();
        sent.send((r, user, Instant::now()))?;
        sink.send(Message::text(frame)).await?;
    }
    Ok(sink)
}

/// Reads `count` replies; returns each round trip and the number of answers other than online: true.
async fn read_replies(
    stream: &mut SplitStream<Ws>,
    mut sent: UnboundedReceiver<(String, u64, Instant)>,
    count: u64,
) -> Result<(Vec<Duration>, u64)> {
    let (mut waiting, mut rtts, mut wrong) = (HashMap::new(), Vec::new(), 0);
    while (rtts.len() as u64) < count {
        let message = tokio::time::timeout(WAIT, stream.next())
            .await
            .context("a query got no reply")?;
        let Some(Ok(Message::Text(text))) = message else {
            bail!("query socket closed or failed: {message:?}");
        };
        let at = Instant::now();
        let reply: Value = serde_json::from_str(&text)?;
        while let Ok((r, user, time)) = sent.try_recv() {
            waiting.insert(r, (user, time));
        }
        let Some((user, time)) = reply[1].as_str().and_then(|r| waiting.remove(r)) else {
            continue;
        };
        rtts.push(at - time);
        if reply[4] != json!({"status": "ok", "response": {"id": user, "online": true}}) {
            wrong += 1;
        }
    }
    Ok((rtts, wrong))
}

/// Round trips and wrong answers of paced is_online queries to `gateway` about users `1..=users`.
async fn query_latency(gateway: &Gateway, args: &Args) -> Result<(Vec<Duration>, u64)> {
    let sockets = args.query_sockets.min(args.queries).max(1);
    let mut opened = Vec::new();
    for _ in 0..sockets {
        opened.push(open_joined(gateway, None).await?.into_inner());
    }
    let every = Duration::from_secs_f64(sockets as f64 / args.rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for (s, ws) in (0..sockets).zip(opened) {
        let count = args.queries / sockets + u64::from(s < args.queries % sockets);
        let offset = every.mul_f64(s as f64 / sockets as f64);
        let (sink, stream) = ws.split();
        let (tx, rx) = unbounded_channel();
        let rng = Rng::seeded(s);
        let sender = send_queries(sink, tx, count, start + offset, every, args.users, rng);
        tasks.push(tokio::spawn(async move {
            let mut stream = stream;
            let (sink, replies) = tokio::join!(sender, read_replies(&mut stream, rx, count));
            let _ = sink?.reunite(stream)?.close(None).await;
            replies
        }));
    }
    let (mut rtts, mut wrong) = (Vec::new(), 0);
    for task in tasks {
        let (r, w) = task.await??;
        rtts.extend(r);
        wrong += w;
    }
    Ok((rtts, wrong))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p` quantile (0..=1) of sorted durations, in milliseconds (nearest rank).
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    ms(sorted[rank - 1])
}

/// One figure: JSON key, label, value, decimals shown, target, and whether it is met (None: no target).
#[derive(Serialize)]
struct Row {
    key: &'static str,
    figure: String,
    value: f64,
    #[serde(skip)]
    decimals: usize,
    target: String,
    met: Option<bool>,
}

fn row(
    key: &'static str,
    figure: impl Display,
    value: f64,
    decimals: usize,
    target: impl Display,
    met: Option<bool>,
) -> Row {
    let (figure, target) = (figure.to_string(), target.to_string());
    Row {
        key,
        figure,
        value,
        decimals,
        target,
        met,
    }
}

fn print_table(rows: &[Row]) {
    let width = rows
        .iter()
        .map(|r| r.figure.chars().count())
        .max()
        .unwrap_or(0);
    println!(
        "\n{:width$}  {:>10}  {:<30}  met",
        "figure", "measured", "target"
    );
    println!("{}", "-".repeat(width + 50));
    for r in rows {
        let met = r.met.map_or("", |ok| if ok { "yes" } else { "NO" });
        println!(
            "{:width$}  {:>10.*}  {:<30}  {met}",
            r.figure, r.decimals, r.value, r.target
        );
    }
}

/// What `--json` writes.
#[derive(Serialize)]
struct Report<'a> {
    args: &'a Args,
    dup_users: u64,
    cpus: usize,
    figures: &'a [Row],
}

/// The cluster under test and the figures measured so far.
struct Bench {
    args: Args,
    dup: u64,
    period: Duration,
    js: jetstream::Context,
    a: Gateway,
    b: Gateway,
    rows: Vec<Row>,
}

impl Bench {
    /// Phase 1, KV writes of N users with one socket each, then with a second socket for `dup` of them. The
    /// sockets stay open (until `held` is cancelled) for the later phases.
    async fn kv_writes(&mut self, held: &CancellationToken) -> Result<()> {
        let (users, dup, period) = (self.args.users, self.dup, self.period);
        let a_idle = vm_rss(self.a.pid())?;
        let started = Instant::now();
        hold_sockets(&self.a, 1..=users, held).await?;
        let deadline = Instant::now() + WAIT;
        while kv_state(&self.js).await?.1 < users {
            ensure!(
                Instant::now() < deadline,
                "the bucket never held {users} records"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut poller = Poller::open(&self.b).await?;
        poller.wait_for(users, true, Instant::now(), WAIT).await?;
        let a_per_socket = vm_rss(self.a.pid())?.saturating_sub(a_idle) as f64 / users as f64;
        println!(
            "[1] {users} users joined on A, records written, seen on B: {:.1?}",
            started.elapsed()
        );
        println!(
            "[1] counting KV writes over {} refresh periods…",
            self.args.periods
        );
        let (per_sec, per_user) = write_window(&self.js, users, period, self.args.periods).await?;
        let dup_held = CancellationToken::new();
        hold_sockets(&self.a, 1..=dup, &dup_held).await?;
        println!(
            "[1] {dup} users now hold 2 sockets ({} sockets); counting again…",
            users + dup
        );
        let (dup_per_sec, dup_per_user) =
            write_window(&self.js, users, period, self.args.periods).await?;
        dup_held.cancel();
        // Every record must still be there: a record that was not refreshed has expired.
        let alive = kv_state(&self.js).await?.1;
        let expected = users as f64 / period.as_secs_f64();
        // Rewrites flow evenly, in 10 ms slices, so a window that ends a moment after `periods` periods
        // (the time to read the stream's sequence) holds that moment's writes too: up to 50 ms of slack.
        let edge = 0.05 / (period.as_secs_f64() * f64::from(self.args.periods));
        #[rustfmt::skip]
        let rows = [
            row("kv_writes_per_sec", format!("KV writes/s, {users} users × 1 socket"), per_sec, 1, format!("≈ N/period = {expected:.1}"), None),
            row("kv_writes_per_user_period", "  … per user per refresh period", per_user, 3, "≤ 1 (+ edge)", Some(per_user <= 1.0 + edge)),
            row("kv_writes_per_sec_dup", format!("KV writes/s, {dup} of them × 2 sockets"), dup_per_sec, 1, format!("≈ {expected:.1}, not per socket"), None),
            row("kv_writes_per_user_period_dup", "  … per user per refresh period", dup_per_user, 3, "≤ 1 (+ edge)", Some(dup_per_user <= 1.0 + edge)),
            row("kv_live_records", format!("  … live records after both windows (of {users})"), alive as f64, 0, "= N (none expired)", Some(alive == users)),
            row("a_kib_per_socket", format!("A RSS per held socket, {users} sockets (KiB)"), a_per_socket / 1024.0, 1, "— (side figure)", None),
        ];
        self.rows.extend(rows);
        Ok(())
    }

    /// Phase 2, is_online round trips on B about random online users of A.
    async fn is_online_latency(&mut self) -> Result<()> {
        let args = &self.args;
        println!(
            "[2] {} is_online queries on B at {}/s from {} sockets…",
            args.queries, args.rate, args.query_sockets
        );
        let (mut rtts, wrong) = query_latency(&self.b, args).await?;
        rtts.sort();
        let p99 = pct(&rtts, 0.99);
        #[rustfmt::skip]
        let rows = [
            row("is_online_p50_ms", "is_online round trip on B, p50 (ms)", pct(&rtts, 0.5), 3, "— (answered from memory)", None),
            row("is_online_p99_ms", "  … p99 (ms)", p99, 3, "< 1 (whole WebSocket round trip)", Some(p99 < 1.0)),
            row("is_online_p999_ms", "  … p999 (ms)", pct(&rtts, 0.999), 3, "—", None),
            row("is_online_max_ms", "  … max (ms)", pct(&rtts, 1.0), 3, "—", None),
            row("is_online_wrong", format!("  … answers not online:true (of {})", rtts.len()), wrong as f64, 0, "0", Some(wrong == 0)),
        ];
        self.rows.extend(rows);
        Ok(())
    }

    /// Phase 3, last leave: a user joins on A, B says online, A's socket closes, B is polled until offline.
    async fn leave_propagation(&mut self) -> Result<()> {
        println!("[3] {} leave trials…", self.args.trials);
        let mut poller = Poller::open(&self.b).await?;
        let (mut visible, mut gone, mut failures, mut in_a_row) = (Vec::new(), Vec::new(), 0, 0);
        for i in 0..self.args.trials {
            if in_a_row == TRIAL_GIVE_UP {
                eprintln!(
                    "[3] {TRIAL_GIVE_UP} trials failed in a row: the remaining ones count as failed"
                );
                failures += self.args.trials - i;
                break;
            }
            let user = TRIAL_BASE + u64::from(i);
            let trial = async {
                let mut ws = open_joined(&self.a, Some(user)).await?.into_inner();
                visible.push(
                    poller
                        .wait_for(user, true, Instant::now(), TRIAL_WAIT)
                        .await?,
                );
                let closed_at = Instant::now();
                ws.close(None).await?;
                tokio::spawn(tokio::time::timeout(Duration::from_secs(5), ws.count()));
                gone.push(poller.wait_for(user, false, closed_at, TRIAL_WAIT).await?);
                anyhow::Ok(())
            };
            if let Err(error) = trial.await {
                eprintln!("[3] trial {i} failed: {error:#}");
                (failures, in_a_row) = (failures + 1, in_a_row + 1);
                poller = Poller::open(&self.b).await?;
            } else {
                in_a_row = 0;
            }
        }
        visible.sort();
        gone.sort();
        let p99 = pct(&gone, 0.99);
        #[rustfmt::skip]
        let rows = [
            row("leave_p50_ms", "last leave: close on A → false on B, p50 (ms)", pct(&gone, 0.5), 2, "—", None),
            row("leave_p99_ms", "  … p99 (ms)", p99, 2, "< 1000", Some(p99 < 1000.0 && failures == 0)),
            row("leave_max_ms", "  … max (ms)", pct(&gone, 1.0), 2, "—", None),
            row("leave_failed", format!("  … failed trials (of {})", self.args.trials), failures as f64, 0, "0", Some(failures == 0)),
            row("join_visible_p50_ms", "join on A → true on B, p50 (ms)", pct(&visible, 0.5), 2, "—", None),
            row("join_visible_p99_ms", "  … p99 (ms)", pct(&visible, 0.99), 2, "—", None),
        ];
        self.rows.extend(rows);
        Ok(())
    }

    /// Phase 4, B's RSS before and after R records of a fake node are written straight into the bucket.
    async fn view_memory(&mut self) -> Result<()> {
        let records = self.args.records;
        println!("[4] writing {records} records of node {FAKE_NODE}…");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = vm_rss(self.b.pid())?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-TTL", "300s");
        let started = Instant::now();
        // Pipelined: a batch of publishes, then all of its acknowledgements.
        for first in (0..records).step_by(1000) {
            let mut acks = Vec::new();
            for k in first..(first + 1000).min(records) {
                let subject = format!("$KV.{BUCKET}.{}.{FAKE_NODE}", FAKE_BASE + k);
                acks.push(
                    self.js
                        .publish_with_headers(subject, headers.clone(), Bytes::new())
                        .await?,
                );
            }
            futures::future::try_join_all(acks.into_iter().map(IntoFuture::into_future)).await?;
        }
        let mut poller = Poller::open(&self.b).await?;
        let visible = poller
            .wait_for(FAKE_BASE + records - 1, true, started, WAIT)
            .await?;
        ensure!(
            poller.is_online(FAKE_BASE).await?,
            "B does not see the first fake record"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = vm_rss(self.b.pid())?;
        let per_user = after.saturating_sub(before) as f64 / records as f64;
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        #[rustfmt::skip]
        let rows = [
            row("fake_records_visible_secs", format!("{records} fake records written, all seen on B (s)"), visible.as_secs_f64(), 2, "—", None),
            row("b_rss_before_mib", "B RSS before (MiB)", mib(before), 1, "—", None),
            row("b_rss_after_mib", "B RSS after (MiB)", mib(after), 1, "—", None),
            row("b_view_kib_per_1000_users", "B presence view, KiB per 1,000 users", per_user * 1000.0 / 1024.0, 1, "— (information)", None),
            row("b_view_bytes_per_user", "  … bytes per user", per_user, 0, "— (information)", None),
        ];
        self.rows.extend(rows);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    epoch_bench::until_interrupted(run(args)).await
}

async fn run(args: Args) -> Result<()> {
    ensure!(
        args.periods >= 2 && args.ttl_secs >= 3,
        "--periods must be ≥ 2 and --ttl-secs ≥ 3"
    );
    let counts = [
        args.users,
        args.queries,
        args.rate,
        args.query_sockets,
        args.records,
    ];
    ensure!(
        counts.iter().all(|&n| n > 0) && args.trials > 0,
        "counts and rates must be > 0"
    );
    let dup = args.dup_users.unwrap_or(args.users / 5).min(args.users);
    ensure!(
        args.users + dup + args.query_sockets <= 15_000,
        "at most 15,000 sockets: this process holds every client end (open-file limit)"
    );
    let nats = Nats::launch(&args.nats_server, free_port(), Serves::JetStream)?;
    let a = start_gateway(&args, &nats).await?;
    let b = start_gateway(&args, &nats).await?;
    let js = jetstream::new(async_nats::connect(&nats.url).await?);
    let period = Duration::from_secs(args.ttl_secs) / 3;
    println!(
        "nats {} | gateway A {} | gateway B {} | TTL {}s, refresh every {period:?}",
        nats.url, a.addr, b.addr, args.ttl_secs
    );
    let mut bench = Bench {
        args,
        dup,
        period,
        js,
        a,
        b,
        rows: Vec::new(),
    };
    let held = CancellationToken::new();
    let _close_held = held.clone().drop_guard();
    // The table so far is printed even when a phase fails.
    let result = async {
        bench.kv_writes(&held).await?;
        bench.is_online_latency().await?;
        bench.leave_propagation().await?;
        bench.view_memory().await
    }
    .await;
    let unexpected = UNEXPECTED_CLOSES.load(Ordering::Relaxed);
    #[rustfmt::skip]
    bench.rows.push(row("held_closed_by_server", "held sockets closed by the server", unexpected as f64, 0, "0", Some(unexpected == 0)));
    print_table(&bench.rows);
    if let Some(path) = &bench.args.json {
        let report = Report {
            args: &bench.args,
            dup_users: dup,
            cpus: epoch_bench::cpus(),
            figures: &bench.rows,
        };
        epoch_bench::write_json(path, &report)?;
        println!("\nfigures written to {}", path.display());
    }
    result?;
    let missed = bench.rows.iter().filter(|r| r.met == Some(false)).count();
    ensure!(missed == 0, "{missed} figure(s) missed their target");
    Ok(())
}
