//! The report of a run, as typed values: written as JSON (`--json`, read by `scripts/plot_bench.py`) and
//! summed up as a table of headline figures, each with the gateway's value, the baseline's, their ratio,
//! and the target when it has one.
//!
//! Each server's part is a [`TargetReport`]: how the sockets opened, the scenario's own figures (a type of
//! each scenario, in `scenarios/`), and the server's CPU and memory; in JSON the three are one object.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cli::{Args, Scenario};
use crate::clients::Held;

/// Everything one run measured.
#[derive(Serialize)]
pub(crate) struct Report<'a, F> {
    pub(crate) scenario: Scenario,
    pub(crate) args: &'a Args,
    pub(crate) cpus: usize,
    pub(crate) headlines: &'a [Headline],
    /// Promises of the gateway the run found broken (the run failed): empty when it passed.
    pub(crate) failures: &'a [String],
    pub(crate) gateway: Option<&'a TargetReport<F>>,
    pub(crate) baseline: Option<&'a TargetReport<F>>,
}

/// One server's run of a scenario, with the scenario's figures `F`.
#[derive(Serialize)]
pub(crate) struct TargetReport<F> {
    #[serde(flatten)]
    pub(crate) opened: Opened,
    #[serde(flatten)]
    pub(crate) figures: F,
    #[serde(flatten)]
    pub(crate) server: ServerFigures,
    /// The load tool's own CPU over this server's run (the two share the machine's cores).
    pub(crate) load_tool_cpu_secs: f64,
    pub(crate) load_tool_cpu_percent: f64,
    /// The JetStream nats-server behind the gateway (absent for the baseline, which is that server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backing_nats_cpu_percent: Option<f64>,
}

/// How opening the sockets went.
#[derive(Serialize, Clone)]
pub(crate) struct Opened {
    pub(crate) sockets_opened: u64,
    pub(crate) sockets_failed: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) open_secs: f64,
    pub(crate) connect_rate_per_sec: f64,
}

impl Opened {
    pub(crate) fn of<T: 'static>(held: &Held<T>) -> Self {
        Self {
            sockets_opened: held.opened,
            sockets_failed: held.failed,
            first_error: held.first_error.clone(),
            open_secs: held.secs,
            connect_rate_per_sec: held.connect_rate(),
        }
    }
}

/// The server under test at the end of a scenario.
#[derive(Serialize)]
pub(crate) struct ServerFigures {
    pub(crate) server_rss_mib: f64,
    /// From the start of the scenario's measurement to its end.
    pub(crate) server_cpu_percent: f64,
    /// Sockets closed by the server, or broken, while held.
    pub(crate) unexpected_closes: u64,
    /// The same by close code (0: no close frame).
    pub(crate) closes_by_code: BTreeMap<String, u64>,
}

/// A headline figure of a scenario: the gateway's, the baseline's, their ratio, and the target.
#[derive(Serialize)]
pub(crate) struct Headline {
    figure: String,
    gateway: Option<f64>,
    baseline: Option<f64>,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

/// The headline table of a run, built one figure at a time from both servers' reports.
pub(crate) struct Headlines<'a, F> {
    gateway: Option<&'a TargetReport<F>>,
    baseline: Option<&'a TargetReport<F>>,
    rows: Vec<Headline>,
}

impl<'a, F> Headlines<'a, F> {
    pub(crate) fn new(
        gateway: Option<&'a TargetReport<F>>,
        baseline: Option<&'a TargetReport<F>>,
    ) -> Self {
        Self {
            gateway,
            baseline,
            rows: Vec::new(),
        }
    }

    /// A figure with no target.
    pub(crate) fn info(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
    ) {
        self.push(
            figure.into(),
            value,
            "—",
            None::<fn(f64, Option<f64>) -> bool>,
        );
    }

    /// A count whose target is 0 (messages lost, sockets closed).
    pub(crate) fn zero(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
    ) {
        self.judged(figure, value, "0", |g, _| g == 0.0);
    }

    /// A figure judged against `target` by `met(gateway's value, gateway / baseline)`.
    pub(crate) fn judged(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
        target: &str,
        met: impl Fn(f64, Option<f64>) -> bool,
    ) {
        self.push(figure.into(), value, target, Some(met));
    }

    fn push(
        &mut self,
        figure: String,
        value: impl Fn(&TargetReport<F>) -> f64,
        target: &str,
        met: Option<impl Fn(f64, Option<f64>) -> bool>,
    ) {
        // A figure that could not be measured (no samples: NaN) has no value.
        let value_of =
            |report: Option<&TargetReport<F>>| report.map(&value).filter(|v| !v.is_nan());
        let (gateway, baseline) = (value_of(self.gateway), value_of(self.baseline));
        let ratio = gateway
            .zip(baseline)
            .filter(|&(_, b)| b != 0.0)
            .map(|(g, b)| g / b);
        self.rows.push(Headline {
            figure,
            gateway,
            baseline,
            ratio,
            target: target.to_owned(),
            met: gateway.zip(met).map(|(g, met)| met(g, ratio)),
        });
    }

    pub(crate) fn into_rows(self) -> Vec<Headline> {
        self.rows
    }
}

pub(crate) fn print_headlines(rows: &[Headline]) {
    let width = rows
        .iter()
        .map(|r| r.figure.chars().count())
        .max()
        .unwrap_or(0);
    let num = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.3}"));
    println!(
        "\n{:width$}  {:>12}  {:>12}  {:>8}  {:<28}  met",
        "figure", "gateway", "nats-ws", "ratio", "target"
    );
    println!("{}", "-".repeat(width + 76));
    for r in rows {
        let met = r.met.map_or("", |ok| if ok { "yes" } else { "NO" });
        println!(
            "{:width$}  {:>12}  {:>12}  {:>8}  {:<28}  {met}",
            r.figure,
            num(r.gateway),
            num(r.baseline),
            r.ratio.map_or("—".to_owned(), |v| format!("{v:.2}")),
            r.target
        );
    }
}
