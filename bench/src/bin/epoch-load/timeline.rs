//! The per-user timeline (`--timeline`): what happened on one target in every 10 ms of its measured
//! windows, to find what the slow deliveries coincide with.
//!
//! Three recorders run beside a window and are read when it ends:
//! - [`MessageLog`]: per message of the window (by its number), its publish stamp and its arrival, written
//!   by the socket tasks ([`crate::stats::Stats::on_delivery`]) with two relaxed stores. Read after the
//!   window: latency percentiles per bucket **by publish time** (the messages published in those 10 ms),
//!   arrivals per bucket by receive time.
//! - the `/proc` sampler, a thread of its own, every 10 ms: `schedstat` of every thread of the server, of
//!   its nats-server, of this driver and of the other targets' servers (time run and time waited on a run
//!   queue, in ns, and times scheduled), each file kept open and re-read at offset 0, one system call per
//!   thread and tick; the whole machine's CPU time (`/proc/stat`, every process's, in 10 ms ticks) and
//!   threads runnable (`/proc/loadavg`), which tell the load of others on the shared cores; how late its
//!   own tick was; and the heartbeats the sockets sent.
//! - the scraper, a thread of its own, every 100 ms: a gateway's `/metrics` (presence writes and watch
//!   updates, NATS messages, frames written, fan-out latency) and the nats-server's `/varz` (messages and
//!   bytes in and out). Each scrape costs the gateway a render of its metrics.
//!
//! Both threads are this driver's, named [`PROC_THREAD`] and [`SCRAPE_THREAD`], so their own CPU is in the
//! timeline too ([`SamplerFigures`]). The timeline of each target is written as JSON to a file of its own,
//! read by `scripts/timeline.py`.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::clients::Kind;
use crate::scenarios::Target;
use crate::stats::{Stats, now_us};

/// The width of a bucket.
pub(crate) const BUCKET: Duration = Duration::from_millis(10);
/// How often the servers' counters are scraped: an HTTP request each, and a render of the gateway's
/// metrics, too dear for every bucket.
const SCRAPE_EVERY: Duration = Duration::from_millis(100);
/// The `/proc` sampler looks for new threads every this many ticks.
const RESCAN_TICKS: usize = 10;
/// A tick at least this late counts as late in [`SamplerFigures`].
const LATE: Duration = Duration::from_millis(2);
/// Bound on one scrape (connect, request, response).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// The sampler threads' names (the kernel keeps 15 bytes of a thread's name).
const PROC_THREAD: &str = "tl-proc";
const SCRAPE_THREAD: &str = "tl-scrape";
/// The gateway's series recorded from `/metrics`, as rendered (name and labels).
const GATEWAY_SERIES: [&str; 8] = [
    "epoch_gateway_presence_writes_total",
    "epoch_gateway_presence_watch_updates_total",
    "epoch_gateway_nats_messages_total",
    "epoch_gateway_frames_out_total",
    "epoch_gateway_fanout_latency_seconds_count",
    "epoch_gateway_fanout_latency_seconds_sum",
    "epoch_gateway_fanout_latency_seconds_bucket{le=\"0.001\"}",
    "epoch_gateway_delivery_caught_up_events_total",
];
/// Latencies whose messages are counted per bucket: the p99 and p999 targets (µs), so that the
/// share of the tail in each bucket is known, not only the bucket's percentiles.
const OVER_P99_TARGET_US: u64 = 1_000;
const OVER_P999_TARGET_US: u64 = 3_000;
/// nats-server's `/varz` counters recorded.
const VARZ_COUNTERS: [&str; 4] = ["in_msgs", "out_msgs", "in_bytes", "out_bytes"];

// ---------------------------------------------------------------------------------------------------------
// Each message of a window

/// Per message of the armed window, its publish stamp and its arrival (µs, [`now_us`]; 0: not arrived).
/// Per-user messages reach one socket each, so a message has one arrival.
pub(crate) struct MessageLog {
    /// The number of the window's first message.
    first: AtomicU64,
    /// Messages of the window; 0 while none is armed.
    len: AtomicU64,
    stamp_us: Box<[AtomicU64]>,
    arrived_us: Box<[AtomicU64]>,
}

impl MessageLog {
    fn new(capacity: usize) -> Self {
        let slots = || (0..capacity).map(|_| AtomicU64::new(0)).collect();
        Self {
            first: AtomicU64::new(0),
            len: AtomicU64::new(0),
            stamp_us: slots(),
            arrived_us: slots(),
        }
    }

    /// Starts logging messages `first..first + count` (no delivery of another window is under way).
    fn arm(&self, first: u64, count: u64) -> Result<()> {
        ensure!(
            count <= self.stamp_us.len() as u64,
            "the timeline holds {} messages per window, not {count}",
            self.stamp_us.len()
        );
        self.len.store(0, Ordering::Release);
        for i in 0..count as usize {
            self.stamp_us[i].store(0, Ordering::Relaxed);
            self.arrived_us[i].store(0, Ordering::Relaxed);
        }
        self.first.store(first, Ordering::Relaxed);
        self.len.store(count, Ordering::Release);
        Ok(())
    }

    /// Message `seq`, stamped `stamp` (µs), arrived at `now`; ignored outside the armed window.
    pub(crate) fn received(&self, seq: u64, stamp: u64, now: u64) {
        let i = seq.wrapping_sub(self.first.load(Ordering::Relaxed));
        if i < self.len.load(Ordering::Acquire) {
            self.stamp_us[i as usize].store(stamp, Ordering::Relaxed);
            self.arrived_us[i as usize].store(now, Ordering::Relaxed);
        }
    }

    /// The armed window's (stamp, arrival) of every message that arrived, and how many did not.
    fn read(&self) -> (Vec<(u64, u64)>, u64) {
        let len = self.len.load(Ordering::Acquire) as usize;
        let mut arrived = Vec::with_capacity(len);
        for i in 0..len {
            let at = self.arrived_us[i].load(Ordering::Relaxed);
            if at != 0 {
                arrived.push((self.stamp_us[i].load(Ordering::Relaxed), at));
            }
        }
        let lost = (len - arrived.len()) as u64;
        (arrived, lost)
    }
}

// ---------------------------------------------------------------------------------------------------------
// A thread that samples on a fixed schedule

/// What the main thread asks of a sampler thread.
enum Command<S> {
    /// Sample from `start` on, every period.
    Arm { start: Instant },
    /// Stop sampling and hand over the samples.
    Stop(mpsc::Sender<Ticks<S>>),
}

/// What one armed stretch of a sampler thread recorded.
struct Ticks<S> {
    at_us: Vec<u64>,
    values: Vec<S>,
    /// How late each tick was (µs after its time): a tick is late when this thread waited for a CPU, or
    /// when nothing of the machine ran (its virtual CPUs held up by the host).
    late_us: Vec<u64>,
}

impl<S> Ticks<S> {
    fn none() -> Self {
        Self {
            at_us: Vec::new(),
            values: Vec::new(),
            late_us: Vec::new(),
        }
    }
}

/// A thread of its own that calls a sampling function every `period` while armed: its schedule is kept
/// whatever the driver's runtime is doing, and its work is not on the runtime's threads.
struct Periodic<S> {
    commands: mpsc::Sender<Command<S>>,
}

impl<S: Send + 'static> Periodic<S> {
    fn spawn(
        name: &str,
        period: Duration,
        sample: impl FnMut() -> S + Send + 'static,
    ) -> Result<Self> {
        let (commands, received) = mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || sample_while_armed(&received, period, sample))
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(Self { commands })
    }

    fn arm(&self, start: Instant) -> Result<()> {
        self.commands
            .send(Command::Arm { start })
            .ok()
            .context("a timeline sampler thread is gone")
    }

    fn stop(&self) -> Result<Ticks<S>> {
        let (reply, ticks) = mpsc::channel();
        self.commands
            .send(Command::Stop(reply))
            .ok()
            .context("a timeline sampler thread is gone")?;
        ticks
            .recv()
            .context("a timeline sampler thread stopped without its samples")
    }
}

/// The sampler thread: idle until armed, then a sample at `start`, `start + period`, … until stopped. A
/// tick that falls more than a period behind skips the ticks it missed.
fn sample_while_armed<S>(
    commands: &mpsc::Receiver<Command<S>>,
    period: Duration,
    mut sample: impl FnMut() -> S,
) {
    while let Ok(command) = commands.recv() {
        let start = match command {
            Command::Arm { start } => start,
            // Not armed: nothing was recorded.
            Command::Stop(reply) => {
                let _ = reply.send(Ticks::none());
                continue;
            }
        };
        let mut ticks = Ticks::none();
        let mut due = start;
        loop {
            let late = Instant::now().saturating_duration_since(due);
            ticks.late_us.push(late.as_micros() as u64);
            ticks.at_us.push(now_us());
            ticks.values.push(sample());
            due += period;
            while due < Instant::now() {
                due += period;
            }
            match commands.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Timeout) | Ok(Command::Arm { .. }) => {}
                Ok(Command::Stop(reply)) => {
                    let _ = reply.send(ticks);
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Threads, from /proc

/// Whose thread it is.
#[derive(Serialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
#[serde(rename_all = "snake_case")]
enum Process {
    /// The server under test (the gateway, nats-server for nats-ws, the bare server).
    Server,
    /// The nats-server behind it.
    BackingNats,
    /// This driver: the target's sockets, its publisher and the samplers.
    LoadTool,
    /// The other targets' servers and nats-servers, between their own turns.
    OtherTargets,
}

/// A thread, as its series are labelled.
#[derive(PartialEq, Eq, PartialOrd, Ord, Debug)]
struct ThreadId {
    process: Process,
    tid: u32,
    name: String,
}

/// `/proc/stat`'s CPU times are in ticks of `USER_HZ`, 100 per second on Linux.
const MS_PER_TICK: u64 = 10;

/// A thread's `schedstat` at a tick: ns on a CPU, ns waiting on a run queue, times scheduled in.
struct Reading {
    thread: Arc<ThreadId>,
    values: [u64; 3],
}

/// The threads of the processes sampled, each `schedstat` file kept open, and the machine's files.
struct Threads {
    processes: Vec<(Process, u32)>,
    open: Vec<(Arc<ThreadId>, File)>,
    seen: HashSet<(u32, u32)>,
    ticks: usize,
    stat: Option<File>,
    loadavg: Option<File>,
}

impl Threads {
    fn new(processes: Vec<(Process, u32)>) -> Self {
        Self {
            processes,
            open: Vec::new(),
            seen: HashSet::new(),
            ticks: 0,
            stat: File::open("/proc/stat").ok(),
            loadavg: File::open("/proc/loadavg").ok(),
        }
    }

    /// Opens the threads not seen yet (a process that is gone is skipped: its samples simply end).
    fn rescan(&mut self) {
        for &(process, pid) in &self.processes {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                if !self.seen.insert((pid, tid)) {
                    continue;
                }
                let dir = task.path();
                let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                if let Ok(file) = File::open(dir.join("schedstat")) {
                    let thread = ThreadId {
                        process,
                        tid,
                        name: name.trim().to_owned(),
                    };
                    self.open.push((Arc::new(thread), file));
                }
            }
        }
    }

    /// The machine's CPU time so far, in ticks: every CPU's busy time (all but idle and iowait) and the
    /// time the hypervisor gave to others (steal).
    fn machine_cpu(&self) -> Option<MachineCpu> {
        let mut buffer = [0u8; 256];
        let n = self.stat.as_ref()?.read_at(&mut buffer, 0).ok()?;
        MachineCpu::parse(std::str::from_utf8(&buffer[..n]).ok()?)
    }

    /// Threads runnable on the machine now (`/proc/loadavg`'s `running/total`), this one included.
    fn runnable(&self) -> Option<u32> {
        let mut buffer = [0u8; 128];
        let n = self.loadavg.as_ref()?.read_at(&mut buffer, 0).ok()?;
        runnable_in(std::str::from_utf8(&buffer[..n]).ok()?)
    }

    fn sample(&mut self) -> Vec<Reading> {
        if self.ticks.is_multiple_of(RESCAN_TICKS) {
            self.rescan();
        }
        self.ticks += 1;
        let mut buffer = [0u8; 96];
        let mut readings = Vec::with_capacity(self.open.len());
        for (thread, file) in &self.open {
            // A thread that ended reads as an error: its series ends.
            let Ok(n) = file.read_at(&mut buffer, 0) else {
                continue;
            };
            let mut fields = std::str::from_utf8(&buffer[..n])
                .unwrap_or_default()
                .split_ascii_whitespace()
                .map(|f| f.parse::<u64>().unwrap_or(0));
            let mut values = [0; 3];
            for value in &mut values {
                *value = fields.next().unwrap_or(0);
            }
            readings.push(Reading {
                thread: Arc::clone(thread),
                values,
            });
        }
        readings
    }
}

/// The machine's CPU time so far (all CPUs, every process), in ticks of [`MS_PER_TICK`].
#[derive(Clone, Copy)]
struct MachineCpu {
    busy: u64,
    steal: u64,
}

impl MachineCpu {
    /// From `/proc/stat`, whose first line is `cpu  user nice system idle iowait irq softirq steal …`.
    fn parse(stat: &str) -> Option<Self> {
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_ascii_whitespace()
            .skip(1)
            .map_while(|t| t.parse().ok())
            .collect();
        let (idle, iowait, steal) = (*ticks.get(3)?, *ticks.get(4)?, *ticks.get(7)?);
        let all: u64 = ticks.iter().take(8).sum();
        Some(Self {
            busy: all - idle - iowait - steal,
            steal,
        })
    }
}

/// The threads running now, from `/proc/loadavg` (`0.5 0.4 0.3 running/total last_pid`).
fn runnable_in(loadavg: &str) -> Option<u32> {
    let (running, _) = loadavg.split_ascii_whitespace().nth(3)?.split_once('/')?;
    running.parse().ok()
}

/// One tick of the `/proc` sampler: every thread's reading, the machine's, and the heartbeats sent so
/// far.
struct ProcTick {
    threads: Vec<Reading>,
    machine: Option<MachineCpu>,
    runnable: Option<u32>,
    heartbeats: u64,
}

// ---------------------------------------------------------------------------------------------------------
// Counters, over HTTP

/// One scrape: [`GATEWAY_SERIES`] and [`VARZ_COUNTERS`], in order (`None`: not had).
struct Scrape {
    gateway: Vec<Option<f64>>,
    varz: Vec<Option<f64>>,
}

/// Where the scraper reads: the gateway's `/metrics` (gateways only) and nats-server's `/varz`.
struct Endpoints {
    metrics: Option<SocketAddr>,
    varz: Option<SocketAddr>,
}

impl Endpoints {
    fn scrape(&self) -> Scrape {
        let gateway = match self.metrics.and_then(|addr| get(addr, "/metrics")) {
            Some(body) => GATEWAY_SERIES
                .iter()
                .map(|series| series_value(&body, series))
                .collect(),
            None => vec![None; GATEWAY_SERIES.len()],
        };
        let varz = self
            .varz
            .and_then(|addr| get(addr, "/varz"))
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok());
        let varz = VARZ_COUNTERS
            .iter()
            .map(|key| varz.as_ref().and_then(|v| v[*key].as_f64()))
            .collect();
        Scrape { gateway, varz }
    }
}

/// The body of `GET path` (HTTP/1.0: the whole body, never chunked, then the connection closes).
fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.split_whitespace()
        .nth(1)
        .is_some_and(|status| status == "200")
        .then(|| body.to_owned())
}

/// The value of the series `series` (`name{labels}` as rendered) in a `/metrics` body.
fn series_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------------------
// The timeline of a target

/// The timeline of one target's measured windows.
pub(crate) struct Timeline {
    stats: Arc<Stats>,
    kind: Kind,
    procs: Periodic<ProcTick>,
    scrapes: Periodic<Scrape>,
    windows: Vec<WindowTimeline>,
}

/// A window's recordings, taken when it ends and turned into a [`WindowTimeline`] after its turn.
pub(crate) struct Recorded {
    start_us: u64,
    start_unix_s: f64,
    first_seq: u64,
    sent: u64,
    arrived: Vec<(u64, u64)>,
    lost: u64,
    procs: Ticks<ProcTick>,
    scrapes: Ticks<Scrape>,
}

impl Timeline {
    /// The recorders of `target`, for windows of at most `capacity` messages; idle until a window.
    pub(crate) fn start(target: &Target, stats: &Arc<Stats>, capacity: usize) -> Result<Self> {
        ensure!(
            stats.message_log.set(MessageLog::new(capacity)).is_ok(),
            "one timeline per socket set"
        );
        let mut processes = vec![(Process::Server, target.pid)];
        processes.extend(target.backing_pid.map(|pid| (Process::BackingNats, pid)));
        processes.push((Process::LoadTool, std::process::id()));
        processes.extend(
            target
                .neighbours
                .iter()
                .map(|&pid| (Process::OtherTargets, pid)),
        );
        let mut threads = Threads::new(processes);
        let counters = Arc::clone(stats);
        let procs = Periodic::spawn(PROC_THREAD, BUCKET, move || ProcTick {
            threads: threads.sample(),
            machine: threads.machine_cpu(),
            runnable: threads.runnable(),
            heartbeats: counters.heartbeats.load(Ordering::Relaxed),
        })?;
        let kind = target.endpoint.kind;
        let endpoints = Endpoints {
            metrics: kind.is_gateway().then_some(target.endpoint.addr),
            varz: target.monitoring,
        };
        let scrapes = Periodic::spawn(SCRAPE_THREAD, SCRAPE_EVERY, move || endpoints.scrape())?;
        Ok(Self {
            stats: Arc::clone(stats),
            kind,
            procs,
            scrapes,
            windows: Vec::new(),
        })
    }

    /// Runs `work`, a window of `sent` messages numbered from `first_seq`, with every recorder on.
    pub(crate) async fn around<T>(
        &self,
        first_seq: u64,
        sent: u64,
        work: impl Future<Output = Result<T>>,
    ) -> Result<(T, Recorded)> {
        let log = self
            .stats
            .message_log
            .get()
            .context("the timeline's message log")?;
        log.arm(first_seq, sent)?;
        let start = Instant::now();
        let start_us = now_us();
        let start_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(f64::NAN, |since| since.as_secs_f64());
        self.procs.arm(start)?;
        self.scrapes.arm(start)?;
        let value = work.await;
        let procs = self.procs.stop()?;
        let scrapes = self.scrapes.stop()?;
        let (arrived, lost) = log.read();
        Ok((
            value?,
            Recorded {
                start_us,
                start_unix_s,
                first_seq,
                sent,
                arrived,
                lost,
                procs,
                scrapes,
            },
        ))
    }

    /// Adds a window's recordings, at `rate` in round `round` (from 1), and prints what stands out.
    pub(crate) fn add(&mut self, recorded: Recorded, rate: f64, round: u32) {
        let window = WindowTimeline::of(recorded, rate, round);
        let slow = window
            .buckets
            .max_ms
            .iter()
            .filter(|max| max.is_some_and(|m| m > SLOW_BUCKET_MS))
            .count();
        println!(
            "    timeline: {} buckets of {} ms, {slow} with a message over {SLOW_BUCKET_MS} ms; samplers {:.1} % of a core (/proc {:.1} %, scrapes {:.1} %), {} late ticks",
            window.buckets.published.len(),
            BUCKET.as_millis(),
            window.sampler.proc_cpu_percent + window.sampler.scrape_cpu_percent,
            window.sampler.proc_cpu_percent,
            window.sampler.scrape_cpu_percent,
            window.sampler.late_ticks,
        );
        self.windows.push(window);
    }

    /// Writes the timeline next to `path`, with the target's name added; returns where.
    pub(crate) fn write(&self, path: &Path) -> Result<PathBuf> {
        let path = path_of(path, self.kind);
        let file = TimelineFile {
            target: self.kind.label(),
            bucket_ms: BUCKET.as_secs_f64() * 1000.0,
            scrape_ms: SCRAPE_EVERY.as_secs_f64() * 1000.0,
            latency_by: "publish time",
            windows: &self.windows,
        };
        epoch_bench::write_json(&path, &file)?;
        println!("  timeline written to {}", path.display());
        Ok(path)
    }
}

/// A bucket with a message slower than this is counted as slow in the driver's line (the analysis
/// script has its own threshold).
const SLOW_BUCKET_MS: f64 = 2.0;

/// `dir/timeline.json` → `dir/timeline-gateway.json`.
fn path_of(path: &Path, kind: Kind) -> PathBuf {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("timeline");
    let name = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}-{}.{ext}", kind.label()),
        None => format!("{stem}-{}", kind.label()),
    };
    path.with_file_name(name)
}

// ---------------------------------------------------------------------------------------------------------
// What is written

/// A target's timeline file.
#[derive(Serialize)]
struct TimelineFile<'a> {
    target: &'a str,
    bucket_ms: f64,
    scrape_ms: f64,
    /// What a bucket's latency percentiles are over: the messages *published* in it.
    latency_by: &'a str,
    windows: &'a [WindowTimeline],
}

/// One measured window: bucket `k` covers `[start + k × bucket, start + (k + 1) × bucket)`, from the
/// window's first message to the end of its drain.
#[derive(Serialize)]
struct WindowTimeline {
    rate_msgs_per_sec: f64,
    round: u32,
    /// The window's start on the tool's clock (µs), and on the wall clock (seconds since the Unix epoch:
    /// to line the timeline up with other logs, a Go runtime's `gctrace` say).
    start_us: u64,
    start_unix_s: f64,
    first_seq: u64,
    sent: u64,
    lost: u64,
    buckets: Buckets,
    /// Per thread, per bucket.
    threads: Vec<ThreadSeries>,
    scrapes: Scrapes,
    sampler: SamplerFigures,
}

/// Per bucket, columns of equal length.
#[derive(Serialize, Default)]
struct Buckets {
    /// Messages published in the bucket (by their stamp; those that never arrived are not known).
    published: Vec<u32>,
    /// Deliveries that arrived in the bucket.
    received: Vec<u32>,
    /// Publish → receive latency of the messages published in the bucket (ms; null: none), nearest rank.
    /// At 5,000 msg/s a bucket holds about 50 messages: below 100, its p99 is its largest.
    p50_ms: Vec<Option<f64>>,
    p99_ms: Vec<Option<f64>>,
    max_ms: Vec<Option<f64>>,
    /// Of the messages published in the bucket, those slower than 1 ms and than 3 ms (the p99 and
    /// p999 targets): where the tail is.
    over_1ms: Vec<u32>,
    over_3ms: Vec<u32>,
    /// Heartbeats the sockets sent in the bucket.
    heartbeats: Vec<u64>,
    /// Threads runnable on the whole machine at the bucket's start (the sampler itself included; null:
    /// not read): above the 2 cores, someone waits.
    runnable: Vec<Option<u32>>,
    /// How late the `/proc` sampler's tick at the bucket's start was (µs; null: no tick): late with little
    /// run-queue wait of its own, nothing of the machine was running.
    sampler_late_us: Vec<Option<u64>>,
    /// CPU time of the whole machine in the bucket, every process's (ms, from `/proc/stat`: counted in
    /// 10 ms ticks, so coarse per bucket), and the time the hypervisor gave to other machines (steal).
    machine_busy_ms: Vec<u64>,
    machine_steal_ms: Vec<u64>,
}

/// One thread's time per bucket, from `/proc/<pid>/task/<tid>/schedstat`.
#[derive(Serialize)]
struct ThreadSeries {
    process: Process,
    tid: u32,
    name: String,
    /// µs on a CPU.
    run_us: Vec<u32>,
    /// µs runnable but waiting for a CPU.
    wait_us: Vec<u32>,
    /// Times scheduled onto a CPU (a wake-up or a preemption ended each).
    scheduled: Vec<u32>,
}

/// The counters scraped every [`SCRAPE_EVERY`]: at each scrape (ms after the window's start), each
/// series' increase since the scrape before (null: not had).
#[derive(Serialize)]
struct Scrapes {
    at_ms: Vec<f64>,
    series: BTreeMap<String, Vec<Option<f64>>>,
}

/// What the samplers cost and how well they kept their schedule.
#[derive(Serialize)]
struct SamplerFigures {
    proc_ticks: usize,
    late_ticks: u64,
    worst_late_ms: f64,
    /// The sampler threads' CPU over the window, % of a core.
    proc_cpu_percent: f64,
    scrape_cpu_percent: f64,
}

/// The nearest-rank quantile `q` of sorted values.
fn quantile(sorted: &[u64], q: f64) -> Option<f64> {
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n.max(1));
    sorted.get(rank - 1).map(|&us| us as f64 / 1000.0)
}

/// The bucket of a time on the tool's clock (µs), counted from `start_us`.
fn bucket_of(at_us: u64, start_us: u64) -> usize {
    (at_us.saturating_sub(start_us) / BUCKET.as_micros() as u64) as usize
}

/// Per bucket, the sum of the increases of `value` between consecutive ticks, each put in the bucket of
/// the tick it ends at less half a bucket (a tick on schedule at `start + k × bucket` closes bucket `k − 1`).
fn per_bucket(
    at_us: &[u64],
    start_us: u64,
    buckets: usize,
    mut value: impl FnMut(usize) -> Option<u64>,
) -> Vec<u64> {
    let mut out = vec![0; buckets];
    let half = BUCKET.as_micros() as u64 / 2;
    let mut last: Option<u64> = None;
    for (i, &at) in at_us.iter().enumerate() {
        let now = value(i);
        if let (Some(before), Some(now)) = (last, now) {
            let bucket = bucket_of(at.saturating_sub(half), start_us);
            if let Some(slot) = out.get_mut(bucket) {
                *slot += now.saturating_sub(before);
            }
        }
        if now.is_some() {
            last = now;
        }
    }
    out
}

/// Per bucket, a value read at the tick that falls in it (the last one, if two do; `None`: no tick).
fn at_ticks<T>(
    at_us: &[u64],
    start_us: u64,
    buckets: usize,
    value: impl Fn(usize) -> Option<T>,
) -> Vec<Option<T>> {
    let mut out: Vec<Option<T>> = (0..buckets).map(|_| None).collect();
    for (i, &at) in at_us.iter().enumerate() {
        if let Some(slot) = out.get_mut(bucket_of(at, start_us)) {
            *slot = value(i);
        }
    }
    out
}

impl WindowTimeline {
    fn of(recorded: Recorded, rate: f64, round: u32) -> Self {
        let Recorded {
            start_us,
            start_unix_s,
            first_seq,
            sent,
            arrived,
            lost,
            procs,
            scrapes,
        } = recorded;
        let end_us = procs
            .at_us
            .last()
            .copied()
            .into_iter()
            .chain(arrived.iter().map(|&(_, at)| at))
            .max()
            .unwrap_or(start_us);
        let buckets = bucket_of(end_us, start_us) + 1;
        let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); buckets];
        let mut received = vec![0u32; buckets];
        for &(stamp, at) in &arrived {
            if let Some(bucket) = latencies.get_mut(bucket_of(stamp, start_us)) {
                bucket.push(at.saturating_sub(stamp));
            }
            if let Some(count) = received.get_mut(bucket_of(at, start_us)) {
                *count += 1;
            }
        }
        let machine = |field: fn(MachineCpu) -> u64| {
            per_bucket(&procs.at_us, start_us, buckets, |i| {
                procs.values[i].machine.map(field)
            })
            .into_iter()
            .map(|ticks| ticks * MS_PER_TICK)
            .collect()
        };
        let runnable = at_ticks(&procs.at_us, start_us, buckets, |i| {
            procs.values[i].runnable
        });
        let sampler_late_us = at_ticks(&procs.at_us, start_us, buckets, |i| Some(procs.late_us[i]));
        let mut columns = Buckets {
            received,
            heartbeats: per_bucket(&procs.at_us, start_us, buckets, |i| {
                Some(procs.values[i].heartbeats)
            }),
            runnable,
            sampler_late_us,
            machine_busy_ms: machine(|cpu| cpu.busy),
            machine_steal_ms: machine(|cpu| cpu.steal),
            ..Buckets::default()
        };
        for mut bucket in latencies {
            bucket.sort_unstable();
            columns.published.push(bucket.len() as u32);
            columns.p50_ms.push(quantile(&bucket, 0.5));
            columns.p99_ms.push(quantile(&bucket, 0.99));
            columns.max_ms.push(quantile(&bucket, 1.0));
            let over = |us: u64| bucket.iter().filter(|&&l| l > us).count() as u32;
            columns.over_1ms.push(over(OVER_P99_TARGET_US));
            columns.over_3ms.push(over(OVER_P999_TARGET_US));
        }
        let threads = thread_series(&procs, start_us, buckets);
        let wall_ns = end_us.saturating_sub(start_us).max(1) as f64 * 1000.0;
        let cpu_of = |name: &str| {
            let run_us: u64 = threads
                .iter()
                .filter(|t| t.process == Process::LoadTool && t.name == name)
                .flat_map(|t| t.run_us.iter().map(|&us| u64::from(us)))
                .sum();
            100.0 * run_us as f64 * 1000.0 / wall_ns
        };
        let late = LATE.as_micros() as u64;
        let sampler = SamplerFigures {
            proc_ticks: procs.at_us.len(),
            late_ticks: procs.late_us.iter().filter(|&&us| us >= late).count() as u64,
            worst_late_ms: procs.late_us.iter().copied().max().unwrap_or(0) as f64 / 1000.0,
            proc_cpu_percent: cpu_of(PROC_THREAD),
            scrape_cpu_percent: cpu_of(SCRAPE_THREAD),
        };
        Self {
            rate_msgs_per_sec: rate,
            round,
            start_us,
            start_unix_s,
            first_seq,
            sent,
            lost,
            buckets: columns,
            threads,
            scrapes: Scrapes::of(&scrapes, start_us),
            sampler,
        }
    }
}

/// Every thread's series, those that never ran left out, in the order server, nats-server, load tool,
/// other targets.
fn thread_series(procs: &Ticks<ProcTick>, start_us: u64, buckets: usize) -> Vec<ThreadSeries> {
    let mut ids: Vec<&Arc<ThreadId>> = procs
        .values
        .iter()
        .flat_map(|tick| tick.threads.iter().map(|r| &r.thread))
        .collect();
    ids.sort();
    ids.dedup();
    let column = |thread: &Arc<ThreadId>, field: usize| {
        per_bucket(&procs.at_us, start_us, buckets, |i| {
            procs.values[i]
                .threads
                .iter()
                .find(|r| Arc::ptr_eq(&r.thread, thread))
                .map(|r| r.values[field])
        })
    };
    let micros = |ns: Vec<u64>| ns.into_iter().map(|ns| (ns / 1000) as u32).collect();
    let count = |n: Vec<u64>| n.into_iter().map(|n| n as u32).collect();
    ids.into_iter()
        .map(|thread| ThreadSeries {
            process: thread.process,
            tid: thread.tid,
            name: thread.name.clone(),
            run_us: micros(column(thread, 0)),
            wait_us: micros(column(thread, 1)),
            scheduled: count(column(thread, 2)),
        })
        .filter(|series| series.run_us.iter().any(|&us| us > 0))
        .collect()
}

impl Scrapes {
    fn of(scrapes: &Ticks<Scrape>, start_us: u64) -> Self {
        let mut series = BTreeMap::new();
        let names = GATEWAY_SERIES
            .iter()
            .map(|name| (*name).to_owned())
            .chain(VARZ_COUNTERS.iter().map(|key| format!("varz.{key}")));
        for (i, name) in names.enumerate() {
            let value = |tick: &Scrape| {
                if i < GATEWAY_SERIES.len() {
                    tick.gateway[i]
                } else {
                    tick.varz[i - GATEWAY_SERIES.len()]
                }
            };
            if scrapes.values.iter().all(|tick| value(tick).is_none()) {
                continue;
            }
            let increases = std::iter::once(None)
                .chain(scrapes.values.windows(2).map(|pair| {
                    let (before, after) = (value(&pair[0])?, value(&pair[1])?);
                    Some(after - before)
                }))
                .collect();
            series.insert(name, increases);
        }
        Self {
            at_ms: scrapes
                .at_us
                .iter()
                .map(|&at| at.saturating_sub(start_us) as f64 / 1000.0)
                .collect(),
            series,
        }
    }
}

/// The message log's capacity for windows of `secs` at the highest of `rates`.
pub(crate) fn capacity(rates: &[f64], secs: f64) -> usize {
    let most = rates.iter().copied().fold(0.0, f64::max);
    (most * secs).round() as usize + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_its_window_only() {
        let log = MessageLog::new(4);
        log.arm(10, 3).unwrap();
        log.received(9, 1, 2);
        log.received(10, 5, 9);
        log.received(12, 6, 8);
        log.received(13, 7, 9);
        assert_eq!(log.read(), (vec![(5, 9), (6, 8)], 1));
        assert!(log.arm(0, 5).is_err());
    }

    #[test]
    fn increases_go_to_the_bucket_a_tick_closes() {
        let bucket = BUCKET.as_micros() as u64;
        // Ticks at 0, 1, 2, 3 buckets (a little late), the counter at 0, 5, 5, 7.
        let at = [100, bucket + 300, 2 * bucket + 50, 3 * bucket + 900];
        let values = [0, 5, 5, 7];
        assert_eq!(per_bucket(&at, 0, 4, |i| Some(values[i])), [5, 0, 2, 0]);
        // A reading missing at a tick: the increase is counted at the next one.
        let gap = [Some(0), None, Some(4), Some(4)];
        assert_eq!(per_bucket(&at, 0, 4, |i| gap[i]), [0, 4, 0, 0]);
    }

    #[test]
    fn the_machine_is_read_from_proc_stat_and_loadavg() {
        let stat = "cpu  100 5 20 900 7 1 2 3 0 0\ncpu0 50 2 10 450 3 0 1 1 0 0\n";
        let cpu = MachineCpu::parse(stat).unwrap();
        assert_eq!((cpu.busy, cpu.steal), (128, 3));
        assert!(MachineCpu::parse("cpu  1 2 3\n").is_none());
        assert_eq!(runnable_in("2.91 2.81 3.29 3/250 12345\n"), Some(3));
        assert_eq!(runnable_in("2.91 2.81"), None);
    }

    #[test]
    fn a_reading_at_a_tick_goes_to_the_tick_s_bucket() {
        let bucket = BUCKET.as_micros() as u64;
        let at = [0, bucket + 10, 3 * bucket + 20];
        assert_eq!(
            at_ticks(&at, 0, 4, |i| Some(i * 10)),
            [Some(0), Some(10), None, Some(20)]
        );
    }

    #[test]
    fn quantiles_are_nearest_rank_in_ms() {
        let sorted: Vec<u64> = (1..=50).map(|i| i * 100).collect();
        assert_eq!(quantile(&sorted, 0.5), Some(2.5));
        assert_eq!(quantile(&sorted, 0.99), Some(5.0));
        assert_eq!(quantile(&[], 0.99), None);
    }

    #[test]
    fn a_series_is_read_by_its_whole_name() {
        let body = "a_total 3\na_total{x=\"1\"} 4\nab_total 5\n";
        assert_eq!(series_value(body, "a_total"), Some(3.0));
        assert_eq!(series_value(body, "a_total{x=\"1\"}"), Some(4.0));
        assert_eq!(series_value(body, "b_total"), None);
    }

    #[test]
    fn each_target_has_its_own_file() {
        assert_eq!(
            path_of(Path::new("target/bench/timeline.json"), Kind::GatewayB),
            Path::new("target/bench/timeline-gateway-b.json")
        );
    }
}
