//! The report of a run, as typed values: written as JSON (`--json`, read by `scripts/plot_bench.py`) and
//! summed up as a table of headline figures, each with the value of every server measured (the gateway,
//! nats-server's WebSocket listener, the bare server), the gateway's ratio to each of the other two, and
//! the target when it has one. An A/B test adds a second gateway (`gateway-b`) and its ratio to the first.
//!
//! Each server's part is a [`TargetReport`], built where that server's load ran (its driver): how the
//! sockets opened, the scenario's own figures (a type of each scenario, in `scenarios/`), the server's
//! memory and closes, and the CPU of its measured turns; in JSON the four are one object. The driver also
//! takes its values of the headline rows ([`Headlines`] over its report); the main process runs the same
//! row definitions without a report and puts every server's values side by side ([`table`]).
//!
//! A run that compares the gateway with itself under other settings (presence-feed: the feed off and on) has
//! a table of its own, a column per condition and the last condition's ratio to the first
//! ([`condition_table`]), and a report with each condition's part ([`ConditionsReport`]).
//!
//! The rules of the table: a ratio needs both of its sides. When the gateway and another server both ran,
//! a figure compared between them that either lacks is a failure of the run, never a pass; a target set
//! against nats-server is not judged when nats-server did not run.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cli::{Args, Scenario};
use crate::clients::{Held, Kind};
use crate::driver::Outcome;

/// Everything one run measured.
#[derive(Serialize)]
pub(crate) struct Report<'a> {
    pub(crate) scenario: Scenario,
    pub(crate) args: &'a Args,
    pub(crate) cpus: usize,
    pub(crate) headlines: &'a [Headline],
    /// Promises broken and ratios that lack a side (the run failed): empty when it passed.
    pub(crate) failures: &'a [String],
    pub(crate) gateway: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) gateway_b: Option<&'a serde_json::Value>,
    pub(crate) nats_ws: Option<&'a serde_json::Value>,
    pub(crate) bare: Option<&'a serde_json::Value>,
}

/// Everything a run that compares the gateway with itself measured.
#[derive(Serialize)]
pub(crate) struct ConditionsReport<'a> {
    pub(crate) scenario: Scenario,
    pub(crate) args: &'a Args,
    pub(crate) cpus: usize,
    pub(crate) headlines: &'a [ConditionHeadline],
    /// Promises broken (the run failed): empty when it passed.
    pub(crate) failures: &'a [String],
    /// Each condition's `TargetReport`, by the condition's name.
    pub(crate) conditions: BTreeMap<&'static str, &'a serde_json::Value>,
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
    #[serde(flatten)]
    pub(crate) cpu: CpuFigures,
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
        Self::of_all(&[held])
    }

    /// How opening went for groups of sockets opened one after the other.
    pub(crate) fn of_all<T: 'static>(groups: &[&Held<T>]) -> Self {
        let opened = groups.iter().map(|held| held.opened).sum::<u64>();
        let secs = groups.iter().map(|held| held.secs).sum::<f64>();
        Self {
            sockets_opened: opened,
            sockets_failed: groups.iter().map(|held| held.failed).sum(),
            first_error: groups.iter().find_map(|held| held.first_error.clone()),
            open_secs: secs,
            connect_rate_per_sec: opened as f64 / secs,
        }
    }
}

/// The server under test at the end of a scenario, its sockets still open.
#[derive(Serialize)]
pub(crate) struct ServerFigures {
    pub(crate) server_rss_mib: f64,
    /// The nats-server behind the gateway or the bare server (none for nats-ws, which is that server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backing_nats_rss_mib: Option<f64>,
    /// Sockets closed by the server, or broken, while held.
    pub(crate) unexpected_closes: u64,
    /// The same by close code (0: no close frame).
    pub(crate) closes_by_code: BTreeMap<String, u64>,
}

/// CPU over the target's measured turns (its windows, steps, measurements), not over its setup or the
/// other targets' turns.
#[derive(Serialize)]
pub(crate) struct CpuFigures {
    pub(crate) measured_secs: f64,
    pub(crate) server_cpu_percent: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backing_nats_cpu_percent: Option<f64>,
    /// The load tool's own (the target's driver): it shares the machine's cores with the servers.
    pub(crate) load_tool_cpu_secs: f64,
    pub(crate) load_tool_cpu_percent: f64,
}

/// How a headline row is judged.
#[derive(Clone, Copy)]
enum Judge {
    Not,
    /// By the gateway's value alone.
    Alone(fn(f64) -> bool),
    /// By the gateway's value and its ratio to nats-server's.
    AgainstNats(fn(f64, f64) -> bool),
    /// By the gateway's value and its ratio to the bare server's.
    AgainstBare(fn(f64, f64) -> bool),
}

/// A headline row, apart from its values.
struct Row {
    figure: String,
    target: String,
    judge: Judge,
    /// Whether every server has the figure, so that each ratio must have both sides.
    compared: bool,
}

/// The headline rows of a scenario, defined one at a time; with a report, each row's value in it.
pub(crate) struct Headlines<'a, F> {
    report: Option<&'a TargetReport<F>>,
    rows: Vec<Row>,
    values: Vec<Option<f64>>,
}

impl<'a, F> Headlines<'a, F> {
    /// The rows, with their values in `report` when there is one.
    pub(crate) fn of(report: Option<&'a TargetReport<F>>) -> Self {
        Self {
            report,
            rows: Vec::new(),
            values: Vec::new(),
        }
    }

    /// A figure every server has, with no target.
    pub(crate) fn info(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
    ) {
        self.push(figure, "—", Judge::Not, true, value);
    }

    /// A figure only some servers have (`is_online`, a nats-server behind the server): no ratio is owed.
    pub(crate) fn own(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
    ) {
        self.push(figure, "—", Judge::Not, false, value);
    }

    /// A count whose target is 0 (messages lost, sockets closed).
    pub(crate) fn zero(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
    ) {
        self.judged(figure, value, "0", |g| g == 0.0);
    }

    /// A figure every server has, whose target is met when `met(gateway's value)`.
    pub(crate) fn judged(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
        target: &str,
        met: fn(f64) -> bool,
    ) {
        self.push(figure, target, Judge::Alone(met), true, value);
    }

    /// [`Headlines::judged`] for a figure only the gateway has.
    pub(crate) fn own_judged(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
        target: &str,
        met: fn(f64) -> bool,
    ) {
        self.push(figure, target, Judge::Alone(met), false, value);
    }

    /// A figure whose target is met when `met(gateway's value, gateway / nats-server)`; not judged when
    /// nats-server did not run.
    pub(crate) fn against_nats(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
        target: &str,
        met: fn(f64, f64) -> bool,
    ) {
        self.push(figure, target, Judge::AgainstNats(met), true, value);
    }

    /// A figure whose target is met when `met(gateway's value, gateway / bare server)`; not judged when
    /// the bare server did not run.
    pub(crate) fn against_bare(
        &mut self,
        figure: impl Into<String>,
        value: impl Fn(&TargetReport<F>) -> f64,
        target: &str,
        met: fn(f64, f64) -> bool,
    ) {
        self.push(figure, target, Judge::AgainstBare(met), true, value);
    }

    fn push(
        &mut self,
        figure: impl Into<String>,
        target: &str,
        judge: Judge,
        compared: bool,
        value: impl Fn(&TargetReport<F>) -> f64,
    ) {
        self.rows.push(Row {
            figure: figure.into(),
            target: target.to_owned(),
            judge,
            compared,
        });
        // A figure that could not be measured (no samples: NaN) has no value.
        self.values
            .push(self.report.map(&value).filter(|v| v.is_finite()));
    }

    /// The report's value of every row, in order.
    pub(crate) fn into_values(self) -> Vec<Option<f64>> {
        self.values
    }
}

/// A headline figure of a run: every server's value, the gateway's ratios, the target and whether it was
/// met.
#[derive(Serialize)]
pub(crate) struct Headline {
    figure: String,
    gateway: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_b: Option<f64>,
    nats_ws: Option<f64>,
    bare: Option<f64>,
    gateway_to_nats_ws: Option<f64>,
    gateway_to_bare: Option<f64>,
    /// gateway-b's value over the gateway's (an A/B test: below 1, B is lower).
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_b_to_gateway: Option<f64>,
    target: String,
    met: Option<bool>,
}

/// The headline table of `rows` over the servers' `outcomes`, and the ratios that lack a side.
pub(crate) fn table<F>(
    rows: Headlines<'_, F>,
    outcomes: &[(Kind, Outcome)],
) -> (Vec<Headline>, Vec<String>) {
    let mut failures = Vec::new();
    let mut table = Vec::with_capacity(rows.rows.len());
    for (i, row) in rows.rows.into_iter().enumerate() {
        // Outer `None`: the server did not run; inner: it ran and has no value.
        let value = |kind: Kind| {
            outcomes
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, outcome)| outcome.values.get(i).copied().flatten())
        };
        let (gateway, nats, bare) = (value(Kind::Gateway), value(Kind::Nats), value(Kind::Bare));
        let gateway_b = value(Kind::GatewayB);
        let ratio = |other: Option<Option<f64>>| {
            gateway
                .flatten()
                .zip(other.flatten())
                .filter(|&(_, o)| o != 0.0)
                .map(|(g, o)| g / o)
        };
        if row.compared && gateway.is_some() {
            let others = [
                (Kind::GatewayB, gateway_b),
                (Kind::Nats, nats),
                (Kind::Bare, bare),
            ];
            let ran: Vec<(Kind, Option<f64>)> = others
                .into_iter()
                .filter_map(|(kind, v)| Some((kind, v?)))
                .collect();
            if !ran.is_empty() && gateway.flatten().is_none() {
                failures.push(format!(
                    "{}: the gateway has no value, so no ratio",
                    row.figure.trim()
                ));
            }
            for (kind, _) in ran.iter().filter(|(_, v)| v.is_none()) {
                failures.push(format!(
                    "{}: {} has no value, so no ratio to it",
                    row.figure.trim(),
                    kind.label()
                ));
            }
        }
        let (to_nats, to_bare) = (ratio(nats), ratio(bare));
        // A missing side is a failure above, and never a target met.
        let against = |other: Option<Option<f64>>, to: Option<f64>, met: fn(f64, f64) -> bool| {
            other.map(|_| gateway.flatten().zip(to).is_some_and(|(g, r)| met(g, r)))
        };
        let met = match row.judge {
            Judge::Not => None,
            Judge::Alone(met) => gateway.flatten().map(met),
            Judge::AgainstNats(met) => against(nats, to_nats, met),
            Judge::AgainstBare(met) => against(bare, to_bare, met),
        };
        let b_to_gateway = gateway_b
            .flatten()
            .zip(gateway.flatten())
            .filter(|&(_, g)| g != 0.0)
            .map(|(b, g)| b / g);
        table.push(Headline {
            figure: row.figure,
            gateway: gateway.flatten(),
            gateway_b: gateway_b.flatten(),
            nats_ws: nats.flatten(),
            bare: bare.flatten(),
            gateway_to_nats_ws: to_nats,
            gateway_to_bare: to_bare,
            gateway_b_to_gateway: b_to_gateway,
            target: row.target,
            met,
        });
    }
    (table, failures)
}

/// A headline figure of a run that compares the gateway with itself: each condition's value, the last
/// condition's ratio to the first, the target and whether every condition with a value met it.
#[derive(Serialize)]
pub(crate) struct ConditionHeadline {
    figure: String,
    values: BTreeMap<&'static str, Option<f64>>,
    last_to_first: Option<f64>,
    target: String,
    met: Option<bool>,
}

/// The headline table of `rows` over each condition's outcome, in the conditions' order (by name).
pub(crate) fn condition_table<F>(
    rows: Headlines<'_, F>,
    outcomes: &[(&'static str, &Outcome)],
) -> Vec<ConditionHeadline> {
    rows.rows
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let values: Vec<(&'static str, Option<f64>)> = outcomes
                .iter()
                .map(|(name, outcome)| (*name, outcome.values.get(i).copied().flatten()))
                .collect();
            let (first, last) = (values.first(), values.last());
            let last_to_first = first
                .and_then(|f| f.1)
                .zip(last.and_then(|l| l.1))
                .filter(|&(f, _)| f != 0.0 && values.len() > 1)
                .map(|(f, l)| l / f);
            // A target against another server has no side to judge here.
            let met = match row.judge {
                Judge::Alone(met) => {
                    let judged: Vec<bool> = values.iter().filter_map(|(_, v)| v.map(met)).collect();
                    (!judged.is_empty()).then(|| judged.iter().all(|&m| m))
                }
                Judge::Not | Judge::AgainstNats(_) | Judge::AgainstBare(_) => None,
            };
            ConditionHeadline {
                figure: row.figure,
                values: values.into_iter().collect(),
                last_to_first,
                target: row.target,
                met,
            }
        })
        .collect()
}

fn value_cell(v: Option<f64>) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.3}"))
}

fn ratio_cell(v: Option<f64>) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.2}"))
}

/// A column of the printed table: its heading, width and cell.
type Column = (&'static str, usize, fn(&Headline) -> String);

/// Prints the table with a column per server that ran, and the gateway's ratios to the others.
pub(crate) fn print_headlines(rows: &[Headline], kinds: &[Kind]) {
    let ran = |kind| kinds.contains(&kind);
    let ratios = ran(Kind::Gateway);
    let candidates: [(bool, Column); 7] = [
        (
            ran(Kind::Gateway),
            ("gateway", 12, |r| value_cell(r.gateway)),
        ),
        (
            ran(Kind::GatewayB),
            ("gateway-b", 12, |r| value_cell(r.gateway_b)),
        ),
        (ran(Kind::Nats), ("nats-ws", 12, |r| value_cell(r.nats_ws))),
        (ran(Kind::Bare), ("bare", 12, |r| value_cell(r.bare))),
        (
            ratios && ran(Kind::Nats),
            ("gw/nats", 8, |r| ratio_cell(r.gateway_to_nats_ws)),
        ),
        (
            ratios && ran(Kind::Bare),
            ("gw/bare", 8, |r| ratio_cell(r.gateway_to_bare)),
        ),
        (
            ratios && ran(Kind::GatewayB),
            ("b/gw", 8, |r| ratio_cell(r.gateway_b_to_gateway)),
        ),
    ];
    let columns: Vec<Column> = candidates
        .into_iter()
        .filter_map(|(shown, column)| shown.then_some(column))
        .collect();
    let headings: Vec<(&str, usize)> = columns.iter().map(|&(name, w, _)| (name, w)).collect();
    let printed: Vec<Printed<'_>> = rows
        .iter()
        .map(|r| Printed {
            figure: &r.figure,
            cells: columns.iter().map(|(_, _, cell)| cell(r)).collect(),
            target: &r.target,
            met: r.met,
        })
        .collect();
    print_table(&headings, &printed);
}

/// Prints a conditions table: a column per condition (`(name, label)`, in order), then the last one's ratio
/// to the first.
pub(crate) fn print_condition_headlines(
    rows: &[ConditionHeadline],
    conditions: &[(&'static str, &'static str)],
) {
    let mut headings: Vec<(&str, usize)> =
        conditions.iter().map(|&(_, label)| (label, 12)).collect();
    headings.push(("ratio", 8));
    let printed: Vec<Printed<'_>> = rows
        .iter()
        .map(|r| {
            let mut cells: Vec<String> = conditions
                .iter()
                .map(|(name, _)| value_cell(r.values.get(name).copied().flatten()))
                .collect();
            cells.push(ratio_cell(r.last_to_first));
            Printed {
                figure: &r.figure,
                cells,
                target: &r.target,
                met: r.met,
            }
        })
        .collect();
    print_table(&headings, &printed);
    if let (Some((_, first)), Some((_, last))) = (conditions.first(), conditions.last()) {
        println!("ratio: {last} / {first}");
    }
}

/// A row as printed: its figure, a cell per column, its target and whether it was met.
struct Printed<'a> {
    figure: &'a str,
    cells: Vec<String>,
    target: &'a str,
    met: Option<bool>,
}

/// Prints the figures, a column per `(heading, width)`, then each row's target and whether it was met.
fn print_table(headings: &[(&str, usize)], rows: &[Printed<'_>]) {
    let width = rows
        .iter()
        .map(|r| r.figure.chars().count())
        .max()
        .unwrap_or(0);
    let mut heading = format!("\n{:width$}", "figure");
    for (name, w) in headings {
        heading.push_str(&format!("  {name:>w$}"));
    }
    println!("{heading}  {:<28}  met", "target");
    let ruler = width + headings.iter().map(|(_, w)| w + 2).sum::<usize>() + 35;
    println!("{}", "-".repeat(ruler));
    for r in rows {
        let mut line = format!("{:width$}", r.figure);
        for ((_, w), cell) in headings.iter().zip(&r.cells) {
            line.push_str(&format!("  {cell:>w$}"));
        }
        let met = r.met.map_or("", |ok| if ok { "yes" } else { "NO" });
        println!("{line}  {:<28}  {met}", r.target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(values: &[Option<f64>]) -> Outcome {
        Outcome {
            report: serde_json::Value::Null,
            values: values.to_vec(),
            failures: Vec::new(),
        }
    }

    fn rows() -> Headlines<'static, ()> {
        let mut rows = Headlines::of(None);
        rows.against_nats("deliveries/s", |_| 0.0, "≥ 3× nats-ws", |_, r| r >= 3.0);
        rows.own("is_online p99", |_| 0.0);
        rows
    }

    #[test]
    fn a_ratio_without_its_other_side_fails_and_is_not_met() {
        let outcomes = [
            (Kind::Gateway, outcome(&[Some(9.0), Some(1.0)])),
            (Kind::Nats, outcome(&[None, None])),
            (Kind::Bare, outcome(&[Some(10.0), None])),
        ];
        let (rows, failures) = table(rows(), &outcomes);
        assert_eq!(rows[0].met, Some(false));
        assert_eq!(rows[0].gateway_to_bare, Some(0.9));
        assert_eq!(
            failures,
            ["deliveries/s: nats-ws has no value, so no ratio to it"]
        );
    }

    #[test]
    fn a_conditions_table_judges_every_condition_and_sets_the_last_against_the_first() {
        let mut rows = Headlines::<()>::of(None);
        rows.info("p99", |_| 0.0);
        rows.zero("closed", |_| 0.0);
        rows.zero("only on", |_| 0.0);
        let off = outcome(&[Some(2.0), Some(0.0), None]);
        let on = outcome(&[Some(3.0), Some(1.0), Some(0.0)]);
        let table = condition_table(rows, &[("off", &off), ("on", &on)]);
        assert_eq!(table[0].last_to_first, Some(1.5));
        assert_eq!(table[0].met, None);
        assert_eq!(table[1].met, Some(false), "one condition missed it");
        assert_eq!(table[2].met, Some(true), "judged where there is a value");
        assert_eq!(table[2].values["off"], None);
    }

    #[test]
    fn gateway_b_is_set_against_the_gateway_and_owes_its_side() {
        let outcomes = [
            (Kind::Gateway, outcome(&[Some(2.0), Some(1.0)])),
            (Kind::GatewayB, outcome(&[Some(1.5), None])),
        ];
        let (judged, failures) = table(rows(), &outcomes);
        assert_eq!(judged[0].gateway_b_to_gateway, Some(0.75));
        // Only the gateway and B ran: a target against nats-server is not judged.
        assert_eq!(judged[0].met, None);
        assert!(failures.is_empty(), "{failures:?}");
        let lacking = [
            (Kind::Gateway, outcome(&[Some(2.0), None])),
            (Kind::GatewayB, outcome(&[None, None])),
        ];
        assert_eq!(
            table(rows(), &lacking).1,
            ["deliveries/s: gateway-b has no value, so no ratio to it"]
        );
    }

    #[test]
    fn a_target_against_nats_is_not_judged_without_nats() {
        let outcomes = [(Kind::Gateway, outcome(&[Some(9.0), None]))];
        let (judged, failures) = table(rows(), &outcomes);
        assert_eq!(judged[0].met, None);
        assert!(failures.is_empty());
        let both = [
            (Kind::Gateway, outcome(&[Some(9.0), None])),
            (Kind::Nats, outcome(&[Some(2.0), None])),
        ];
        assert_eq!(table(rows(), &both).0[0].met, Some(true));
    }
}
