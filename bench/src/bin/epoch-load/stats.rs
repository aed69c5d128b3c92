//! The figures: what every socket task records (deliveries, their latency, replies, closes, and per socket
//! the messages it received), the stamp the publisher writes into every message to make that possible,
//! percentiles, and the CPU, memory, file descriptors and threads of processes, read from `/proc`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::timeline::MessageLog;

/// Slots of per-message "last socket reached" figures (messages are numbered; a slot per number).
const SEQ_SLOTS: usize = 1 << 16;
/// `/proc/<pid>/stat` CPU times are in clock ticks of `USER_HZ`, 100 on Linux.
pub(crate) const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Microseconds since the tool started: the timestamps in payloads and the receive times.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

pub(crate) fn now_us() -> u64 {
    EPOCH.elapsed().as_micros() as u64
}

/// Starts the clock of [`now_us`] (before any socket or publisher reads it).
pub(crate) fn start_clock() {
    LazyLock::force(&EPOCH);
}

/// The body of message `seq`: an `announcement` stamped with its send time `"t"` (µs, [`now_us`]) and its
/// number `"s"`, which every socket finds in the frame or NATS message it receives.
pub(crate) fn stamped_body(seq: u64) -> String {
    format!(
        "{{\"event\":\"announcement\",\"payload\":{{\"t\":{},\"s\":{seq}}}}}",
        now_us()
    )
}

// ---------------------------------------------------------------------------------------------------------
// Latency

/// A log-linear histogram of microseconds, lock-free: exact below 256 µs, then 64 sub-buckets per octave
/// (under 1.6 % error).
pub(crate) struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

/// Microseconds below this have a bucket each.
const LINEAR: u64 = 256;
/// log2 of the sub-buckets per octave above [`LINEAR`].
const SUB_BITS: u32 = 6;
/// Octaves above [`LINEAR`] (up to 2^64 µs).
const OCTAVES: usize = 64;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub(crate) fn new() -> Self {
        Self {
            buckets: (0..(LINEAR as usize + OCTAVES * (1 << SUB_BITS)))
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

    pub(crate) fn record(&self, us: u64) {
        let i = Self::index(us).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

/// Percentiles (in ms) of latency counts.
#[derive(Serialize, Clone, Copy, Default, Debug)]
pub(crate) struct Latency {
    pub(crate) samples: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

/// The counts recorded between two snapshots of a [`LatencyHistogram`].
pub(crate) fn counts_between(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Percentiles of the counts recorded between two snapshots.
pub(crate) fn latency(before: &[u64], after: &[u64]) -> Latency {
    percentiles(&counts_between(before, after))
}

/// Percentiles (in ms) of a histogram's counts (NaN when there are none).
pub(crate) fn percentiles(counts: &[u64]) -> Latency {
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
                return LatencyHistogram::value(i) / 1000.0;
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

/// Latency counts of one condition pooled over the rounds, with each window's p99 kept for the spread.
#[derive(Default)]
pub(crate) struct Pooled {
    counts: Vec<u64>,
    pub(crate) window_p99_ms: Vec<f64>,
}

impl Pooled {
    pub(crate) fn add(&mut self, counts: &[u64]) {
        self.counts.resize(counts.len(), 0);
        for (total, count) in self.counts.iter_mut().zip(counts) {
            *total += count;
        }
        self.window_p99_ms.push(percentiles(counts).p99_ms);
    }

    pub(crate) fn latency(&self) -> Latency {
        percentiles(&self.counts)
    }
}

pub(crate) fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The middle value (the mean of the two middle ones for an even count; NaN for none).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}

// ---------------------------------------------------------------------------------------------------------
// What the sockets record

/// What every socket task reports into.
pub(crate) struct Stats {
    pub(crate) delivered: AtomicU64,
    pub(crate) latency: LatencyHistogram,
    /// Per message number: the latest arrival (µs after publishing) and how many sockets had it.
    last_reached: Vec<AtomicU64>,
    reached: Vec<AtomicU32>,
    /// Per socket (by index): one more than the highest message number it received, and how many
    /// messages numbered from `counting_from` on it received, each once and in order (a number at or
    /// below one it already had is a duplicate or out of order and is not counted).
    socket_next: Vec<AtomicU64>,
    socket_counted: Vec<AtomicU64>,
    /// Messages numbered below this are not counted per socket: late arrivals of an earlier step.
    counting_from: AtomicU64,
    /// Sockets closed by the server, or broken, while held; by close code (0: no close frame).
    closes: Mutex<BTreeMap<u16, u64>>,
    /// is-online: microseconds between two client frames of one socket (0: none), users asked about
    /// (`1..=query_users`), and the round trips of the replies (answers, heartbeat replies, `PONG`s).
    pub(crate) query_period_us: tokio::sync::watch::Sender<u64>,
    pub(crate) query_users: AtomicU64,
    /// Send the control frame instead of `is_online` queries: a heartbeat to the gateway, `PING` to
    /// nats-server (a client frame and its reply, no presence lookup).
    pub(crate) query_heartbeats: AtomicBool,
    pub(crate) queries: AtomicU64,
    pub(crate) query_rtt: LatencyHistogram,
    pub(crate) query_wrong: AtomicU64,
    /// Heartbeats the sockets sent (the per-user timeline counts them per 10 ms).
    pub(crate) heartbeats: AtomicU64,
    /// Each message's stamp and arrival, while a per-user timeline records (`--timeline`).
    pub(crate) message_log: OnceLock<MessageLog>,
}

impl Stats {
    /// Figures of `sockets` sockets, numbered `0..sockets`.
    pub(crate) fn new(sockets: u64) -> Self {
        let per_socket = || (0..sockets).map(|_| AtomicU64::new(0)).collect();
        Self {
            delivered: AtomicU64::new(0),
            latency: LatencyHistogram::new(),
            last_reached: (0..SEQ_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            reached: (0..SEQ_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            socket_next: per_socket(),
            socket_counted: per_socket(),
            counting_from: AtomicU64::new(0),
            closes: Mutex::new(BTreeMap::new()),
            query_period_us: tokio::sync::watch::Sender::new(0),
            query_users: AtomicU64::new(1),
            query_heartbeats: AtomicBool::new(false),
            queries: AtomicU64::new(0),
            query_rtt: LatencyHistogram::new(),
            query_wrong: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            message_log: OnceLock::new(),
        }
    }

    /// A delivered frame or NATS message body on socket `socket`: times it by its `"t":` stamp
    /// ([`stamped_body`]) and counts its number `"s"` for the socket; anything without a stamp is not one
    /// of the publisher's messages.
    pub(crate) fn on_delivery(&self, socket: u64, body: &[u8]) {
        let Some(t) = number_after(body, b"\"t\":") else {
            return;
        };
        let now = now_us();
        let us = now.saturating_sub(t);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.latency.record(us);
        let Some(seq) = number_after(body, b"\"s\":") else {
            return;
        };
        if let Some(log) = self.message_log.get() {
            log.received(seq, t, now);
        }
        let slot = seq as usize % SEQ_SLOTS;
        self.last_reached[slot].fetch_max(us, Ordering::Relaxed);
        self.reached[slot].fetch_add(1, Ordering::Relaxed);
        let socket = socket as usize;
        let (Some(next), Some(counted)) = (
            self.socket_next.get(socket),
            self.socket_counted.get(socket),
        ) else {
            return;
        };
        // Only the socket's own task writes its slots.
        let new = next.fetch_max(seq + 1, Ordering::Relaxed) <= seq;
        if new && seq >= self.counting_from.load(Ordering::Relaxed) {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// From now on, only messages numbered `first` or more are counted per socket.
    pub(crate) fn count_from(&self, first: u64) {
        self.counting_from.store(first, Ordering::Relaxed);
    }

    /// The messages each socket received, each once and in order, since the count started: two snapshots
    /// around a step give what each socket received of it.
    pub(crate) fn socket_counts(&self) -> Vec<u64> {
        self.socket_counted
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The reply to a client frame sent at `sent_us` ([`now_us`]).
    pub(crate) fn on_reply(&self, sent_us: u64) {
        self.query_rtt.record(now_us().saturating_sub(sent_us));
    }

    /// The latest arrival of message `seq` (µs after it was published) and how many sockets had it.
    pub(crate) fn reached(&self, seq: u64) -> (u64, u64) {
        let slot = seq as usize % SEQ_SLOTS;
        (
            self.last_reached[slot].load(Ordering::Relaxed),
            u64::from(self.reached[slot].load(Ordering::Relaxed)),
        )
    }

    pub(crate) fn closed(&self, code: u16) {
        *self
            .closes
            .lock()
            .expect("no panics under this lock")
            .entry(code)
            .or_default() += 1;
    }

    pub(crate) fn close_count(&self) -> u64 {
        self.closes_by_code().values().sum()
    }

    pub(crate) fn closes_by_code(&self) -> BTreeMap<u16, u64> {
        self.closes
            .lock()
            .expect("no panics under this lock")
            .clone()
    }
}

/// The decimal number after the first `key` in `body` (the payloads and refs are written by this tool).
pub(crate) fn number_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    leading_number(&body[at..])
}

/// The decimal number `bytes` starts with.
pub(crate) fn leading_number(bytes: &[u8]) -> Option<u64> {
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
// Processes

/// RSS and CPU time of a process, from `/proc`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProcSample {
    pub(crate) at: Instant,
    pub(crate) rss: u64,
    pub(crate) cpu_ticks: u64,
}

pub(crate) fn sample(pid: u32) -> Result<ProcSample> {
    let rss = epoch_testkit::vm_rss(pid)?;
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

/// This tool's own process.
pub(crate) fn sample_self() -> Result<ProcSample> {
    sample(std::process::id())
}

/// CPU use between two samples, in percent of one core.
pub(crate) fn cpu_percent(a: ProcSample, b: ProcSample) -> f64 {
    let secs = (b.cpu_ticks - a.cpu_ticks) as f64 / CLOCK_TICKS_PER_SEC;
    100.0 * secs / b.at.duration_since(a.at).as_secs_f64()
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Open file descriptors and threads of a process, from `/proc`.
pub(crate) fn fds_and_threads(pid: u32) -> Result<(u64, u64)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_bucket_holds_its_values_within_two_percent() {
        for us in [0, 1, 255, 256, 257, 1_000, 12_345, 1_000_000, 60_000_000] {
            let middle = LatencyHistogram::value(LatencyHistogram::index(us));
            let error = (middle - us as f64).abs() / (us as f64).max(1.0);
            assert!(error < 0.02, "{us} µs reads back as {middle}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let histogram = LatencyHistogram::new();
        let before = histogram.snapshot();
        for us in 1..=100 {
            histogram.record(us);
        }
        let latency = latency(&before, &histogram.snapshot());
        assert_eq!(latency.samples, 100);
        assert_eq!(latency.p50_ms, 0.050);
        assert_eq!(latency.p99_ms, 0.099);
        assert_eq!(latency.max_ms, 0.100);
        assert!(percentiles(&[0; 4]).p99_ms.is_nan());
    }

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn a_delivery_is_timed_by_its_stamp() {
        start_clock();
        let stats = Stats::new(1);
        let body = stamped_body(7);
        stats.on_delivery(0, body.as_bytes());
        stats.on_delivery(0, b"{\"event\":\"other\"}");
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 1);
        assert_eq!(stats.reached(7).1, 1);
        assert_eq!(number_after(b"[\"1\",\"q123\"]", b",\"q"), Some(123));
        assert_eq!(leading_number(b"x1"), None);
    }

    #[test]
    fn a_socket_counts_each_message_of_a_step_once() {
        start_clock();
        let stats = Stats::new(2);
        stats.on_delivery(0, stamped_body(3).as_bytes());
        stats.count_from(5);
        let before = stats.socket_counts();
        for seq in [5, 6, 6, 4, 8] {
            stats.on_delivery(0, stamped_body(seq).as_bytes());
        }
        stats.on_delivery(1, stamped_body(5).as_bytes());
        let after = stats.socket_counts();
        // 6 twice counts once; 4 is of an earlier step; 7 never came.
        assert_eq!(counts_between(&before, &after), [3, 1]);
    }
}
