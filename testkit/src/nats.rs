//! nats-server processes: one server with JetStream (what a gateway needs), one with a plain WebSocket
//! listener (the load tool's baseline), or a 3-node JetStream cluster from `nats/cluster/`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Result;

use crate::process::{Process, free_port, nats_server_bin, wait_port, workspace_root};

/// How to get nats-server when it cannot be started.
const INSTALL_HINT: &str =
    "run `make setup` (or `scripts/setup.sh --nats-only`), or set NATS_SERVER_BIN";

/// What a nats-server serves besides core NATS on its client port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    /// JetStream, stored in the server's temporary directory: what a gateway needs (presence, revocations).
    JetStream,
    /// A WebSocket listener without TLS, and no JetStream: nats-server as a WebSocket server of its own.
    WebSocket,
}

/// A nats-server on loopback with its own temporary directory. Fields drop in order: the process, then its
/// directory.
pub struct Nats {
    process: Process,
    pub url: String,
    /// The WebSocket listener of a [`Serves::WebSocket`] server.
    pub websocket: Option<SocketAddr>,
    /// The monitoring port (`/connz`, `/jsz`, …), when the server was started with one.
    pub monitor: Option<u16>,
    bin: std::path::PathBuf,
    port: u16,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// A JetStream server on a free port, from [`nats_server_bin`]; panics when it does not start.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// A JetStream server on `port` (a restart on the same port, for outage tests), with an empty store.
    pub fn start_on(port: u16) -> Self {
        Self::launch(&nats_server_bin(), port, Serves::JetStream)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A JetStream server that also serves its monitoring endpoints on [`Self::monitor`].
    pub fn start_monitored() -> Self {
        Self::launch_with(
            &nats_server_bin(),
            free_port(),
            Serves::JetStream,
            Some(free_port()),
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `bin` on `port` and waits for its listeners.
    pub fn launch(bin: &Path, port: u16, serves: Serves) -> Result<Self> {
        Self::launch_with(bin, port, serves, None)
    }

    fn launch_with(bin: &Path, port: u16, serves: Serves, monitor: Option<u16>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Room for the load tool's sockets (19,500) on the WebSocket listener, and 1 MiB messages.
        let mut conf = format!(
            "listen: \"127.0.0.1:{port}\"\nmax_payload: 1048576\nmax_connections: 100000\n"
        );
        let ws_port = (serves == Serves::WebSocket).then(free_port);
        match ws_port {
            None => conf.push_str(&format!(
                "jetstream {{ store_dir: \"{}\" }}\n",
                dir.path().join("js").display()
            )),
            Some(ws_port) => conf.push_str(&format!(
                "websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"
            )),
        }
        if let Some(monitor) = monitor {
            conf.push_str(&format!("http: \"127.0.0.1:{monitor}\"\n"));
        }
        let conf_path = dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf)?;
        let process = spawn(bin, &conf_path, port)?;
        if let Some(ws_port) = ws_port {
            wait_port(ws_port, "nats-server's WebSocket listener")?;
        }
        let websocket = ws_port.map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        Ok(Self {
            process,
            url: format!("nats://127.0.0.1:{port}"),
            websocket,
            monitor,
            bin: bin.to_owned(),
            port,
            conf: conf_path,
            _dir: dir,
        })
    }

    /// Kills the server (if it still runs) and starts it again on the same port and the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.process = spawn(&self.bin, &self.conf, self.port).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The JSON of a monitoring endpoint, e.g. `/connz?subs=1`.
    pub async fn monitoring(&self, path: &str) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = self
            .monitor
            .expect("a server started with a monitoring port");
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        // HTTP/1.0: the whole body, never chunked, then the end of the connection.
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(crate::WAIT, stream.read_to_end(&mut response))
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

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url).await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Kills the server (its store stays until the value is dropped).
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// Starts nats-server from `conf` and waits until it accepts connections on `port`.
fn spawn(bin: &Path, conf: &Path, port: u16) -> Result<Process> {
    let process = Process::spawn(
        Command::new(bin)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        INSTALL_HINT,
    )?;
    wait_port(port, "nats-server")?;
    Ok(process)
}

/// A 3-node JetStream cluster started from `nats/cluster/node-{a,b,c}.conf`, on fresh loopback ports.
pub struct Cluster {
    nodes: Vec<Process>,
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
        let conf_dir = workspace_root().join("nats/cluster");
        let nodes = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                Process::spawn(
                    Command::new(nats_server_bin())
                        .arg("-c")
                        .arg(conf_dir.join(format!("node-{name}.conf")))
                        .args(["-p", &clients[i].to_string()])
                        .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                        .args(["--routes", &route_list])
                        .arg("-sd")
                        .arg(dir.path().join(name))
                        .stdout(Stdio::null())
                        .stderr(Stdio::null()),
                    INSTALL_HINT,
                )
                .unwrap_or_else(|e| panic!("{e:#}"))
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
            wait_port(port, "cluster node").unwrap_or_else(|e| panic!("{e:#}"));
        }
        cluster
    }

    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }
}
