//! Settings: built-in defaults → optional TOML/YAML file → `EPOCH_GATEWAY__<SECTION>__<KEY>` variables.
//!
//! [`Settings::load`] is the only way to get settings, and it validates everything it returns: an address
//! parses, a node id is safe inside a NATS subject, a production deployment has a real secret. Errors name
//! the key and its environment variable. Secrets are [`Secret`], which never prints.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::limits::Limits;
use crate::topic::is_key_token;

/// Environment variable naming an optional configuration file.
pub const CONFIG_FILE_ENV: &str = "EPOCH_GATEWAY_CONFIG";
/// Prefix of the environment variables that override single keys.
pub const ENV_PREFIX: &str = "EPOCH_GATEWAY";

/// Guardian's development secret (epochtalk_server `config/runtime.exs`), so that tokens minted by a
/// development Epochtalk server work here too. Refused in production.
pub const DEV_SECRET: &str = "Secret key. You can use `mix guardian.gen.secret` to get one";

/// The secret the deployment files under `deploy/` ship with, to be replaced. Refused in production.
pub const PLACEHOLDER_SECRET: &str = "change-me";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which sockets may watch the presence feed (`presence_state` and `presence_diff` on `user:public`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedMode {
    /// No feed: a join that asks for it is refused.
    Off,
    /// Authenticated sockets only.
    Authenticated,
    /// Anonymous sockets too, as Phoenix's `presence_diff` broadcasts reach every socket.
    Everyone,
}

/// A string that prints as `[redacted]` in `Debug`, `Display` and serialised output.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    pub environment: Environment,
    pub http: HttpSettings,
    pub nats: NatsSettings,
    pub auth: AuthSettings,
    pub presence: PresenceSettings,
    #[serde(default)]
    pub node: NodeSettings,
    pub ws: WsSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    #[serde(default)]
    pub runtime: RuntimeSettings,
    pub delivery: DeliverySettings,
    /// Values parsed from the fields above by [`Settings::load`], once.
    #[serde(skip)]
    parsed: Parsed,
}

/// Typed forms of settings that arrive as text.
#[derive(Debug, Clone, Default)]
struct Parsed {
    algorithm: jsonwebtoken::Algorithm,
    node_id: String,
    origins: AllowedOrigins,
    nats_urls: Vec<String>,
}

/// The event stream (CONTRACT §8): what is published on `<prefix>.user.>` is stored, so that joined
/// sockets lose nothing across NATS outages and rejoining sockets can recover what they missed.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DeliverySettings {
    /// Off: the core NATS path, at most once, every instance receiving every user's events.
    pub enabled: bool,
    /// Name of the JetStream stream the gateway creates or updates at start.
    pub stream: String,
    /// Stream replicas (3 on a 3-node cluster).
    pub replicas: usize,
    /// How long events are kept for recovery.
    pub history_secs: u64,
    /// Events kept per topic (per NATS subject).
    pub history_per_topic: u64,
    /// Most events replayed to one rejoining channel; more means `recovered: false`.
    pub max_recover: u64,
}

/// The async runtime.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RuntimeSettings {
    /// Worker threads; one per CPU the process may use when unset.
    pub worker_threads: Option<usize>,
}

/// OpenTelemetry trace export over OTLP (HTTP/protobuf or gRPC). Off unless an endpoint is configured here
/// or in the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; each key set here
/// wins over its standard variable (the telemetry module resolves the two).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TelemetrySettings {
    /// Base URL of the collector's OTLP receiver: `http://otel-collector:4318` (HTTP; `/v1/traces` is
    /// appended) or `http://otel-collector:4317` (gRPC; used as it is).
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` or `grpc`; `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL`, then
    /// `http/protobuf`, when unset.
    pub otlp_protocol: Option<String>,
    /// `service.name` of the exported spans; `OTEL_SERVICE_NAME`, `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`, then `epoch-gateway`, when unset.
    pub service_name: Option<String>,
    /// Fraction of new traces sampled (0.0-1.0); a sampled-in parent (from `traceparent`) is always followed.
    pub sampling_ratio: f64,
    /// `otlp_protocol`, parsed by [`Settings::load`].
    #[serde(skip)]
    protocol: Option<OtlpProtocol>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: None,
            service_name: None,
            sampling_ratio: 1.0,
            protocol: None,
        }
    }
}

impl TelemetrySettings {
    /// The configured OTLP transport, if any (else the standard variables decide).
    pub fn protocol(&self) -> Option<OtlpProtocol> {
        self.protocol
    }

    /// Settings with `protocol` as if configured (tests of the telemetry module).
    #[cfg(test)]
    pub(crate) fn with_protocol(mut self, protocol: OtlpProtocol) -> Self {
        self.otlp_protocol = Some(protocol.name().to_owned());
        self.protocol = Some(protocol);
        self
    }
}

/// The OTLP transports the exporter is built with, under their names in `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP/1.1 `POST <endpoint>/v1/traces` (port 4318).
    HttpProtobuf,
    /// The `TraceService/Export` gRPC call (HTTP/2, port 4317).
    Grpc,
}

impl OtlpProtocol {
    /// The name the OpenTelemetry specification gives the protocol.
    pub const fn name(self) -> &'static str {
        match self {
            Self::HttpProtobuf => "http/protobuf",
            Self::Grpc => "grpc",
        }
    }

    /// A protocol by its specification name, in any letter case (as opentelemetry-otlp reads the
    /// variable); `http/json` is not built in.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::HttpProtobuf, Self::Grpc]
            .into_iter()
            .find(|protocol| protocol.name().eq_ignore_ascii_case(name))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpSettings {
    /// `host:port`; port 0 picks a free port, which is logged as `listening on ADDR`.
    pub listen: SocketAddr,
    /// Origins allowed to open a socket: full origins (`https://forum.example`) or bare hosts
    /// (`forum.example`, any scheme and port), or `*` for any. Empty: any (development only).
    /// A request without an `Origin` header is always accepted, as Phoenix does.
    #[serde(default, deserialize_with = "comma_list")]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NatsSettings {
    /// One URL, or a comma-separated list for a cluster.
    pub url: String,
    pub subject_prefix: String,
    /// Largest ingress message body; a larger one is dropped and counted.
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AuthSettings {
    /// Raw bytes of the JWT signing secret, as Guardian uses it.
    pub secret: Option<Secret>,
    /// `HS256`, `HS384` or `HS512`; the only algorithm a token may use.
    pub algorithm: String,
    /// Close an authenticated socket when its token expires (never downgrade it to anonymous).
    pub close_on_expiry: bool,
    /// JetStream KV bucket of revoked token ids (`jti`), each kept until the token would have expired.
    pub revoked_bucket: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PresenceSettings {
    pub bucket: String,
    /// Lifetime of a presence record that is no longer refreshed (a crashed instance's users).
    pub ttl_secs: u64,
    /// Stream replicas of the bucket when the gateway creates it (3 on a 3-node cluster).
    pub replicas: usize,
    /// Who may join `user:public` with `{"presence": true}` and watch who is online.
    #[serde(deserialize_with = "feed_mode")]
    pub feed: FeedMode,
    /// At most one `presence_diff` per this many milliseconds; changes in between are merged.
    pub feed_interval_ms: u64,
    /// Above this many users online, the feed is suspended: no `presence_state` or `presence_diff` larger
    /// than this is ever sent.
    pub feed_max_users: usize,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct NodeSettings {
    /// This instance's name in presence records and logs; random when unset.
    pub id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WsSettings {
    /// A socket with no inbound frame for this long is closed (Phoenix: 60 s; clients heartbeat every 30 s).
    pub idle_timeout_secs: u64,
    /// Largest inbound message; a larger one closes the socket (1009).
    pub max_message_bytes: usize,
    /// Frames queued for one socket before it counts as a slow consumer and is closed.
    pub outbound_queue: usize,
    /// Sockets open at once on this instance; beyond it, upgrades get 503.
    pub max_connections: usize,
    /// New sockets accepted per second on this instance (bursts of twice that); beyond it, 503.
    pub max_new_connections_per_sec: u32,
    /// Topics one socket may have joined at once.
    pub max_topics: usize,
    /// Client frames per second per socket, sustained. Frames over the budget get an error reply; a socket
    /// that keeps going for another second's worth is closed (1008).
    pub max_pushes_per_sec: u32,
    /// Client frames a socket may send at once. The Epochtalk client asks `is_online` for every poster on
    /// a page in one go (up to 100 on a 100-post page), so this must cover a page.
    pub push_burst: u32,
    /// A socket that sends no frame at all within this time is closed (4000).
    pub first_frame_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ShutdownSettings {
    /// Window over which sockets are closed in even batches after SIGTERM (0: all at once).
    pub drain_secs: u64,
    /// After the drain, bound on waiting for sessions and on removing presence.
    pub grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directive, used when `RUST_LOG` is unset.
    pub level: String,
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("{key} ({env}): {problem}")]
    Invalid {
        key: &'static str,
        env: String,
        problem: String,
    },
}

/// The environment variable that sets `key` (`presence.ttl_secs` → `EPOCH_GATEWAY__PRESENCE__TTL_SECS`).
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase())
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        env: env_var(key),
        problem: problem.into(),
    }
}

/// The defaults, one `(key, value)` per setting; the README lists the same table.
const DEFAULTS: &[(&str, &str)] = &[
    ("environment", "development"),
    ("http.listen", "127.0.0.1:4000"),
    ("nats.url", "nats://127.0.0.1:4222"),
    ("nats.subject_prefix", "epoch"),
    ("nats.max_message_bytes", "65536"),
    ("auth.algorithm", "HS512"),
    ("auth.close_on_expiry", "true"),
    ("auth.revoked_bucket", "epoch_revoked"),
    ("presence.bucket", "epoch_presence"),
    ("presence.ttl_secs", "30"),
    ("presence.replicas", "1"),
    ("presence.feed", "off"),
    ("presence.feed_interval_ms", "1000"),
    ("presence.feed_max_users", "10000"),
    ("ws.idle_timeout_secs", "60"),
    ("ws.max_message_bytes", "65536"),
    ("ws.outbound_queue", "1024"),
    ("ws.max_connections", "50000"),
    ("ws.max_new_connections_per_sec", "5000"),
    ("ws.max_topics", "16"),
    ("ws.max_pushes_per_sec", "50"),
    ("ws.push_burst", "200"),
    ("ws.first_frame_timeout_secs", "40"),
    ("shutdown.drain_secs", "5"),
    ("shutdown.grace_secs", "10"),
    ("log.format", "text"),
    ("log.level", "info"),
    ("telemetry.sampling_ratio", "1.0"),
    ("delivery.enabled", "true"),
    ("delivery.stream", "epoch_events"),
    ("delivery.replicas", "1"),
    ("delivery.history_secs", "300"),
    ("delivery.history_per_topic", "100"),
    ("delivery.max_recover", "1000"),
];

impl Settings {
    /// Loads defaults, then `file` (or the file named by `EPOCH_GATEWAY_CONFIG`), then the environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key when a value is missing, malformed or unsafe.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os(CONFIG_FILE_ENV).map(std::path::PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut builder = config::Config::builder();
        for (key, value) in DEFAULTS {
            builder = builder.set_default(*key, *value)?;
        }
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Self = builder
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    // No `try_parsing`: it would turn a secret like "0123" into the number 123.
                    .separator("__"),
            )
            .build()?
            .try_deserialize()?;
        settings.validated()
    }

    fn validated(mut self) -> Result<Self, ConfigError> {
        self.parsed.algorithm = parse_algorithm(&self.auth.algorithm)?;
        match (&self.auth.secret, self.environment) {
            (Some(secret), _) if secret.expose().is_empty() => {
                return Err(invalid("auth.secret", "must not be empty"));
            }
            (Some(secret), Environment::Production) if secret.expose() == DEV_SECRET => {
                return Err(invalid(
                    "auth.secret",
                    "the development secret is refused in production",
                ));
            }
            (Some(secret), Environment::Production) if secret.expose() == PLACEHOLDER_SECRET => {
                return Err(invalid(
                    "auth.secret",
                    "is the deployment files' placeholder 'change-me'; set the forum's Guardian secret",
                ));
            }
            (None, Environment::Production) => {
                return Err(invalid("auth.secret", "is required in production"));
            }
            _ => {}
        }
        if let Some(bad) = self
            .http
            .allowed_origins
            .iter()
            .find(|o| !is_origin_pattern(o))
        {
            return Err(invalid(
                "http.allowed_origins",
                format!("'{bad}' is not an origin (scheme://host[:port]), a host, or *"),
            ));
        }
        if self.environment == Environment::Production && self.http.allowed_origins.is_empty() {
            return Err(invalid(
                "http.allowed_origins",
                "is required in production (list the forum's origins, or * to allow any)",
            ));
        }
        self.parsed.origins = AllowedOrigins::new(&self.http.allowed_origins);
        self.parsed.nats_urls = self
            .nats
            .url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        if self.parsed.nats_urls.is_empty() {
            return Err(invalid("nats.url", "must name at least one server"));
        }
        if !is_subject_prefix(&self.nats.subject_prefix) {
            return Err(invalid(
                "nats.subject_prefix",
                "must be dot-separated tokens of letters, digits, '-' and '_'",
            ));
        }
        if !is_key_token(&self.auth.revoked_bucket) {
            return Err(invalid(
                "auth.revoked_bucket",
                "must be letters, digits, '-' and '_' only",
            ));
        }
        if !is_key_token(&self.presence.bucket) {
            return Err(invalid(
                "presence.bucket",
                "must be letters, digits, '-' and '_' only",
            ));
        }
        if self.presence.ttl_secs < MIN_PRESENCE_TTL_SECS {
            return Err(invalid(
                "presence.ttl_secs",
                format!("must be at least {MIN_PRESENCE_TTL_SECS}"),
            ));
        }
        if self.presence.replicas == 0 || self.presence.replicas > 5 {
            return Err(invalid("presence.replicas", "must be between 1 and 5"));
        }
        within(
            "presence.feed_interval_ms",
            self.presence.feed_interval_ms,
            FEED_INTERVAL_MS,
        )?;
        within(
            "presence.feed_max_users",
            self.presence.feed_max_users,
            FEED_MAX_USERS,
        )?;
        if !is_key_token(&self.delivery.stream) {
            return Err(invalid(
                "delivery.stream",
                "must be letters, digits, '-' and '_' only",
            ));
        }
        if self.delivery.replicas == 0 || self.delivery.replicas > 5 {
            return Err(invalid("delivery.replicas", "must be between 1 and 5"));
        }
        for (key, value) in [
            ("delivery.history_secs", self.delivery.history_secs),
            (
                "delivery.history_per_topic",
                self.delivery.history_per_topic,
            ),
            ("delivery.max_recover", self.delivery.max_recover),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if i64::try_from(self.delivery.history_per_topic).is_err() {
            return Err(invalid("delivery.history_per_topic", "is too large"));
        }
        if matches!(self.runtime.worker_threads, Some(n) if n == 0 || n > 1024) {
            return Err(invalid(
                "runtime.worker_threads",
                "must be between 1 and 1024 (unset: one per CPU)",
            ));
        }
        match &self.node.id {
            Some(id) if !is_key_token(id) || id.len() > MAX_NODE_ID_BYTES => {
                return Err(invalid(
                    "node.id",
                    format!("must be 1-{MAX_NODE_ID_BYTES} letters, digits, '-' and '_'"),
                ));
            }
            Some(_) => {}
            None => {
                let random = uuid::Uuid::new_v4().simple().to_string();
                self.node.id = Some(format!("gw-{}", &random[..12]));
            }
        }
        self.parsed.node_id = self.node.id.clone().unwrap_or_default();
        if self.ws.idle_timeout_secs == 0 {
            return Err(invalid("ws.idle_timeout_secs", "must be at least 1"));
        }
        if self.ws.max_message_bytes < 1024 {
            return Err(invalid("ws.max_message_bytes", "must be at least 1024"));
        }
        for (key, value) in [
            ("ws.max_connections", self.ws.max_connections as u64),
            (
                "ws.max_new_connections_per_sec",
                u64::from(self.ws.max_new_connections_per_sec),
            ),
            ("ws.max_topics", self.ws.max_topics as u64),
            (
                "ws.max_pushes_per_sec",
                u64::from(self.ws.max_pushes_per_sec),
            ),
            ("ws.push_burst", u64::from(self.ws.push_burst)),
            (
                "ws.first_frame_timeout_secs",
                self.ws.first_frame_timeout_secs,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.ws.outbound_queue == 0 {
            return Err(invalid("ws.outbound_queue", "must be at least 1"));
        }
        if self.nats.max_message_bytes == 0 {
            return Err(invalid("nats.max_message_bytes", "must be at least 1"));
        }
        self.validate_telemetry()?;
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return Err(invalid(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", "is not a valid tracing filter"));
        }
        Ok(self)
    }

    /// An empty value is unset (as for the standard `OTEL_*` variables); the endpoint is a URL; the
    /// protocol is one the exporter is built with.
    fn validate_telemetry(&mut self) -> Result<(), ConfigError> {
        let telemetry = &mut self.telemetry;
        for value in [
            &mut telemetry.otlp_endpoint,
            &mut telemetry.otlp_protocol,
            &mut telemetry.service_name,
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
        }
        if let Some(endpoint) = &telemetry.otlp_endpoint
            && !is_http_url(endpoint)
        {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("'{endpoint}' is not an http:// or https:// URL with a host"),
            ));
        }
        telemetry.protocol = match &telemetry.otlp_protocol {
            None => None,
            Some(name) => Some(OtlpProtocol::parse(name.trim()).ok_or_else(|| {
                invalid(
                    "telemetry.otlp_protocol",
                    format!("'{name}' is not supported; use http/protobuf or grpc"),
                )
            })?),
        };
        // check-config shows the protocol under its specification name, however it was written.
        telemetry.otlp_protocol = telemetry.protocol.map(|p| p.name().to_owned());
        Ok(())
    }

    /// The pinned JWT algorithm.
    pub fn auth_algorithm(&self) -> jsonwebtoken::Algorithm {
        self.parsed.algorithm
    }

    /// The signing secret, falling back to [`DEV_SECRET`] outside production.
    pub fn auth_secret(&self) -> Secret {
        self.auth
            .secret
            .clone()
            .unwrap_or_else(|| Secret::new(DEV_SECRET))
    }

    /// This instance's name; random when not configured.
    pub fn node_id(&self) -> &str {
        &self.parsed.node_id
    }

    /// The NATS servers to connect to, in the configured order.
    pub fn nats_urls(&self) -> &[String] {
        &self.parsed.nats_urls
    }

    /// The `Origin` allow-list of the WebSocket endpoint.
    pub fn allowed_origins(&self) -> &AllowedOrigins {
        &self.parsed.origins
    }

    /// Per-socket limits.
    pub fn limits(&self) -> Limits {
        Limits {
            idle_timeout: self.idle_timeout(),
            max_message_bytes: self.ws.max_message_bytes,
            outbound_queue: self.ws.outbound_queue,
            close_on_expiry: self.auth.close_on_expiry,
            max_topics: self.ws.max_topics,
            max_pushes_per_sec: self.ws.max_pushes_per_sec,
            push_burst: self.ws.push_burst,
            first_frame_timeout: Duration::from_secs(self.ws.first_frame_timeout_secs),
        }
    }

    pub fn delivery_history(&self) -> Duration {
        Duration::from_secs(self.delivery.history_secs)
    }

    pub fn presence_ttl(&self) -> Duration {
        Duration::from_secs(self.presence.ttl_secs)
    }

    pub fn presence_feed_interval(&self) -> Duration {
        Duration::from_millis(self.presence.feed_interval_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.ws.idle_timeout_secs)
    }

    pub fn drain_window(&self) -> Duration {
        Duration::from_secs(self.shutdown.drain_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown.grace_secs)
    }
}

/// `value` of `key` within `range`, or an error that names the range.
fn within<T: PartialOrd + fmt::Display>(
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be between {} and {}", range.start(), range.end()),
        ))
    }
}

fn parse_algorithm(name: &str) -> Result<jsonwebtoken::Algorithm, ConfigError> {
    use jsonwebtoken::Algorithm;
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "HS384" => Ok(Algorithm::HS384),
        "HS512" => Ok(Algorithm::HS512),
        other => Err(invalid(
            "auth.algorithm",
            format!("'{other}' is not supported; use HS256, HS384 or HS512"),
        )),
    }
}

/// The `Origin` allow-list (Phoenix's `check_origin`): exact origins, bare hosts, or anything.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins {
    any: bool,
    exact: Vec<String>,
    hosts: Vec<String>,
}

impl AllowedOrigins {
    /// Builds the list from validated configuration entries; an empty list allows any origin.
    pub fn new(entries: &[String]) -> Self {
        let mut list = Self {
            any: entries.is_empty(),
            ..Self::default()
        };
        for entry in entries.iter().map(|e| e.to_ascii_lowercase()) {
            if entry == "*" {
                list.any = true;
            } else if entry.contains("://") {
                list.exact.push(entry);
            } else {
                list.hosts.push(entry);
            }
        }
        list
    }

    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        let host = origin
            .split_once("://")
            .map(|(_, rest)| rest.rsplit_once(':').map_or(rest, |(host, _)| host));
        self.exact.contains(&origin)
            || host.is_some_and(|host| self.hosts.iter().any(|h| h == host))
    }
}

/// Below this, refreshing records at a third of the TTL would mean a write per user every second.
pub const MIN_PRESENCE_TTL_SECS: u64 = 3;
/// Node ids go into KV keys; keep them short.
pub const MAX_NODE_ID_BYTES: usize = 64;
/// Bounds of `presence.feed_interval_ms`: under 50 ms a diff is hardly a batch; over a minute the list is
/// stale.
const FEED_INTERVAL_MS: std::ops::RangeInclusive<u64> = 50..=60_000;
/// Bounds of `presence.feed_max_users`: a `presence_state` frame is about 50 bytes per user, so the upper
/// bound keeps one under 50 MB.
const FEED_MAX_USERS: std::ops::RangeInclusive<usize> = 1..=1_000_000;

/// `presence.feed`, with an error that names the accepted values.
fn feed_mode<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<FeedMode, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.as_str() {
        "off" => Ok(FeedMode::Off),
        "authenticated" => Ok(FeedMode::Authenticated),
        "everyone" => Ok(FeedMode::Everyone),
        other => Err(serde::de::Error::custom(format!(
            "'{other}' is not a feed mode; use off, authenticated or everyone"
        ))),
    }
}

/// A list from a file (`["a", "b"]`) or from one environment variable (`"a,b"`).
fn comma_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => text.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(items) => items,
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
}

fn is_origin_pattern(text: &str) -> bool {
    let host_port = match text.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() => rest,
        Some(_) => return false,
        None => text,
    };
    text == "*"
        || (!host_port.is_empty()
            && !host_port.contains(['/', '?', '#', ' ', '*'])
            && !host_port.starts_with(':'))
}

/// `http://host[:port][/path]` or `https://…`, without spaces.
pub fn is_http_url(text: &str) -> bool {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"));
    rest.is_some_and(|rest| {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        !authority.is_empty() && !authority.starts_with(':') && !text.contains(char::is_whitespace)
    })
}

fn is_subject_prefix(text: &str) -> bool {
    text.split('.').all(is_key_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_prefixes_and_key_tokens() {
        assert!(is_subject_prefix("epoch"));
        assert!(is_subject_prefix("forum.prod-1"));
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a"] {
            assert!(!is_subject_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn origin_patterns() {
        for good in [
            "*",
            "https://forum.example",
            "http://localhost:8080",
            "forum.example",
        ] {
            assert!(is_origin_pattern(good), "{good}");
        }
        for bad in [
            "",
            "https://",
            "://x",
            "https://forum.example/path",
            "*.example",
            ":80",
        ] {
            assert!(!is_origin_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn origins_match_exactly_or_by_host() {
        let list =
            AllowedOrigins::new(&["https://forum.example".to_owned(), "localhost".to_owned()]);
        assert!(list.allows("https://forum.example"));
        assert!(list.allows("HTTPS://Forum.Example"));
        assert!(list.allows("http://localhost:8080"));
        assert!(!list.allows("http://forum.example"));
        assert!(!list.allows("https://forum.example.evil"));
        assert!(!list.allows("https://evil.example"));
        assert!(!list.allows("null"));
        assert!(AllowedOrigins::new(&[]).allows("https://anything"));
        assert!(AllowedOrigins::new(&["*".to_owned()]).allows("null"));
    }

    #[test]
    fn otlp_protocols_by_name() {
        assert_eq!(OtlpProtocol::parse("grpc"), Some(OtlpProtocol::Grpc));
        assert_eq!(OtlpProtocol::parse("GRPC"), Some(OtlpProtocol::Grpc));
        assert_eq!(
            OtlpProtocol::parse("http/protobuf"),
            Some(OtlpProtocol::HttpProtobuf)
        );
        for bad in ["", "http", "http/json", "grpc ", "tcp"] {
            assert_eq!(OtlpProtocol::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn http_urls() {
        for good in [
            "http://collector:4318",
            "https://collector.example/otlp/",
            "http://127.0.0.1:4317",
        ] {
            assert!(is_http_url(good), "{good}");
        }
        for bad in [
            "",
            "collector:4317",
            "http://",
            "http://:4317",
            "grpc://collector:4317",
            "http://collector :4317",
        ] {
            assert!(!is_http_url(bad), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_environment_variable() {
        let err = invalid("presence.ttl_secs", "must be at least 3");
        assert_eq!(
            err.to_string(),
            "presence.ttl_secs (EPOCH_GATEWAY__PRESENCE__TTL_SECS): must be at least 3"
        );
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"[redacted]\"");
    }
}
