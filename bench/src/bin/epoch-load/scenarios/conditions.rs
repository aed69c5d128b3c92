//! A run that compares the gateway with itself under other settings (`presence-feed`: the presence feed
//! off and on), as the main process runs it.
//!
//! Each condition of the scenario ([`super::Measure::CONDITIONS`]) is a gateway target of its own: a
//! gateway with the scenario's settings, then the condition's, on a nats-server of its own (so that neither
//! sees the other's presence records), with a driver of its own holding its sockets. The drivers take turns
//! as the targets of any run do ([`driver::take_turns`]), so the conditions' windows alternate, A B A B, on
//! servers that stay up with their sockets open. A setting a condition makes may not come from the command
//! line as well: it would make the conditions alike. The table has a column per condition and the last
//! condition's ratio to the first; the report has each condition's part by its name.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use epoch_gateway::config::env_var;

use super::{Measure, all_headlines, conclude};
use crate::cli::Args;
use crate::clients::Kind;
use crate::driver;
use crate::report::{ConditionsReport, Headlines, condition_table, print_condition_headlines};
use crate::servers::Server;

/// One condition: its name in the report, its label in the table and progress lines, and the gateway
/// settings (`section.key`, value) that make it.
pub(crate) struct Condition {
    pub(crate) name: &'static str,
    pub(crate) label: &'static str,
    pub(crate) settings: &'static [(&'static str, &'static str)],
}

/// Starts a gateway per condition, has the scenario run on each in alternated turns, prints the table
/// and writes the report; fails when a condition's run broke a promise of the gateway.
pub(super) async fn measure<M: Measure>(args: &Args) -> Result<()> {
    let conditions = M::CONDITIONS;
    for (key, _) in conditions.iter().flat_map(|c| c.settings) {
        ensure!(
            args.setting(key).is_none(),
            "{} sets {key} itself, once per condition: leave it off the command line",
            args.scenario.name()
        );
    }
    let mut servers = Vec::with_capacity(conditions.len());
    for condition in conditions {
        let mut settings = M::gateway_settings(args);
        settings.extend(
            condition
                .settings
                .iter()
                .map(|(key, value)| (env_var(key), (*value).to_owned())),
        );
        let mut server = Server::start(args, Kind::Gateway, settings).await?;
        server.condition = Some(condition.label);
        println!(
            "{}: {} sockets on {} (gateway pid {}, its nats-server pid {})",
            condition.label,
            args.sockets,
            server.addr,
            server.pid,
            server.backing_pid.unwrap_or_default(),
        );
        servers.push(server);
    }
    let outcomes = driver::take_turns(&servers).await?;
    // The drivers report in the servers' order, which is the conditions'.
    let named: Vec<_> = conditions
        .iter()
        .zip(&outcomes)
        .map(|(condition, (_, outcome))| (condition.name, outcome))
        .collect();
    let mut rows = Headlines::of(None);
    all_headlines::<M>(args, &mut rows);
    let headlines = condition_table(rows, &named);
    let failures: Vec<String> = conditions
        .iter()
        .zip(&outcomes)
        .flat_map(|(condition, (_, outcome))| {
            outcome
                .failures
                .iter()
                .map(|f| format!("{}: {f}", condition.label))
        })
        .collect();
    let labels: Vec<_> = conditions.iter().map(|c| (c.name, c.label)).collect();
    print_condition_headlines(&headlines, &labels);
    let report = ConditionsReport {
        scenario: args.scenario,
        args,
        cpus: epoch_bench::cpus(),
        headlines: &headlines,
        failures: &failures,
        conditions: named
            .iter()
            .map(|(name, outcome)| (*name, &outcome.report))
            .collect::<BTreeMap<_, _>>(),
    };
    conclude(args, &report, &failures)
}
