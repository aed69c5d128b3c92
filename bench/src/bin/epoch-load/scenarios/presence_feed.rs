//! `presence-feed` (gateway only: nats-server's WebSocket listener and the bare server have no feed): what
//! the presence feed costs, to its watchers and to the per-user load beside it, with the feed off and on
//! in one run.
//!
//! Two gateways, each a target of its own with its own nats-server and sockets ([`super::conditions`]):
//! `presence.feed=off` and `presence.feed=authenticated`, both with the interval of [`FEED_INTERVAL_MS`]
//! (unless `--gateway-setting presence.feed_interval_ms=…`) and a `presence.feed_max_users` of every user of
//! the run, so that the feed is never suspended. Their turns alternate, off, on, off, on. On each:
//!
//! - `--sockets` N users' sockets (users 1..=N), opened as the other scenarios open them: authenticated,
//!   joined to `user:public`, `user:role` and `user:<id>`. The last `--watchers` W of them are the watchers
//!   ([`feed`]): with the feed on their `user:public` join asks for it, `{"presence": true}`, and each is open
//!   once its `presence_state` arrived (its size is the initial state, counted apart); with the feed off
//!   they join plainly, so that both gateways hold the same sockets and joins. They open last, so that
//!   their states list everybody online.
//! - The churn: a pool of P = 2 × `--churn` × [`CHURN_DWELL`] more sockets, users N + 1 ..= N + P, each
//!   authenticated as its own user and joined to nothing at first; half of them join `user:public` while
//!   the sockets open. During each of the target's windows, `--churn` times a second, the pool user online
//!   longest leaves `user:public` (`phx_leave`: a presence leave) and the one offline longest joins it (a
//!   presence join): `--churn` joins and as many leaves a second, with N + P / 2 users online throughout.
//!   Joins and leaves on held sockets cost no connect, which is not what is measured. Each pool user stays
//!   online (and then offline) for `CHURN_DWELL`, several intervals, so that its join and its leave fall
//!   into different diffs instead of cancelling out within one.
//! - Windows: a warm-up (a setup turn, not counted), then `--repeats` rounds (3 by default) of a window
//!   per `--rates` rate: per-user messages to random users 1..=N at that rate for `--secs` while the churn
//!   goes on, then the drain. The churn runs in the target's own turns only, so the other gateway idles
//!   meanwhile.
//!
//! Figures per condition: per rate, the per-user percentiles and losses pooled over the rounds; the feed's
//! frames and bytes per watcher per second (diffs only, over the time the churn ran), users per diff, the
//! initial state's bytes and users apart; how far apart one watcher's diffs arrived; the churn done; with
//! the headline rows every scenario has, the gateway's CPU over the measured turns and its RSS at the end.
//!
//! The run fails, as recovery-storm does, when a promise is broken: any socket closed by the gateway, a
//! join or leave of the churn refused; with the feed on, two diffs on one watcher closer than the interval
//! less [`JITTER_SHARE`] of it (in a measured window), no diff at all, a later `presence_state` or a
//! `presence_suspended`, a feed frame the watcher's list cannot take, or, at the end, a watcher whose list
//! (its state with every diff applied as phoenix.js's `Presence.syncDiff` does) is not the set of users
//! online as the tool knows it: the users' sockets and the pool users whose last join was answered; with
//! the feed off, any feed frame.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use epoch_gateway::config::env_var;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::conditions::Condition;
use super::publish::{
    RatePoint, RateTotals, WarmUp, Window, in_round_order, paced, per_user_window,
};
use super::{Measure, Run, Target, enough_opened};
use crate::cli::{Args, MAX_SOCKETS};
use crate::clients::feed::{self, DiffCounts, ListDifferences, Pool, Watch};
use crate::clients::{Held, open_all, open_each};
use crate::driver::Phase;
use crate::report::{Headlines, Opened, TargetReport};
use crate::stats::{Latency, Stats, percentiles};

/// The gateway settings of the feed.
const FEED: &str = "presence.feed";
const FEED_INTERVAL: &str = "presence.feed_interval_ms";
const FEED_MAX_USERS: &str = "presence.feed_max_users";
/// `presence.feed` of the feed-off gateway.
const FEED_OFF: &str = "off";
/// The feed's interval unless the command line sets another: the gateway's default, set all the same so
/// that the tool knows what it checks the diffs against.
const FEED_INTERVAL_MS: u64 = 1000;
/// How long a pool user stays online, and then offline: several intervals, so that a user's join and its
/// leave fall into different diffs instead of cancelling out within one.
const CHURN_DWELL: Duration = Duration::from_secs(5);
/// How much of an interval two diffs on one watcher may come closer than it: delivery jitter (a diff
/// written or read late, the next one on time). Two diffs of one interval, unbatched changes, would come
/// milliseconds apart.
const JITTER_SHARE: f64 = 0.5;
/// At the end, the lists have this many intervals to show the last changes (the tick that takes them, and
/// its frame on the way), and `SETTLE_MARGIN`; every join and leave of the pool is answered by then.
const SETTLE_INTERVALS: u32 = 2;
const SETTLE_MARGIN: Duration = Duration::from_secs(1);
/// Bound on the pool's first joins, while the sockets open.
const POOL_JOIN_WAIT: Duration = Duration::from_secs(30);
/// The feed's list changes at its ticks only: before the watchers open, one interval and this pass, so
/// that a tick has taken every user already online into the list their states are made of.
const TICK_MARGIN: Duration = Duration::from_millis(250);
const POLL: Duration = Duration::from_millis(50);

/// The feed off, then on: the order of the turns.
const CONDITIONS: &[Condition] = &[
    Condition {
        name: "feed_off",
        label: "feed off",
        settings: &[(FEED, FEED_OFF)],
    },
    Condition {
        name: "feed_on",
        label: "feed on",
        settings: &[(FEED, "authenticated")],
    },
];

pub(super) struct PresenceFeed;

/// The run's sockets: `users` users' sockets, of which the last `watchers` watch, and the churn pool's
/// `pool` (users after them).
#[derive(Clone, Copy)]
struct Sizes {
    users: u64,
    watchers: u64,
    pool: u64,
}

impl Sizes {
    fn of(args: &Args) -> Self {
        let per_dwell = (args.churn * CHURN_DWELL.as_secs_f64()).ceil() as u64;
        Self {
            users: args.sockets,
            watchers: args.watchers,
            pool: 2 * per_dwell.max(1),
        }
    }

    /// The users' sockets that do not watch: sockets `0..plain`.
    fn plain(self) -> u64 {
        self.users - self.watchers
    }

    /// Every user of the run, and socket a target holds.
    fn all(self) -> u64 {
        self.users + self.pool
    }

    /// Users online while the churn goes on: the users' sockets and half the pool.
    fn online(self) -> u64 {
        self.users + self.pool / 2
    }
}

#[derive(Serialize)]
pub(super) struct PresenceFeedFigures {
    /// This gateway's `presence.feed`: `off` or `authenticated`.
    presence_feed: String,
    feed_interval_ms: u64,
    rounds: u32,
    users: u64,
    watchers: u64,
    watchers_opened: u64,
    churn_pool: u64,
    online_users: u64,
    churn_offered_per_sec: f64,
    warm_up: WarmUp,
    points: Vec<RatePoint>,
    churn: ChurnFigures,
    feed: FeedFigures,
}

/// The churn over the measured windows (refusals over the whole run).
#[derive(Serialize)]
struct ChurnFigures {
    joins: u64,
    leaves: u64,
    /// Joins and leaves answered ok, per second of churn.
    joins_per_sec: f64,
    leaves_per_sec: f64,
    refused: u64,
}

/// What the feed sent the watchers. Rates are over the measured windows, while the churn ran.
#[derive(Serialize)]
struct FeedFigures {
    churn_secs: f64,
    diffs: u64,
    diffs_per_watcher_per_sec: f64,
    diffs_per_watcher_per_sec_per_window: Vec<f64>,
    diff_bytes_per_watcher_per_sec: f64,
    mean_diff_bytes: f64,
    mean_joins_per_diff: f64,
    mean_leaves_per_diff: f64,
    /// How far apart one watcher's diffs arrived in the measured windows, and the closest two.
    diff_spacing: Latency,
    closest_diffs_ms: f64,
    /// Diffs closer than this to the watcher's last one are early (a failure).
    early_below_ms: f64,
    early_diffs: u64,
    initial_state: InitialState,
    later_states: u64,
    suspended: u64,
    malformed: u64,
    watchers_closed: u64,
    /// With the feed on: the watchers' lists at the end against the users online.
    lists: Option<ListCheck>,
}

/// The watchers' initial lists: each a `presence_state`, then for a long list `presence_diff`s that join
/// the rest, a bounded number of users a frame.
#[derive(Serialize)]
struct InitialState {
    watchers: u64,
    /// Bytes of a watcher's whole initial list, on average.
    mean_bytes: f64,
    /// The largest frame of an initial list.
    max_frame_bytes: u64,
    mean_users: f64,
}

/// The lists at the end.
#[derive(Serialize)]
struct ListCheck {
    #[serde(flatten)]
    differences: ListDifferences,
    users_online: u64,
    /// Every join and leave of the pool answered.
    pool_settled: bool,
    /// From the end of the last measured turn's drain until the lists matched (or the wait ran out).
    secs: f64,
}

/// The sockets of one target.
struct Sockets {
    plain: Held,
    churners: Held,
    watchers: Held,
}

impl Sockets {
    /// How the users' sockets opened (the pool's are not counted: they join nothing at first).
    fn opened(&self) -> Opened {
        Opened::of_all(&[&self.plain, &self.watchers])
    }

    /// Per user index, whether the user is online as far as the tool knows: a user's socket that opened
    /// (each joined `user:public`), a pool user whose last join was answered.
    fn online(&self, sizes: Sizes, pool: &Pool) -> Vec<bool> {
        let mut online = vec![false; sizes.all() as usize];
        let users = self
            .plain
            .indices
            .iter()
            .copied()
            .chain(self.watchers.indices.iter().map(|w| sizes.plain() + w));
        for i in users {
            online[i as usize] = true;
        }
        for k in 0..sizes.pool as usize {
            online[sizes.users as usize + k] = pool.is_online(k);
        }
        online
    }

    async fn drop_all(self) {
        self.plain.drop_all().await;
        self.churners.drop_all().await;
        self.watchers.drop_all().await;
    }
}

/// Who in the pool is online and who comes next: the one offline longest joins as the one online longest
/// leaves.
struct Churn {
    pool: Arc<Pool>,
    online: VecDeque<usize>,
    offline: VecDeque<usize>,
}

impl Churn {
    /// The first half of the pool comes online, the other half waits.
    fn start(pool: Arc<Pool>, size: u64) -> Self {
        let (online, offline): (VecDeque<usize>, VecDeque<usize>) =
            (0..size as usize).partition(|&k| (k as u64) < size / 2);
        for &k in &online {
            pool.set(k, true);
        }
        Self {
            pool,
            online,
            offline,
        }
    }

    /// A join and a leave `rate` times a second for `secs`.
    async fn run(&mut self, rate: f64, secs: f64) -> Result<u64> {
        let total = (rate * secs).round() as u64;
        paced(rate, total, &CancellationToken::new(), |_| {
            self.swap();
            std::future::ready(Ok::<(), anyhow::Error>(()))
        })
        .await
    }

    fn swap(&mut self) {
        if let (Some(leaving), Some(joining)) = (self.online.pop_front(), self.offline.pop_front())
        {
            self.pool.set(leaving, false);
            self.pool.set(joining, true);
            self.offline.push_back(leaving);
            self.online.push_back(joining);
        }
    }
}

/// What one target's run shares.
struct Feed<'a> {
    args: &'a Args,
    target: &'a Target,
    sizes: Sizes,
    stats: Arc<Stats>,
    watch: Arc<Watch>,
    pool: Arc<Pool>,
}

/// One window: per-user messages while the churn goes on.
struct FeedWindow {
    per_user: Window,
    /// The diffs that arrived while the churn ran, and for how long it ran.
    diffs: DiffCounts,
    churn_secs: f64,
    /// Joins and leaves answered over the window.
    joins: u64,
    leaves: u64,
}

/// The measured windows' feed and churn, summed.
#[derive(Default)]
struct FeedTotals {
    diffs: DiffCounts,
    churn_secs: f64,
    joins: u64,
    leaves: u64,
    diffs_per_watcher_per_sec: Vec<f64>,
}

impl Feed<'_> {
    /// Opens the users' sockets that do not watch, then the pool (half of it joins), then, after a tick
    /// of the feed, the watchers.
    async fn open(&self, feed_on: bool, interval: Duration) -> Result<(Sockets, Churn)> {
        let (args, sizes, endpoint) = (self.args, self.sizes, &self.target.endpoint);
        let plain = open_all(
            std::slice::from_ref(endpoint),
            sizes.plain(),
            args.concurrency,
            &self.stats,
        )
        .await;
        enough_opened(&plain, sizes.plain())?;
        let churners = open_each(
            sizes.pool,
            args.concurrency,
            |k| feed::open_churner(endpoint, sizes.users + k),
            |k, ws, stop| {
                let (pool, stats) = (self.pool.clone(), self.stats.clone());
                feed::hold_churner(ws, k as usize, sizes.users + k, pool, stats, stop)
            },
        )
        .await;
        enough_opened(&churners, sizes.pool)?;
        // Every pool user is scheduled to come and go.
        ensure!(
            churners.failed == 0,
            "a socket of the churn pool did not open"
        );
        let churn = Churn::start(self.pool.clone(), sizes.pool);
        let deadline = Instant::now() + POOL_JOIN_WAIT;
        while !self.pool.settled() {
            ensure!(
                Instant::now() < deadline,
                "the pool's first joins were not answered"
            );
            tokio::time::sleep(POLL).await;
        }
        tokio::time::sleep(interval + TICK_MARGIN).await;
        let watchers = open_each(
            sizes.watchers,
            args.concurrency,
            |w| {
                let (watch, stats) = (self.watch.clone(), self.stats.clone());
                feed::open_watcher(
                    endpoint,
                    sizes.plain() + w,
                    w as usize,
                    feed_on,
                    watch,
                    stats,
                )
            },
            |_, socket, stop| feed::hold_watcher(socket, stop),
        )
        .await;
        enough_opened(&watchers, sizes.watchers)?;
        let t = &self.watch.tally;
        let states = t.states.load(Ordering::Relaxed);
        if states > 0 {
            println!(
                "  {states} presence_state, {:.0} bytes and {:.0} users each on average",
                t.state_bytes.load(Ordering::Relaxed) as f64 / states as f64,
                t.state_users.load(Ordering::Relaxed) as f64 / states as f64,
            );
        }
        let sockets = Sockets {
            plain,
            churners,
            watchers,
        };
        Ok((sockets, churn))
    }

    /// Per-user messages at `rate` for `--secs`, numbered from `seq`, while the churn goes on; then the
    /// drain.
    async fn window(&self, churn: &mut Churn, rate: f64, seq: u64) -> Result<FeedWindow> {
        let (args, pool) = (self.args, &self.pool);
        let joins = pool.joins.load(Ordering::Relaxed);
        let leaves = pool.leaves.load(Ordering::Relaxed);
        let from = self.watch.counts();
        let started = Instant::now();
        let churning = async {
            churn.run(args.churn, args.secs).await?;
            Ok::<_, anyhow::Error>((self.watch.counts(), started.elapsed().as_secs_f64()))
        };
        let users = self.sizes.users;
        let per_user = per_user_window(self.target, &self.stats, rate, args.secs, seq, users);
        let (per_user, churned) = tokio::join!(per_user, churning);
        let (to, churn_secs) = churned?;
        Ok(FeedWindow {
            per_user: per_user?,
            diffs: to.since(from),
            churn_secs,
            joins: pool.joins.load(Ordering::Relaxed) - joins,
            leaves: pool.leaves.load(Ordering::Relaxed) - leaves,
        })
    }

    /// Waits until every join and leave of the pool is answered and every watcher's list is the set of
    /// users online, or `SETTLE_INTERVALS` intervals and `SETTLE_MARGIN`; then how the lists differ.
    async fn check_lists(&self, sockets: &Sockets, interval: Duration) -> ListCheck {
        let started = Instant::now();
        let deadline = started + interval * SETTLE_INTERVALS + SETTLE_MARGIN;
        loop {
            let pool_settled = self.pool.settled();
            let online = sockets.online(self.sizes, &self.pool);
            let differences = self.watch.differences(&sockets.watchers.indices, &online);
            let matched = pool_settled && differences.watchers_differing == 0;
            if matched || Instant::now() >= deadline {
                return ListCheck {
                    differences,
                    users_online: online.iter().filter(|&&o| o).count() as u64,
                    pool_settled,
                    secs: started.elapsed().as_secs_f64(),
                };
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The feed's figures over the measured windows, `lists` at the end.
    fn feed_figures(
        &self,
        totals: FeedTotals,
        watchers: u64,
        early_below_us: u64,
        lists: Option<ListCheck>,
    ) -> FeedFigures {
        let t = &self.watch.tally;
        let d = totals.diffs;
        let per_watcher_sec = (watchers as f64 * totals.churn_secs).max(f64::MIN_POSITIVE);
        let per_diff = |n: u64| n as f64 / d.diffs as f64;
        let states = t.states.load(Ordering::Relaxed);
        let per_state = |n: u64| n as f64 / states as f64;
        let closest = t.closest_us.load(Ordering::Relaxed);
        FeedFigures {
            churn_secs: totals.churn_secs,
            diffs: d.diffs,
            diffs_per_watcher_per_sec: d.diffs as f64 / per_watcher_sec,
            diffs_per_watcher_per_sec_per_window: totals.diffs_per_watcher_per_sec,
            diff_bytes_per_watcher_per_sec: d.bytes as f64 / per_watcher_sec,
            mean_diff_bytes: per_diff(d.bytes),
            mean_joins_per_diff: per_diff(d.joins),
            mean_leaves_per_diff: per_diff(d.leaves),
            diff_spacing: self.watch.spacing(),
            closest_diffs_ms: if closest == u64::MAX {
                f64::NAN
            } else {
                closest as f64 / 1000.0
            },
            early_below_ms: early_below_us as f64 / 1000.0,
            early_diffs: t.early_diffs.load(Ordering::Relaxed),
            initial_state: InitialState {
                watchers: states,
                mean_bytes: per_state(t.state_bytes.load(Ordering::Relaxed)),
                max_frame_bytes: t.state_bytes_max.load(Ordering::Relaxed),
                mean_users: per_state(t.state_users.load(Ordering::Relaxed)),
            },
            later_states: t.later_states.load(Ordering::Relaxed),
            suspended: t.suspended.load(Ordering::Relaxed),
            malformed: t.malformed.load(Ordering::Relaxed),
            watchers_closed: t.closed.load(Ordering::Relaxed),
            lists,
        }
    }
}

impl FeedTotals {
    fn add(&mut self, w: &FeedWindow, watchers: u64) {
        self.diffs = self.diffs.add(w.diffs);
        self.churn_secs += w.churn_secs;
        self.joins += w.joins;
        self.leaves += w.leaves;
        let per_watcher_sec = (watchers as f64 * w.churn_secs).max(f64::MIN_POSITIVE);
        self.diffs_per_watcher_per_sec
            .push(w.diffs.diffs as f64 / per_watcher_sec);
    }
}

/// The interval of the target's feed, from its settings (the scenario always sets it).
fn interval_of(target: &Target) -> Result<Duration> {
    let ms: u64 = target
        .setting(FEED_INTERVAL)
        .context("the scenario sets the feed's interval")?
        .parse()
        .context("presence.feed_interval_ms is a number of milliseconds")?;
    Ok(Duration::from_millis(ms))
}

impl Measure for PresenceFeed {
    type Figures = PresenceFeedFigures;

    const CONDITIONS: &'static [Condition] = CONDITIONS;

    fn gateway_settings(args: &Args) -> Vec<(String, String)> {
        vec![
            (env_var(FEED_INTERVAL), FEED_INTERVAL_MS.to_string()),
            // Every user of the run may be online at once: the feed is never suspended.
            (env_var(FEED_MAX_USERS), Sizes::of(args).all().to_string()),
        ]
    }

    async fn run(args: &Args, target: &Target) -> Result<Run<PresenceFeedFigures>> {
        let sizes = Sizes::of(args);
        ensure!(
            sizes.all() <= MAX_SOCKETS,
            "{} users' sockets and a churn pool of {} are more than one process may hold ({MAX_SOCKETS})",
            sizes.users,
            sizes.pool
        );
        let presence_feed = target
            .setting(FEED)
            .context("presence-feed runs on the gateways of its conditions")?
            .to_owned();
        let feed_on = presence_feed != FEED_OFF;
        let interval = interval_of(target)?;
        let early_below_us = interval.mul_f64(1.0 - JITTER_SHARE).as_micros() as u64;
        let feed = Feed {
            args,
            target,
            sizes,
            stats: Arc::new(Stats::new(sizes.users)),
            watch: Arc::new(Watch::new(sizes.watchers, sizes.all(), early_below_us)),
            pool: Arc::new(Pool::new(sizes.pool)),
        };
        println!(
            "  presence.feed {presence_feed}: {} users' sockets ({} watching), a churn pool of {} users, {:.0} joins and leaves a second",
            sizes.users, sizes.watchers, sizes.pool, args.churn
        );
        let (sockets, mut churn) = target
            .turn(Phase::Setup, feed.open(feed_on, interval))
            .await?;
        let watchers = sockets.watchers.opened;

        let first_rate = args.rates[0];
        let warm = target.turn(Phase::Setup, feed.window(&mut churn, first_rate, 0));
        let warm_up = WarmUp::of(first_rate, &warm.await?.per_user);
        let mut seq = warm_up.next_seq();
        let rounds = args.rounds();
        let mut per_rate: Vec<RateTotals> =
            args.rates.iter().map(|_| RateTotals::default()).collect();
        let mut totals = FeedTotals::default();
        for round in 0..rounds {
            for i in in_round_order(round, (0..args.rates.len()).collect()) {
                let rate = args.rates[i];
                let measured = async {
                    feed.watch.check_spacing(true);
                    let w = feed.window(&mut churn, rate, seq).await;
                    feed.watch.check_spacing(false);
                    w
                };
                let w = target.turn(Phase::Measured, measured).await?;
                seq += w.per_user.sent;
                let d = w.diffs;
                println!(
                    "  round {}/{rounds}, {rate:.0} msg/s: {} of {} delivered, p99 {:.3} ms; {} diffs ({:.0} bytes each), {} joins and {} leaves answered; server cpu {:.0} %",
                    round + 1,
                    w.per_user.delivered,
                    w.per_user.sent,
                    percentiles(&w.per_user.counts).p99_ms,
                    d.diffs,
                    d.bytes as f64 / d.diffs.max(1) as f64,
                    w.joins,
                    w.leaves,
                    w.per_user.server_cpu,
                );
                per_rate[i].add(&w.per_user);
                totals.add(&w, watchers);
            }
        }

        let checked = async {
            let lists = if feed_on {
                Some(feed.check_lists(&sockets, interval).await)
            } else {
                None
            };
            let churn_secs = totals.churn_secs.max(f64::MIN_POSITIVE);
            let churn = ChurnFigures {
                joins: totals.joins,
                leaves: totals.leaves,
                joins_per_sec: totals.joins as f64 / churn_secs,
                leaves_per_sec: totals.leaves as f64 / churn_secs,
                refused: feed.pool.refused.load(Ordering::Relaxed),
            };
            let figures = PresenceFeedFigures {
                presence_feed,
                feed_interval_ms: interval.as_millis() as u64,
                rounds,
                users: sizes.users,
                watchers: sizes.watchers,
                watchers_opened: watchers,
                churn_pool: sizes.pool,
                online_users: sizes.online(),
                churn_offered_per_sec: args.churn,
                warm_up,
                points: args
                    .rates
                    .iter()
                    .zip(per_rate)
                    .map(|(&rate, t)| RatePoint::of(rate, t))
                    .collect(),
                churn,
                feed: feed.feed_figures(totals, watchers, early_below_us, lists),
            };
            let run = target.finish_opened(sockets.opened(), figures, &feed.stats)?;
            sockets.drop_all().await;
            Ok(run)
        };
        target.turn(Phase::Setup, checked).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, PresenceFeedFigures>) {
        for (i, rate) in args.rates.iter().enumerate() {
            let point = move |r: &TargetReport<PresenceFeedFigures>| r.figures.points[i].latency;
            rows.info(format!("per-user {rate} msg/s: p50 (ms)"), move |r| {
                point(r).p50_ms
            });
            rows.info(format!("per-user {rate} msg/s: p99 (ms)"), move |r| {
                point(r).p99_ms
            });
            rows.info(format!("per-user {rate} msg/s: p999 (ms)"), move |r| {
                point(r).p999_ms
            });
            rows.zero(format!("per-user {rate} msg/s: lost"), move |r| {
                r.figures.points[i].lost as f64
            });
        }
        rows.info("presence_diff frames per watcher per second", |r| {
            r.figures.feed.diffs_per_watcher_per_sec
        });
        rows.info("presence_diff bytes per watcher per second", |r| {
            r.figures.feed.diff_bytes_per_watcher_per_sec
        });
        rows.info("  … users per diff (joins + leaves)", |r| {
            r.figures.feed.mean_joins_per_diff + r.figures.feed.mean_leaves_per_diff
        });
        rows.info(
            "initial list bytes per watcher (presence_state and its join frames)",
            |r| r.figures.feed.initial_state.mean_bytes,
        );
        rows.info("  … users in it", |r| {
            r.figures.feed.initial_state.mean_users
        });
        rows.info("closest two diffs on one watcher (ms)", |r| {
            r.figures.feed.closest_diffs_ms
        });
        rows.zero(
            format!(
                "diffs closer than {:.0} % of the interval to the last",
                100.0 * (1.0 - JITTER_SHARE)
            ),
            |r| r.figures.feed.early_diffs as f64,
        );
        rows.zero(
            "watchers whose list is not who is online, at the end",
            |r| {
                r.figures
                    .feed
                    .lists
                    .as_ref()
                    .map_or(f64::NAN, |l| l.differences.watchers_differing as f64)
            },
        );
        rows.info("churn: presence joins per second (as many leaves)", |r| {
            r.figures.churn.joins_per_sec
        });
    }

    fn failures(report: &TargetReport<PresenceFeedFigures>) -> Vec<String> {
        let figures = &report.figures;
        let feed = &figures.feed;
        let mut failures = Vec::new();
        let mut fail = |broken: bool, what: String| {
            if broken {
                failures.push(what);
            }
        };
        fail(
            report.server.unexpected_closes > 0,
            format!(
                "{} sockets closed by the gateway or broken ({} of them watchers)",
                report.server.unexpected_closes, feed.watchers_closed
            ),
        );
        fail(
            figures.churn.refused > 0,
            format!(
                "{} joins or leaves of the churn refused",
                figures.churn.refused
            ),
        );
        let frames = feed.diffs + feed.initial_state.watchers + feed.later_states + feed.suspended;
        if figures.presence_feed == FEED_OFF {
            fail(
                frames > 0,
                format!("{frames} feed frames with the feed off"),
            );
            return failures;
        }
        fail(
            feed.initial_state.watchers < figures.watchers_opened,
            format!(
                "{} of {} watchers got a presence_state",
                feed.initial_state.watchers, figures.watchers_opened
            ),
        );
        fail(
            feed.diffs == 0,
            "no presence_diff in the measured windows while users came and went".to_owned(),
        );
        fail(
            feed.early_diffs > 0,
            format!(
                "{} diffs came within {:.0} ms of the watcher's last one (interval {} ms)",
                feed.early_diffs, feed.early_below_ms, figures.feed_interval_ms
            ),
        );
        fail(
            feed.later_states + feed.suspended > 0,
            format!(
                "{} later presence_state and {} presence_suspended frames",
                feed.later_states, feed.suspended
            ),
        );
        fail(
            feed.malformed > 0,
            format!(
                "{} feed frames the watchers' lists could not take",
                feed.malformed
            ),
        );
        if let Some(lists) = &feed.lists {
            let d = &lists.differences;
            fail(
                d.watchers_differing > 0 || !lists.pool_settled,
                format!(
                    "at the end, {} of {} watchers' lists were not who is online ({} users missing, {} in excess; the pool's joins and leaves {}answered)",
                    d.watchers_differing,
                    d.watchers_checked,
                    d.users_missing,
                    d.users_in_excess,
                    if lists.pool_settled { "" } else { "not all " }
                ),
            );
        }
        failures
    }
}
