//! Tracing overhead on the hot path: broadcast fan-out with trace export off, and on but sampled out.
//!
//! Starts a `nats-server` and, for each mode in turn, a gateway from the release build next to this
//! program (`target/release/epoch-gateway`); opens S sockets joined to `user:public`, publishes M
//! announcements as fast as NATS takes them, and times the moment the last socket has all M (deliveries/s =
//! S × M / time). Modes alternate for R rounds so drift on a shared machine hits both alike; the report
//! gives each round and the ratio of medians.
//!
//! - `off`: no OTLP endpoint, no exporter.
//! - `sampled-out`: OTLP export configured (`telemetry.otlp_endpoint`, to a port nobody listens on) with
//!   `telemetry.sampling_ratio = 0`: every span is created and dropped by the sampler.
//!
//! `cargo build --release && cargo run --release -p epoch-bench --bin tracing_overhead -- [--sockets S]
//! [--messages M] [--rounds R]`. The per-socket queue is raised so that the figure is throughput, not the
//! slow-consumer policy. `BENCH_LOG=1` runs the gateways at debug level and prints their logs.

use std::time::Instant;

use epoch_testkit::{Echo, Gateway, GatewayOptions, Nats, free_port, gateway_bin};
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// `ws.outbound_queue` of the gateways: no socket is cut off as a slow consumer.
const OUTBOUND_QUEUE: &str = "1000000";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn start_gateway(nats_url: &str, traced: bool) -> Gateway {
    let verbose = std::env::var_os("BENCH_LOG").is_some();
    let mut options = GatewayOptions::benchmark(gateway_bin())
        .env("EPOCH_GATEWAY__WS__OUTBOUND_QUEUE", OUTBOUND_QUEUE)
        .env(
            "EPOCH_GATEWAY__LOG__LEVEL",
            if verbose { "debug" } else { "info" },
        );
    if verbose {
        options.echo = Echo::Everything;
    }
    if traced {
        options = options
            .env(
                "EPOCH_GATEWAY__TELEMETRY__OTLP_ENDPOINT",
                &format!("http://127.0.0.1:{}", free_port()),
            )
            .env("EPOCH_GATEWAY__TELEMETRY__SAMPLING_RATIO", "0");
    }
    Gateway::try_start(nats_url, options)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn run(
    nats: &async_nats::Client,
    nats_url: &str,
    traced: bool,
    sockets: usize,
    messages: usize,
) -> f64 {
    let gateway = start_gateway(nats_url, traced).await;
    let mut readers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let mut client = gateway.anonymous().await;
        client.join_ok("user:public").await;
        let mut ws = client.into_inner();
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
    let subject = format!("{}.user.public", gateway.prefix);
    let started = Instant::now();
    for seq in 0..messages {
        let body = format!(r#"{{"event":"announcement","payload":{{"seq":{seq}}}}}"#);
        nats.publish(subject.clone(), body.into())
            .await
            .expect("published");
    }
    nats.flush().await.expect("flushed");
    for reader in readers {
        reader.await.expect("a reader got every message");
    }
    (sockets * messages) as f64 / started.elapsed().as_secs_f64()
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
    let nats_server = Nats::start();
    let nats = nats_server.client().await;
    println!("{sockets} sockets x {messages} broadcasts per run, {rounds} rounds");
    let (mut off, mut sampled_out) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let a = run(&nats, &nats_server.url, false, sockets, messages).await;
        let b = run(&nats, &nats_server.url, true, sockets, messages).await;
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
