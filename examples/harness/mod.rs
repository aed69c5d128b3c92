//! Processes of the benchmark programs (`examples/presence_bench.rs`, `src/bin/epoch-load.rs`): nats-server
//! and the release gateway as children that are killed and reaped on drop, so nothing outlives a run.
//!
//! Each program uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tokio::net::TcpStream;

/// Bound on a process start and on the gateway becoming ready.
const START_WAIT: Duration = Duration::from_secs(30);

/// A child process, killed and reaped on drop: nothing outlives the program, even on error or panic.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Guard {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// A nats-server in a temporary directory. Fields drop in order: the process, then its directory.
pub(crate) struct Nats {
    pub(crate) process: Guard,
    pub(crate) url: String,
    /// The WebSocket listener, when started with one.
    pub(crate) ws: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + START_WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "{what} did not open port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts nats-server on loopback: with JetStream in its temporary directory (for gateways), or with a
/// plain WebSocket listener and no JetStream (the baseline of `epoch-load`).
pub(crate) fn start_nats(bin: &Path, websocket: bool) -> Result<Nats> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let ws_port = free_port()?;
    let mut conf =
        format!("listen: \"127.0.0.1:{port}\"\nmax_payload: 1048576\nmax_connections: 100000\n");
    if websocket {
        conf.push_str(&format!(
            "websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"
        ));
    } else {
        conf.push_str(&format!(
            "jetstream {{ store_dir: \"{}\" }}\n",
            dir.path().join("js").display()
        ));
    }
    let conf_path = dir.path().join("nats.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {}; run scripts/setup.sh --nats-only",
                bin.display()
            )
        })?;
    let process = Guard(child);
    wait_port(port, "nats-server")?;
    let ws = if websocket {
        wait_port(ws_port, "nats-server websocket")?;
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, ws_port)))
    } else {
        None
    };
    Ok(Nats {
        process,
        url: format!("nats://127.0.0.1:{port}"),
        ws,
        _dir: dir,
    })
}

/// A release gateway on port 0.
pub(crate) struct Gateway {
    pub(crate) process: Guard,
    pub(crate) addr: SocketAddr,
}

impl Gateway {
    /// Starts `bin serve` with only `settings` (`EPOCH_GATEWAY__…` variables) in its environment, then
    /// waits for its `listening on` line and for `/readyz`. Its warnings and errors go to stderr as
    /// `[gateway <name>] …`.
    pub(crate) async fn start(bin: &Path, name: &str, settings: &[(&str, String)]) -> Result<Self> {
        let mut child = Command::new(bin)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("EPOCH_GATEWAY__HTTP__LISTEN", "127.0.0.1:0")
            .envs(settings.iter().map(|(key, value)| (key, value)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}; run cargo build --release --bin epoch-gateway",
                    bin.display()
                )
            })?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let process = Guard(child);
        let (tx, rx) = std::sync::mpsc::channel();
        let label = format!("[gateway {name}]");
        // Reads the log to its end (a full pipe would stall the gateway).
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let addr = line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next());
                if let Some(addr) = addr.and_then(|a| a.parse::<SocketAddr>().ok()) {
                    let _ = tx.send(addr);
                } else if line.contains(" WARN ") || line.contains(" ERROR ") {
                    eprintln!("{label} {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(START_WAIT)
            .context("the gateway did not log its address")?;
        let deadline = Instant::now() + START_WAIT;
        while !http_ok(addr, "/readyz").await {
            ensure!(
                Instant::now() < deadline,
                "gateway {name} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { process, addr })
    }
}

/// Whether `GET path` answers 200.
pub(crate) async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut response = Vec::new();
    stream.write_all(request.as_bytes()).await.is_ok()
        && stream.read_to_end(&mut response).await.is_ok()
        && response.starts_with(b"HTTP/1.1 200")
}

/// Resident set size of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn vm_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kib * 1024)
}

/// Runs `work` to its end, or until Ctrl-C or SIGTERM: then `work` is dropped, and with it every process
/// guard and temporary directory it holds.
pub(crate) async fn until_interrupted(work: impl Future<Output = Result<()>>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = terminate.recv() => anyhow::bail!("terminated"),
    }
}
