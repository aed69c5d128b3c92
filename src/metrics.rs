//! Process-wide counters, gauges and histograms, rendered in the OpenMetrics text format for `GET /metrics`.
//!
//! Every event has one method on [`Metrics`]; the metrics themselves are `prometheus-client` types in one
//! registry. Every label value is a variant of an enum (topic kind, drop reason, auth failure, close code),
//! and every series exists, at 0, from the start, so label cardinality is bounded (no user id or topic name
//! ever becomes a label) and a rate over a series that has not moved yet is 0, not absent.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use crate::auth::AuthFailure;
use crate::protocol::CloseCode;
use crate::telemetry::{SpanDrop, SpanDrops};
use crate::topic::TopicKind;

/// The `Content-Type` of [`Metrics::render`]'s output, which Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix of every metric name.
const PREFIX: &str = "epoch_gateway";

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The `code` label of a socket the client closed, or whose connection dropped: no close code was sent.
const CLOSED_BY_CLIENT: u16 = 0;

enum_with_all! {
    /// Why an ingress message was not delivered.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum IngressDrop {
        BadSubject,
        TooLarge,
        NotJson,
        BadEvent,
        BadPayload,
        NoSubscribers,
    }
}

impl IngressDrop {
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

enum_with_all! {
    /// Whether a socket authenticated with a token.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum ConnectionKind {
        Anonymous,
        Authenticated,
    }
}

impl ConnectionKind {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Anonymous => "anonymous",
            Self::Authenticated => "authenticated",
        }
    }
}

/// Why an upgrade was refused before its token was looked at (token failures are [`AuthFailure`]s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An unsupported protocol version (403).
    Vsn,
    /// An `Origin` outside the allow-list (403).
    Origin,
    /// The connection limit or the new-connection rate (503).
    Limit,
}

enum_with_all! {
    /// Ingress events counted by name; any other name is counted as `other`, so label values stay few.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum KnownEvent {
        Announcement,
        PermissionsChanged,
        Reauthenticate,
        Logout,
        NewMessage,
        RefreshMentions,
        Disconnect,
        Other,
    }
}

impl KnownEvent {
    pub fn of(event: &str) -> Self {
        Self::ALL
            .iter()
            .copied()
            .find(|known| known.label() == event)
            .unwrap_or(Self::Other)
    }

    pub const fn label(self) -> &'static str {
        match self {
            Self::Announcement => "announcement",
            Self::PermissionsChanged => "permissionsChanged",
            Self::Reauthenticate => "reauthenticate",
            Self::Logout => "logout",
            Self::NewMessage => "newMessage",
            Self::RefreshMentions => "refreshMentions",
            Self::Disconnect => "disconnect",
            Self::Other => "other",
        }
    }
}

enum_with_all! {
    /// How a join with `since` ended: recovered, or why not.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum RecoveryOutcome {
        Recovered,
        Malformed,
        OtherStream,
        FromTheFuture,
        Expired,
        Trimmed,
        TooMany,
    }
}

impl RecoveryOutcome {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Recovered => "recovered",
            Self::Malformed => "malformed",
            Self::OtherStream => "other_stream",
            Self::FromTheFuture => "from_the_future",
            Self::Expired => "expired",
            Self::Trimmed => "trimmed",
            Self::TooMany => "too_many",
        }
    }
}

enum_with_all! {
    /// Why a join was not given the presence feed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum FeedRefusal {
        /// `presence` not a boolean, or asked for on another topic than `user:public`.
        BadRequest,
        /// `presence.feed` is `off`.
        Off,
        /// `presence.feed` is `authenticated` and the socket is anonymous.
        Anonymous,
        /// More users online than `presence.feed_max_users`.
        TooManyUsers,
    }
}

impl FeedRefusal {
    pub const fn label(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Off => "off",
            Self::Anonymous => "anonymous",
            Self::TooManyUsers => "too_many_users",
        }
    }
}

/// Upper bounds of the replay-size histogram's buckets (events per recovery).
const REPLAY_BUCKETS: [f64; 6] = [0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0];

/// Encodes each label enum as its `label()`.
macro_rules! label_values {
    ($($label:ty),+) => {$(
        impl EncodeLabelValue for $label {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
                encoder.write_str(self.label())
            }
        }
    )+};
}

label_values!(
    FeedRefusal,
    SpanDrop,
    RecoveryOutcome,
    IngressDrop,
    ConnectionKind,
    KnownEvent,
    AuthFailure,
    TopicKind
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionLabels {
    kind: ConnectionKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JoinLabels {
    kind: TopicKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthLabels {
    reason: AuthFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: IngressDrop,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RecoveryLabels {
    outcome: RecoveryOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FeedRefusalLabels {
    reason: FeedRefusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    event: KnownEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SpanDropLabels {
    reason: SpanDrop,
}

/// The span drops the telemetry pipeline counts (it runs before, and apart from, this registry), rendered
/// as a counter family with a series per reason.
#[derive(Debug, Clone, Default)]
struct DroppedSpans(SpanDrops);

impl TypedMetric for DroppedSpans {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for DroppedSpans {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        for &reason in SpanDrop::ALL {
            encoder
                .encode_family(&SpanDropLabels { reason })?
                .encode_counter::<NoLabelSet, _, u64>(&self.0.count(reason), None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The number of a [`CloseCode`], or [`CLOSED_BY_CLIENT`]: two close codes may share a number, and then
/// they share a series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CloseLabels {
    code: u16,
}

/// A histogram of durations over [`LATENCY_BUCKETS`], updated with relaxed atomics. It is observed once
/// per write batch of every socket, on every worker thread: prometheus-client's histogram takes a lock per
/// observation, which those threads would contend for. Cloning shares it (the registry holds a clone).
#[derive(Debug, Clone, Default)]
struct LatencyHistogram(std::sync::Arc<LatencyCounts>);

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let counts = &self.0;
        counts.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        counts.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        counts.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        let counts = &self.0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&counts.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let sum = counts.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(
            sum,
            counts.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Every metric of the process, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<ConnectionLabels, Gauge>,
    connections_opened: Counter,
    upgrades_refused_vsn: Counter,
    upgrades_refused_origin: Counter,
    upgrades_refused_limit: Counter,
    pushes_rate_limited: Counter,
    auth_failures: Family<AuthLabels, Counter>,
    joins: Family<JoinLabels, Counter>,
    joins_refused: Counter,
    nats_messages: Counter,
    ingress_drops: Family<DropLabels, Counter>,
    frames_out: Counter,
    slow_consumers: Counter,
    invalid_client_frames: Counter,
    is_online_queries: Counter,
    closes: Family<CloseLabels, Counter>,
    nats_events: Family<EventLabels, Counter>,
    /// NATS receive → socket write, observed on the first frame of each write batch.
    fanout_latency: LatencyHistogram,
    /// `is_online` frame decoded → reply written.
    is_online_latency: LatencyHistogram,
    nats_connected: Gauge,
    nats_reconnects: Counter,
    presence_local_users: Gauge,
    presence_online_users: Gauge,
    presence_write_errors: Counter,
    presence_writes: Counter,
    presence_watch_updates: Counter,
    presence_feed_watchers: Gauge,
    presence_feed_diffs: Counter,
    presence_feed_refusals: Family<FeedRefusalLabels, Counter>,
    delivery_gaps_filled: Counter,
    delivery_caught_up: Counter,
    delivery_replays: Histogram,
    delivery_recoveries: Family<RecoveryLabels, Counter>,
    delivery_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    trace_spans_dropped: DroppedSpans,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A family with a series for each of `labels`.
fn family_of<S, M, L>(labels: &[L], label_set: impl Fn(L) -> S) -> Family<S, M>
where
    S: Clone + Eq + std::hash::Hash,
    M: Default,
    L: Copy,
{
    let family = Family::<S, M>::default();
    for label in labels {
        // Creating the series is the point; the guard is dropped at once.
        drop(family.get_or_create(&label_set(*label)));
    }
    family
}

impl Metrics {
    /// Metrics with span drops of their own (no trace export).
    pub fn new() -> Self {
        Self::with_span_drops(SpanDrops::default())
    }

    /// Metrics that render the span drops of the trace export pipeline.
    pub fn with_span_drops(span_drops: SpanDrops) -> Self {
        let close_codes: Vec<u16> = std::iter::once(CLOSED_BY_CLIENT)
            .chain(CloseCode::ALL.iter().map(|code| code.code()))
            .collect();
        let mut metrics = Self {
            registry: Registry::with_prefix(PREFIX),
            connections: family_of(ConnectionKind::ALL, |kind| ConnectionLabels { kind }),
            connections_opened: Counter::default(),
            upgrades_refused_vsn: Counter::default(),
            upgrades_refused_origin: Counter::default(),
            upgrades_refused_limit: Counter::default(),
            pushes_rate_limited: Counter::default(),
            auth_failures: family_of(AuthFailure::ALL, |reason| AuthLabels { reason }),
            joins: family_of(TopicKind::ALL, |kind| JoinLabels { kind }),
            joins_refused: Counter::default(),
            nats_messages: Counter::default(),
            ingress_drops: family_of(IngressDrop::ALL, |reason| DropLabels { reason }),
            frames_out: Counter::default(),
            slow_consumers: Counter::default(),
            invalid_client_frames: Counter::default(),
            is_online_queries: Counter::default(),
            closes: family_of(&close_codes, |code| CloseLabels { code }),
            nats_events: family_of(KnownEvent::ALL, |event| EventLabels { event }),
            fanout_latency: LatencyHistogram::default(),
            is_online_latency: LatencyHistogram::default(),
            nats_connected: Gauge::default(),
            nats_reconnects: Counter::default(),
            presence_local_users: Gauge::default(),
            presence_online_users: Gauge::default(),
            presence_write_errors: Counter::default(),
            presence_writes: Counter::default(),
            presence_watch_updates: Counter::default(),
            presence_feed_watchers: Gauge::default(),
            presence_feed_diffs: Counter::default(),
            presence_feed_refusals: family_of(FeedRefusal::ALL, |reason| FeedRefusalLabels {
                reason,
            }),
            delivery_gaps_filled: Counter::default(),
            delivery_caught_up: Counter::default(),
            delivery_replays: Histogram::new(REPLAY_BUCKETS),
            delivery_recoveries: family_of(RecoveryOutcome::ALL, |outcome| RecoveryLabels {
                outcome,
            }),
            delivery_lag: Gauge::default(),
            trace_spans_dropped: DroppedSpans(span_drops),
        };
        metrics.register();
        metrics
    }

    /// Registers every metric under its exported name: `PREFIX_` + name (+ `_total` for counters,
    /// + `_seconds` for the histograms). The metrics are shared handles, so the registry sees every update.
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "connections",
            "Open WebSocket connections",
            self.connections.clone(),
        );
        r.register(
            "connections_opened",
            "WebSocket connections accepted",
            self.connections_opened.clone(),
        );
        r.register(
            "upgrades_refused_vsn",
            "Upgrades refused for an unsupported protocol version",
            self.upgrades_refused_vsn.clone(),
        );
        r.register(
            "upgrades_refused_origin",
            "Upgrades refused for an Origin outside the allow-list",
            self.upgrades_refused_origin.clone(),
        );
        r.register(
            "upgrades_refused_limit",
            "Upgrades refused by the connection limit or the new-connection rate (503)",
            self.upgrades_refused_limit.clone(),
        );
        r.register(
            "pushes_rate_limited",
            "Client frames refused by the per-socket rate limit",
            self.pushes_rate_limited.clone(),
        );
        r.register(
            "auth_failures",
            "Upgrades refused for an invalid token, by reason",
            self.auth_failures.clone(),
        );
        r.register(
            "joins",
            "Successful channel joins, by topic kind",
            self.joins.clone(),
        );
        r.register(
            "joins_refused",
            "Channel joins refused",
            self.joins_refused.clone(),
        );
        r.register(
            "nats_messages",
            "Messages received on the ingress subjects",
            self.nats_messages.clone(),
        );
        r.register(
            "ingress_drops",
            "Ingress messages not delivered, by reason",
            self.ingress_drops.clone(),
        );
        r.register(
            "frames_out",
            "Frames written to sockets",
            self.frames_out.clone(),
        );
        r.register(
            "slow_consumer_closes",
            "Sockets closed because their outbound queue overflowed",
            self.slow_consumers.clone(),
        );
        r.register(
            "invalid_client_frames",
            "Client frames that were not Phoenix V2 messages",
            self.invalid_client_frames.clone(),
        );
        r.register(
            "is_online_queries",
            "is_online pushes answered",
            self.is_online_queries.clone(),
        );
        r.register(
            "closes",
            "Sockets closed, by close code (0: by the client or dropped)",
            self.closes.clone(),
        );
        r.register(
            "nats_events",
            "Valid ingress messages, by event (other names as `other`)",
            self.nats_events.clone(),
        );
        r.register_with_unit(
            "fanout_latency",
            "NATS receive to socket write, for the first frame of each write batch",
            Unit::Seconds,
            self.fanout_latency.clone(),
        );
        r.register_with_unit(
            "is_online_latency",
            "is_online frame received to reply written",
            Unit::Seconds,
            self.is_online_latency.clone(),
        );
        r.register(
            "nats_connected",
            "1 while connected to NATS",
            self.nats_connected.clone(),
        );
        r.register(
            "nats_reconnects",
            "Reconnections to NATS after a disconnect",
            self.nats_reconnects.clone(),
        );
        r.register(
            "presence_local_users",
            "Users with a presence record from this instance",
            self.presence_local_users.clone(),
        );
        r.register(
            "presence_online_users",
            "Users online cluster-wide, as seen by this instance",
            self.presence_online_users.clone(),
        );
        r.register(
            "presence_write_errors",
            "Presence records that could not be written",
            self.presence_write_errors.clone(),
        );
        r.register(
            "presence_writes",
            "Presence records sent to the bucket (refreshes, joins and leaves), acknowledged or not",
            self.presence_writes.clone(),
        );
        r.register(
            "presence_watch_updates",
            "Presence bucket updates received by the watch (this instance's own records included)",
            self.presence_watch_updates.clone(),
        );
        r.register(
            "presence_feed_watchers",
            "Sockets watching the presence feed on this instance",
            self.presence_feed_watchers.clone(),
        );
        r.register(
            "presence_feed_diffs",
            "presence_diff frames encoded (each shared by every watcher)",
            self.presence_feed_diffs.clone(),
        );
        r.register(
            "presence_feed_refusals",
            "Joins that asked for the presence feed and were refused, by reason",
            self.presence_feed_refusals.clone(),
        );
        r.register(
            "delivery_gaps_filled",
            "Gaps in a topic's live events read back from the event stream",
            self.delivery_gaps_filled.clone(),
        );
        r.register(
            "delivery_caught_up_events",
            "Events delivered from the event stream after a gap, a reconnect or a leader election",
            self.delivery_caught_up.clone(),
        );
        r.register(
            "delivery_replay_events",
            "Events replayed per join with since",
            self.delivery_replays.clone(),
        );
        r.register(
            "delivery_recoveries",
            "Joins with since, by outcome",
            self.delivery_recoveries.clone(),
        );
        r.register_with_unit(
            "delivery_lag",
            "Time from the event stream storing the latest event to its copy arriving here",
            Unit::Seconds,
            self.delivery_lag.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans not exported, by reason (queue_full: the export queue was full; export_failed: the \
             collector did not take them)",
            self.trace_spans_dropped.clone(),
        );
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8192);
        // Writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding into a String cannot fail");
        text
    }

    /// A socket was accepted.
    pub fn connection_opened(&self, kind: ConnectionKind) {
        self.connections_opened.inc();
        self.connections
            .get_or_create(&ConnectionLabels { kind })
            .inc();
    }

    /// A socket's session ended.
    pub fn connection_closed(&self, kind: ConnectionKind) {
        self.connections
            .get_or_create(&ConnectionLabels { kind })
            .dec();
    }

    pub fn upgrade_refused(&self, refusal: Refusal) {
        match refusal {
            Refusal::Vsn => self.upgrades_refused_vsn.inc(),
            Refusal::Origin => self.upgrades_refused_origin.inc(),
            Refusal::Limit => self.upgrades_refused_limit.inc(),
        };
    }

    /// An upgrade was refused for its token.
    pub fn auth_failed(&self, reason: AuthFailure) {
        self.auth_failures
            .get_or_create(&AuthLabels { reason })
            .inc();
    }

    pub fn push_rate_limited(&self) {
        self.pushes_rate_limited.inc();
    }

    pub fn invalid_client_frame(&self) {
        self.invalid_client_frames.inc();
    }

    pub fn joined(&self, kind: TopicKind) {
        self.joins.get_or_create(&JoinLabels { kind }).inc();
    }

    pub fn join_refused(&self) {
        self.joins_refused.inc();
    }

    pub fn is_online_query(&self) {
        self.is_online_queries.inc();
    }

    /// An `is_online` reply was written `elapsed` after its frame was decoded.
    pub fn is_online_answered(&self, elapsed: Duration) {
        self.is_online_latency.observe(elapsed);
    }

    /// A message arrived on the ingress subjects.
    pub fn nats_message(&self) {
        self.nats_messages.inc();
    }

    pub fn ingress_dropped(&self, reason: IngressDrop) {
        self.ingress_drops
            .get_or_create(&DropLabels { reason })
            .inc();
    }

    /// A valid ingress message, by its event name.
    pub fn nats_event(&self, event: &str) {
        let event = KnownEvent::of(event);
        self.nats_events.get_or_create(&EventLabels { event }).inc();
    }

    pub fn frames_written(&self, count: u64) {
        self.frames_out.inc_by(count);
    }

    /// A write batch was flushed `elapsed` after its first frame's NATS message arrived.
    pub fn fanout_latency(&self, elapsed: Duration) {
        self.fanout_latency.observe(elapsed);
    }

    /// A socket was closed because its outbound queue overflowed.
    pub fn slow_consumer_closed(&self) {
        self.slow_consumers.inc();
    }

    /// The gateway closed a socket with `code`.
    pub fn close_sent(&self, code: CloseCode) {
        self.count_close(code.code());
    }

    /// A socket ended without a close code from the gateway: the client closed it, or it dropped.
    pub fn closed_by_client(&self) {
        self.count_close(CLOSED_BY_CLIENT);
    }

    fn count_close(&self, code: u16) {
        self.closes.get_or_create(&CloseLabels { code }).inc();
    }

    /// The NATS connection came up (`true`) or went down.
    pub fn nats_connection(&self, connected: bool) {
        self.nats_connected.set(i64::from(connected));
    }

    pub fn nats_connected(&self) -> bool {
        self.nats_connected.get() == 1
    }

    pub fn nats_reconnected(&self) {
        self.nats_reconnects.inc();
    }

    /// Records this instance holds, and users online cluster-wide as this instance sees them.
    pub fn presence_users(&self, local: usize, online: usize) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.presence_local_users.set(gauge(local));
        self.presence_online_users.set(gauge(online));
    }

    pub fn presence_write_failed(&self) {
        self.presence_write_errors.inc();
    }

    /// `records` presence records were sent to the bucket.
    pub fn presence_written(&self, records: usize) {
        self.presence_writes.inc_by(records as u64);
    }

    /// The presence watch received an update of the bucket.
    pub fn presence_watch_update(&self) {
        self.presence_watch_updates.inc();
    }

    /// Sockets watching the presence feed now.
    pub fn presence_feed_watchers(&self, watchers: usize) {
        self.presence_feed_watchers
            .set(i64::try_from(watchers).unwrap_or(i64::MAX));
    }

    /// One `presence_diff` was encoded and offered to the watchers.
    pub fn presence_feed_diff(&self) {
        self.presence_feed_diffs.inc();
    }

    pub fn presence_feed_refused(&self, reason: FeedRefusal) {
        self.presence_feed_refusals
            .get_or_create(&FeedRefusalLabels { reason })
            .inc();
    }

    /// A gap in a topic's live events was read back from the event stream.
    pub fn delivery_gap_filled(&self) {
        self.delivery_gaps_filled.inc();
    }

    /// Events delivered from the event stream rather than live (gap fills and catch-ups).
    pub fn delivery_caught_up(&self, events: usize) {
        self.delivery_caught_up.inc_by(events as u64);
    }

    /// A join with `since` ended with `outcome`, replaying `events` events.
    pub fn delivery_recovery(&self, outcome: RecoveryOutcome, events: usize) {
        self.delivery_recoveries
            .get_or_create(&RecoveryLabels { outcome })
            .inc();
        if outcome == RecoveryOutcome::Recovered {
            self.delivery_replays.observe(events as f64);
        }
    }

    /// Time from the stream storing an event to its copy reaching this instance.
    pub fn delivery_lag(&self, stored: std::time::SystemTime) {
        self.delivery_lag
            .set(stored.elapsed().unwrap_or_default().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that each of `lines` is a whole line of `text`.
    fn has(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "{line} not in:\n{text}");
        }
    }

    #[test]
    fn renders_every_series_from_the_start() {
        let text = Metrics::new().render();
        has(
            &text,
            &[
                "# TYPE epoch_gateway_connections gauge",
                "epoch_gateway_connections{kind=\"anonymous\"} 0",
                "epoch_gateway_auth_failures_total{reason=\"missing_claim\"} 0",
                "epoch_gateway_closes_total{code=\"0\"} 0",
                "epoch_gateway_closes_total{code=\"4403\"} 0",
                "epoch_gateway_nats_events_total{event=\"other\"} 0",
                "epoch_gateway_fanout_latency_seconds_bucket{le=\"+Inf\"} 0",
                "epoch_gateway_presence_writes_total 0",
                "epoch_gateway_presence_watch_updates_total 0",
                "# TYPE epoch_gateway_trace_spans_dropped counter",
                "epoch_gateway_trace_spans_dropped_total{reason=\"queue_full\"} 0",
                "epoch_gateway_trace_spans_dropped_total{reason=\"export_failed\"} 0",
            ],
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn renders_labelled_counters() {
        let metrics = Metrics::new();
        metrics.auth_failed(AuthFailure::Expired);
        metrics.ingress_dropped(IngressDrop::NotJson);
        metrics.joined(TopicKind::Role);
        metrics.nats_event("refreshMentions");
        metrics.nats_event("somethingElse");
        metrics.connection_opened(ConnectionKind::Authenticated);
        let text = metrics.render();
        has(
            &text,
            &[
                "epoch_gateway_auth_failures_total{reason=\"expired\"} 1",
                "epoch_gateway_ingress_drops_total{reason=\"not_json\"} 1",
                "epoch_gateway_joins_total{kind=\"role\"} 1",
                "epoch_gateway_nats_events_total{event=\"refreshMentions\"} 1",
                "epoch_gateway_nats_events_total{event=\"other\"} 1",
                "epoch_gateway_connections{kind=\"authenticated\"} 1",
                "epoch_gateway_connections_opened_total 1",
            ],
        );
    }

    #[test]
    fn close_codes_that_share_a_number_share_a_series() {
        let metrics = Metrics::new();
        metrics.close_sent(CloseCode::InvalidFrame);
        metrics.close_sent(CloseCode::InvalidUtf8);
        metrics.closed_by_client();
        let text = metrics.render();
        assert_eq!(
            text.matches("epoch_gateway_closes_total{code=\"1007\"}")
                .count(),
            1
        );
        has(
            &text,
            &[
                "epoch_gateway_closes_total{code=\"1007\"} 2",
                "epoch_gateway_closes_total{code=\"0\"} 1",
            ],
        );
    }

    #[test]
    fn observes_latencies_in_seconds() {
        let metrics = Metrics::new();
        metrics.fanout_latency(Duration::from_micros(300));
        let text = metrics.render();
        has(
            &text,
            &[
                "# UNIT epoch_gateway_fanout_latency_seconds seconds",
                "epoch_gateway_fanout_latency_seconds_bucket{le=\"0.00025\"} 0",
                "epoch_gateway_fanout_latency_seconds_bucket{le=\"0.0005\"} 1",
                "epoch_gateway_fanout_latency_seconds_count 1",
            ],
        );
    }
}
