//! The servers under test, started by the tool's main process before any socket opens and killed when
//! the run ends: per target, the process measured and the nats-server that its messages come through.
//!
//! - gateway: a JetStream nats-server and the release `epoch-gateway` on port 0, with the abuse limits
//!   lifted; gateway-b the same, with settings or a build of its own;
//! - nats-ws: a nats-server with a WebSocket listener, which is both;
//! - bare: a core nats-server and `bare_server` on port 0.
//!
//! Every nats-server serves its monitoring endpoint: the gateway-only scenarios read its JetStream API
//! counts, the per-user timeline its `/varz`.
//!
//! Every target has a nats-server of its own, so the publisher of one target's window loads no other
//! target, and each server's memory and CPU are read apart from its nats-server's.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use epoch_testkit::{Gateway, GatewayOptions, Nats, Process, START_WAIT, Serves, free_port};

use crate::cli::{Args, setting_in};
use crate::clients::Kind;
use crate::driver::Remote;

/// Subject prefix of every target: the gateway's `nats.subject_prefix`, the bare server's, and the
/// subjects the baseline's sockets subscribe to.
pub(crate) const PREFIX: &str = "load";
const BUCKET: &str = "load_presence";
/// Connection, push and rate limits of the gateway, lifted: they are abuse controls, not what is measured.
const LIFTED_LIMIT: &str = "1000000";
/// The gateway's settings that lift them.
const LIFTED_SETTINGS: [&str; 4] = [
    "EPOCH_GATEWAY__WS__MAX_CONNECTIONS",
    "EPOCH_GATEWAY__WS__MAX_NEW_CONNECTIONS_PER_SEC",
    "EPOCH_GATEWAY__WS__MAX_PUSHES_PER_SEC",
    "EPOCH_GATEWAY__WS__PUSH_BURST",
];
/// What the bare server prints once it listens, before its address.
const BARE_LISTENING: &str = "listening on ";

/// One target's processes. Fields drop in order: the server, then its nats-server.
pub(crate) struct Server {
    pub(crate) kind: Kind,
    /// Where the sockets connect.
    pub(crate) addr: SocketAddr,
    /// The process measured.
    pub(crate) pid: u32,
    /// The nats-server behind the gateway or the bare server (none for nats-ws: it is that server).
    pub(crate) backing_pid: Option<u32>,
    gateway: Option<Gateway>,
    _bare: Option<Process>,
    nats: Nats,
    /// The gateway's binary and settings (the scenario's, then the command line's), for every instance.
    gateway_bin: PathBuf,
    settings: Vec<(String, String)>,
    /// What the target is called when the run has two of a kind (presence-feed: `feed on`), else its kind.
    pub(crate) condition: Option<&'static str>,
}

impl Server {
    /// Starts the target `kind`; a gateway with the scenario's settings, then the command line's (and
    /// gateway-b's own last).
    pub(crate) async fn start(
        args: &Args,
        kind: Kind,
        scenario_settings: Vec<(String, String)>,
    ) -> Result<Self> {
        let mut settings = scenario_settings;
        settings.extend(args.gateway_settings.iter().cloned());
        let mut gateway_bin = args.gateway_bin.clone();
        if kind == Kind::GatewayB {
            settings.extend(args.gateway_b_settings.iter().cloned());
            gateway_bin = args.gateway_b_bin.clone().unwrap_or(gateway_bin);
        }
        let serves = match kind {
            Kind::Gateway | Kind::GatewayB => Serves::JetStream,
            Kind::Nats => Serves::WebSocket,
            Kind::Bare => Serves::Core,
        };
        let nats = Nats::launch_monitored(&args.nats_server, free_port(), serves)?;
        let mut server = Self {
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid: nats.pid(),
            backing_pid: None,
            gateway: None,
            _bare: None,
            nats,
            gateway_bin,
            settings,
            condition: None,
        };
        match kind {
            Kind::Nats => server.addr = server.nats.websocket.context("websocket listener")?,
            Kind::Gateway | Kind::GatewayB => {
                let gateway = server.start_gateway(&[]).await?;
                (server.addr, server.pid) = (gateway.addr, gateway.pid());
                server.gateway = Some(gateway);
            }
            Kind::Bare => {
                let (bare, addr) = start_bare(args, &server.nats.url).await?;
                (server.addr, server.pid) = (addr, bare.pid());
                server._bare = Some(bare);
            }
        }
        if kind != Kind::Nats {
            server.backing_pid = Some(server.nats.pid());
        }
        Ok(server)
    }

    /// What a driver needs to know of this target.
    pub(crate) fn remote(&self) -> Remote {
        Remote {
            kind: self.kind,
            addr: self.addr,
            nats_url: self.nats.url.clone(),
            pid: self.pid,
            backing_pid: self.backing_pid,
            settings: self.settings.clone(),
            monitoring: self.nats.monitoring,
            neighbours: Vec::new(),
        }
    }

    /// The target's name in progress lines and tables: its condition, else its kind's label.
    pub(crate) fn label(&self) -> String {
        self.condition.unwrap_or(self.kind.label()).to_owned()
    }

    /// Starts an instance of the gateway on this target's nats-server, with the same subject prefix,
    /// presence bucket and event stream as the target's own, the tool's settings and `extra` last.
    pub(crate) async fn start_gateway(&self, extra: &[(String, String)]) -> Result<Gateway> {
        // Defaults, except the abuse limits: they are not what is measured.
        let mut options =
            GatewayOptions::benchmark(self.gateway_bin.clone()).shared(PREFIX, BUCKET);
        for setting in LIFTED_SETTINGS {
            options = options.env(setting, LIFTED_LIMIT);
        }
        for (name, value) in self.settings.iter().chain(extra) {
            options = options.env(name, value);
        }
        Gateway::try_start(&self.nats.url, options).await
    }

    /// The value a gateway setting (`delivery.max_recover`) has on this target's instances, when set.
    pub(crate) fn setting(&self, key: &str) -> Option<&str> {
        setting_in(&self.settings, key)
    }

    /// The target's own gateway (none for the other targets).
    pub(crate) fn gateway(&self) -> Option<&Gateway> {
        self.gateway.as_ref()
    }

    /// A page of the monitoring endpoint of the gateway's nats-server (`/jsz`, `/connz`).
    pub(crate) async fn monitoring_json(&self, path: &str) -> Result<serde_json::Value> {
        self.nats.monitoring_json(path).await
    }

    /// The `api.total` of nats-server's `/jsz`: JetStream API requests it served since it started.
    pub(crate) async fn jetstream_api_requests(&self) -> Result<u64> {
        let jsz = self.monitoring_json("/jsz").await?;
        jsz["api"]["total"].as_u64().context("no api.total in /jsz")
    }
}

/// Starts `bare_server` on the nats-server at `nats_url` and reads the address it listens on.
async fn start_bare(args: &Args, nats_url: &str) -> Result<(Process, SocketAddr)> {
    let mut bare = Process::spawn(
        Command::new(&args.bare_bin)
            .args(["--nats", nats_url, "--prefix", PREFIX])
            .stdout(Stdio::piped()),
        "build it with `cargo build --release -p epoch-bench`",
    )?;
    let stdout = bare.take_stdout().context("the bare server's stdout")?;
    // Its one line of output; it exits (end of file) when it cannot start.
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = tokio::time::timeout(START_WAIT, first_line)
        .await
        .context("the bare server did not report its address in time")???;
    let addr = line
        .trim()
        .strip_prefix(BARE_LISTENING)
        .and_then(|addr| addr.parse().ok())
        .with_context(|| format!("the bare server did not start: {line:?}"))?;
    Ok((bare, addr))
}
