//! nats-server processes: one server with JetStream (what a gateway needs), one with a plain WebSocket
//! listener (the load tool's baseline), one with core NATS only, or a 3-node JetStream cluster from
//! `nats/cluster/`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

use crate::gateway::http_get;
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
    /// Core NATS only: what a server that needs no stream or bucket connects to.
    Core,
}

/// A nats-server on loopback with its own temporary directory. Fields drop in order: the process, then its
/// directory.
pub struct Nats {
    process: Process,
    pub url: String,
    /// The WebSocket listener of a [`Serves::WebSocket`] server.
    pub websocket: Option<SocketAddr>,
    /// The HTTP monitoring endpoint (`/varz`, `/connz`, `/jsz`) of a server started with
    /// [`Nats::launch_monitored`].
    pub monitoring: Option<SocketAddr>,
    /// What [`Nats::restart`] starts again: the binary, the client port, the configuration (and its store).
    bin: std::path::PathBuf,
    port: u16,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// A JetStream server on a free port, from [`nats_server_bin`]; panics when it does not start.
    pub fn start() -> Self {
        // The port is picked free and released before the server binds it: on a collision with another
        // test, start again on another.
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::launch(&nats_server_bin(), free_port(), Serves::JetStream) {
                Ok(nats) => return nats,
                Err(error) => last = Some(error),
            }
        }
        panic!("{:#}", last.expect("at least one attempt"))
    }

    /// A JetStream server on `port` (a restart on the same port, for outage tests), with an empty store.
    pub fn start_on(port: u16) -> Self {
        Self::launch(&nats_server_bin(), port, Serves::JetStream)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A JetStream server that also serves its monitoring endpoints ([`Self::monitoring`]).
    pub fn start_monitored() -> Self {
        Self::launch_monitored(&nats_server_bin(), free_port(), Serves::JetStream)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `bin` on `port` and waits for its listeners.
    pub fn launch(bin: &Path, port: u16, serves: Serves) -> Result<Self> {
        Self::spawn(bin, port, serves, None)
    }

    /// [`Nats::launch`] with the HTTP monitoring endpoint on a free loopback port ([`Nats::monitoring`]).
    pub fn launch_monitored(bin: &Path, port: u16, serves: Serves) -> Result<Self> {
        Self::spawn(bin, port, serves, Some(free_port()))
    }

    fn spawn(bin: &Path, port: u16, serves: Serves, monitoring: Option<u16>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Room for the load tool's sockets (19,500) on the WebSocket listener, and 1 MiB messages.
        let mut conf = format!(
            "listen: \"127.0.0.1:{port}\"\nmax_payload: 1048576\nmax_connections: 100000\n"
        );
        if let Some(http_port) = monitoring {
            conf.push_str(&format!("http: \"127.0.0.1:{http_port}\"\n"));
        }
        let ws_port = (serves == Serves::WebSocket).then(free_port);
        if serves == Serves::JetStream {
            conf.push_str(&format!(
                "jetstream {{ store_dir: \"{}\" }}\n",
                dir.path().join("js").display()
            ));
        }
        if let Some(ws_port) = ws_port {
            conf.push_str(&format!(
                "websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"
            ));
        }
        let conf_path = dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf)?;
        let process = spawn(bin, &conf_path, port)?;
        for (extra, what) in [
            (ws_port, "nats-server's WebSocket listener"),
            (monitoring, "nats-server's monitoring endpoint"),
        ] {
            if let Some(extra) = extra {
                wait_port(extra, what)?;
            }
        }
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Ok(Self {
            process,
            url: format!("nats://127.0.0.1:{port}"),
            websocket: ws_port.map(loopback),
            monitoring: monitoring.map(loopback),
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

    /// [`Self::monitoring_json`] for tests: panics when the page cannot be had.
    pub async fn monitoring(&self, path: &str) -> serde_json::Value {
        self.monitoring_json(path)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A JSON page of the monitoring endpoint (`/jsz`, `/connz?subs=1`, …) of a monitored server.
    pub async fn monitoring_json(&self, path: &str) -> Result<serde_json::Value> {
        let addr = self
            .monitoring
            .context("nats-server was started without its monitoring endpoint")?;
        let (status, body) = http_get(addr, path)
            .await
            .with_context(|| format!("GET {path} from nats-server's monitoring endpoint"))?;
        ensure!(status == 200, "GET {path}: status {status}");
        Ok(serde_json::from_str(&body)?)
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

/// Attempts at starting a server or a cluster: its ports are picked free and released before the servers
/// bind them, so another test can take one in between; it is then started again on fresh ports.
const START_ATTEMPTS: usize = 3;

impl Cluster {
    pub fn start() -> Self {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(error) => last = Some(error),
            }
        }
        panic!("{:#}", last.expect("at least one attempt"))
    }

    fn try_start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let conf_dir = workspace_root().join("nats/cluster");
        let mut nodes = Vec::with_capacity(3);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            nodes.push(Process::spawn(
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
            )?);
        }
        let urls = clients
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        // Dropped on an error below: the nodes started so far are killed.
        let cluster = Self {
            nodes,
            urls,
            _dir: dir,
        };
        for port in clients {
            wait_port(port, "cluster node")?;
        }
        Ok(cluster)
    }

    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }
}
