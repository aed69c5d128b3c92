//! `scale-out` (gateway only): what one more instance takes off each instance's NATS ingress.
//!
//! For each of `--instances` K: K instances on one nats-server, one subject prefix, presence bucket and
//! event stream (the target's gateway and K − 1 more, stopped with SIGTERM after the step); `--sockets` N
//! authenticated sockets, socket i (user i + 1) on instance i mod K, each joined to `user:public`,
//! `user:role` and `user:<id>`; per-user messages to uniformly random users at each of `--rates` for
//! `--secs`. Per instance and window: the NATS messages it took in (the delta of
//! `epoch_gateway_nats_messages_total`, as a share of those published), everything nats-server sent to its
//! connection (`/connz` `out_msgs`, presence watch updates included), and its CPU while publishing; per
//! window, the per-user percentiles and the messages lost (any fails the run).
//!
//! With interest-based ingress (delivery on) an instance receives only the events of users with a session
//! on it, about 1/K of them; run it again with `--gateway-setting delivery.enabled=false` for the core
//! NATS path, where every instance receives every per-user message.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use epoch_testkit::Gateway;
use serde::Serialize;

use super::publish::per_user_window_over;
use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::driver::Phase;
use crate::report::{Headlines, Opened, TargetReport};
use crate::stats::{Latency, Stats, percentiles};

/// The metric of what an instance took in from NATS.
const NATS_MESSAGES: &str = "epoch_gateway_nats_messages_total";
/// Bound on an instance's clean shutdown after its step.
const STOP_WAIT: Duration = Duration::from_secs(15);

pub(super) struct ScaleOut;

#[derive(Serialize)]
pub(super) struct ScaleOutFigures {
    /// `delivery.enabled` of every instance: interest-based ingress, or the core NATS path.
    delivery_enabled: bool,
    steps: Vec<Step>,
}

/// One instance count and per-user rate.
#[derive(Serialize)]
struct Step {
    instances: usize,
    rate_msgs_per_sec: f64,
    /// How the step's sockets opened (over all its instances).
    opened: Opened,
    sent: u64,
    delivered: u64,
    lost: u64,
    latency: Latency,
    per_instance: Vec<InstanceFigures>,
    /// The largest and the mean of the instances' shares.
    most_share_percent: f64,
    mean_cpu_percent: f64,
    nats_cpu_percent: f64,
    load_tool_cpu_percent: f64,
}

/// One instance over one window.
#[derive(Serialize)]
struct InstanceFigures {
    instance: usize,
    sockets: u64,
    nats_messages: u64,
    share_percent: f64,
    connz_out_msgs: u64,
    cpu_percent: f64,
}

/// What was counted for an instance before or after a window.
struct Counts {
    nats_messages: f64,
    out_msgs: u64,
}

/// Each instance's counts: its `/metrics` and its connection's `/connz` `out_msgs`.
async fn counts(target: &Target, gateways: &[&Gateway]) -> Result<Vec<Counts>> {
    let connz = target
        .server()?
        .monitoring_json("/connz?limit=100000")
        .await?;
    let connections = connz["connections"]
        .as_array()
        .context("no connections in /connz")?;
    let mut counts = Vec::with_capacity(gateways.len());
    for gateway in gateways {
        let name = format!("epoch-gateway {}", gateway.node);
        let out_msgs = connections
            .iter()
            .filter(|c| c["name"] == name.as_str())
            .filter_map(|c| c["out_msgs"].as_u64())
            .sum();
        let nats_messages = gateway
            .try_metric(NATS_MESSAGES)
            .await
            .with_context(|| format!("{NATS_MESSAGES} of instance {}", gateway.node))?;
        counts.push(Counts {
            nats_messages,
            out_msgs,
        });
    }
    Ok(counts)
}

/// Whether the instances run with the event stream (`delivery.enabled`, on by default).
fn delivery_enabled(setting: Option<&str>) -> bool {
    !setting.is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// Step `i` of a report.
fn step(report: &TargetReport<ScaleOutFigures>, i: usize) -> &Step {
    &report.figures.steps[i]
}

/// The instance counts and rates, on the target's gateway and instances of their own.
async fn scale_out(args: &Args, target: &Target) -> Result<Run<ScaleOutFigures>> {
    let server = target.server()?;
    let first = server.gateway().context("scale-out runs on the gateway")?;
    let nats_pid = target.backing_pid.context("the gateway's nats-server")?;
    let stats = Arc::new(Stats::new(args.sockets));
    let (mut steps, mut seq, mut opened) = (Vec::new(), 0, None);
    for &k in &args.instances {
        let mut more = Vec::with_capacity(k - 1);
        for _ in 1..k {
            more.push(server.start_gateway(&[]).await?);
        }
        let gateways: Vec<&Gateway> = std::iter::once(first).chain(&more).collect();
        let endpoints: Vec<_> = gateways
            .iter()
            .map(|g| target.endpoint_at(g.addr))
            .collect();
        println!("  {k} instance(s):");
        let held = target.open_on(&endpoints, args, &stats).await?;
        let step_opened = Opened::of(&held);
        let users = held.opened.max(1);
        let mut pids: Vec<u32> = gateways.iter().map(|g| g.pid()).collect();
        pids.push(nats_pid);
        for &rate in &args.rates {
            let before = counts(target, &gateways).await?;
            let w =
                per_user_window_over(target, &pids, &stats, rate, args.secs, seq, users).await?;
            seq += w.sent;
            let after = counts(target, &gateways).await?;
            let per_instance: Vec<InstanceFigures> = before
                .iter()
                .zip(&after)
                .enumerate()
                .map(|(j, (before, after))| {
                    let nats_messages = (after.nats_messages - before.nats_messages) as u64;
                    InstanceFigures {
                        instance: j + 1,
                        // Socket i is on instance i mod k.
                        sockets: (args.sockets + (k - 1 - j) as u64) / k as u64,
                        nats_messages,
                        share_percent: 100.0 * nats_messages as f64 / w.sent.max(1) as f64,
                        connz_out_msgs: after.out_msgs.saturating_sub(before.out_msgs),
                        cpu_percent: w.servers_cpu[j],
                    }
                })
                .collect();
            let latency = percentiles(&w.counts);
            let most_share_percent = per_instance
                .iter()
                .map(|i| i.share_percent)
                .fold(0.0, f64::max);
            let mean_cpu_percent = w.servers_cpu[..k].iter().sum::<f64>() / k as f64;
            println!(
                "    {rate:>7.0} msg/s: {} of {} delivered, p99 {:.3} ms; per instance: {}; nats-server cpu {:.0} %",
                w.delivered,
                w.sent,
                latency.p99_ms,
                per_instance
                    .iter()
                    .map(|i| format!(
                        "{} msgs ({:.1} %), cpu {:.0} %",
                        i.nats_messages, i.share_percent, i.cpu_percent
                    ))
                    .collect::<Vec<_>>()
                    .join(" | "),
                w.servers_cpu[k],
            );
            steps.push(Step {
                instances: k,
                rate_msgs_per_sec: rate,
                opened: step_opened.clone(),
                sent: w.sent,
                delivered: w.delivered,
                lost: w.sent.saturating_sub(w.delivered),
                latency,
                per_instance,
                most_share_percent,
                mean_cpu_percent,
                nats_cpu_percent: w.servers_cpu[k],
                load_tool_cpu_percent: w.tool_cpu,
            });
        }
        held.drop_all().await;
        for mut gateway in more {
            gateway.stop(STOP_WAIT).await;
        }
        opened = Some(step_opened);
    }
    let figures = ScaleOutFigures {
        delivery_enabled: delivery_enabled(server.setting("delivery.enabled")),
        steps,
    };
    let opened = opened.context("--instances names no count")?;
    target.finish_opened(opened, figures, &stats)
}

impl Measure for ScaleOut {
    type Figures = ScaleOutFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<ScaleOutFigures>> {
        // The target alone, in one turn.
        target.turn(Phase::Measured, scale_out(args, target)).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, ScaleOutFigures>) {
        let ingress = if delivery_enabled(args.setting("delivery.enabled")) {
            "interest-based"
        } else {
            "core NATS"
        };
        let mut i = 0;
        for &k in &args.instances {
            for &rate in &args.rates {
                rows.info(
                    format!("scale-out, {ingress}, {k} instance(s), {rate} msg/s: most NATS messages an instance received (% of published)"),
                    move |r| step(r, i).most_share_percent,
                );
                rows.info("  … mean instance CPU (% of a core)", move |r| {
                    step(r, i).mean_cpu_percent
                });
                rows.info("  … nats-server CPU (% of a core)", move |r| {
                    step(r, i).nats_cpu_percent
                });
                rows.info("  … per-user p99 (ms)", move |r| {
                    step(r, i).latency.p99_ms
                });
                rows.zero("  … messages lost", move |r| step(r, i).lost as f64);
                i += 1;
            }
        }
    }

    fn failures(report: &TargetReport<ScaleOutFigures>) -> Vec<String> {
        let mut failures: Vec<String> = report
            .figures
            .steps
            .iter()
            .filter(|s| s.lost > 0)
            .map(|s| {
                format!(
                    "{} instance(s), {} msg/s: {} of {} messages lost",
                    s.instances, s.rate_msgs_per_sec, s.lost, s.sent
                )
            })
            .collect();
        if report.server.unexpected_closes > 0 {
            failures.push(format!(
                "{} sockets closed by the server or broken",
                report.server.unexpected_closes
            ));
        }
        failures
    }
}
