//! The command line: one scenario per run, the servers to measure, and the sizes of the load; and the hidden
//! `--drive` of a driver process, which the tool passes to itself ([`crate::driver`]).

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::clients::Kind;
use crate::driver::Remote;

/// Most sockets of one target: one process (a driver, or this one for the gateway-only scenarios) holds
/// every client end of a target, under the open-file limit of 20,000.
pub(crate) const MAX_SOCKETS: u64 = 19_500;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scenario {
    /// N authenticated sockets, 3 joins each, held idle: server RSS per socket and connect rate.
    Idle,
    /// `announcement` on user.public to N sockets, offered rate stepped up until deliveries stop growing.
    Broadcast,
    /// 1 msg/s to N sockets: latency until the last socket has a message.
    BroadcastLatency,
    /// Messages to random `user:<id>` at each of `--rates`: publish → receive percentiles.
    PerUser,
    /// N sockets dropped at once and reopened with 3 joins each: time until all are joined again.
    Reconnect,
    /// `is_online` queries from the sockets at each of `--rates` (queries/s) while per-user messages flow at
    /// `--per-user-rate`: query round trips, and delivery latency with and without the queries. As a control,
    /// the same rate of frames that need no lookup: heartbeats to the gateway, `PING`s to nats-server.
    IsOnline,
    /// Per-user messages at `--per-user-rate` for `--secs` (10 minutes for the soak), in windows of
    /// `--sample-secs`: the server's RSS, open file descriptors and threads after each window, and the
    /// window's latency. Growth is judged from the end of the first window to the end of the last.
    Soak,
    /// Gateway only. Two instances A and B on one event stream; N anonymous sockets join `user:public` on A
    /// with positions while events are published at `--rate`; after `--secs` A is killed (SIGKILL) and
    /// every socket reconnects to B and rejoins with `since`: time until all are recovered and at the live
    /// head, events lost and duplicated (the run fails on any), recoveries by outcome, JetStream API
    /// requests, B's CPU.
    RecoveryStorm,
    /// Gateway only. For each of `--instances` K: K instances on one nats-server, N authenticated sockets
    /// round-robin over them (user i's socket joins `user:public`, `user:role` and `user:<i>`), per-user
    /// messages at each of `--rates` for `--secs`: the NATS messages each instance received as a share of
    /// those published, its CPU, p99, and 0 lost.
    ScaleOut,
    /// Gateway only. Two gateways, the presence feed off and on, their windows alternated: N authenticated
    /// sockets of which `--watchers` watch the feed, `--churn` presence joins and as many leaves a second,
    /// per-user messages at each of `--rates`: the feed's frames and bytes per watcher, the initial
    /// `presence_state`, the gateway's CPU and RSS, per-user p99 and lost; the run fails when a watcher's
    /// diffs come closer than the interval allows, a socket is closed or a watcher's list is wrong.
    PresenceFeed,
}

impl Scenario {
    /// The scenario's name on the command line (`recovery-storm`).
    pub(crate) fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }

    /// Scenarios that nats-server's WebSocket listener has no equivalent for.
    pub(crate) fn gateway_only(self) -> bool {
        matches!(
            self,
            Self::RecoveryStorm | Self::ScaleOut | Self::PresenceFeed
        )
    }
}

/// A server or a set of servers on the command line (`--targets gateway,bare`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Targets {
    /// The gateway, nats-server's WebSocket listener and the bare server (ratios to both).
    All,
    /// The gateway and nats-server's WebSocket listener.
    Both,
    Gateway,
    /// nats-server's WebSocket listener: the baseline.
    Nats,
    /// `bare_server`: the lower bound, delivery and nothing else.
    Bare,
    /// A second gateway with settings (`--gateway-b-setting`) or a build (`--gateway-b-bin`) of its own,
    /// its windows alternated with the first's: an A/B test of one change.
    GatewayB,
}

impl Targets {
    fn kinds(self) -> &'static [Kind] {
        match self {
            Self::All => &[Kind::Gateway, Kind::Nats, Kind::Bare],
            Self::Both => &[Kind::Gateway, Kind::Nats],
            Self::Gateway => &[Kind::Gateway],
            Self::Nats => &[Kind::Nats],
            Self::Bare => &[Kind::Bare],
            Self::GatewayB => &[Kind::GatewayB],
        }
    }
}

#[derive(Parser, Debug, Serialize)]
#[command(
    name = "epoch-load",
    about = "Load tool: epoch-gateway against nats-server's WebSocket listener and a bare server, same run, same machine"
)]
pub(crate) struct Args {
    pub(crate) scenario: Scenario,
    /// Sockets held (one user each, users 1..=N).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) sockets: u64,
    /// Handshakes in flight while sockets are opened (a reconnect storm is "everyone at once"; this is
    /// how many the tool keeps in flight). recovery-storm: also the reconnect handshakes in flight.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Which servers to measure (comma-separated): by default all three, the gateway alone for
    /// recovery-storm and scale-out. Their windows alternate, one target after the other.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) targets: Vec<Targets>,
    /// per-user and scale-out: offered messages per second, one measurement per rate.
    #[arg(long, value_delimiter = ',', default_value = "5000")]
    pub(crate) rates: Vec<f64>,
    /// presence-feed: sockets among `--sockets` that watch the presence feed (join `user:public` with
    /// `{"presence": true}`).
    #[arg(long, default_value_t = 1000)]
    pub(crate) watchers: u64,
    /// presence-feed: presence joins per second, and as many leaves, by users of a pool of their own.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) churn: f64,
    /// recovery-storm: events per second published on user.public, before and during the storm.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,
    /// scale-out: gateway instances, one measurement per count.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub(crate) instances: Vec<usize>,
    /// is-online: per-user messages/s published while the queries run (and without them, for comparison).
    /// soak: the per-user rate of the whole run.
    #[arg(long, default_value_t = 5000.0)]
    pub(crate) per_user_rate: f64,
    /// per-user, is-online and presence-feed: rounds of windows, pooled per rate and condition (each
    /// window's p99 is kept too). per-user: the rates once per round (default 1 round); is-online: alone,
    /// then control frames and queries at each rate (default 3 rounds); presence-feed: the rates once per
    /// round on each gateway (default 3 rounds). idle, reconnect and broadcast-latency: measurements, each
    /// target's alternated with the others' (default 1).
    #[arg(long)]
    pub(crate) repeats: Option<u32>,
    /// soak: seconds per sampling window.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) sample_secs: f64,
    /// per-user, scale-out and broadcast-latency: seconds of publishing per measurement. recovery-storm:
    /// seconds of publishing before the first instance is killed.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) secs: f64,
    /// broadcast: seconds per offered-rate step.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) step_secs: f64,
    /// broadcast: first offered rate in messages per second (each step multiplies it by `--step-factor`).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) start_rate: f64,
    #[arg(long, default_value_t = 1.5)]
    pub(crate) step_factor: f64,
    /// broadcast: most steps.
    #[arg(long, default_value_t = 16)]
    pub(crate) max_steps: u32,
    /// Seconds left to a server after the sockets are opened, before RSS is read (idle).
    #[arg(long, default_value_t = 3.0)]
    pub(crate) settle_secs: f64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// The gateway binary (by default the release build next to this program: `cargo build --release`).
    #[arg(long, default_value_os_t = epoch_testkit::gateway_bin())]
    pub(crate) gateway_bin: PathBuf,
    /// A gateway setting on top of the tool's, as `KEY=VALUE` with the key as in the configuration file
    /// (`runtime.worker_threads=1`); repeatable.
    #[arg(long = "gateway-setting", value_parser = parse_setting)]
    pub(crate) gateway_settings: Vec<(String, String)>,
    /// The nats-server binary (by default NATS_SERVER_BIN, else the one `scripts/setup.sh` installs).
    #[arg(long, default_value_os_t = epoch_testkit::nats_server_bin())]
    pub(crate) nats_server: PathBuf,
    /// The bare server (by default the build next to this program: `cargo build --release -p epoch-bench`).
    #[arg(long, default_value_os_t = epoch_testkit::gateway_bin().with_file_name("bare_server"))]
    pub(crate) bare_bin: PathBuf,
    /// The `gateway-b` target's binary (by default `--gateway-bin`).
    #[arg(long)]
    pub(crate) gateway_b_bin: Option<PathBuf>,
    /// A setting of the `gateway-b` target only, after the `--gateway-setting`s; repeatable.
    #[arg(long = "gateway-b-setting", value_parser = parse_setting)]
    pub(crate) gateway_b_settings: Vec<(String, String)>,
    /// per-user: write a timeline of every measured window, per 10 ms, to this path with each target's
    /// name added (`timeline.json` → `timeline-gateway.json`, …): deliveries and latency, the CPU of
    /// every thread of the server, its nats-server and the load tool, and the servers' counters.
    #[arg(long)]
    pub(crate) timeline: Option<PathBuf>,
    /// Run as the driver of one target: hold its sockets and measure on the turns the parent gives.
    #[arg(long, hide = true, value_parser = Remote::parse)]
    #[serde(skip)]
    pub(crate) drive: Option<Remote>,
}

impl Args {
    /// Refuses sizes the tool cannot run.
    pub(crate) fn check(&self) -> Result<()> {
        ensure!(self.sockets > 0, "--sockets must be > 0");
        ensure!(
            self.sockets <= MAX_SOCKETS,
            "at most 19,500 sockets: one process holds every client end of a target (open-file limit 20,000)"
        );
        ensure!(
            !(self.scenario.gateway_only() && self.kinds() != [Kind::Gateway]),
            "{} runs on the gateway only: the other servers have no equivalent",
            self.scenario.name()
        );
        ensure!(
            (self.gateway_b_bin.is_none() && self.gateway_b_settings.is_empty())
                || self.kinds().contains(&Kind::GatewayB),
            "--gateway-b-bin and --gateway-b-setting are for the gateway-b target (--targets gateway,gateway-b)"
        );
        ensure!(
            self.timeline.is_none() || self.scenario == Scenario::PerUser,
            "--timeline is a per-user option"
        );
        ensure!(
            self.instances.iter().all(|&k| k > 0),
            "--instances must be > 0"
        );
        ensure!(
            self.scenario != Scenario::PresenceFeed
                || (self.watchers <= self.sockets && self.churn > 0.0),
            "--watchers must be at most --sockets, and --churn > 0"
        );
        ensure!(
            self.rates.iter().all(|&r| r > 0.0)
                && self.rate > 0.0
                && self.repeats != Some(0)
                && self.secs > 0.0
                && self.step_secs > 0.0
                && self.settle_secs >= 0.0,
            "rates, repeats and durations must be > 0"
        );
        Ok(())
    }

    /// The value the command line gives a gateway setting (`delivery.enabled`), if any.
    pub(crate) fn setting(&self, key: &str) -> Option<&str> {
        setting_in(&self.gateway_settings, key)
    }

    /// The servers measured (`--targets`), each once, in the order gateway, gateway-b, nats-ws, bare.
    pub(crate) fn kinds(&self) -> Vec<Kind> {
        let chosen: Vec<Kind> = match self.targets.as_slice() {
            [] if self.scenario.gateway_only() => vec![Kind::Gateway],
            [] => Targets::All.kinds().to_vec(),
            targets => targets.iter().flat_map(|t| t.kinds()).copied().collect(),
        };
        Kind::ALL
            .iter()
            .copied()
            .filter(|kind| chosen.contains(kind))
            .collect()
    }

    /// Rounds of windows (`--repeats`), by default 3 for is-online and presence-feed and 1 otherwise.
    pub(crate) fn rounds(&self) -> u32 {
        self.repeats.unwrap_or(
            if matches!(self.scenario, Scenario::IsOnline | Scenario::PresenceFeed) {
                3
            } else {
                1
            },
        )
    }
}

/// The last value of the setting `key` (`delivery.enabled`) among `settings` (`EPOCH_GATEWAY__…` names).
pub(crate) fn setting_in<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    let name = epoch_gateway::config::env_var(key);
    settings
        .iter()
        .rev()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

/// `section.key=value` → (`EPOCH_GATEWAY__SECTION__KEY`, `value`).
fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let valid = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
    if !valid {
        return Err(format!(
            "{key:?} is not a configuration key like runtime.worker_threads"
        ));
    }
    Ok((epoch_gateway::config::env_var(key), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::parse_setting;

    #[test]
    fn a_setting_becomes_its_environment_variable() {
        assert_eq!(
            parse_setting("runtime.worker_threads=1"),
            Ok((
                "EPOCH_GATEWAY__RUNTIME__WORKER_THREADS".to_owned(),
                "1".to_owned()
            ))
        );
        assert!(parse_setting("runtime.worker_threads").is_err());
        assert!(parse_setting("runtime..threads=1").is_err());
        assert!(parse_setting("runtime.worker-threads=1").is_err());
    }
}
