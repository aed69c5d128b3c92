//! The scenarios, and the run that every one of them shares: start the server under test (the gateway with
//! its JetStream nats-server, or nats-server's WebSocket listener), open the sockets, measure, sample the
//! server, and report — first for the gateway, then for the baseline.
//!
//! Each scenario is a [`Measure`]: its own figures type, how it measures one server, and its headline
//! figures. The publisher and the per-user windows several scenarios share are in [`publish`].

mod broadcast;
mod idle;
mod is_online;
mod per_user;
mod publish;
mod reconnect;
mod soak;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use epoch_gateway::auth::Authenticator;
use epoch_gateway::config::Secret;
use epoch_testkit::{Gateway, GatewayOptions, Nats, Serves, free_port};
use serde::Serialize;

use crate::cli::{Args, Scenario, Targets};
use crate::clients::{Endpoint, Held, Kind, open_all};
use crate::report::{Headlines, Opened, Report, ServerFigures, TargetReport, print_headlines};
use crate::stats::{CLOCK_TICKS_PER_SEC, ProcSample, Stats, cpu_percent, mib, sample, sample_self};

/// Subject prefix of both runs: the gateway's `nats.subject_prefix`, and the baseline's subjects.
const PREFIX: &str = "load";
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
/// A run fails when more than this share of its sockets cannot be opened.
const MOST_FAILED_PERCENT: u64 = 1;

/// One scenario.
pub(crate) trait Measure {
    /// The scenario's figures of one server, next to the ones every scenario reports.
    type Figures: Serialize;

    /// Measures one server: opens the sockets, loads the server, samples it ([`Target::finish`]).
    async fn run(args: &Args, target: &Target) -> Result<Run<Self::Figures>>;

    /// The scenario's rows of the headline table.
    fn headlines(args: &Args, rows: &mut Headlines<'_, Self::Figures>);
}

/// What a scenario measured on one server.
pub(crate) struct Run<F> {
    pub(crate) opened: Opened,
    pub(crate) figures: F,
    pub(crate) server: ServerFigures,
    /// This tool's CPU time when the scenario ended (before its sockets were dropped).
    pub(crate) tool_at_end: ProcSample,
}

/// Runs `args.scenario` on the servers `args.targets`, prints the headline table and writes the report.
pub(crate) async fn run(args: &Args) -> Result<()> {
    match args.scenario {
        Scenario::Idle => measure::<idle::Idle>(args).await,
        Scenario::Broadcast => measure::<broadcast::Broadcast>(args).await,
        Scenario::BroadcastLatency => measure::<broadcast::BroadcastLatency>(args).await,
        Scenario::PerUser => measure::<per_user::PerUser>(args).await,
        Scenario::Reconnect => measure::<reconnect::Reconnect>(args).await,
        Scenario::IsOnline => measure::<is_online::IsOnline>(args).await,
        Scenario::Soak => measure::<soak::Soak>(args).await,
    }
}

async fn measure<M: Measure>(args: &Args) -> Result<()> {
    // Tokens are signed with the secret of the gateways the harness starts.
    let auth = Arc::new(Authenticator::new(
        &Secret::new(epoch_testkit::SECRET),
        jsonwebtoken::Algorithm::HS512,
    ));
    let mut gateway = None;
    let mut baseline = None;
    if args.targets != Targets::Nats {
        gateway = Some(run_target::<M>(args, Kind::Gateway, &auth).await?);
        // The previous run's processes and sockets wind down before the baseline starts.
        tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    }
    if args.targets != Targets::Gateway {
        baseline = Some(run_target::<M>(args, Kind::Nats, &auth).await?);
    }
    let mut rows = Headlines::new(gateway.as_ref(), baseline.as_ref());
    rows.info("connect rate (sockets/s, 3 joins each)", |r| {
        r.opened.connect_rate_per_sec
    });
    M::headlines(args, &mut rows);
    rows.info("server CPU over the scenario (% of a core)", |r| {
        r.server.server_cpu_percent
    });
    rows.info("server RSS at the end (MiB)", |r| r.server.server_rss_mib);
    rows.judged(
        "sockets closed by the server / broken",
        |r| r.server.unexpected_closes as f64,
        "0",
        |g, _| g == 0.0,
    );
    let rows = rows.into_rows();
    print_headlines(&rows);
    if let Some(path) = &args.json {
        let report = Report {
            scenario: args.scenario,
            args,
            cpus: epoch_bench::cpus(),
            headlines: &rows,
            gateway: gateway.as_ref(),
            baseline: baseline.as_ref(),
        };
        epoch_bench::write_json(path, &report)?;
        println!("\nreport written to {}", path.display());
    }
    Ok(())
}

/// One server under test: its sockets' endpoint, the process measured, and the publisher's connection.
pub(crate) struct Target {
    pub(crate) endpoint: Endpoint,
    pub(crate) pid: u32,
    pub(crate) client: async_nats::Client,
    /// The JetStream nats-server behind the gateway (its CPU is reported on the side).
    backing_pid: Option<u32>,
    _gateway: Option<Gateway>,
    _nats: Nats,
}

async fn start_target(args: &Args, kind: Kind, auth: &Arc<Authenticator>) -> Result<Target> {
    let serves = match kind {
        Kind::Gateway => Serves::JetStream,
        Kind::Nats => Serves::WebSocket,
    };
    let nats = Nats::launch(&args.nats_server, free_port(), serves)?;
    let client = async_nats::ConnectOptions::new()
        .client_capacity(1 << 16)
        .connect(&nats.url)
        .await?;
    let (addr, pid, gateway, backing_pid): (SocketAddr, _, _, _) = match kind {
        Kind::Nats => (
            nats.websocket.context("websocket listener")?,
            nats.pid(),
            None,
            None,
        ),
        Kind::Gateway => {
            // Defaults, except the abuse limits: they are not what is measured.
            let mut options =
                GatewayOptions::benchmark(args.gateway_bin.clone()).shared(PREFIX, BUCKET);
            for setting in LIFTED_SETTINGS {
                options = options.env(setting, LIFTED_LIMIT);
            }
            for (name, value) in &args.gateway_settings {
                options = options.env(name, value);
            }
            let gateway = Gateway::try_start(&nats.url, options).await?;
            (gateway.addr, gateway.pid(), Some(gateway), Some(nats.pid()))
        }
    };
    Ok(Target {
        endpoint: Endpoint {
            kind,
            addr,
            auth: auth.clone(),
            prefix: PREFIX,
        },
        pid,
        client,
        backing_pid,
        _gateway: gateway,
        _nats: nats,
    })
}

impl Target {
    /// Opens `args.sockets` sockets and fails the run when too few opened.
    pub(crate) async fn open(&self, args: &Args, stats: &Arc<Stats>) -> Result<Held> {
        let n = args.sockets;
        let held = open_all(&self.endpoint, n, args.concurrency, stats).await;
        println!(
            "  {} sockets opened in {:.2} s ({:.0}/s), {} failed{}",
            held.opened,
            held.secs,
            held.connect_rate(),
            held.failed,
            held.first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
        ensure!(
            held.failed * 100 <= n * MOST_FAILED_PERCENT,
            "{} of {n} sockets failed to open: {}",
            held.failed,
            held.first_error.as_deref().unwrap_or("?")
        );
        Ok(held)
    }

    /// Opens the sockets, with figures of their own, and samples the server: where the measurement of most
    /// scenarios starts.
    pub(crate) async fn start(&self, args: &Args) -> Result<(Arc<Stats>, Held, ProcSample)> {
        let stats = Arc::new(Stats::new());
        let held = self.open(args, &stats).await?;
        let from = sample(self.pid)?;
        Ok((stats, held, from))
    }

    /// The end of a scenario's measurement: the server's RSS, its CPU since `from`, and the closes; then
    /// the sockets are dropped.
    pub(crate) async fn finish<F>(
        &self,
        held: Held,
        figures: F,
        stats: &Stats,
        from: ProcSample,
    ) -> Result<Run<F>> {
        let to = sample(self.pid)?;
        let tool_at_end = sample_self()?;
        let server = ServerFigures {
            server_rss_mib: mib(to.rss),
            server_cpu_percent: cpu_percent(from, to),
            unexpected_closes: stats.close_count(),
            closes_by_code: stats
                .closes_by_code()
                .into_iter()
                .map(|(code, n)| (code.to_string(), n))
                .collect(),
        };
        let opened = Opened::of(&held);
        held.drop_all().await;
        Ok(Run {
            opened,
            figures,
            server,
            tool_at_end,
        })
    }
}

async fn run_target<M: Measure>(
    args: &Args,
    kind: Kind,
    auth: &Arc<Authenticator>,
) -> Result<TargetReport<M::Figures>> {
    let target = start_target(args, kind, auth).await?;
    println!(
        "{}: {} sockets on {} (server pid {})",
        kind.label(),
        args.sockets,
        target.endpoint.addr,
        target.pid
    );
    let backing_before = target.backing_pid.map(sample).transpose()?;
    let tool_before = sample_self()?;
    let run = M::run(args, &target).await?;
    let tool_ticks = run
        .tool_at_end
        .cpu_ticks
        .saturating_sub(tool_before.cpu_ticks);
    let load_tool_cpu_secs = tool_ticks as f64 / CLOCK_TICKS_PER_SEC;
    let backing_nats_cpu_percent = match (target.backing_pid, backing_before) {
        (Some(pid), Some(before)) => Some(cpu_percent(before, sample(pid)?)),
        _ => None,
    };
    Ok(TargetReport {
        opened: run.opened,
        figures: run.figures,
        server: run.server,
        load_tool_cpu_secs,
        load_tool_cpu_percent: 100.0 * load_tool_cpu_secs / tool_before.at.elapsed().as_secs_f64(),
        backing_nats_cpu_percent,
    })
}
