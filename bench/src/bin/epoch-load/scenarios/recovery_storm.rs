//! `recovery-storm` (gateway only): an instance dies under its sockets, and all of them recover on another.
//!
//! Two instances, A and B, on one nats-server, one subject prefix and one event stream, both with a
//! per-topic history and a recovery limit large enough for the storm ([`HISTORY_PER_TOPIC`],
//! [`MAX_RECOVER`]). B is the target (its CPU and RSS are the report's server figures) and is started
//! first, so that its hot window of `user:public` holds every event of the run. N anonymous sockets join
//! `user:public` on A with `{"positions": true}` ([`crate::clients::recovering`]); events numbered from 0
//! are published on `user.public` at `--rate`; after `--secs` A is killed with SIGKILL while publishing
//! goes on, and every socket reconnects to B and rejoins with `{"since": <the last position it saw>}`.
//!
//! Measured from the kill: when each socket's rejoin was answered, and when each caught up (recovered, and
//! holding every event up to one published after its rejoin's reply). Then one more second of live events,
//! the publisher stops, deliveries drain, and every socket's numbers are checked: any event lost (a gap,
//! or missing at the end) or duplicated, any `recovered: false`, any socket that did not catch up or was
//! closed fails the run. Also: B's recoveries by outcome and events replayed (its `/metrics`), the
//! JetStream API requests nats-server served from the kill until every socket settled (`/jsz` `api.total`),
//! and B's and nats-server's CPU over that time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use epoch_gateway::config::env_var;
use epoch_testkit::Gateway;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::publish::{WINDOW_DRAIN_CAP, drain, public_subject, publish_until};
use super::{Measure, Run, Target, enough_opened, metric_family};
use crate::cli::Args;
use crate::clients::open_each;
use crate::clients::recovering::{self, Arrived, Storm};
use crate::driver::Phase;
use crate::report::{Headlines, Opened, TargetReport};
use crate::stats::{Stats, cpu_percent, sample};

/// `delivery.history_per_topic` and `delivery.max_recover` of both instances, unless the command line
/// sets them: room for every event of the run in the stream and in B's hot window (which also stops at
/// 1 MiB: about 15,000 of these events), and for the events a socket misses while it reconnects.
const HISTORY_PER_TOPIC: u64 = 20_000;
const MAX_RECOVER: u64 = 10_000;
const HISTORY_SETTING: &str = "delivery.history_per_topic";
const MAX_RECOVER_SETTING: &str = "delivery.max_recover";
/// How long every socket has to settle (caught up, or found lost) after the kill.
const STORM_CAP: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);
/// Live events after the storm settled, before the publisher stops: delivery goes on without a gap.
const LIVE_AFTER: Duration = Duration::from_secs(1);
/// B's metrics read before and after the storm.
const RECOVERIES: &str = "epoch_gateway_delivery_recoveries_total";
const REPLAYED: &str = "epoch_gateway_delivery_replay_events_sum";

pub(super) struct RecoveryStorm;

#[derive(Serialize)]
pub(super) struct RecoveryStormFigures {
    storm: StormFigures,
}

#[derive(Serialize)]
struct StormFigures {
    /// Which sockets: anonymous, each joined to `user:public` only.
    sockets_kind: &'static str,
    /// The two instances' delivery settings.
    history_per_topic: String,
    max_recover: String,
    rate_events_per_sec: f64,
    publish_secs_before_kill: f64,
    events_published: u64,
    sockets: u64,
    /// Rejoins answered ok on B, by `recovered`, and reconnect attempts tried again.
    recovered_true: u64,
    recovered_false: u64,
    failed_attempts: u64,
    /// When the rejoins were answered on B, counted from the kill.
    rejoined: Arrived,
    /// When the sockets caught up (recovered, every event up to the live head, none twice).
    caught_up: Arrived,
    /// From the kill until every socket settled (caught up, or at the head with something missing), or
    /// the cap.
    storm_secs: f64,
    events_lost: u64,
    sockets_with_loss: u64,
    most_lost_on_a_socket: u64,
    events_duplicated: u64,
    sockets_with_duplicates: u64,
    most_duplicated_on_a_socket: u64,
    /// B's `delivery_recoveries_total` over the run, by outcome, and the events its recoveries replayed.
    recoveries_by_outcome: BTreeMap<String, u64>,
    events_replayed: u64,
    /// JetStream API requests nats-server served from the kill until every socket settled.
    jetstream_api_requests: u64,
    gateway_b_cpu_percent: f64,
    nats_cpu_percent: f64,
}

/// B's recovery counters by outcome, and the events its recoveries replayed.
async fn recoveries(b: &Gateway) -> (BTreeMap<String, f64>, f64) {
    let body = b.http_body("/metrics").await;
    let outcomes = metric_family(&body, RECOVERIES)
        .into_iter()
        .map(|(labels, n)| {
            let outcome = labels
                .strip_prefix("outcome=\"")
                .and_then(|l| l.strip_suffix('"'))
                .unwrap_or(&labels);
            (outcome.to_owned(), n)
        })
        .collect();
    let replayed = epoch_testkit::metric_in(&body, REPLAYED).unwrap_or(0.0);
    (outcomes, replayed)
}

/// The sum of per-socket counts, the sockets with any, and the most on one socket.
fn spread(counts: &[u64]) -> (u64, u64, u64) {
    let sockets = counts.iter().filter(|&&n| n > 0).count() as u64;
    let most = counts.iter().copied().max().unwrap_or(0);
    (counts.iter().sum(), sockets, most)
}

/// The storm on the target's gateway (B) and an instance A of its own.
async fn storm(args: &Args, target: &Target) -> Result<Run<RecoveryStormFigures>> {
    let server = target.server()?;
    let b = server
        .gateway()
        .context("recovery-storm runs on the gateway")?;
    let mut a = server.start_gateway(&[]).await?;
    let (history, max_recover) = (
        server.setting(HISTORY_SETTING).unwrap_or("?").to_owned(),
        server
            .setting(MAX_RECOVER_SETTING)
            .unwrap_or("?")
            .to_owned(),
    );
    println!(
        "  instance A on {} (pid {}), B on {} (pid {}); {HISTORY_SETTING} {history}, {MAX_RECOVER_SETTING} {max_recover}",
        a.addr,
        a.pid(),
        b.addr,
        b.pid()
    );
    let stats = Arc::new(Stats::new(args.sockets));
    let storm = Arc::new(Storm::new(b.addr, args.concurrency));
    let on_a = a.addr;
    let held = open_each(
        args.sockets,
        args.concurrency,
        |i| recovering::open(on_a, i),
        |i, socket, stop| recovering::hold(socket, i, storm.clone(), stats.clone(), stop),
    )
    .await;
    enough_opened(&held, args.sockets)?;
    let first_open = Opened::of(&held);
    let sockets = held.opened;

    let stop_publishing = CancellationToken::new();
    let publisher = tokio::spawn({
        let (client, stop, rate) = (target.client.clone(), stop_publishing.clone(), args.rate);
        async move { publish_until(&client, rate, u64::MAX, &stop, 0, |_| public_subject()).await }
    });
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;

    let (outcomes_before, replayed_before) = recoveries(b).await;
    let api_before = server.jetstream_api_requests().await?;
    let b_from = sample(target.pid)?;
    let nats_pid = target.backing_pid.context("the gateway's nats-server")?;
    let nats_from = sample(nats_pid)?;
    let killed = Instant::now();
    storm.killed();
    a.kill();
    println!(
        "  A killed after {:.1} s of events at {:.0}/s; {sockets} sockets reconnect to B",
        args.secs, args.rate
    );
    while storm.settled() < sockets && killed.elapsed() < STORM_CAP {
        tokio::time::sleep(POLL).await;
    }
    let storm_secs = killed.elapsed().as_secs_f64();
    let gateway_b_cpu_percent = cpu_percent(b_from, sample(target.pid)?);
    let nats_cpu_percent = cpu_percent(nats_from, sample(nats_pid)?);
    let api_after = server.jetstream_api_requests().await?;

    tokio::time::sleep(LIVE_AFTER).await;
    stop_publishing.cancel();
    let published = publisher.await??;
    drain(&stats, WINDOW_DRAIN_CAP).await;
    let (outcomes_after, replayed_after) = recoveries(b).await;
    // B's figures with the sockets still open; then the sockets stop and report.
    let run = target.finish_opened(first_open, (), &stats)?;
    let ended = held.stop_all().await;

    // Events at the end that never arrived are lost too.
    let missing: Vec<u64> = ended
        .iter()
        .map(|o| o.lost + published.saturating_sub(o.next))
        .collect();
    let twice: Vec<u64> = ended.iter().map(|o| o.duplicated).collect();
    let (lost, with_loss, most_lost) = spread(&missing);
    let (duplicated, with_duplicates, most_duplicated) = spread(&twice);
    let tally = &storm.tally;
    let recovered_true = tally.recovered.load(Ordering::Relaxed);
    let recovered_false = tally.not_recovered.load(Ordering::Relaxed);
    let (rejoined, caught_up) = (tally.rejoined.of(sockets), tally.caught_up.of(sockets));
    let figures = StormFigures {
        sockets_kind: "anonymous, each joined to user:public only",
        history_per_topic: history,
        max_recover,
        rate_events_per_sec: args.rate,
        publish_secs_before_kill: args.secs,
        events_published: published,
        sockets,
        recovered_true,
        recovered_false,
        failed_attempts: tally.failed_attempts.load(Ordering::Relaxed),
        rejoined,
        caught_up,
        storm_secs,
        events_lost: lost,
        sockets_with_loss: with_loss,
        most_lost_on_a_socket: most_lost,
        events_duplicated: duplicated,
        sockets_with_duplicates: with_duplicates,
        most_duplicated_on_a_socket: most_duplicated,
        recoveries_by_outcome: outcomes_after
            .iter()
            .map(|(outcome, n)| {
                let before = outcomes_before.get(outcome).copied().unwrap_or(0.0);
                (outcome.clone(), (n - before) as u64)
            })
            .filter(|(_, n)| *n > 0)
            .collect(),
        events_replayed: (replayed_after - replayed_before) as u64,
        jetstream_api_requests: api_after.saturating_sub(api_before),
        gateway_b_cpu_percent,
        nats_cpu_percent,
    };
    println!(
        "  {} of {sockets} rejoined ({recovered_true} recovered, {recovered_false} not) in {:.2} s, {} caught up in {:.2} s; {lost} events lost, {duplicated} duplicated; {} JetStream API requests; B cpu {gateway_b_cpu_percent:.0} %",
        rejoined.sockets,
        rejoined.all_secs,
        caught_up.sockets,
        caught_up.all_secs,
        figures.jetstream_api_requests,
    );
    Ok(Run {
        opened: run.opened,
        figures: RecoveryStormFigures { storm: figures },
        server: run.server,
    })
}

impl Measure for RecoveryStorm {
    type Figures = RecoveryStormFigures;

    const JOINS_PER_SOCKET: u32 = 1;

    fn gateway_settings(_args: &Args) -> Vec<(String, String)> {
        vec![
            (env_var(HISTORY_SETTING), HISTORY_PER_TOPIC.to_string()),
            (env_var(MAX_RECOVER_SETTING), MAX_RECOVER.to_string()),
        ]
    }

    async fn run(args: &Args, target: &Target) -> Result<Run<RecoveryStormFigures>> {
        // The target alone, in one turn.
        target.turn(Phase::Measured, storm(args, target)).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, RecoveryStormFigures>) {
        let n = args.sockets;
        rows.info(
            format!("recovery storm: {n} sockets all rejoined on B after A's kill (s)"),
            |r| r.figures.storm.rejoined.all_secs,
        );
        rows.info("  … all recovered and at the live head (s)", |r| {
            r.figures.storm.caught_up.all_secs
        });
        rows.info("  … p50 socket at the live head (s)", |r| {
            r.figures.storm.caught_up.after_kill.p50_ms / 1000.0
        });
        rows.zero("  … rejoins with recovered: false", |r| {
            r.figures.storm.recovered_false as f64
        });
        rows.zero("  … events lost (all sockets)", |r| {
            r.figures.storm.events_lost as f64
        });
        rows.zero("  … events duplicated (all sockets)", |r| {
            r.figures.storm.events_duplicated as f64
        });
        rows.info("  … events replayed by B", |r| {
            r.figures.storm.events_replayed as f64
        });
        rows.info("  … JetStream API requests during the storm", |r| {
            r.figures.storm.jetstream_api_requests as f64
        });
        rows.info("  … B's CPU during the storm (% of a core)", |r| {
            r.figures.storm.gateway_b_cpu_percent
        });
    }

    fn failures(report: &TargetReport<RecoveryStormFigures>) -> Vec<String> {
        let storm = &report.figures.storm;
        let mut failures = Vec::new();
        let mut fail = |broken: bool, what: String| {
            if broken {
                failures.push(what);
            }
        };
        fail(
            storm.events_lost > 0,
            format!(
                "{} events lost on {} sockets",
                storm.events_lost, storm.sockets_with_loss
            ),
        );
        fail(
            storm.events_duplicated > 0,
            format!(
                "{} events duplicated on {} sockets",
                storm.events_duplicated, storm.sockets_with_duplicates
            ),
        );
        fail(
            storm.recovered_false > 0,
            format!(
                "{} rejoins answered recovered: false",
                storm.recovered_false
            ),
        );
        fail(
            storm.caught_up.sockets < storm.sockets,
            format!(
                "{} of {} sockets caught up within {} s",
                storm.caught_up.sockets,
                storm.sockets,
                STORM_CAP.as_secs()
            ),
        );
        fail(
            report.server.unexpected_closes > 0,
            format!(
                "{} sockets closed by the server or broken (outside the kill)",
                report.server.unexpected_closes
            ),
        );
        failures
    }
}
