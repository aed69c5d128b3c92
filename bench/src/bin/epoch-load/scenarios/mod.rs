//! The scenarios, and the run that every one of them shares: start the server under test (the gateway with
//! its JetStream nats-server, or nats-server's WebSocket listener), open the sockets, measure, sample the
//! server, and report — first for the gateway, then for the baseline.
//!
//! Each scenario is a [`Measure`]: its own figures type, how it measures one server, and its headline
//! figures. The publisher and the per-user windows several scenarios share are in [`publish`]. The
//! gateway-only scenarios (`recovery-storm`, `scale-out`) start more instances of the gateway on the
//! target's nats-server ([`Target::start_gateway`]), all on one subject prefix, presence bucket and event
//! stream, and fail the run when a delivery promise is broken ([`Measure::failures`]).

mod broadcast;
mod idle;
mod is_online;
mod per_user;
mod publish;
mod reconnect;
mod recovery_storm;
mod scale_out;
mod soak;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use epoch_gateway::auth::Authenticator;
use epoch_gateway::config::Secret;
use epoch_testkit::{Gateway, GatewayOptions, Nats, Serves, free_port};
use serde::Serialize;

use crate::cli::{Args, Scenario, Targets, setting_in};
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

    /// Joins each socket makes when it opens (the connect rate's row says so).
    const JOINS_PER_SOCKET: u32 = 3;

    /// Gateway settings of the scenario's own, as `EPOCH_GATEWAY__…` variables, for every gateway it runs;
    /// `--gateway-setting` comes after them, so the command line wins.
    fn gateway_settings(_args: &Args) -> Vec<(String, String)> {
        Vec::new()
    }

    /// What makes the run fail (exit status non-zero, `failures` in the report) beyond the tool's own
    /// errors: a promise of the gateway broken, as opposed to a figure that misses its target.
    fn failures(_report: &TargetReport<Self::Figures>) -> Vec<String> {
        Vec::new()
    }
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
        Scenario::RecoveryStorm => measure::<recovery_storm::RecoveryStorm>(args).await,
        Scenario::ScaleOut => measure::<scale_out::ScaleOut>(args).await,
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
    let targets = args.targets();
    if targets != Targets::Nats {
        gateway = Some(run_target::<M>(args, Kind::Gateway, &auth).await?);
        if targets == Targets::Both {
            // The previous run's processes and sockets wind down before the baseline starts.
            tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
        }
    }
    if targets != Targets::Gateway {
        baseline = Some(run_target::<M>(args, Kind::Nats, &auth).await?);
    }
    let failures: Vec<String> = gateway.iter().flat_map(M::failures).collect();
    let mut rows = Headlines::new(gateway.as_ref(), baseline.as_ref());
    let joins = match M::JOINS_PER_SOCKET {
        1 => "1 join".to_owned(),
        n => format!("{n} joins each"),
    };
    rows.info(format!("connect rate (sockets/s, {joins})"), |r| {
        r.opened.connect_rate_per_sec
    });
    M::headlines(args, &mut rows);
    rows.info("server CPU over the scenario (% of a core)", |r| {
        r.server.server_cpu_percent
    });
    rows.info("server RSS at the end (MiB)", |r| r.server.server_rss_mib);
    rows.zero("sockets closed by the server / broken", |r| {
        r.server.unexpected_closes as f64
    });
    let rows = rows.into_rows();
    print_headlines(&rows);
    if let Some(path) = &args.json {
        let report = Report {
            scenario: args.scenario,
            args,
            cpus: epoch_bench::cpus(),
            headlines: &rows,
            failures: &failures,
            gateway: gateway.as_ref(),
            baseline: baseline.as_ref(),
        };
        epoch_bench::write_json(path, &report)?;
        println!("\nreport written to {}", path.display());
    }
    ensure!(
        failures.is_empty(),
        "{} failed: {}",
        args.scenario.name(),
        failures.join("; ")
    );
    Ok(())
}

/// One server under test: its sockets' endpoint, the process measured, and the publisher's connection.
pub(crate) struct Target {
    pub(crate) endpoint: Endpoint,
    pub(crate) pid: u32,
    pub(crate) client: async_nats::Client,
    /// The JetStream nats-server behind the gateway (its CPU is reported on the side).
    pub(crate) backing_pid: Option<u32>,
    /// The gateway's binary and settings (the scenario's, then the command line's), for every instance.
    gateway_bin: PathBuf,
    settings: Vec<(String, String)>,
    gateway: Option<Gateway>,
    nats: Nats,
}

async fn start_target(
    args: &Args,
    kind: Kind,
    auth: &Arc<Authenticator>,
    scenario_settings: Vec<(String, String)>,
) -> Result<Target> {
    match kind {
        Kind::Nats => {
            let nats = Nats::launch(&args.nats_server, free_port(), Serves::WebSocket)?;
            let mut target = Target::on(kind, nats, auth, args, scenario_settings).await?;
            target.endpoint.addr = target.nats.websocket.context("websocket listener")?;
            target.pid = target.nats.pid();
            Ok(target)
        }
        Kind::Gateway => {
            // Monitored: the gateway-only scenarios read its JetStream API counts.
            let nats = Nats::launch_monitored(&args.nats_server, free_port(), Serves::JetStream)?;
            let mut target = Target::on(kind, nats, auth, args, scenario_settings).await?;
            let gateway = target.start_gateway(&[]).await?;
            target.endpoint.addr = gateway.addr;
            target.pid = gateway.pid();
            target.backing_pid = Some(target.nats.pid());
            target.gateway = Some(gateway);
            Ok(target)
        }
    }
}

impl Target {
    /// A target on `nats` whose server is not started yet.
    async fn on(
        kind: Kind,
        nats: Nats,
        auth: &Arc<Authenticator>,
        args: &Args,
        scenario_settings: Vec<(String, String)>,
    ) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .client_capacity(1 << 16)
            .connect(&nats.url)
            .await?;
        let mut settings = scenario_settings;
        settings.extend(args.gateway_settings.iter().cloned());
        Ok(Self {
            endpoint: Endpoint {
                kind,
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                auth: auth.clone(),
                prefix: PREFIX,
            },
            pid: 0,
            client,
            backing_pid: None,
            gateway_bin: args.gateway_bin.clone(),
            settings,
            gateway: None,
            nats,
        })
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

    /// The target's own gateway (none for the baseline).
    pub(crate) fn gateway(&self) -> Option<&Gateway> {
        self.gateway.as_ref()
    }

    /// Where sockets of this target's kind reach the instance at `addr`.
    pub(crate) fn endpoint_at(&self, addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            ..self.endpoint.clone()
        }
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

    /// Opens `args.sockets` sockets and fails the run when too few opened.
    pub(crate) async fn open(&self, args: &Args, stats: &Arc<Stats>) -> Result<Held> {
        self.open_on(std::slice::from_ref(&self.endpoint), args, stats)
            .await
    }

    /// Opens `args.sockets` sockets round-robin over `endpoints` and fails the run when too few opened.
    pub(crate) async fn open_on(
        &self,
        endpoints: &[Endpoint],
        args: &Args,
        stats: &Arc<Stats>,
    ) -> Result<Held> {
        let held = open_all(endpoints, args.sockets, args.concurrency, stats).await;
        enough_opened(&held, args.sockets)?;
        Ok(held)
    }

    /// Opens the sockets, with figures of their own, and samples the server: where the measurement of most
    /// scenarios starts.
    pub(crate) async fn start(&self, args: &Args) -> Result<(Arc<Stats>, Held, ProcSample)> {
        let stats = Arc::new(Stats::new(args.sockets));
        let held = self.open(args, &stats).await?;
        let from = sample(self.pid)?;
        Ok((stats, held, from))
    }

    /// The end of a scenario's measurement: the server's RSS, its CPU since `from`, and the closes; then
    /// the sockets are dropped.
    pub(crate) async fn finish<F, T: 'static>(
        &self,
        held: Held<T>,
        figures: F,
        stats: &Stats,
        from: ProcSample,
    ) -> Result<Run<F>> {
        let run = self.finish_opened(Opened::of(&held), figures, stats, from)?;
        held.drop_all().await;
        Ok(run)
    }

    /// [`Target::finish`] for a scenario whose sockets are gone already, with how they opened.
    pub(crate) fn finish_opened<F>(
        &self,
        opened: Opened,
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
    let target = start_target(args, kind, auth, M::gateway_settings(args)).await?;
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

/// Prints how opening went, and fails the run when more than `MOST_FAILED_PERCENT` of `n` sockets failed.
pub(crate) fn enough_opened<T: 'static>(held: &Held<T>, n: u64) -> Result<()> {
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
    Ok(())
}

/// The series of the counter family `name` in a gateway's `/metrics` body, by their labels as rendered
/// (`outcome="recovered"`).
pub(crate) fn metric_family(body: &str, name: &str) -> std::collections::BTreeMap<String, f64> {
    body.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
