//! Process-wide counters and gauges, rendered in the Prometheus text format for `GET /metrics`.
//!
//! Every label set is fixed at compile time (topic kind, drop reason, auth failure reason), so label
//! cardinality is bounded: no user id or topic name ever becomes a label.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Why an ingress message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressDrop {
    BadSubject,
    TooLarge,
    NotJson,
    BadEvent,
    BadPayload,
    NoSubscribers,
}

impl IngressDrop {
    const ALL: [Self; 6] = [
        Self::BadSubject,
        Self::TooLarge,
        Self::NotJson,
        Self::BadEvent,
        Self::BadPayload,
        Self::NoSubscribers,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::BadSubject => "bad_subject",
            Self::TooLarge => "too_large",
            Self::NotJson => "not_json",
            Self::BadEvent => "bad_event",
            Self::BadPayload => "bad_payload",
            Self::NoSubscribers => "no_subscribers",
        }
    }
}

const AUTH_REASONS: [&str; 8] = [
    "malformed",
    "bad_signature",
    "wrong_algorithm",
    "expired",
    "not_yet_valid",
    "missing_claim",
    "bad_subject",
    "revoked",
];

const TOPIC_KINDS: [&str; 3] = ["public", "role", "user"];

/// Close codes the gateway sends, plus 0 for "the client closed or the connection dropped".
const CLOSE_CODES: [u16; 13] = [
    0, 1000, 1001, 1003, 1007, 1008, 1009, 4000, 4001, 4401, 4402, 4403, 1011,
];

/// Events counted by name; anything else is counted as `other` (label values stay few).
const KNOWN_EVENTS: [&str; 7] = [
    "announcement",
    "permissionsChanged",
    "reauthenticate",
    "logout",
    "newMessage",
    "refreshMentions",
    "disconnect",
];

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A Prometheus histogram of durations with fixed buckets, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|bound| secs <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            sample(
                out,
                &format!("{name}_bucket"),
                &format!("le=\"{bound}\""),
                cumulative,
            );
        }
        let count = self.count();
        sample(out, &format!("{name}_bucket"), "le=\"+Inf\"", count);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        sample(out, &format!("{name}_sum"), "", sum);
        sample(out, &format!("{name}_count"), "", count);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_anonymous: AtomicI64,
    pub connections_authenticated: AtomicI64,
    pub connections_opened: AtomicU64,
    pub upgrades_refused_vsn: AtomicU64,
    pub upgrades_refused_origin: AtomicU64,
    pub upgrades_refused_limit: AtomicU64,
    pub pushes_rate_limited: AtomicU64,
    auth_failures: [AtomicU64; AUTH_REASONS.len()],
    joins: [AtomicU64; TOPIC_KINDS.len()],
    pub joins_refused: AtomicU64,
    pub nats_messages: AtomicU64,
    ingress_drops: [AtomicU64; IngressDrop::ALL.len()],
    pub frames_out: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub invalid_client_frames: AtomicU64,
    pub is_online_queries: AtomicU64,
    closes: [AtomicU64; CLOSE_CODES.len()],
    nats_by_event: [AtomicU64; KNOWN_EVENTS.len() + 1],
    /// NATS receive → socket write, observed on the first frame of each write batch.
    pub fanout_latency: Histogram,
    /// `is_online` frame decoded → reply written.
    pub is_online_latency: Histogram,
    pub nats_connected: AtomicI64,
    pub nats_reconnects: AtomicU64,
    pub presence_local_users: AtomicI64,
    pub presence_online_users: AtomicI64,
    pub presence_write_errors: AtomicU64,
    delivery_gaps_filled: AtomicU64,
    delivery_caught_up: AtomicU64,
    delivery_replayed: AtomicU64,
    delivery_recoveries: [AtomicU64; RECOVERY_OUTCOMES.len()],
    delivery_lag_micros: AtomicI64,
}

/// Outcomes of a join with `since`: recovered, or the reason it was not.
const RECOVERY_OUTCOMES: [&str; 7] = [
    "recovered",
    "malformed",
    "other_stream",
    "from_the_future",
    "expired",
    "trimmed",
    "too_many",
];

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn auth_failure(&self, reason: &str) {
        if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
            inc(&self.auth_failures[i]);
        }
    }

    pub fn join(&self, kind: &str) {
        if let Some(i) = TOPIC_KINDS.iter().position(|k| *k == kind) {
            inc(&self.joins[i]);
        }
    }

    pub fn ingress_drop(&self, reason: IngressDrop) {
        // `ALL` lists every variant, so the position always exists.
        let i = IngressDrop::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every drop reason is listed");
        inc(&self.ingress_drops[i]);
    }

    pub fn ingress_drops(&self, reason: IngressDrop) -> u64 {
        let i = IngressDrop::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every drop reason is listed");
        self.ingress_drops[i].load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    /// Counts a socket closed with `code` (0: by the client, or the connection dropped).
    pub fn close(&self, code: u16) {
        let i = CLOSE_CODES.iter().position(|c| *c == code).unwrap_or(0);
        inc(&self.closes[i]);
    }

    /// Counts an ingress message by its event name.
    pub fn nats_event(&self, event: &str) {
        let i = KNOWN_EVENTS
            .iter()
            .position(|e| *e == event)
            .unwrap_or(KNOWN_EVENTS.len());
        inc(&self.nats_by_event[i]);
    }

    /// A gap in a topic's live events was read back from the event stream.
    pub fn delivery_gap_filled(&self) {
        inc(&self.delivery_gaps_filled);
    }

    /// Events delivered from the event stream rather than live (gap fills and catch-ups).
    pub fn delivery_caught_up(&self, events: usize) {
        self.delivery_caught_up
            .fetch_add(events as u64, Ordering::Relaxed);
    }

    /// A recovery replayed `events` events.
    pub fn delivery_replay(&self, events: usize) {
        self.delivery_replayed
            .fetch_add(events as u64, Ordering::Relaxed);
    }

    /// A join with `since` ended with `outcome` (see [`RECOVERY_OUTCOMES`]).
    pub fn delivery_recovery(&self, outcome: &str) {
        if let Some(i) = RECOVERY_OUTCOMES.iter().position(|o| *o == outcome) {
            inc(&self.delivery_recoveries[i]);
        }
    }

    /// Time from the stream storing an event to its copy reaching this instance.
    pub fn delivery_lag(&self, stored: &std::time::SystemTime) {
        let lag = stored.elapsed().unwrap_or_default();
        self.delivery_lag_micros.store(
            i64::try_from(lag.as_micros()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let u = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let i = |g: &AtomicI64| g.load(Ordering::Relaxed);

        header(
            &mut out,
            "epoch_gateway_connections",
            "gauge",
            "Open WebSocket connections.",
        );
        sample(
            &mut out,
            "epoch_gateway_connections",
            "kind=\"anonymous\"",
            i(&self.connections_anonymous),
        );
        sample(
            &mut out,
            "epoch_gateway_connections",
            "kind=\"authenticated\"",
            i(&self.connections_authenticated),
        );
        counter(
            &mut out,
            "epoch_gateway_connections_opened_total",
            "WebSocket connections accepted.",
            u(&self.connections_opened),
        );
        counter(
            &mut out,
            "epoch_gateway_upgrades_refused_vsn_total",
            "Upgrades refused for an unsupported protocol version.",
            u(&self.upgrades_refused_vsn),
        );
        counter(
            &mut out,
            "epoch_gateway_upgrades_refused_origin_total",
            "Upgrades refused for an Origin outside the allow-list.",
            u(&self.upgrades_refused_origin),
        );
        counter(
            &mut out,
            "epoch_gateway_upgrades_refused_limit_total",
            "Upgrades refused by the connection limit or the new-connection rate (503).",
            u(&self.upgrades_refused_limit),
        );
        counter(
            &mut out,
            "epoch_gateway_pushes_rate_limited_total",
            "Client frames refused by the per-socket rate limit.",
            u(&self.pushes_rate_limited),
        );

        header(
            &mut out,
            "epoch_gateway_auth_failures_total",
            "counter",
            "Upgrades refused for an invalid token, by reason.",
        );
        for (reason, c) in AUTH_REASONS.iter().zip(&self.auth_failures) {
            sample(
                &mut out,
                "epoch_gateway_auth_failures_total",
                &format!("reason=\"{reason}\""),
                u(c),
            );
        }
        header(
            &mut out,
            "epoch_gateway_joins_total",
            "counter",
            "Successful channel joins, by topic kind.",
        );
        for (kind, c) in TOPIC_KINDS.iter().zip(&self.joins) {
            sample(
                &mut out,
                "epoch_gateway_joins_total",
                &format!("kind=\"{kind}\""),
                u(c),
            );
        }
        counter(
            &mut out,
            "epoch_gateway_joins_refused_total",
            "Channel joins refused.",
            u(&self.joins_refused),
        );

        counter(
            &mut out,
            "epoch_gateway_nats_messages_total",
            "Messages received on the ingress subjects.",
            u(&self.nats_messages),
        );
        header(
            &mut out,
            "epoch_gateway_ingress_drops_total",
            "counter",
            "Ingress messages not delivered, by reason.",
        );
        for reason in IngressDrop::ALL {
            sample(
                &mut out,
                "epoch_gateway_ingress_drops_total",
                &format!("reason=\"{}\"", reason.label()),
                self.ingress_drops(reason),
            );
        }
        counter(
            &mut out,
            "epoch_gateway_frames_out_total",
            "Frames written to sockets.",
            u(&self.frames_out),
        );
        counter(
            &mut out,
            "epoch_gateway_slow_consumer_closes_total",
            "Sockets closed because their outbound queue overflowed.",
            u(&self.slow_consumers),
        );
        counter(
            &mut out,
            "epoch_gateway_invalid_client_frames_total",
            "Client frames that were not Phoenix V2 messages.",
            u(&self.invalid_client_frames),
        );
        counter(
            &mut out,
            "epoch_gateway_is_online_queries_total",
            "is_online pushes answered.",
            u(&self.is_online_queries),
        );

        header(
            &mut out,
            "epoch_gateway_closes_total",
            "counter",
            "Sockets closed, by close code (0: by the client or dropped).",
        );
        for (code, c) in CLOSE_CODES.iter().zip(&self.closes) {
            sample(
                &mut out,
                "epoch_gateway_closes_total",
                &format!("code=\"{code}\""),
                u(c),
            );
        }
        header(
            &mut out,
            "epoch_gateway_nats_events_total",
            "counter",
            "Valid ingress messages, by event (other names as `other`).",
        );
        for (event, c) in KNOWN_EVENTS
            .iter()
            .chain(["other"].iter())
            .zip(&self.nats_by_event)
        {
            sample(
                &mut out,
                "epoch_gateway_nats_events_total",
                &format!("event=\"{event}\""),
                u(c),
            );
        }
        self.fanout_latency.render(
            &mut out,
            "epoch_gateway_fanout_latency_seconds",
            "NATS receive to socket write, for the first frame of each write batch.",
        );
        self.is_online_latency.render(
            &mut out,
            "epoch_gateway_is_online_latency_seconds",
            "is_online frame received to reply written.",
        );
        header(
            &mut out,
            "epoch_gateway_nats_connected",
            "gauge",
            "1 while connected to NATS.",
        );
        sample(
            &mut out,
            "epoch_gateway_nats_connected",
            "",
            i(&self.nats_connected),
        );
        counter(
            &mut out,
            "epoch_gateway_nats_reconnects_total",
            "Reconnections to NATS after a disconnect.",
            u(&self.nats_reconnects),
        );
        header(
            &mut out,
            "epoch_gateway_presence_local_users",
            "gauge",
            "Users with a presence record from this instance.",
        );
        sample(
            &mut out,
            "epoch_gateway_presence_local_users",
            "",
            i(&self.presence_local_users),
        );
        header(
            &mut out,
            "epoch_gateway_presence_online_users",
            "gauge",
            "Users online cluster-wide, as seen by this instance.",
        );
        sample(
            &mut out,
            "epoch_gateway_presence_online_users",
            "",
            i(&self.presence_online_users),
        );
        counter(
            &mut out,
            "epoch_gateway_presence_write_errors_total",
            "Presence records that could not be written.",
            u(&self.presence_write_errors),
        );
        counter(
            &mut out,
            "epoch_gateway_delivery_gaps_filled_total",
            "Gaps in a topic's live events read back from the event stream.",
            u(&self.delivery_gaps_filled),
        );
        counter(
            &mut out,
            "epoch_gateway_delivery_caught_up_events_total",
            "Events delivered from the event stream after a gap, a reconnect or a leader election.",
            u(&self.delivery_caught_up),
        );
        counter(
            &mut out,
            "epoch_gateway_delivery_replayed_events_total",
            "Events replayed to channels joined with since.",
            u(&self.delivery_replayed),
        );
        header(
            &mut out,
            "epoch_gateway_delivery_recoveries_total",
            "counter",
            "Joins with since, by outcome.",
        );
        for (outcome, c) in RECOVERY_OUTCOMES.iter().zip(&self.delivery_recoveries) {
            sample(
                &mut out,
                "epoch_gateway_delivery_recoveries_total",
                &format!("outcome=\"{outcome}\""),
                u(c),
            );
        }
        header(
            &mut out,
            "epoch_gateway_delivery_lag_seconds",
            "gauge",
            "Time from the event stream storing the latest event to its copy arriving here.",
        );
        sample(
            &mut out,
            "epoch_gateway_delivery_lag_seconds",
            "",
            i(&self.delivery_lag_micros) as f64 / 1e6,
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    sample(out, name, "", value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters() {
        let metrics = Metrics::new();
        metrics.auth_failure("expired");
        metrics.ingress_drop(IngressDrop::NotJson);
        metrics.join("role");
        let text = metrics.render();
        assert!(text.contains("epoch_gateway_auth_failures_total{reason=\"expired\"} 1\n"));
        assert!(text.contains("epoch_gateway_ingress_drops_total{reason=\"not_json\"} 1\n"));
        assert!(text.contains("epoch_gateway_joins_total{kind=\"role\"} 1\n"));
        assert!(text.contains("# TYPE epoch_gateway_connections gauge\n"));
    }
}
