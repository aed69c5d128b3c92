//! The scenarios, and the run that every one of them shares.
//!
//! The main process starts every target's servers ([`Server`]), then hands each target to a driver
//! process ([`crate::driver`]) that runs the scenario on it ([`drive`]): opens its sockets, measures on the
//! turns it is given, samples its server, and reports. Turns alternate between the targets, so every
//! window of a windowed scenario (per-user, is-online, broadcast, soak) has the other targets' windows on
//! either side, and the one-shot scenarios (idle, reconnect, broadcast-latency) alternate whole
//! measurements when `--repeats` asks for several. The first window of each target in per-user, is-online
//! and broadcast is a warm-up, reported apart and never counted.
//!
//! Each scenario is a [`Measure`]: its own figures type, how it measures one target (every step of it in a
//! [`Target::turn`]), and its headline figures. The publisher and the per-user windows several scenarios
//! share are in [`publish`]. The gateway-only scenarios (`recovery-storm`, `scale-out`) start more
//! instances of the gateway on the target's nats-server ([`Server::start_gateway`]), all on one subject
//! prefix, presence bucket and event stream, so they run in the main process, on their one target, in one
//! turn; they fail the run when a delivery promise is broken ([`Measure::failures`]). A scenario that
//! compares the gateway with itself under other settings (`presence-feed`: the presence feed off and on)
//! names its [`Measure::CONDITIONS`]: each is a gateway target of its own, driven like the others
//! ([`conditions`]).

mod broadcast;
mod conditions;
mod idle;
mod is_online;
mod per_user;
mod presence_feed;
mod publish;
mod reconnect;
mod recovery_storm;
mod scale_out;
mod soak;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use epoch_gateway::auth::Authenticator;
use epoch_gateway::config::Secret;
use serde::Serialize;

use crate::cli::{Args, Scenario, setting_in};
use crate::clients::{Endpoint, Held, Kind, open_all};
use crate::driver::{self, Outcome, Phase, Remote, Turns};
use crate::report::{
    Headlines, Opened, Report, ServerFigures, TargetReport, print_headlines, table,
};
use crate::servers::{PREFIX, Server};
use crate::stats::{Stats, mib, sample};

/// A run fails when more than this share of its sockets cannot be opened.
const MOST_FAILED_PERCENT: u64 = 1;

/// One scenario.
pub(crate) trait Measure {
    /// The scenario's figures of one server, next to the ones every scenario reports.
    type Figures: Serialize;

    /// Measures one target: opens the sockets, loads the server, samples it ([`Target::finish`]), each
    /// step in a turn.
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
    /// errors: a promise of the server broken, as opposed to a figure that misses its target.
    fn failures(_report: &TargetReport<Self::Figures>) -> Vec<String> {
        Vec::new()
    }

    /// The settings the scenario compares the gateway under, each a gateway target of its own (its own
    /// nats-server and sockets) with the condition's settings on top of the scenario's, their turns
    /// alternated; none: the scenario runs on `--targets`.
    const CONDITIONS: &'static [conditions::Condition] = &[];
}

/// What a scenario measured on one server.
pub(crate) struct Run<F> {
    pub(crate) opened: Opened,
    pub(crate) figures: F,
    pub(crate) server: ServerFigures,
}

/// Runs `args.scenario`: as the main process on the servers `--targets`, or as the driver of one.
pub(crate) async fn run(args: &Args) -> Result<()> {
    match args.scenario {
        Scenario::Idle => run_as::<idle::Idle>(args).await,
        Scenario::Broadcast => run_as::<broadcast::Broadcast>(args).await,
        Scenario::BroadcastLatency => run_as::<broadcast::BroadcastLatency>(args).await,
        Scenario::PerUser => run_as::<per_user::PerUser>(args).await,
        Scenario::Reconnect => run_as::<reconnect::Reconnect>(args).await,
        Scenario::IsOnline => run_as::<is_online::IsOnline>(args).await,
        Scenario::Soak => run_as::<soak::Soak>(args).await,
        Scenario::RecoveryStorm => run_as::<recovery_storm::RecoveryStorm>(args).await,
        Scenario::ScaleOut => run_as::<scale_out::ScaleOut>(args).await,
        Scenario::PresenceFeed => run_as::<presence_feed::PresenceFeed>(args).await,
    }
}

async fn run_as<M: Measure>(args: &Args) -> Result<()> {
    match &args.drive {
        Some(remote) => drive::<M>(args, remote).await,
        None if M::CONDITIONS.is_empty() => measure::<M>(args).await,
        None => conditions::measure::<M>(args).await,
    }
}

/// The driver of one target: runs the scenario on it and ends with its outcome, on a turn of its own (its
/// sockets close when it exits, which must not fall into another target's turn).
async fn drive<M: Measure>(args: &Args, remote: &Remote) -> Result<()> {
    let result = async {
        let target = Target::driven(remote).await?;
        let outcome = run_target::<M>(args, &target).await?;
        target.turns.take(Phase::Setup).await?;
        Ok(outcome)
    }
    .await;
    driver::report_end(result)
}

/// Every scenario's headline rows: the connect rate, the scenario's own, then the servers' CPU, memory
/// and closes.
fn all_headlines<M: Measure>(args: &Args, rows: &mut Headlines<'_, M::Figures>) {
    let joins = match M::JOINS_PER_SOCKET {
        1 => "1 join".to_owned(),
        n => format!("{n} joins each"),
    };
    rows.info(format!("connect rate (sockets/s, {joins})"), |r| {
        r.opened.connect_rate_per_sec
    });
    M::headlines(args, rows);
    rows.info("server CPU over the measured turns (% of a core)", |r| {
        r.cpu.server_cpu_percent
    });
    rows.own("  … its nats-server's CPU (% of a core)", |r| {
        r.cpu.backing_nats_cpu_percent.unwrap_or(f64::NAN)
    });
    rows.info("server RSS at the end (MiB)", |r| r.server.server_rss_mib);
    rows.own("  … its nats-server's RSS at the end (MiB)", |r| {
        r.server.backing_nats_rss_mib.unwrap_or(f64::NAN)
    });
    rows.zero("sockets closed by the server / broken", |r| {
        r.server.unexpected_closes as f64
    });
}

/// The main process: starts the targets' servers, has the scenario run on each, prints the headline
/// table and writes the report.
async fn measure<M: Measure>(args: &Args) -> Result<()> {
    let kinds = args.kinds();
    let mut servers = Vec::with_capacity(kinds.len());
    for &kind in &kinds {
        let server = Server::start(args, kind, M::gateway_settings(args)).await?;
        let backing = server
            .backing_pid
            .map_or(String::new(), |pid| format!(", its nats-server pid {pid}"));
        println!(
            "{}: {} sockets on {} (server pid {}{backing})",
            kind.label(),
            args.sockets,
            server.addr,
            server.pid,
        );
        servers.push(server);
    }
    let outcomes = if args.scenario.gateway_only() {
        let mut outcomes = Vec::with_capacity(servers.len());
        for server in servers {
            let kind = server.kind;
            let target = Target::alone(server).await?;
            outcomes.push((kind, run_target::<M>(args, &target).await?));
        }
        outcomes
    } else {
        driver::take_turns(&servers).await?
    };
    let mut rows = Headlines::of(None);
    all_headlines::<M>(args, &mut rows);
    let (rows, mut failures) = table(rows, &outcomes);
    for (kind, outcome) in &outcomes {
        let label = if *kind == Kind::Gateway {
            String::new()
        } else {
            format!("{}: ", kind.label())
        };
        failures.extend(outcome.failures.iter().map(|f| format!("{label}{f}")));
    }
    print_headlines(&rows, &kinds);
    let report_of = |kind: Kind| {
        outcomes
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, outcome)| &outcome.report)
    };
    let report = Report {
        scenario: args.scenario,
        args,
        cpus: epoch_bench::cpus(),
        headlines: &rows,
        failures: &failures,
        gateway: report_of(Kind::Gateway),
        gateway_b: report_of(Kind::GatewayB),
        nats_ws: report_of(Kind::Nats),
        bare: report_of(Kind::Bare),
    };
    conclude(args, &report, &failures)
}

/// The end of a run in the main process: the report written where `--json` says, and the run failed when
/// a promise was broken.
fn conclude(args: &Args, report: &impl Serialize, failures: &[String]) -> Result<()> {
    if let Some(path) = &args.json {
        epoch_bench::write_json(path, report)?;
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

/// Runs the scenario on one target and takes its report's headline values.
async fn run_target<M: Measure>(args: &Args, target: &Target) -> Result<Outcome> {
    let run = M::run(args, target).await?;
    let report = TargetReport {
        opened: run.opened,
        figures: run.figures,
        server: run.server,
        cpu: target.turns.cpu()?,
    };
    let mut rows = Headlines::of(Some(&report));
    all_headlines::<M>(args, &mut rows);
    Ok(Outcome {
        values: rows.into_values(),
        failures: M::failures(&report),
        report: serde_json::to_value(&report)?,
    })
}

/// One server under test as a scenario sees it: its sockets' endpoint, the processes measured, the
/// publisher's connection, and the turns.
pub(crate) struct Target {
    pub(crate) endpoint: Endpoint,
    pub(crate) pid: u32,
    /// The nats-server behind the gateway or the bare server.
    pub(crate) backing_pid: Option<u32>,
    /// The monitoring endpoint of the target's nats-server.
    pub(crate) monitoring: Option<SocketAddr>,
    /// The other targets' processes ([`Remote::neighbours`]).
    pub(crate) neighbours: Vec<u32>,
    pub(crate) client: async_nats::Client,
    pub(crate) turns: Turns,
    /// The processes, when this process started them (the gateway-only scenarios); none in a driver.
    server: Option<Server>,
    /// The gateway settings of the target, as [`Remote::settings`].
    settings: Vec<(String, String)>,
}

impl Target {
    /// A driver's target, whose servers the main process started.
    async fn driven(remote: &Remote) -> Result<Self> {
        Self::new(remote, Turns::driven(remote.pid, remote.backing_pid), None).await
    }

    /// A target this process started and runs alone.
    async fn alone(server: Server) -> Result<Self> {
        let remote = server.remote();
        let turns = Turns::alone(remote.pid, remote.backing_pid);
        Self::new(&remote, turns, Some(server)).await
    }

    async fn new(remote: &Remote, turns: Turns, server: Option<Server>) -> Result<Self> {
        // Tokens are signed with the secret of the gateways the harness starts.
        let auth = Arc::new(Authenticator::new(
            &Secret::new(epoch_testkit::SECRET),
            jsonwebtoken::Algorithm::HS512,
        ));
        let client = async_nats::ConnectOptions::new()
            .client_capacity(1 << 16)
            .connect(&remote.nats_url)
            .await?;
        Ok(Self {
            endpoint: Endpoint {
                kind: remote.kind,
                addr: remote.addr,
                auth,
                prefix: PREFIX,
            },
            pid: remote.pid,
            backing_pid: remote.backing_pid,
            monitoring: remote.monitoring,
            neighbours: remote.neighbours.clone(),
            client,
            turns,
            server,
            settings: remote.settings.clone(),
        })
    }

    /// The value a gateway setting (`presence.feed`) has on this target, when the scenario or the command
    /// line set it.
    pub(crate) fn setting(&self, key: &str) -> Option<&str> {
        setting_in(&self.settings, key)
    }

    /// The target's processes: only where they were started (the gateway-only scenarios).
    pub(crate) fn server(&self) -> Result<&Server> {
        self.server
            .as_ref()
            .context("this scenario runs in the process that started its servers")
    }

    /// Waits for a turn, does `work` on it, and hands the turn on.
    pub(crate) async fn turn<T>(
        &self,
        phase: Phase,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.turns.take(phase).await?;
        let value = work.await?;
        self.turns.over()?;
        Ok(value)
    }

    /// Where sockets of this target's kind reach the instance at `addr`.
    pub(crate) fn endpoint_at(&self, addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            ..self.endpoint.clone()
        }
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

    /// Opens the sockets, with figures of their own, on a setup turn: where most scenarios start.
    pub(crate) async fn start(&self, args: &Args) -> Result<(Arc<Stats>, Held)> {
        self.turn(Phase::Setup, async {
            let stats = Arc::new(Stats::new(args.sockets));
            let held = self.open(args, &stats).await?;
            Ok((stats, held))
        })
        .await
    }

    /// The end of a scenario, on a setup turn: the server's RSS and its nats-server's, and the closes; then
    /// the sockets are dropped.
    pub(crate) async fn finish<F, T: 'static>(
        &self,
        held: Held<T>,
        figures: F,
        stats: &Stats,
    ) -> Result<Run<F>> {
        self.turn(Phase::Setup, async {
            let run = self.finish_opened(Opened::of(&held), figures, stats)?;
            held.drop_all().await;
            Ok(run)
        })
        .await
    }

    /// [`Target::finish`] within a turn under way, with how the sockets opened.
    pub(crate) fn finish_opened<F>(
        &self,
        opened: Opened,
        figures: F,
        stats: &Stats,
    ) -> Result<Run<F>> {
        let server = ServerFigures {
            server_rss_mib: mib(sample(self.pid)?.rss),
            backing_nats_rss_mib: self
                .backing_pid
                .map(|pid| Ok::<_, anyhow::Error>(mib(sample(pid)?.rss)))
                .transpose()?,
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
        })
    }
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
