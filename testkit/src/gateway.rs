//! The real `epoch-gateway` binary as a child process: started on port 0 with its own subject prefix,
//! presence bucket and node id, its address read from its `listening on` log line, its log lines kept.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;

use crate::phoenix::{PhxClient, WAIT};
use crate::process::{Process, START_WAIT, gateway_bin, unique};

/// The signing secret of every gateway the harness starts (`auth.secret`).
pub const SECRET: &str = "integration test secret";

/// `RUST_LOG` of a test's gateway: tests read its debug lines.
const TEST_LOG_FILTER: &str = "info,epoch_gateway=debug";

/// Which of the gateway's log lines are printed to stderr (all of them are kept, see [`Gateway::logs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    Nothing,
    /// Warnings and errors: what a benchmark's operator needs to see.
    Problems,
    Everything,
}

pub struct GatewayOptions {
    /// The binary; by default the one cargo built with the running program ([`gateway_bin`]).
    pub bin: PathBuf,
    /// Settings as `EPOCH_GATEWAY__…` variables, applied after the harness's own (a later one wins).
    pub env: Vec<(String, String)>,
    pub wait_ready: bool,
    /// Subject prefix and bucket shared with other gateways of the same test; fresh ones when `None`.
    pub shared: Option<(String, String)>,
    /// `RUST_LOG` of the gateway; `None` leaves the level to its configuration (`info`).
    pub log_filter: Option<String>,
    pub echo: Echo,
}

impl Default for GatewayOptions {
    /// A test's gateway: debug logs kept, printed only when `TEST_LOG` is set.
    fn default() -> Self {
        Self {
            bin: gateway_bin(),
            env: Vec::new(),
            wait_ready: true,
            shared: None,
            log_filter: Some(TEST_LOG_FILTER.to_owned()),
            echo: if std::env::var_os("TEST_LOG").is_some() {
                Echo::Everything
            } else {
                Echo::Nothing
            },
        }
    }
}

impl GatewayOptions {
    /// A benchmark's gateway: `bin`, the configured log level (logging costs time on the measured path),
    /// warnings and errors printed.
    pub fn benchmark(bin: PathBuf) -> Self {
        Self {
            bin,
            log_filter: None,
            echo: Echo::Problems,
            ..Self::default()
        }
    }

    /// Options for gateways of one cluster: same prefix, same bucket.
    pub fn cluster(prefix: &str, bucket: &str) -> Self {
        Self::default().shared(prefix, bucket)
    }

    pub fn shared(mut self, prefix: &str, bucket: &str) -> Self {
        self.shared = Some((prefix.to_owned(), bucket.to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

pub struct Gateway {
    process: Process,
    pub addr: SocketAddr,
    pub prefix: String,
    pub bucket: String,
    pub node: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    pub async fn start(nats_url: &str) -> Self {
        Self::start_with(nats_url, GatewayOptions::default()).await
    }

    /// Starts a gateway; panics, with its logs, when it does not start or get ready.
    pub async fn start_with(nats_url: &str, options: GatewayOptions) -> Self {
        Self::try_start(nats_url, options)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `options.bin serve` with only the harness's settings and `options.env` in its environment.
    pub async fn try_start(nats_url: &str, options: GatewayOptions) -> Result<Self> {
        let (prefix, bucket) = options
            .shared
            .clone()
            .unwrap_or_else(|| (unique("t"), unique("presence_")));
        let node = unique("node-");
        let mut command = Command::new(&options.bin);
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("EPOCH_GATEWAY__HTTP__LISTEN", "127.0.0.1:0")
            .env("EPOCH_GATEWAY__NATS__URL", nats_url)
            .env("EPOCH_GATEWAY__NATS__SUBJECT_PREFIX", &prefix)
            .env("EPOCH_GATEWAY__AUTH__SECRET", SECRET)
            .env("EPOCH_GATEWAY__PRESENCE__BUCKET", &bucket)
            // Gateways that share a prefix share its event stream; other tests' streams are their own.
            .env(
                "EPOCH_GATEWAY__DELIVERY__STREAM",
                format!("events_{prefix}"),
            )
            .env("EPOCH_GATEWAY__NODE__ID", &node)
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(filter) = &options.log_filter {
            command.env("RUST_LOG", filter);
        }
        let mut process = Process::spawn(
            &mut command,
            "build it with `cargo build` (`cargo build --release` for the benchmarks)",
        )?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stdout = process.0.stdout.take().context("the gateway's stdout")?;
        let stderr = process.0.stderr.take().context("the gateway's stderr")?;
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let (logs, addr_tx) = (Arc::clone(&logs), addr_tx.clone());
            let (label, echo) = (format!("[gateway {node}]"), options.echo);
            // Reads the log to its end: a full pipe would stall the gateway.
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        if let Ok(addr) = addr.parse::<SocketAddr>() {
                            let _ = addr_tx.send(addr);
                        }
                    }
                    let problem = line.contains(" WARN ") || line.contains(" ERROR ");
                    if echo == Echo::Everything || (echo == Echo::Problems && problem) {
                        eprintln!("{label} {line}");
                    }
                    logs.lock().expect("no panics under this lock").push(line);
                }
            });
        }
        let Ok(addr) = addr_rx.recv_timeout(START_WAIT) else {
            anyhow::bail!(
                "the gateway did not report its address; logs: {:#?}",
                logs.lock().expect("no panics under this lock")
            );
        };
        let gateway = Self {
            process,
            addr,
            prefix,
            bucket,
            node,
            logs,
        };
        if options.wait_ready {
            ensure!(
                gateway.ready_within(START_WAIT).await,
                "gateway not ready; logs: {:#?}",
                gateway.logs()
            );
        }
        Ok(gateway)
    }

    /// Whether `/readyz` answers 200 within `wait`.
    async fn ready_within(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while self.http_status("/readyz").await != 200 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    pub async fn wait_ready(&self) {
        assert!(
            self.ready_within(START_WAIT).await,
            "gateway not ready; logs: {:#?}",
            self.logs()
        );
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("no panics under this lock").clone()
    }

    pub fn token(&self, user: u64) -> String {
        mint(
            &json!({"sub": user.to_string(), "jti": uuid::Uuid::new_v4().to_string(), "exp": now() + 3600, "nbf": now() - 1}),
        )
    }

    pub fn socket_url(&self, query: &str) -> String {
        format!("ws://{}/socket/websocket?{query}", self.addr)
    }

    /// Status of a plain HTTP GET (or of a WebSocket upgrade request when `path` is the socket path).
    pub async fn http_status(&self, path: &str) -> u16 {
        http_get(self.addr, path)
            .await
            .map_or(0, |(status, _)| status)
    }

    pub async fn http_body(&self, path: &str) -> String {
        http_get(self.addr, path)
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let body = self.http_body("/metrics").await;
        metric_in(&body, name_and_labels)
            .unwrap_or_else(|| panic!("metric {name_and_labels} not found in:\n{body}"))
    }

    /// The value of one series of `/metrics`, or `None` when the gateway does not answer or lacks it.
    pub async fn try_metric(&self, name_and_labels: &str) -> Option<f64> {
        metric_in(&self.http_body("/metrics").await, name_and_labels)
    }

    pub async fn anonymous(&self) -> PhxClient {
        PhxClient::connect(&self.socket_url("vsn=2.0.0"))
            .await
            .expect("anonymous socket opens")
    }

    pub async fn authenticated(&self, user: u64) -> PhxClient {
        let url = self.socket_url(&format!("token={}&vsn=2.0.0", self.token(user)));
        PhxClient::connect(&url)
            .await
            .expect("authenticated socket opens")
    }

    /// Status of an upgrade attempt with this query string (101 when accepted).
    pub async fn upgrade_status(&self, query: &str) -> u16 {
        match tokio_tungstenite::connect_async(self.socket_url(query)).await {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("unexpected upgrade error: {other}"),
        }
    }

    /// Status of an upgrade attempt that sends an `Origin` header.
    pub async fn upgrade_status_from(&self, origin: &str) -> u16 {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = self.socket_url("vsn=2.0.0").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("unexpected upgrade error: {other}"),
        }
    }

    pub async fn publish(&self, nats: &async_nats::Client, suffix: &str, body: &str) {
        nats.publish(
            format!("{}.user.{suffix}", self.prefix),
            body.to_owned().into(),
        )
        .await
        .unwrap();
        nats.flush().await.unwrap();
    }

    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    /// Kills the process with SIGKILL (an instance dies: no shutdown, no goodbye to NATS) and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Shuts the gateway down as an orchestrator does (SIGTERM: sockets closed, presence records purged)
    /// and waits up to `within` for it to exit; false when it did not (dropping it then kills it).
    pub async fn stop(&mut self, within: Duration) -> bool {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        while self.process.try_wait().is_none() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.process.try_wait() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit; logs: {:#?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The value of the series `name_and_labels` (`name{label="value"}` as rendered) in a `/metrics` body.
pub fn metric_in(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with these claims, signed like the harness's gateways expect (HS512, [`SECRET`]).
pub fn mint(claims: &Value) -> String {
    sign(claims, jsonwebtoken::Algorithm::HS512, SECRET)
}

pub fn sign(claims: &Value, algorithm: jsonwebtoken::Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(algorithm),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Minimal HTTP/1.1 GET, enough for status codes and bodies of a few pages (plain or chunked).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding") && value.trim() == "chunked"
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Some((status, body))
}

/// The body of a `Transfer-Encoding: chunked` response (Go's servers send larger pages that way).
fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn a_chunked_body_is_joined() {
        assert_eq!(
            dechunk("5\r\n{\"a\":\r\n3;x=1\r\n 1}\r\n0\r\n\r\n").as_deref(),
            Some("{\"a\": 1}")
        );
        assert_eq!(dechunk("5\r\nab"), None);
    }
}
