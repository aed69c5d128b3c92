//! Test harness: a real `nats-server` (JetStream, random port, temporary store) and the real
//! `epoch-gateway` binary on port 0, both killed on drop, plus a Phoenix V2 WebSocket client.
//!
//! Every gateway gets its own subject prefix and presence bucket, so tests run in parallel.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration test secret";
/// How long any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(5);

pub fn nats_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let local =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/nats-server-bin/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A free TCP port on loopback (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Nats {
    child: Child,
    pub url: String,
    /// The monitoring port (`-m`), when the server was started with one.
    pub monitor: Option<u16>,
    port: u16,
    /// The JetStream store; removed when the server is dropped.
    dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(port, None, dir)
    }

    /// A server that also serves its monitoring endpoints (`/connz`, …) on [`Self::monitor`].
    pub fn start_monitored() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(free_port(), Some(free_port()), dir)
    }

    fn start_in(port: u16, monitor: Option<u16>, dir: tempfile::TempDir) -> Self {
        let child = spawn_nats(port, monitor, dir.path());
        Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            monitor,
            port,
            dir,
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url).await.unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server (if it still runs) and starts it again on the same port and the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_nats(self.port, self.monitor, self.dir.path());
    }

    /// The JSON of a monitoring endpoint, e.g. `/connz?subs=1`.
    pub async fn monitoring(&self, path: &str) -> Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = self
            .monitor
            .expect("a server started with a monitoring port");
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        // HTTP/1.0: the whole body, never chunked, then the end of the connection.
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
            .await
            .expect("the monitoring endpoint answers in time")
            .unwrap();
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        assert!(
            head.lines()
                .next()
                .is_some_and(|status| status.contains(" 200 ")),
            "{path}: {head}"
        );
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

/// Starts a JetStream nats-server on loopback and waits until it accepts connections.
fn spawn_nats(port: u16, monitor: Option<u16>, store: &std::path::Path) -> Child {
    let bin = nats_server_bin();
    let mut command = Command::new(&bin);
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store);
    if let Some(monitor) = monitor {
        command.args(["-m", &monitor.to_string()]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} ({e}); run `make setup`", bin.display()));
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A 3-node JetStream cluster started from `nats/cluster/node-{a,b,c}.conf`, on fresh loopback ports.
pub struct Cluster {
    nodes: Vec<Child>,
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let conf_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nats/cluster");
        let nodes = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                Command::new(nats_server_bin())
                    .arg("-c")
                    .arg(conf_dir.join(format!("node-{name}.conf")))
                    .args(["-p", &clients[i].to_string()])
                    .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                    .args(["--routes", &route_list])
                    .arg("-sd")
                    .arg(dir.path().join(name))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("nats-server starts")
            })
            .collect();
        let urls = clients
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let cluster = Self {
            nodes,
            urls,
            _dir: dir,
        };
        for port in clients {
            let deadline = Instant::now() + WAIT;
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "cluster node on {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster
    }

    pub fn kill(&mut self, node: usize) {
        let _ = self.nodes[node].kill();
        let _ = self.nodes[node].wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill(node);
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct GatewayOptions {
    pub env: Vec<(String, String)>,
    pub wait_ready: bool,
    /// Subject prefix and bucket shared with other gateways of the same test; fresh ones when `None`.
    pub shared: Option<(String, String)>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            wait_ready: true,
            shared: None,
        }
    }
}

impl GatewayOptions {
    /// Options for gateways of one cluster: same prefix, same bucket.
    pub fn cluster(prefix: &str, bucket: &str) -> Self {
        Self {
            shared: Some((prefix.to_owned(), bucket.to_owned())),
            ..Self::default()
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub prefix: String,
    pub bucket: String,
    pub node: String,
    logs: Arc<Mutex<Vec<String>>>,
}

pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_epoch-gateway")
}

impl Gateway {
    pub async fn start(nats_url: &str) -> Self {
        Self::start_with(nats_url, GatewayOptions::default()).await
    }

    pub async fn start_with(nats_url: &str, options: GatewayOptions) -> Self {
        let (prefix, bucket) = options
            .shared
            .clone()
            .unwrap_or_else(|| (unique("t"), unique("presence_")));
        let node = unique("node-");
        let mut command = Command::new(gateway_bin());
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,epoch_gateway=debug")
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
        let mut child = command.spawn().expect("gateway binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = Arc::clone(&logs);
            let addr_tx = addr_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        if let Ok(addr) = addr.parse::<SocketAddr>() {
                            let _ = addr_tx.send(addr);
                        }
                    }
                    if std::env::var_os("TEST_LOG").is_some() {
                        eprintln!("[gateway] {line}");
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let addr = addr_rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "gateway did not report its address; logs: {:#?}",
                logs.lock().unwrap()
            )
        });
        let gateway = Self {
            child,
            addr,
            prefix,
            bucket,
            node,
            logs,
        };
        if options.wait_ready {
            gateway.wait_ready().await;
        }
        gateway
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.http_status("/readyz").await == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready; logs: {:#?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
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
        body.lines()
            .find_map(|line| {
                line.strip_prefix(name_and_labels)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("metric {name_and_labels} not found in:\n{body}"))
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
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
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

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

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

/// Minimal HTTP/1.1 GET, enough for status codes and small bodies.
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
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// What the server did next on a socket.
#[derive(Debug, PartialEq)]
pub enum Next {
    Frame(Value),
    Closed(Option<u16>),
}

/// A Phoenix V2 client over a real WebSocket.
pub struct PhxClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
}

impl PhxClient {
    pub async fn connect(url: &str) -> Result<Self, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { ws, next_ref: 1 })
    }

    pub fn make_ref(&mut self) -> String {
        let r = self.next_ref.to_string();
        self.next_ref += 1;
        r
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends without panicking; false once the server has closed the socket.
    pub async fn try_send(&mut self, frame: Value) -> bool {
        self.ws.send(Message::text(frame.to_string())).await.is_ok()
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// The next frame or close, skipping pings; panics after [`WAIT`].
    pub async fn next(&mut self) -> Next {
        self.next_within(WAIT)
            .await
            .expect("the server sent nothing in time")
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Next> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(Next::Frame(serde_json::from_str(&text).unwrap()));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Next::Closed(frame.map(|f: CloseFrame| f.code.into())));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                None | Some(Err(_)) => return Some(Next::Closed(None)),
            }
        }
    }

    pub async fn frame(&mut self) -> Value {
        match self.next().await {
            Next::Frame(frame) => frame,
            Next::Closed(code) => panic!("socket closed ({code:?}) while a frame was expected"),
        }
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn silent_for(&mut self, wait: Duration) {
        if let Some(next) = self.next_within(wait).await {
            panic!("expected silence, got {next:?}");
        }
    }

    /// Joins `topic` and returns the reply frame.
    pub async fn join(&mut self, topic: &str) -> Value {
        let r = self.make_ref();
        self.send(json!([r, r, topic, "phx_join", {}])).await;
        self.frame().await
    }

    pub async fn join_ok(&mut self, topic: &str) -> String {
        let reply = self.join(topic).await;
        assert_eq!(
            reply[4],
            json!({"status": "ok", "response": {}}),
            "join {topic}: {reply}"
        );
        reply[0].as_str().unwrap().to_owned()
    }

    /// Pushes `event` on a joined topic and returns the reply frame.
    pub async fn push(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Value {
        let r = self.make_ref();
        self.send(json!([join_ref, r, topic, event, payload])).await;
        let reply = self.frame().await;
        assert_eq!(reply[1], json!(r), "reply to the push: {reply}");
        reply
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The frame a NATS message for `topic` arrives as.
pub fn broadcast(topic: &str, event: &str, payload: Value) -> Value {
    json!([null, null, topic, event, payload])
}

/// A Node script of `tests/js` (phoenix.js and nats.js), run with `node`; its output is read line by line.
/// Killed when dropped.
pub struct NodeScript {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    output: Arc<Mutex<Vec<String>>>,
}

impl NodeScript {
    pub fn start(script: &str, env: &[(&str, String)]) -> Self {
        let js_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
        assert!(
            js_dir.join("node_modules/phoenix").exists(),
            "tests/js/node_modules is missing: run `make setup` (npm ci in tests/js)"
        );
        let mut child = tokio::process::Command::new("node")
            .arg(script)
            .current_dir(js_dir)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, tag) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                "",
            ),
            (Box::new(stderr), "[stderr] "),
        ] {
            let (output, tx) = (Arc::clone(&output), tx.clone());
            let script = script.to_owned();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("TEST_LOG").is_some() {
                        eprintln!("[{script}] {tag}{line}");
                    }
                    output.lock().unwrap().push(format!("{tag}{line}"));
                    if tag.is_empty() {
                        let _ = tx.send(line);
                    }
                }
            });
        }
        Self {
            child,
            lines,
            output,
        }
    }

    /// Waits for a line of the script's output that starts with `prefix`; returns the rest of it.
    pub async fn line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                _ => panic!(
                    "no `{prefix}` line from the script within {within:?}; output:\n{}",
                    self.output()
                ),
            }
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits for the script to end and asserts that every one of its checks passed; returns its output.
    pub async fn passes(mut self, within: Duration) -> String {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the script did not end within {within:?}; output:\n{}",
                    self.output()
                )
            })
            .unwrap();
        // The readers end with the process's output.
        let deadline = Instant::now() + WAIT;
        while !self.output().contains(" passed, ") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let output = self.output();
        assert!(status.success(), "the script failed:\n{output}");
        assert!(output.contains(" passed, 0 failed"), "{output}");
        output
    }
}
